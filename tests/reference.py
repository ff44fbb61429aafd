"""An independent exact reference for the golden model, in pure Python (fractions, no torch).

Used only to cross-check :mod:`fp8npu.sim.golden` (which relies on torch's arithmetic).
"""

from fractions import Fraction


def decode(code, exp_bits, man_bits, bias, has_inf):
    """Exact value of a code: a Fraction, +-inf as float, or None for NaN. Zero keeps its sign
    as a (0, sign) tuple when ``signed_zero`` matters; here returned as Fraction(0) plus sign bit."""
    sign = code >> (exp_bits + man_bits) & 1
    e = (code >> man_bits) & ((1 << exp_bits) - 1)
    m = code & ((1 << man_bits) - 1)
    top = (1 << exp_bits) - 1
    if has_inf and e == top:
        return None if m else (float("-inf") if sign else float("inf"))
    if not has_inf and e == top and m == (1 << man_bits) - 1:
        return None
    if e == 0:
        v = Fraction(m, 1 << man_bits) * Fraction(2) ** (1 - bias)
    else:
        v = (1 + Fraction(m, 1 << man_bits)) * Fraction(2) ** (e - bias)
    return -v if sign else v


def encode(value, sign, exp_bits, man_bits, bias, has_inf, overflow):
    """Round an exact non-NaN value (Fraction or +-inf) to the nearest code, ties to even.

    ``overflow`` is what a rounded magnitude above max becomes: "inf", "nan" or "saturate".
    ``sign`` is used for zero results and infinities.
    """
    mag_bits = exp_bits + man_bits
    top = (1 << exp_bits) - 1
    max_code = ((top - 1) << man_bits | ((1 << man_bits) - 1)) if has_inf else ((1 << mag_bits) - 2)
    inf_code = top << man_bits if has_inf else None
    nan_code = (top << man_bits | 1 << (man_bits - 1)) if has_inf else (1 << mag_bits) - 1

    def over():
        if overflow == "saturate":
            return sign << mag_bits | max_code
        if overflow == "inf":
            return sign << mag_bits | inf_code
        return nan_code

    if isinstance(value, float):  # infinity
        return over()
    mag = abs(value)
    # quantum (ulp) in the binade of mag, never below the subnormal quantum
    q = Fraction(2) ** (1 - bias - man_bits)
    if mag >= Fraction(2) ** (1 - bias):
        e = mag.numerator.bit_length() - mag.denominator.bit_length()
        while Fraction(2) ** e > mag:
            e -= 1
        while Fraction(2) ** (e + 1) <= mag:
            e += 1
        q = Fraction(2) ** (e - man_bits)
    n = mag / q
    fl = n.numerator // n.denominator
    rem = n - fl
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2 == 1):
        fl += 1
    rounded = fl * q
    if rounded == 0:
        return sign << mag_bits
    # re-derive the code from the rounded magnitude
    if rounded < Fraction(2) ** (1 - bias):
        code = int(rounded / Fraction(2) ** (1 - bias - man_bits))
    else:
        e = 0
        while Fraction(2) ** (e + 1) <= rounded:
            e += 1
        while Fraction(2) ** e > rounded:
            e -= 1
        frac = rounded / Fraction(2) ** e - 1
        code = (e + bias) << man_bits | int(frac * (1 << man_bits))
    if code > max_code:
        return over()
    return sign << mag_bits | code


FP32 = (8, 23, 127, True)
E4M3 = (4, 3, 7, False)
E5M2 = (5, 2, 15, True)


def add_fp32(a_bits, b_bits):
    """Exact a + b rounded once to binary32 (RNE, subnormals, overflow to inf)."""
    a = decode(a_bits, *FP32)
    b = decode(b_bits, *FP32)
    if a is None or b is None:
        return None
    sa, sb = a_bits >> 31, b_bits >> 31
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, float) and isinstance(b, float) and a != b:
            return None
        inf = a if isinstance(a, float) else b
        return 0xFF800000 if inf < 0 else 0x7F800000
    s = a + b
    if s == 0:
        return (sa & sb) << 31
    return encode(s, 1 if s < 0 else 0, *FP32, overflow="inf")


def quantize(x_bits, fmt, saturate):
    """binary32 -> FP8 code per docs/numerics.md."""
    x = decode(x_bits, *FP32)
    spec = E4M3 if fmt == "e4m3" else E5M2
    nan = (1 << 7) - 1 if fmt == "e4m3" else 0x7E
    if x is None:
        return nan
    sign = x_bits >> 31
    overflow = "saturate" if saturate else ("inf" if fmt == "e5m2" else "nan")
    return encode(x, sign, *spec, overflow=overflow)


# ---- block accumulation (docs/numerics.md section 3) -------------------------------------------
#: Every FP8 x FP8 product is a multiple of 2^-32 (E5M2's smallest subnormal is 2^-16).
UNITS = 32


def product_units(code_a, code_b, fmt_a, fmt_b):
    """An exact product as an integer number of 2^-32 units, or "nan", "+inf", "-inf", or
    "-0" for a negative zero product (a positive zero is the integer 0)."""
    a = decode(code_a, *(E4M3 if fmt_a == "e4m3" else E5M2))
    b = decode(code_b, *(E4M3 if fmt_b == "e4m3" else E5M2))
    if a is None or b is None:
        return "nan"
    negative = (code_a >> 7) ^ (code_b >> 7)
    if isinstance(a, float) or isinstance(b, float):
        if a == 0 or b == 0:
            return "nan"
        return "-inf" if negative else "+inf"
    p = a * b * (1 << UNITS)
    assert p.denominator == 1
    if p == 0 and negative:
        return "-0"
    return int(p)


def round_units_fp32(total):
    """binary32 bits of ``total`` 2^-32 units, rounded to nearest even (integer arithmetic;
    cross-checked against :func:`encode` by the tests)."""
    if total == 0:
        return 0
    sign = 0x80000000 if total < 0 else 0
    mag = abs(total)
    top = mag.bit_length() - 1
    drop = top - 23
    if drop > 0:
        q, rem = mag >> drop, mag & ((1 << drop) - 1)
        half = 1 << (drop - 1)
        if rem > half or (rem == half and q & 1):
            q += 1
            if q >> 24:
                q >>= 1
                top += 1
    else:
        q = mag << -drop
    return sign | (top - UNITS + 127) << 23 | (q & 0x7FFFFF)


def block_sum_fp32(products):
    """The contract's block sum of exact products (:func:`product_units` values): binary32
    bits, or None for NaN."""
    infs = {p for p in products if p in ("+inf", "-inf")}
    if "nan" in products or len(infs) == 2:
        return None
    if infs:
        return 0x7F800000 if "+inf" in infs else 0xFF800000
    total = sum(p for p in products if p != "-0")
    if total == 0:
        return 0x80000000 if all(p == "-0" for p in products) else 0
    return round_units_fp32(total)
