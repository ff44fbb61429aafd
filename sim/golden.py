"""The golden model: what fp8npu hardware computes, written as small torch functions.

Every function here is the executable form of a rule in docs/numerics.md. Every test,
the functional simulator and the compiler compare against these functions and nothing else.

Values cross these functions as raw bit patterns so that comparisons are bit for bit:

* FP8 codes are ``torch.uint8`` tensors,
* FP32 values are ``torch.int32`` tensors holding the binary32 bit pattern
  (``torch.int32`` because torch has little ``uint32`` support).

Rules kept here, each measured on torch 2.13 CPU:

* An FP8 x FP8 product is exact in binary32, so ``float32 * float32`` of the decoded
  operands is the exact product.
* ``float32 + float32`` on torch tensors is one IEEE binary32 round-to-nearest-even
  addition with subnormals. Accumulation is therefore an explicit Python loop over k;
  ``torch.sum``, ``@`` and ``cumsum`` use other orders or wider accumulators and are never
  used for accumulation here.
* FP32 -> FP8 goes through an explicit clamp for saturation, so the result does not
  depend on the torch version's overflow policy.
"""

import torch
from fp8npu.hdl.formats import E4M3, E5M2, FP8_FORMATS, FP32, Format

__all__ = [
    "bits_to_f32", "f32_to_bits", "decode_fp8", "fp8_is_nan", "f32_is_nan",
    "mul", "add", "mul_f32", "mac", "block_partial", "block_round", "block_sum", "mac_blocks", "quantize", "mismatches", "sign_bits",
]

#: Canonical NaN of the accumulator (docs/numerics.md section 5).
CANONICAL_NAN = 0x7FC00000



def check_environment():
    """Raise if this process would not compute binary32 with subnormals (flush-denormal on)."""
    if float(torch.tensor([2.0 ** -126], dtype=torch.float32)[0] / 2) == 0.0:
        raise RuntimeError("torch.set_flush_denormal(True) is in effect; the golden model needs subnormals")


def _fmt(fmt):
    """Accept a :class:`Format`, its value (0, 1), a name or a :class:`FloatFormat`; return the spec."""
    if isinstance(fmt, Format):
        return fmt.spec
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt in (0, 1):
        return Format(fmt).spec
    if isinstance(fmt, str):
        for spec in FP8_FORMATS:
            if spec.name == fmt:
                return spec
        raise ValueError(f"format must be one of e4m3, e5m2, not {fmt!r}")
    if fmt in FP8_FORMATS:
        return fmt
    raise ValueError(f"format must be one of e4m3, e5m2, not {fmt!r}")


def _dtype(spec):
    return getattr(torch, spec.torch_dtype)


def _as_tensor(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.dtype != dtype else x
    return torch.as_tensor(x, dtype=torch.int64).to(dtype)


def bits_to_f32(bits):
    """binary32 bit patterns (int32 or any integer tensor) -> float32 tensor."""
    if isinstance(bits, torch.Tensor) and bits.dtype == torch.int32:
        return bits.contiguous().view(torch.float32)
    b = torch.as_tensor(bits).to(torch.int64) & 0xFFFFFFFF
    return ((b ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32)


def f32_to_bits(x):
    """float32 tensor -> int32 tensor of its binary32 bit patterns."""
    return x.to(torch.float32).contiguous().view(torch.int32)


def decode_fp8(codes, fmt):
    """FP8 codes (uint8) of format ``fmt`` -> float32 tensor (exact)."""
    spec = _fmt(fmt)
    return _as_tensor(codes, torch.uint8).view(_dtype(spec)).to(torch.float32)


def fp8_is_nan(codes, fmt):
    """Boolean tensor: which FP8 codes are NaN."""
    spec = _fmt(fmt)
    mag = _as_tensor(codes, torch.uint8).to(torch.int32) & 0x7F
    if spec.has_inf:
        return mag > spec.inf_code
    return mag == spec.nan_code


def f32_is_nan(bits):
    """Boolean tensor: which binary32 bit patterns are NaN."""
    return (bits.to(torch.int64) & 0x7FFFFFFF) > 0x7F800000


def mul(a_codes, b_codes, fmt_a, fmt_b):
    """Exact FP8 x FP8 product as binary32 bits (int32).

    NaN operands, and inf x 0 (E5M2), give NaN; zero products carry the XOR of the signs.
    """
    p = _decode_any(_as_tensor(a_codes, torch.uint8), fmt_a) * _decode_any(_as_tensor(b_codes, torch.uint8), fmt_b)
    return f32_to_bits(p)


def add(a_bits, b_bits):
    """One IEEE binary32 round-to-nearest-even addition (subnormals kept), on bit patterns."""
    return f32_to_bits(bits_to_f32(_as_tensor(a_bits, torch.int32)) + bits_to_f32(_as_tensor(b_bits, torch.int32)))


def mul_f32(a_bits, b_bits):
    """One IEEE binary32 round-to-nearest-even multiplication (subnormals kept), on bit patterns.

    Used where the hardware multiplies two FP32 values (EPILOGUE and BLOCKSCALE scales, the
    STORE scale before FP8 conversion): ``float32 * float32`` on torch tensors is exactly one
    rounded binary32 product. Arguments broadcast like torch tensors.
    """
    return f32_to_bits(bits_to_f32(_as_tensor(a_bits, torch.int32)) * bits_to_f32(_as_tensor(b_bits, torch.int32)))


def mac(a_codes, b_codes, fmt_a, fmt_b, acc=None, valid=None, first=None, trace=False):
    """Sequential FP32 accumulation of exact FP8 products, k along dimension 0.

    ``acc = fp32(acc + a[k] * b[k])`` for k = 0, 1, ..., starting from ``acc`` (binary32 bits)
    or from +0. ``fmt_a``/``fmt_b`` may be a single format or a per-element tensor of
    :class:`Format` values (0 = E4M3, 1 = E5M2) broadcast against ``a_codes[k]``. ``valid``
    (bool, shape [K]) skips steps whose flag is false; ``first`` (bool, shape [K]) restarts
    the chain at that step from its starting value (``acc = fp32(acc0 + a[k]*b[k])``,
    ``acc0`` = ``acc`` or +0). Returns the final
    accumulator bits, or, with ``trace=True``, a [K, ...] tensor of the accumulator after
    every step.
    """
    a_codes = _as_tensor(a_codes, torch.uint8)
    b_codes = _as_tensor(b_codes, torch.uint8)
    pa = _decode_any(a_codes, fmt_a)
    pb = _decode_any(b_codes, fmt_b)
    prod = pa * pb
    if acc is None:
        init = torch.zeros(prod.shape[1:], dtype=torch.float32)
    else:
        init = bits_to_f32(_as_tensor(acc, torch.int32)).clone()
    state = init
    steps = []
    for k in range(prod.shape[0]):
        if valid is None or bool(valid[k]):
            if first is not None and bool(first[k]):
                state = init
            state = state + prod[k]
        if trace:
            steps.append(state)
    if trace:
        return f32_to_bits(torch.stack(steps)) if steps else torch.empty((0, *prod.shape[1:]), dtype=torch.int32)
    return f32_to_bits(state)


def block_partial(a_codes, b_codes, fmt_a, fmt_b, state=None):
    """Add the exact FP8 products along dimension 0 to a block's exact partial sum.

    ``state`` is the partial so far (None: a new block). A partial is a dict of tensors: ``hi``
    and ``lo`` (int64; the sum is ``hi * 2^32 + lo`` units of 2^-32, exactly, every product
    being a multiple of 2^-32 below 2^32), and the flags ``nan`` (a NaN product), ``pos_inf``,
    ``neg_inf`` (an infinite product of that sign) and ``neg_zero`` (every product so far is
    -0). :func:`block_round` rounds it. Arguments broadcast like :func:`mac`'s.
    """
    a_codes = _as_tensor(a_codes, torch.uint8)
    b_codes = _as_tensor(b_codes, torch.uint8)
    prod = (_decode_any(a_codes, fmt_a) * _decode_any(b_codes, fmt_b)).to(torch.float64)   # exact
    finite = torch.isfinite(prod)
    p = torch.where(finite, prod, torch.zeros_like(prod))
    whole = torch.trunc(p)                                      # |whole| < 2^32: exact in int64
    frac = ((p - whole) * 2.0 ** 32).to(torch.int64)            # a multiple of 2^-32, exact
    new = {"hi": whole.to(torch.int64).sum(0), "lo": frac.sum(0), "nan": torch.isnan(prod).any(0),
           "pos_inf": (prod == float("inf")).any(0), "neg_inf": (prod == float("-inf")).any(0),
           "neg_zero": ((prod == 0) & torch.signbit(prod)).all(0)}
    if state is None:
        return new
    return {"hi": state["hi"] + new["hi"], "lo": state["lo"] + new["lo"], "nan": state["nan"] | new["nan"],
            "pos_inf": state["pos_inf"] | new["pos_inf"], "neg_inf": state["neg_inf"] | new["neg_inf"],
            "neg_zero": state["neg_zero"] & new["neg_zero"]}


def block_round(state):
    """A block's exact partial sum (:func:`block_partial`) rounded once to binary32 bits.

    Round to nearest, ties to even (integer arithmetic on the limbs). A NaN product, or
    infinite products of both signs, give the canonical NaN; otherwise an infinite product
    gives that infinity; an exact zero sum is -0 when every product is -0, else +0. The
    result is never subnormal (it is 0 or at least 2^-32).
    """
    hi, lo = state["hi"], state["lo"]
    carry = torch.div(lo, 1 << 32, rounding_mode="floor")
    hi, lo = hi + carry, lo - (carry << 32)                     # total = hi * 2^32 + lo, 0 <= lo < 2^32
    negative = hi < 0
    # magnitude as (big, small), 0 <= small < 2^32
    borrow = (negative & (lo != 0)).to(torch.int64)
    big = torch.where(negative, -hi - borrow, hi)
    small = torch.where(negative & (lo != 0), (1 << 32) - lo, lo)
    msb_big = torch.frexp(big.to(torch.float64))[1].to(torch.int64) - 1       # exact: big < 2^53
    msb_small = torch.frexp(small.to(torch.float64))[1].to(torch.int64) - 1
    top = torch.where(big != 0, msb_big + 32, msb_small)       # index of the leading bit
    sh = top - 24                                               # bits below 24 + 1 (round) bits
    s_hi = (sh - 32).clamp(0, 62)
    s_mid = sh.clamp(0, 31)
    one = torch.ones_like(big)
    q_hi = big >> s_hi
    sticky_hi = ((big & ((one << s_hi) - 1)) != 0) | (small != 0)
    q_mid = (big << (32 - s_mid)) | (small >> s_mid)
    sticky_mid = (small & ((one << s_mid) - 1)) != 0
    q_lo = small << (-sh).clamp(0, 62)
    q = torch.where(sh >= 32, q_hi, torch.where(sh >= 0, q_mid, q_lo))
    sticky = torch.where(sh >= 32, sticky_hi, torch.where(sh >= 0, sticky_mid, torch.zeros_like(sticky_mid)))
    mant = q >> 1
    up = ((q & 1) == 1) & (sticky | ((mant & 1) == 1))
    mant = mant + up.to(torch.int64)
    over = mant >> 24 != 0                                      # rounded up to the next power of two
    mant = torch.where(over, mant >> 1, mant)
    exponent = top - 32 + 127 + over.to(torch.int64)
    bits = (negative.to(torch.int64) << 31) | (exponent << 23) | (mant & 0x7FFFFF)
    zero = (big == 0) & (small == 0)
    bits = torch.where(zero, torch.where(state["neg_zero"], 1 << 31, 0), bits)
    pos_inf, neg_inf = state["pos_inf"], state["neg_inf"]
    bits = torch.where(pos_inf, 0x7F800000, torch.where(neg_inf, 0xFF800000, bits))
    bits = torch.where(state["nan"] | (pos_inf & neg_inf), CANONICAL_NAN, bits)
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)


def block_sum(a_codes, b_codes, fmt_a, fmt_b):
    """The exact sum of FP8 products along dimension 0, rounded once to binary32 (bits):
    ``block_round(block_partial(...))`` (docs/numerics.md section 3, block accumulation)."""
    return block_round(block_partial(a_codes, b_codes, fmt_a, fmt_b))


def mac_blocks(a_codes, b_codes, fmt_a, fmt_b, acc_block, acc=None):
    """Block accumulation of FP8 products, k along dimension 0: for each block of
    ``acc_block`` consecutive k (fixed positions from k = 0, the last may be shorter),
    ``acc = fp32(acc + block_sum(block))`` in k order, from ``acc`` (bits) or +0."""
    a_codes = _as_tensor(a_codes, torch.uint8)
    b_codes = _as_tensor(b_codes, torch.uint8)
    k = a_codes.shape[0]
    state = None if acc is None else _as_tensor(acc, torch.int32)
    for k0 in range(0, k, acc_block):
        part = block_sum(a_codes[k0:k0 + acc_block], b_codes[k0:k0 + acc_block], fmt_a, fmt_b)
        state = add(torch.zeros_like(part) if state is None else state, part)
    if state is None:
        shape = torch.broadcast_shapes(a_codes.shape[1:], b_codes.shape[1:])
        state = torch.zeros(shape, dtype=torch.int32)
    return state


def _decode_any(codes, fmt):
    """Decode with one format, or with a per-element tensor of format selectors."""
    if isinstance(fmt, torch.Tensor):
        sel = fmt.to(torch.bool)
        return torch.where(sel, decode_fp8(codes, E5M2), decode_fp8(codes, E4M3))
    return decode_fp8(codes, fmt)


def quantize(x_bits, fmt, saturate=True):
    """binary32 bits -> FP8 codes (uint8): round to nearest even, subnormals kept.

    Overflow is decided on the rounded magnitude. With ``saturate`` a finite overflow or an
    infinity becomes the largest finite value of the input's sign; without it, E5M2
    overflows to infinity and E4M3 (which has none) to NaN. NaN stays NaN.
    """
    spec = _fmt(fmt)
    x = bits_to_f32(_as_tensor(x_bits, torch.int32))
    nan = torch.isnan(x)
    m = spec.max_value
    y = x.clamp(-m, m).to(_dtype(spec)).view(torch.uint8)
    if not saturate:
        # Magnitudes past max + half an ulp round above max. The tie itself rounds to even:
        # down to max when its mantissa is even (E4M3 448 = 1.110b x 2^8), up when odd (E5M2).
        half_ulp = 2.0 ** ((spec.max_code >> spec.man_bits) - spec.bias - spec.man_bits - 1)
        tie = m + half_ulp
        over = (x.abs() > tie) | ((x.abs() == tie) & bool(spec.max_code & 1))
        sign = (sign_bits(x) << 7).to(torch.uint8)
        ovf_code = spec.inf_code if spec.has_inf else spec.nan_code
        y = torch.where(over, sign | ovf_code, y)
    return torch.where(nan, torch.full_like(y, spec.nan_code), y)


def sign_bits(x):
    """Sign bits (0/1, uint8) of a float32 tensor, including the sign of zeros and NaNs."""
    return ((f32_to_bits(x) >> 31) & 1).to(torch.uint8)


def mismatches(got, want, kind):
    """Boolean tensor of elements whose bits differ, comparing NaN by class.

    ``kind`` is ``"fp32"`` (int32/uint32 bit patterns) or an FP8 format. Two NaNs match
    whatever their payload and sign; everything else, including the sign of zero, must be
    identical.
    """
    got = torch.as_tensor(got).to(torch.int64)
    want = torch.as_tensor(want).to(torch.int64)
    if kind == "fp32" or kind is FP32:
        mask = 0xFFFFFFFF
        got, want = got & mask, want & mask
        gnan, wnan = f32_is_nan(got), f32_is_nan(want)
    else:
        got, want = got & 0xFF, want & 0xFF
        gnan, wnan = fp8_is_nan(got.to(torch.uint8), kind), fp8_is_nan(want.to(torch.uint8), kind)
    return torch.where(gnan & wnan, torch.zeros_like(gnan), got != want)
