"""IEEE binary32 adder: round to nearest even, subnormals, signed zeros, infinities, NaN."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_stages, leading_zeros, pipe
from .formats import FP32, FP32Layout

__all__ = ["FP32Adder", "fp32_add"]

#: Registers after the order / align / add / normalise / round sections, for each ``stages``
#: setting (settings 0 to 3 place them as the three-section adder did: after align, normalise
#: and round).
STAGE_REGS = {0: (False, False, False, False, False), 1: (False, False, False, False, True),
              2: (False, False, False, True, True), 3: (False, True, False, True, True),
              4: (False, True, True, True, True), 5: (True, True, True, True, True)}


def fp32_add(m, a, b, regs=STAGE_REGS[0], prefix=""):
    """Add the logic of one binary32 addition ``a + b`` to ``m``; return the result signal.

    The datapath has five sections; ``regs`` says which are followed by a register:

    * order: classify, order the operands by magnitude, the exponent difference, and the
      trailing zeros of the smaller significand;
    * align: shift the smaller significand right, keeping a guard, a round and a sticky bit
      (27-bit extended significands; the sticky bit from the trailing-zero count);
    * add: add or subtract;
    * normalise: shift left by the leading-zero count, limited so that the exponent does not
      go below the minimum (gradual underflow), or right by one on a carry;
    * round and pack: round to nearest, ties to even; detect overflow to infinity.

    An exact zero sum is +0 unless both operands are -0. A NaN operand or inf - inf gives the
    canonical NaN ``0x7FC00000``.
    """
    p = prefix
    av = data.View(FP32Layout, a)
    bv = data.View(FP32Layout, b)

    # ---- s0: align -------------------------------------------------------------------
    a_inf = (av.exponent == 0xFF) & (av.mantissa == 0)
    b_inf = (bv.exponent == 0xFF) & (bv.mantissa == 0)
    a_nan = (av.exponent == 0xFF) & (av.mantissa != 0)
    b_nan = (bv.exponent == 0xFF) & (bv.mantissa != 0)

    # The operands are ordered by magnitude (a 31-bit compare); everything that depends on
    # the order is computed for both orders beside the compare and chosen by it (exponent
    # differences, clamped shift distances, trailing zeros), so the compare is the only
    # carry chain in front of the multiplexers.
    swap = Signal(name=f"{p}s0_swap")
    m.d.comb += swap.eq(b[0:31] > a[0:31])
    big = data.View(FP32Layout, Mux(swap, b, a))

    def significand(v):
        return Cat(Const(0, 3), v.mantissa, v.exponent != 0)

    def clamped_distance(x, y, name):
        """min(ex - ey, 27) for |x| >= |y| (subnormals at exponent 1)."""
        ex = Mux(x.exponent == 0, 1, x.exponent)
        ey = Mux(y.exponent == 0, 1, y.exponent)
        d = Signal(9, name=f"{p}s0_{name}")
        m.d.comb += d.eq(ex - ey)
        return Mux(d[8] | (d[0:8] > 27), 27, d[0:5])

    s0_exp_big = Signal(8, name=f"{p}s0_exp_big")
    s0_dist_c = Signal(5, name=f"{p}s0_dist_c")
    s0_big = Signal(27, name=f"{p}s0_big")
    s0_small = Signal(27, name=f"{p}s0_small")
    sig_a, sig_b = significand(av), significand(bv)
    m.d.comb += [
        s0_exp_big.eq(Mux(big.exponent == 0, 1, big.exponent)),
        s0_dist_c.eq(Mux(swap, clamped_distance(bv, av, "dist_ba"), clamped_distance(av, bv, "dist_ab"))),
        s0_big.eq(Mux(swap, sig_b, sig_a)),
        s0_small.eq(Mux(swap, sig_a, sig_b)),
    ]
    tz_a = leading_zeros(m, sig_a[::-1], f"{p}s0_tz_a")
    tz_b = leading_zeros(m, sig_b[::-1], f"{p}s0_tz_b")
    tz_small = Signal.like(tz_a, name=f"{p}s0_tz")
    m.d.comb += tz_small.eq(Mux(swap, tz_a, tz_b))
    v = {"big": s0_big, "small": s0_small, "dist": s0_dist_c, "tz": tz_small, "exp": s0_exp_big,
         "sub": av.sign ^ bv.sign, "sign": big.sign, "zero_sign": av.sign & bv.sign,
         "nan": a_nan | b_nan | (a_inf & b_inf & (av.sign != bv.sign)), "inf": a_inf | b_inf}

    def stage(values, registered, n):
        return {k: pipe(m, x, registered, f"{p}{k}_r{n}") for k, x in values.items()}

    v = stage(v, regs[0], 0)
    # ---- align: the bits shifted out make the sticky bit ---------------------------------
    shifted = Signal(27, name=f"{p}s0_shifted")
    m.d.comb += shifted.eq(v["small"] >> v["dist"])
    small_sticky = Signal(27, name=f"{p}s0_small_sticky")
    m.d.comb += small_sticky.eq(shifted | (v["tz"] < v["dist"]))
    v = stage(dict(v, small=small_sticky), regs[1], 1)
    del v["tz"], v["dist"]

    # ---- add ---------------------------------------------------------------------------
    s1_sum = Signal(28, name=f"{p}s1_sum")
    m.d.comb += s1_sum.eq(Mux(v["sub"], (v["big"] - v["small"])[0:28], v["big"] + v["small"]))
    v = stage({"sum": s1_sum, "exp": v["exp"], "sign": v["sign"], "zero_sign": v["zero_sign"], "nan": v["nan"],
               "inf": v["inf"]}, regs[2], 2)

    # ---- normalise -----------------------------------------------------------------------
    s1_sum, s1_exp = v["sum"], v["exp"]
    lz = leading_zeros(m, s1_sum[0:27], f"{p}s1_lz")
    s1_shift = Signal(5, name=f"{p}s1_shift")
    m.d.comb += s1_shift.eq(Mux(lz > s1_exp - 1, s1_exp - 1, lz))
    carry = s1_sum[27]
    norm = Mux(carry, Cat(s1_sum[0] | s1_sum[1], s1_sum[2:28]), (s1_sum[0:27] << s1_shift)[0:27])
    exp = Mux(carry, s1_exp + 1, s1_exp - s1_shift)

    r1 = regs[3]
    s2_norm = pipe(m, norm, r1, f"{p}s2_norm")
    s2_exp = pipe(m, exp[0:9], r1, f"{p}s2_exp")
    s2_zero = pipe(m, s1_sum == 0, r1, f"{p}s2_zero")
    s2_sign = pipe(m, v["sign"], r1, f"{p}s2_sign")
    s2_zero_sign = pipe(m, v["zero_sign"], r1, f"{p}s2_zero_sign")
    s2_nan = pipe(m, v["nan"], r1, f"{p}s2_nan")
    s2_inf = pipe(m, v["inf"], r1, f"{p}s2_inf")

    # ---- s2: round and pack ------------------------------------------------------------
    guard, lsb = s2_norm[2], s2_norm[3]
    rest = s2_norm[1] | s2_norm[0]
    rounded = Signal(25, name=f"{p}s2_rounded")
    m.d.comb += rounded.eq(s2_norm[3:27] + (guard & (rest | lsb)))
    r_carry = rounded[24]
    exp2 = Signal(10, name=f"{p}s2_exp2")
    m.d.comb += exp2.eq(s2_exp + r_carry)
    frac = Mux(r_carry, rounded[1:24], rounded[0:23])
    hidden = r_carry | rounded[23]
    field = Mux(hidden, exp2[0:8], 0)

    result = Signal(32, name=f"{p}s2_result")
    with m.If(s2_nan):
        m.d.comb += result.eq(FP32.nan_code)
    with m.Elif(s2_inf | (exp2 >= 0xFF)):
        m.d.comb += result.eq(Cat(Const(0, 23), Const(0xFF, 8), s2_sign))
    with m.Elif(s2_zero):
        m.d.comb += result.eq(Cat(Const(0, 31), s2_zero_sign))
    with m.Else():
        m.d.comb += result.eq(Cat(frac, field, s2_sign))

    return pipe(m, result, regs[4], f"{p}result_q")


class FP32Adder(wiring.Component):
    """IEEE 754 binary32 adder, round to nearest even, with subnormals (no flush to zero).

    See :func:`fp32_add` for the datapath. ``stages`` places pipeline registers after the
    round (1), normalise and round (2), or all three sections (3); 0 is combinational.

    Latency ``stages`` cycles; throughput one addition per cycle.

    Members
    -------
    a, b : In(32)
        binary32 operands.
    result : Out(32)
        binary32 bit pattern of ``a + b``.
    """

    a: In(32)
    b: In(32)
    result: Out(32)

    def __init__(self, stages=1):
        self.stages = check_stages(stages, tuple(STAGE_REGS), "adder", self)
        self.latency = stages
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.result.eq(fp32_add(m, self.a, self.b, STAGE_REGS[self.stages]))
        return m
