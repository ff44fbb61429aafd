"""FP32 -> FP8 converter (requantisation): round to nearest even, optional saturation."""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_stages, leading_zeros, pipe
from .formats import E4M3, E5M2, Format, FP32Layout

__all__ = ["FP32ToFP8"]


class FP32ToFP8(wiring.Component):
    """Convert a binary32 value to FP8 (E4M3 or E5M2, chosen at run time).

    Rounding is to nearest, ties to even, at the target mantissa width, including in the
    target's subnormal range (guard = first dropped bit, sticky = OR of the rest, round up
    when ``guard & (sticky | lsb)``). Overflow is decided on the *rounded* magnitude:

    * ``saturate = 1``: overflow and infinities become the largest finite value of the same
      sign (E4M3 +-448, E5M2 +-57344);
    * ``saturate = 0``: E5M2 overflows to +-infinity, E4M3 (no infinity) to NaN.

    NaN inputs give the canonical NaN of the format (E4M3 ``0x7F``, E5M2 ``0x7E``). The sign
    of zero results is kept.

    Parameters
    ----------
    stages : int
        0 for a combinational unit; 1 registers the result, 2 also the kept bits, guard and
        sticky, 3 also the decoded exponent and shift.

    Latency ``stages`` cycles; throughput one conversion per cycle.

    Members
    -------
    x : In(32)
        binary32 input.
    fmt : In(Format)
        Target format.
    saturate : In(1)
        Overflow policy (see above).
    y : Out(8)
        FP8 code.
    """

    x: In(32)
    fmt: In(Format)
    saturate: In(1)
    y: Out(8)

    def __init__(self, stages=0):
        self.stages = check_stages(stages, (0, 1, 2, 3), "converter", self)
        self.latency = stages
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        # Three sections; ``stages`` puts registers after the last (1), the middle (2) and the
        # first (3): decode (exponent, shift, trailing zeros), shift (kept bits, guard,
        # sticky), round (code, overflow, output).
        S = self.stages

        def section(values, registered, tag):
            return {k: pipe(m, v, registered, f"{tag}_{k}") for k, v in values.items()}

        # ---- decode ----
        x = data.View(FP32Layout, self.x)
        is_e5 = self.fmt == Format.E5M2
        sig = Signal(24)
        m.d.comb += sig.eq(Cat(x.mantissa, x.exponent != 0))
        # Everything here is a function of the biased exponent e and the format, computed from
        # e directly (one subtraction and comparisons with constants side by side, no chain):
        # with c = emin + 127 (the target's smallest normal exponent, biased as in binary32),
        # ``off`` = e - c is how far above it the value is (below it when negative), the
        # dropped bits are 23 - man_bits, plus -off in the target's subnormal range, at most 26
        # (from e < c - (26 - (23 - man_bits)) on), and the value overflows for sure when its
        # unbiased exponent is above 16.
        c = {f: f.emin + 127 for f in (E4M3, E5M2)}
        dropped = {E4M3: 23 - E4M3.man_bits, E5M2: 23 - E5M2.man_bits}
        off = Signal(signed(10))
        m.d.comb += off.eq(Mux(is_e5, x.exponent - c[E5M2], x.exponent - c[E4M3]))
        below = off < 0
        lowest = Mux(is_e5, x.exponent < c[E5M2] - (26 - dropped[E5M2]), x.exponent < c[E4M3] - (26 - dropped[E4M3]))
        base_shift = Mux(is_e5, dropped[E5M2], dropped[E4M3])
        shift = Signal(range(32))       # dropped bits: 23 - man_bits, plus denormalisation
        m.d.comb += shift.eq(Mux(lowest, 26, Mux(below, base_shift - off, base_shift)))
        # Codes are monotonic in magnitude: normal code = ((exp + bias - 1) << m) + 1.mmm (exp
        # unbiased; exp + bias - 1 = off), subnormal code = 0.mmm; a rounding carry moves
        # naturally into the exponent field.
        base = Signal(signed(14))
        m.d.comb += base.eq(Mux(below, 0, Mux(is_e5, off << E5M2.man_bits, off << E4M3.man_bits)))
        # the dropped bits below the guard bit are all zero when the trailing zeros reach it
        tz = leading_zeros(m, sig[::-1], "conv_tz")
        v = section({"sig": sig, "shift": shift, "tz": tz, "base": base, "big": x.exponent > 127 + 16, "sign": x.sign,
                     "nan": (x.exponent == 0xFF) & (x.mantissa != 0), "inf": (x.exponent == 0xFF) & (x.mantissa == 0),
                     "is_e5": is_e5, "saturate": self.saturate}, S >= 3, "conv_d")

        # ---- shift: kept bits, guard, sticky ----
        kept = Signal(5)
        m.d.comb += kept.eq(v["sig"] >> v["shift"])
        guard_at = Signal(range(32))
        m.d.comb += guard_at.eq(v["shift"] - 1)
        guard = (v["sig"] >> guard_at)[0]
        sticky = v["tz"] < guard_at
        v = section({**{k: v[k] for k in ("base", "big", "sign", "nan", "inf", "is_e5", "saturate")},
                     "kept": kept, "guard": guard, "sticky": sticky}, S >= 2, "conv_s")

        # ---- round ----
        kept = v["kept"]
        rounded = Signal(6)
        m.d.comb += rounded.eq(kept + (v["guard"] & (v["sticky"] | kept[0])))
        code = Signal(signed(14))
        m.d.comb += code.eq(v["base"] + rounded)
        is_e5 = v["is_e5"]
        max_code = Mux(is_e5, E5M2.max_code, E4M3.max_code)
        overflow = v["inf"] | v["big"] | (code > max_code)
        sign = v["sign"]
        over_code = Mux(v["saturate"], max_code, Mux(is_e5, E5M2.inf_code, E4M3.nan_code))
        y = Signal(8)
        with m.If(v["nan"]):
            m.d.comb += y.eq(Mux(is_e5, E5M2.nan_code, E4M3.nan_code))
        with m.Elif(overflow):
            m.d.comb += y.eq(Cat(over_code[0:7], sign))
        with m.Else():
            m.d.comb += y.eq(Cat(code[0:7], sign))

        m.d.comb += self.y.eq(pipe(m, y, S >= 1, "y_q"))
        return m
