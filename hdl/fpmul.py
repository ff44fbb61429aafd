"""FP8 x FP8 -> FP32 multiplier (exact)."""

from amaranth.hdl import Cat, Const, Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .arith import check_stages, leading_zeros, pipe, unpack_fp8
from .formats import FP32, Format

__all__ = ["FP8Multiplier", "FP32_NAN"]

#: The canonical binary32 NaN produced by every fp8npu unit.
FP32_NAN = FP32.nan_code


class FP8Multiplier(wiring.Component):
    """Exact product of two FP8 operands, as an IEEE binary32 bit pattern.

    Each operand's format (E4M3 or E5M2) is chosen at run time by its ``fmt`` input. Every
    FP8 x FP8 product fits binary32 exactly (at most 8 significant bits, exponent within
    [-32, 32]), so there is no rounding: a 4 x 4-bit significand product, an exponent add and
    a normalisation shift of at most 7 places.

    Special values: a NaN operand, or infinity times zero (E5M2), gives the canonical NaN
    ``0x7FC00000``; infinity times a non-zero finite value gives a signed infinity; a zero
    product has the XOR of the operand signs.

    Parameters
    ----------
    stages : int
        0 for a combinational unit, 1 to register the result.

    Latency ``stages`` cycles; throughput one product per cycle.

    Members
    -------
    a, b : In(8)
        Operand codes.
    fmt_a, fmt_b : In(Format)
        Format of each operand.
    product : Out(32)
        binary32 bit pattern of ``a * b``.
    """

    a: In(8)
    b: In(8)
    fmt_a: In(Format)
    fmt_b: In(Format)
    product: Out(32)

    def __init__(self, stages=0):
        self.stages = check_stages(stages, (0, 1), "multiplier", self)
        self.latency = stages
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        ua = unpack_fp8(m, self.a, self.fmt_a, "a")
        ub = unpack_fp8(m, self.b, self.fmt_b, "b")

        sig = Signal(8)
        exp = Signal(signed(7))
        m.d.comb += [sig.eq(ua.sig * ub.sig), exp.eq(ua.exp + ub.exp)]
        # sig / 64 * 2**exp; normalise so the leading one sits at bit 7.
        lz = leading_zeros(m, sig, "lz")
        norm = Signal(8)
        field = Signal(signed(10))
        m.d.comb += [
            norm.eq(sig << lz),
            field.eq(exp + 128 - lz),
        ]

        sign = ua.sign ^ ub.sign
        nan = ua.nan | ub.nan | (ua.inf & ub.zero) | (ua.zero & ub.inf)
        inf = ua.inf | ub.inf
        zero = ua.zero | ub.zero
        result = Signal(32)
        with m.If(nan):
            m.d.comb += result.eq(FP32_NAN)
        with m.Elif(inf):
            m.d.comb += result.eq(Cat(Const(0, 23), Const(0xFF, 8), sign))
        with m.Elif(zero):
            m.d.comb += result.eq(Cat(Const(0, 31), sign))
        with m.Else():
            m.d.comb += result.eq(Cat(Const(0, 16), norm[0:7], field[0:8], sign))

        m.d.comb += self.product.eq(pipe(m, result, self.stages >= 1, "product_q"))
        return m
