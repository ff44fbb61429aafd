"""Small arithmetic building blocks shared by the floating-point units.

These are functions that add logic to a :class:`~amaranth.hdl.Module` and return the
resulting signals; the components in :mod:`.fpmul`, :mod:`.fpadd`, :mod:`.fpconv` and
:mod:`.mac` are built from them.
"""

from amaranth.hdl import Cat, Const, Mux, Signal, signed

from .formats import Format

__all__ = ["check_stages", "pipe", "leading_zeros", "unpack_fp8"]


def check_stages(stages, allowed, block, component=None):
    """Validate a ``stages`` parameter; one sentence naming the allowed values otherwise.

    ``component`` is the half-constructed component: it is marked as deliberately unused, so
    that a rejected parameter does not also produce an ``UnusedElaboratable`` warning.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages not in allowed:
        if component is not None:
            component._MustUse__silence = True
        choices = ", ".join(str(s) for s in allowed)
        raise ValueError(f"{block} stages must be one of {choices}, not {stages!r}")
    return stages


def pipe(m, value, registered, name):
    """Return a signal carrying ``value``: through a register (``sync``) or a wire (``comb``)."""
    sig = Signal(value.shape(), name=name)
    if registered:
        m.d.sync += sig.eq(value)
    else:
        m.d.comb += sig.eq(value)
    return sig


def leading_zeros(m, value, name):
    """Count of leading zeros of ``value`` (its width when ``value`` is zero), as a priority mux."""
    width = len(value)
    count = Signal(range(width + 1), name=name)
    m.d.comb += count.eq(width)
    # Later assignments win: scanning from the LSB up leaves the most significant one in charge.
    for i in range(width):
        with m.If(value[i]):
            m.d.comb += count.eq(width - 1 - i)
    return count


class UnpackedFP8:
    """An FP8 operand decoded for arithmetic (see :func:`unpack_fp8`)."""

    def __init__(self, sign, exp, sig, zero, inf, nan):
        self.sign, self.exp, self.sig = sign, exp, sig
        self.zero, self.inf, self.nan = zero, inf, nan


def unpack_fp8(m, code, fmt, name):
    """Decode an 8-bit FP8 ``code`` whose format is chosen at run time by ``fmt``.

    The value is ``(-1)**sign * sig / 8 * 2**exp`` with ``sig`` a 4-bit significand with three
    fraction bits (E5M2 mantissas are padded with a zero) and ``exp`` the signed, unbiased
    exponent (subnormals use the minimum exponent and a leading zero). ``zero``, ``inf`` and
    ``nan`` classify the code.
    """
    e4, f3 = code[3:7], code[0:3]
    e5, f2 = code[2:7], code[0:2]
    is_e5 = fmt == Format.E5M2
    sign = Signal(name=f"{name}_sign")
    exp = Signal(signed(6), name=f"{name}_exp")
    sig = Signal(4, name=f"{name}_sig")
    zero = Signal(name=f"{name}_zero")
    inf = Signal(name=f"{name}_inf")
    nan = Signal(name=f"{name}_nan")
    m.d.comb += [
        sign.eq(code[7]),
        zero.eq(code[0:7] == 0),
        sig.eq(Mux(is_e5, Cat(Const(0, 1), f2, e5 != 0), Cat(f3, e4 != 0))),
        exp.eq(Mux(is_e5, Mux(e5 == 0, 1, e5) - 15, Mux(e4 == 0, 1, e4) - 7)),
        inf.eq(is_e5 & (e5 == 31) & (f2 == 0)),
        nan.eq(Mux(is_e5, (e5 == 31) & (f2 != 0), (e4 == 15) & (f3 == 7))),
    ]
    return UnpackedFP8(sign, exp, sig, zero, inf, nan)


