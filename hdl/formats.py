"""Floating-point formats used by fp8npu: OCP FP8 E4M3 and E5M2, and IEEE binary32.

This module is the one description of the formats. The hardware blocks, the golden model
(:mod:`fp8npu.sim.golden`) and the compiler all read their parameters from here.

* :class:`FloatFormat` -- the numeric parameters of a format (pure Python, no hardware).
* :data:`E4M3`, :data:`E5M2`, :data:`FP32` -- the three formats.
* :class:`Format` -- the run-time format selector carried on ``fmt`` ports and in commands.
* :class:`FP8E4M3`, :class:`FP8E5M2`, :class:`FP32Layout` -- bit layouts as ``data.Struct``.
"""

from dataclasses import dataclass

from amaranth.lib import data, enum

__all__ = [
    "FloatFormat", "E4M3", "E5M2", "FP32", "FP8_FORMATS", "Format", "format_by_name",
    "FP8E4M3", "FP8E5M2", "FP32Layout",
]


@dataclass(frozen=True)
class FloatFormat:
    """Parameters of a binary floating-point format.

    Attributes
    ----------
    name : str
        Short name used on the command line, in configs and in assembly (``"e4m3"``).
    exp_bits, man_bits : int
        Widths of the exponent and mantissa (fraction) fields.
    bias : int
        Exponent bias.
    has_inf : bool
        Whether the all-ones exponent with a zero mantissa encodes infinity (E5M2, FP32).
        E4M3 has no infinity: only the all-ones code ``S.1111.111`` is NaN.
    torch_dtype : str
        Name of the matching ``torch`` dtype.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool
    torch_dtype: str

    @property
    def width(self):
        return 1 + self.exp_bits + self.man_bits

    @property
    def sign_mask(self):
        return 1 << (self.width - 1)

    @property
    def max_code(self):
        """Magnitude code of the largest finite value."""
        if self.has_inf:
            return ((1 << self.exp_bits) - 2) << self.man_bits | ((1 << self.man_bits) - 1)
        # E4M3: the all-ones exponent holds finite values except the all-ones mantissa.
        return ((1 << (self.exp_bits + self.man_bits)) - 1) - 1

    @property
    def inf_code(self):
        """Magnitude code of infinity, or ``None`` for formats without one."""
        return ((1 << self.exp_bits) - 1) << self.man_bits if self.has_inf else None

    @property
    def nan_code(self):
        """The canonical (positive, quiet) NaN that fp8npu hardware produces."""
        if self.has_inf:
            return ((1 << self.exp_bits) - 1) << self.man_bits | (1 << (self.man_bits - 1))
        return (1 << (self.exp_bits + self.man_bits)) - 1

    @property
    def emin(self):
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_value(self):
        e = (self.max_code >> self.man_bits) - self.bias
        m = self.max_code & ((1 << self.man_bits) - 1)
        return (1 + m / (1 << self.man_bits)) * 2.0 ** e

    @property
    def min_normal(self):
        return 2.0 ** self.emin

    @property
    def min_subnormal(self):
        return 2.0 ** (self.emin - self.man_bits)

    def is_nan_code(self, code):
        """Whether the integer bit pattern ``code`` encodes NaN."""
        mag = code & (self.sign_mask - 1)
        if self.has_inf:
            return mag > self.inf_code
        return mag == self.nan_code


E4M3 = FloatFormat("e4m3", exp_bits=4, man_bits=3, bias=7, has_inf=False, torch_dtype="float8_e4m3fn")
E5M2 = FloatFormat("e5m2", exp_bits=5, man_bits=2, bias=15, has_inf=True, torch_dtype="float8_e5m2")
FP32 = FloatFormat("fp32", exp_bits=8, man_bits=23, bias=127, has_inf=True, torch_dtype="float32")

#: The FP8 operand formats, indexed by the value of :class:`Format`.
FP8_FORMATS = (E4M3, E5M2)


class Format(enum.Enum, shape=1):
    """Run-time FP8 format selector, as carried on ``fmt`` ports and in command fields."""

    E4M3 = 0
    E5M2 = 1

    @property
    def spec(self):
        return FP8_FORMATS[self.value]


def format_by_name(name):
    """Return the :class:`Format` called ``name`` (``"e4m3"`` or ``"e5m2"``).

    Raises ``ValueError`` with one sentence naming the allowed names otherwise.
    """
    for fmt in Format:
        if fmt.spec.name == name:
            return fmt
    allowed = ", ".join(f.spec.name for f in Format)
    raise ValueError(f"format must be one of {allowed}, not {name!r}")


class FP8E4M3(data.Struct):
    """Bit layout of an OCP FP8 E4M3 value (bias 7, no infinity, NaN = S.1111.111)."""

    mantissa: 3
    exponent: 4
    sign: 1


class FP8E5M2(data.Struct):
    """Bit layout of an OCP FP8 E5M2 value (bias 15, IEEE-style infinities and NaNs)."""

    mantissa: 2
    exponent: 5
    sign: 1


class FP32Layout(data.Struct):
    """Bit layout of an IEEE 754 binary32 value."""

    mantissa: 23
    exponent: 8
    sign: 1
