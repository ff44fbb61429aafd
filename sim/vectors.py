"""Test vectors for the arithmetic units: exhaustive sets, directed corner cases and random mixes.

All generators are deterministic for a given seed and return numpy arrays of raw bit
patterns (uint8 FP8 codes, uint32 binary32 patterns).
"""

import numpy as np
from fp8npu.hdl.formats import E4M3, E5M2

__all__ = ["all_fp8_pairs", "fp32_specials", "adder_vectors", "multiplier_vectors", "converter_inputs", "mac_chains"]


def all_fp8_pairs():
    """Every (a, b) code pair: 65,536 of them, a-major."""
    a = np.repeat(np.arange(256, dtype=np.uint8), 256)
    b = np.tile(np.arange(256, dtype=np.uint8), 256)
    return a, b


def _f32(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def fp32_specials():
    """Directed binary32 values: zeros, subnormal and normal boundaries, ones, max, inf, NaNs."""
    mags = [
        0x00000000, 0x00000001, 0x00000002, 0x00000003, 0x007FFFFF, 0x007FFFFE, 0x00400000,
        0x00800000, 0x00800001, 0x00FFFFFF, 0x01000000, 0x3F800000, 0x3F800001, 0x3F7FFFFF,
        0x3FFFFFFF, 0x40000000, 0x4B800000, 0x4B7FFFFF, 0x33800000, 0x34000000, 0x33FFFFFF,
        0x7F7FFFFF, 0x7F7FFFFE, 0x7F000000, 0x7E800000, 0x7F800000, 0x7FC00000, 0x7F800001,
        0x7FFFFFFF, 0x3EAAAAAB, 0x43E00000, 0x47600000,
    ]
    mags = np.array(mags, dtype=np.uint32)
    return np.concatenate([mags, mags | np.uint32(0x80000000)])


def adder_vectors(n, seed=0):
    """``n`` binary32 operand pairs for the adder: directed cases first, then mixed random.

    Mix: all pairs of :func:`fp32_specials`; uniform random bit patterns; operands with close
    exponents and opposite signs (massive cancellation); exact ties (the smaller operand
    is exactly half an ulp, or an odd multiple of it); carries into a new binade (mantissa
    all ones plus a small addend); subnormal +- subnormal and around the normal boundary;
    sums that overflow to infinity.
    """
    rng = np.random.default_rng(seed)
    sp = fp32_specials()
    da = np.repeat(sp, len(sp))
    db = np.tile(sp, len(sp))
    parts_a, parts_b = [da], [db]
    rest = max(n - len(da), 0)
    k = rest // 7 + 1

    def rand_sign(size):
        return rng.integers(0, 2, size, dtype=np.uint32) << np.uint32(31)

    def compose(sign, exp, man):
        return (sign | (np.asarray(exp, np.uint32) << np.uint32(23)) | np.asarray(man, np.uint32)).astype(np.uint32)

    # uniform random bit patterns
    parts_a.append(rng.integers(0, 2**32, k, dtype=np.uint32))
    parts_b.append(rng.integers(0, 2**32, k, dtype=np.uint32))
    # close exponents, opposite signs: cancellation
    ea = rng.integers(1, 255, k)
    eb = np.clip(ea + rng.integers(-2, 3, k), 1, 254)
    ma = rng.integers(0, 2**23, k, dtype=np.uint32)
    mb = ma ^ rng.integers(0, 2**rng.integers(1, 24, k), dtype=np.uint32)
    sa = rand_sign(k)
    parts_a.append(compose(sa, ea, ma))
    parts_b.append(compose(sa ^ np.uint32(0x80000000), eb, mb))
    # exact ties: b is a (odd multiple of) half ulp of a, or a few ulps around it
    ea = rng.integers(26, 255, k)
    d = rng.integers(22, 27, k)
    mb = (rng.integers(0, 4, k, dtype=np.uint32) << np.uint32(21))
    parts_a.append(compose(rand_sign(k), ea, rng.integers(0, 2**23, k, dtype=np.uint32)))
    parts_b.append(compose(rand_sign(k), ea - d, mb))
    # carry into a new binade
    ea = rng.integers(1, 255, k)
    ma = np.uint32(0x7FFFFF) ^ rng.integers(0, 4, k, dtype=np.uint32)
    eb = np.clip(ea - rng.integers(0, 30, k), 0, 254)
    sa = rand_sign(k)
    parts_a.append(compose(sa, ea, ma))
    parts_b.append(compose(sa, eb, rng.integers(0, 2**23, k, dtype=np.uint32)))
    # subnormals and the normal boundary
    parts_a.append(compose(rand_sign(k), rng.integers(0, 3, k), rng.integers(0, 2**23, k, dtype=np.uint32)))
    parts_b.append(compose(rand_sign(k), rng.integers(0, 3, k), rng.integers(0, 2**23, k, dtype=np.uint32)))
    # overflow: large same-sign operands
    sa = rand_sign(k)
    parts_a.append(compose(sa, rng.integers(250, 255, k), rng.integers(0, 2**23, k, dtype=np.uint32)))
    parts_b.append(compose(sa, rng.integers(250, 255, k), rng.integers(0, 2**23, k, dtype=np.uint32)))
    # random operands with a random exponent gap (alignment and sticky paths)
    ea = rng.integers(1, 255, k)
    eb = np.clip(ea - rng.integers(0, 40, k), 0, 254)
    parts_a.append(compose(rand_sign(k), ea, rng.integers(0, 2**23, k, dtype=np.uint32)))
    parts_b.append(compose(rand_sign(k), eb, rng.integers(0, 2**23, k, dtype=np.uint32)))

    a = np.concatenate(parts_a)[:max(n, len(da))]
    b = np.concatenate(parts_b)[:max(n, len(da))]
    swap = rng.integers(0, 2, len(a)).astype(bool)
    swap[:len(da)] = False
    return np.where(swap, b, a).astype(np.uint32), np.where(swap, a, b).astype(np.uint32)


def multiplier_vectors(n, seed=0):
    """``n`` binary32 operand pairs for the multiplier: all pairs of :func:`fp32_specials`,
    uniform bit patterns, and operands whose exponents sum near the subnormal and overflow
    boundaries (exponent fields adding up to 127 +- 30 and 254 +- 30), subnormal x normal,
    and power-of-two scales (as used for block scaling)."""
    rng = np.random.default_rng(seed)
    sp = fp32_specials()
    parts_a, parts_b = [np.repeat(sp, len(sp))], [np.tile(sp, len(sp))]
    k = max(n - len(sp) ** 2, 0) // 5 + 1

    def word(sign, exp, man):
        return ((np.asarray(sign, np.uint32) << np.uint32(31)) | (np.asarray(exp, np.uint32) << np.uint32(23))
                | np.asarray(man, np.uint32)).astype(np.uint32)

    def rs(size):
        return rng.integers(0, 2, size, dtype=np.uint32)

    def rm(size):
        return rng.integers(0, 2**23, size, dtype=np.uint32)

    parts_a.append(rng.integers(0, 2**32, k, dtype=np.uint32))
    parts_b.append(rng.integers(0, 2**32, k, dtype=np.uint32))
    for centre in (127, 254 + 127 - 127):
        ea = rng.integers(1, 255, k)
        eb = np.clip(centre - ea + rng.integers(-30, 31, k), 0, 254)
        parts_a.append(word(rs(k), ea, rm(k)))
        parts_b.append(word(rs(k), eb, rm(k)))
    parts_a.append(word(rs(k), 0, rm(k)))
    parts_b.append(word(rs(k), rng.integers(1, 255, k), rm(k)))
    parts_a.append(word(rs(k), rng.integers(0, 255, k), rm(k)))
    parts_b.append(word(0, rng.integers(127 - 40, 127 + 40, k), 0))
    a = np.concatenate(parts_a)[:max(n, len(sp) ** 2)]
    b = np.concatenate(parts_b)[:max(n, len(sp) ** 2)]
    return a.astype(np.uint32), b.astype(np.uint32)


def _fp8_values(spec):
    """All finite non-negative values of an FP8 format, ascending, as float64."""
    codes = np.arange(spec.sign_mask, dtype=np.int64)
    e = codes >> spec.man_bits
    m = codes & ((1 << spec.man_bits) - 1)
    val = np.where(e == 0, m / (1 << spec.man_bits) * 2.0 ** spec.emin,
                   (1 + m / (1 << spec.man_bits)) * 2.0 ** (e - spec.bias))
    return val[: spec.max_code + 1]


def converter_inputs(n, seed=0):
    """``n`` binary32 inputs for FP32 -> FP8: every boundary of both formats, then random.

    Directed: every FP8 value, every midpoint between neighbours (ties) and the binary32
    neighbours of each (just below / above a tie), max, the tie above max and beyond,
    the subnormal range down to half the smallest subnormal, +-0, +-inf, NaNs, FP32 subnormals
    and extremes -- all with both signs. Random: uniform bit patterns, and values with
    exponents uniform over the FP8 ranges.
    """
    rng = np.random.default_rng(seed)
    directed = [fp32_specials()]
    for spec in (E4M3, E5M2):
        vals = _fp8_values(spec)
        ulp_max = 2.0 ** ((spec.max_code >> spec.man_bits) - spec.bias - spec.man_bits)
        ext = np.concatenate([vals, [vals[-1] + ulp_max, vals[-1] + 2 * ulp_max, vals[-1] * 4]])
        mids = (ext[:-1] + ext[1:]) / 2
        pts = _f32(np.concatenate([vals, mids, [spec.min_subnormal / 2, spec.min_subnormal / 4]]))
        neigh = np.concatenate([pts, pts + 1, np.where(pts > 0, pts - 1, pts)]).astype(np.uint32)
        directed.append(neigh)
        directed.append(neigh | np.uint32(0x80000000))
    directed = np.concatenate(directed).astype(np.uint32)
    rest = max(n - len(directed), 0)
    uniform = rng.integers(0, 2**32, rest // 2, dtype=np.uint32)
    k = rest - len(uniform)
    exp = rng.integers(127 - 20, 127 + 18, k).astype(np.uint32)
    ranged = (rng.integers(0, 2, k, dtype=np.uint32) << np.uint32(31)) | (exp << np.uint32(23)) \
        | rng.integers(0, 2**23, k, dtype=np.uint32)
    return np.concatenate([directed, uniform, ranged]).astype(np.uint32)


def mac_chains(kind, length, chains, fmt_a, fmt_b, seed=0):
    """Operands for ``chains`` accumulation chains of ``length`` steps.

    Returns ``(a, b, acc0)``: codes ``[length, chains]`` (uint8) and each chain's starting
    accumulator (uint32 binary32 bits). FP8 products lie within [2^-32, 2^32) in magnitude,
    so within a few thousand steps they can neither overflow nor underflow binary32 from a
    zero start; the overflow and underflow kinds therefore start from a preloaded
    accumulator, as the NPU does when it continues a partial sum. Even then a finite product
    (< 2^32) is far below half an ulp of the binary32 maximum (2^103): a chain overflows only
    through an infinite operand.

    * ``"normal"``: codes of N(0, 1) samples, start +0.
    * ``"random"``: uniform random codes without NaN and infinity codes, start +0.
    * ``"overflow"``: large positive products added to an accumulator that starts at the top
      of the binary32 range (they must round back to it, never past it); E5M2 operands also
      carry occasional +inf codes, so those chains overflow to +inf (and to NaN where an
      infinity meets a zero).
    * ``"underflow"``: the smallest FP8 magnitudes with random signs added to an accumulator
      that starts in the binary32 subnormal range: sums pass through tiny values, cancel to
      signed zeros and absorb the subnormal start.
    * ``"specials"``: random codes including NaN and infinity codes, start +0.
    """
    import torch

    from .golden import fp8_is_nan

    rng = np.random.default_rng(seed)
    shape = (length, chains)
    acc0 = np.zeros(chains, dtype=np.uint32)

    def encode(x, fmt):
        spec = (E4M3, E5M2)[fmt]
        t = torch.from_numpy(x.astype(np.float32)).clamp(-spec.max_value, spec.max_value)
        return t.to(getattr(torch, spec.torch_dtype)).view(torch.uint8).numpy()

    def codes(fmt):
        spec = (E4M3, E5M2)[fmt]
        if kind == "normal":
            return encode(rng.standard_normal(shape), fmt)
        if kind in ("random", "specials"):
            c = rng.integers(0, 256, shape, dtype=np.uint8)
            if kind == "random":
                nan = fp8_is_nan(torch.from_numpy(c), spec).numpy()
                inf = ((c & 0x7F) == 0x7C) if spec.has_inf else np.zeros_like(nan)
                c = np.where(nan | inf, c & 0x80, c)
            return c
        if kind == "overflow":
            return encode(rng.uniform(0.5, 1.0, shape) * spec.max_value, fmt) & np.uint8(0x7F)
        if kind == "underflow":
            mag = rng.integers(0, 1 << spec.man_bits, shape, dtype=np.uint8)
            return ((rng.integers(0, 2, shape, dtype=np.uint8) << 7) | mag).astype(np.uint8)
        raise ValueError(f"chain kind must be one of normal, random, overflow, underflow, specials, not {kind!r}")

    a = codes(fmt_a)
    b = codes(fmt_b)
    if kind == "overflow":
        for ops, fmt in ((a, fmt_a), (b, fmt_b)):
            if (E4M3, E5M2)[fmt].has_inf:
                ops[rng.random(shape) < 1.0 / length] = E5M2.inf_code
        acc0 = (np.uint32(0x7F7FFFFF) - rng.integers(0, 1 << 8, chains, dtype=np.uint32)).astype(np.uint32)
    elif kind == "underflow":
        acc0 = ((rng.integers(0, 2, chains, dtype=np.uint32) << np.uint32(31))
                | rng.integers(0, 1 << 23, chains, dtype=np.uint32)).astype(np.uint32)
    return a, b, acc0
