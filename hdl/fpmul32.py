"""IEEE binary32 multiplier (round to nearest even, subnormals), for scales in the epilogue,
the per-K-block scaling and requantizing stores."""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .arith import check_stages, leading_zeros, pipe
from .formats import FP32, FP32Layout

__all__ = ["FP32Multiplier", "fp32_mul"]


#: Registers after the operand / product / normalise / underflow shift / round sections, for
#: each ``stages`` setting; a sixth flag registers the four partial products of the
#: significand product too (6 stages: the products and their sum are separate cycles).
STAGE_REGS = {
    0: (False, False, False, False, False), 1: (False, False, False, False, True),
    2: (False, True, False, False, True), 3: (True, True, False, False, True),
    4: (True, True, True, False, True), 5: (True, True, True, True, True),
    6: (True, True, True, True, True, True),
}

#: Significand bits in the low part of a split product: 17 x 17 bits is an unsigned product
#: that one 18 x 18 signed hardware multiplier (ECP5 MULT18X18D) forms.
SPLIT_LOW = 17


def fp32_mul(m, a, b, prefix="", regs=STAGE_REGS[0]):
    """Add the logic of one binary32 product ``a * b``; return the result signal.

    ``regs`` says which of the five sections is followed by a register: ``s0`` classify and
    normalise the operands, ``s1`` the 24 x 24-bit significand product (with a sixth flag set,
    two cycles: four partial products of 17- and 7-bit halves, one hardware multiplier each,
    registered, then their sum), ``s2`` normalise the
    product and find how far it underflows and its trailing zeros, ``s3`` the underflow shift
    and the round and sticky bits, ``s4`` round and pack (the last register is the output's).

    Subnormal operands are normalised first (leading-zero shift), the 24 x 24-bit significand
    product is normalised to a leading one at bit 47, results below the normal range are
    shifted right with a sticky bit (gradual underflow), and the result is rounded to nearest,
    ties to even. Overflow gives infinity; NaN operands and infinity x 0 give the canonical
    NaN; zero results carry the XOR of the signs.
    """
    p = prefix
    av = data.View(FP32Layout, a)
    bv = data.View(FP32Layout, b)
    sign = av.sign ^ bv.sign
    a_zero = (av.exponent == 0) & (av.mantissa == 0)
    b_zero = (bv.exponent == 0) & (bv.mantissa == 0)
    a_inf = (av.exponent == 0xFF) & (av.mantissa == 0)
    b_inf = (bv.exponent == 0xFF) & (bv.mantissa == 0)
    a_nan = (av.exponent == 0xFF) & (av.mantissa != 0)
    b_nan = (bv.exponent == 0xFF) & (bv.mantissa != 0)

    def normalised(v, name):
        sig = Signal(24, name=f"{p}{name}_sig")
        m.d.comb += sig.eq(Cat(v.mantissa, v.exponent != 0))
        lz = leading_zeros(m, sig, f"{p}{name}_lz")
        nsig = Signal(24, name=f"{p}{name}_nsig")
        exp = Signal(signed(11), name=f"{p}{name}_exp")
        m.d.comb += [nsig.eq(sig << lz), exp.eq(Mux(v.exponent == 0, 1, v.exponent) - lz)]
        return nsig, exp

    sa, ea = normalised(av, "a")
    sb, eb = normalised(bv, "b")
    flags = {"sign": sign, "nan": a_nan | b_nan | (a_inf & b_zero) | (a_zero & b_inf), "inf": a_inf | b_inf,
             "zero": a_zero | b_zero}

    def stage(values, registered, n):
        return {k: pipe(m, v, registered, f"{p}{k}_q{n}") for k, v in values.items()}

    v = stage(dict(flags, sa=sa, ea=ea, sb=sb, eb=eb), regs[0], 0)
    prod0 = Signal(48, name=f"{p}prod")
    e_sum = Signal(signed(12), name=f"{p}e_sum")
    m.d.comb += e_sum.eq(v["ea"] + v["eb"] - 127)
    if len(regs) > 5 and regs[5]:
        lo = SPLIT_LOW
        a_lo, a_hi, b_lo, b_hi = v["sa"][:lo], v["sa"][lo:], v["sb"][:lo], v["sb"][lo:]
        parts = stage({"ll": a_lo * b_lo, "lh": a_lo * b_hi, "hl": a_hi * b_lo, "hh": a_hi * b_hi,
                       "sign": v["sign"], "nan": v["nan"], "inf": v["inf"], "zero": v["zero"], "e_sum": e_sum},
                      True, "1p")
        m.d.comb += prod0.eq(parts["ll"] + ((parts["lh"] + parts["hl"]) << lo) + (parts["hh"] << (2 * lo)))
        v, e_sum = parts, parts["e_sum"]
    else:
        m.d.comb += prod0.eq(v["sa"] * v["sb"])
    v = stage({"sign": v["sign"], "nan": v["nan"], "inf": v["inf"], "zero": v["zero"], "prod": prod0,
               "e_sum": e_sum}, regs[1], 1)
    # value = prod / 2^46 * 2^(ea + eb - 254); align the leading one to bit 47
    prod = v["prod"]
    top = prod[47]
    norm = Signal(48, name=f"{p}norm")
    exp = Signal(signed(12), name=f"{p}exp")          # biased exponent of the result
    m.d.comb += [norm.eq(Mux(top, prod, prod << 1)), exp.eq(v["e_sum"] + top)]
    # gradual underflow: shift right by 1 - exp (capped); every bit below the round bit then
    # makes the sticky bit: the trailing zeros of the product tell whether any is set
    under = Signal(range(64), name=f"{p}under")
    m.d.comb += under.eq(Mux(exp < 1, Mux(1 - exp > 50, 50, 1 - exp), 0))
    tz = leading_zeros(m, norm[::-1], f"{p}tz")
    v = stage({"sign": v["sign"], "nan": v["nan"], "inf": v["inf"], "zero": v["zero"], "norm": norm, "exp": exp,
               "under": under, "tz": tz}, regs[2], 2)
    shifted = Signal(48, name=f"{p}shifted")
    m.d.comb += shifted.eq(v["norm"] >> v["under"])
    sticky = Signal(name=f"{p}sticky")
    m.d.comb += sticky.eq(v["tz"] < 23 + v["under"])
    # the exponent field without and with a rounding carry, and whether each overflows, are
    # found here, beside the shift: rounding then only chooses between them
    exp = v["exp"]
    sub = Signal(name=f"{p}sub")
    m.d.comb += sub.eq(exp < 1)
    v = stage({"sign": v["sign"], "nan": v["nan"], "inf": v["inf"], "zero": v["zero"], "sub": sub,
               "field": exp[0:8], "field_up": (exp + 1)[0:8], "over": ~sub & (exp >= 0xFF),
               "over_up": ~sub & (exp >= 0xFE),
               "kept": shifted[24:48], "guard": shifted[23], "sticky": sticky}, regs[3], 3)
    kept, sign = v["kept"], v["sign"]
    rounded = Signal(25, name=f"{p}rounded")
    m.d.comb += rounded.eq(kept + (v["guard"] & (v["sticky"] | kept[0])))
    carry = rounded[24]
    field = Signal(8, name=f"{p}field")
    # after underflow the exponent field is 0, or 1 if rounding reached the hidden bit
    m.d.comb += field.eq(Mux(v["sub"], carry | rounded[23], Mux(carry, v["field_up"], v["field"])))
    overflow = Mux(carry, v["over_up"], v["over"])
    frac = Mux(carry, rounded[1:24], rounded[0:23])

    result = Signal(32, name=f"{p}result")
    with m.If(v["nan"]):
        m.d.comb += result.eq(FP32.nan_code)
    with m.Elif(v["inf"] | overflow):
        m.d.comb += result.eq(Cat(Const(0, 23), Const(0xFF, 8), sign))
    with m.Elif(v["zero"]):
        m.d.comb += result.eq(Cat(Const(0, 31), sign))
    with m.Else():
        m.d.comb += result.eq(Cat(frac, field, sign))
    return pipe(m, result, regs[4], f"{p}result_q")


class FP32Multiplier(wiring.Component):
    """IEEE 754 binary32 multiplier, round to nearest even, subnormals kept (see :func:`fp32_mul`).

    Latency ``stages`` cycles (0 to 6, see :data:`STAGE_REGS`); throughput one product per cycle.

    Members
    -------
    a, b : In(32)
        binary32 operands.
    result : Out(32)
        binary32 bit pattern of ``a * b``.
    """

    a: In(32)
    b: In(32)
    result: Out(32)

    def __init__(self, stages=0):
        self.stages = check_stages(stages, tuple(STAGE_REGS), "fp32 multiplier", self)
        self.latency = stages
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.result.eq(fp32_mul(m, self.a, self.b, regs=STAGE_REGS[self.stages]))
        return m
