"""FP8 quantization rules: scales and codes for weights (at compile time) and activations (on
the host, at run time). Part of the numerics contract (docs/numerics.md, section
"Quantized layers"); the compiler, the runtime and the reference models all call these
functions, so there is one definition.

Granularities (a scale per group of values):

* weights ``[N, K]`` (out features x in features): ``tensor`` (one scale), ``channel`` (one
  per output row), ``block`` (one per 128 x 128 block, DeepSeek-V3's weight scaling);
* activations ``[T, K]`` (tokens x features): ``tensor``, ``token`` (one per row), ``tile``
  (one per 1 x 128 tile of a row, DeepSeek-V3's activation scaling).

Scale kinds, from ``amax`` = the largest magnitude in the group (NaNs ignored) and ``max`` =
the format's largest finite value (E4M3 448, E5M2 57344):

* ``pow2`` (default; UE8M0, as DeepSeek-V3.1, DeepGEMM and OCP MX use): ``s = 2^e`` with the
  smallest integer ``e`` such that ``amax <= max * 2^e``, found exactly with integer exponent
  arithmetic (no logarithms); ``e`` is clamped to E8M0's range [-127, 127]. Dividing by ``s``
  is exact (barring underflow), and so is applying it again in the NPU;
* ``fp32``: ``s = fp32(amax / max)`` (one binary32 division, rounded to nearest even);
  ``s`` below the smallest normal binary32 becomes 2^-126.

An all-zero group (or one whose ``amax`` is not finite) gets ``s = 1``. Codes are
``quantize(fp32(x / s), fmt, saturate=True)``: one binary32 division, then the golden
model's FP8 rounding (nearest even, saturating; NaN stays NaN).
"""

import math

import torch

from . import golden

__all__ = ["WEIGHT_GRANULARITIES", "ACTIVATION_GRANULARITIES", "SCALE_KINDS", "BLOCK", "scales_from_amax",
           "quantize_weight", "quantize_activation", "quantize_with", "expand_scales", "dequantize"]

BLOCK = 128
WEIGHT_GRANULARITIES = ("tensor", "channel", "block")
ACTIVATION_GRANULARITIES = ("tensor", "token", "tile")
SCALE_KINDS = ("pow2", "fp32")


def _max_finite(fmt):
    return golden._fmt(fmt).max_value


def scales_from_amax(amax, fmt, kind="pow2"):
    """Scales (float32 tensor) for group maxima ``amax`` (float32 tensor) under the rules above."""
    if kind not in SCALE_KINDS:
        raise ValueError(f"scale kind must be one of {', '.join(SCALE_KINDS)}, not {kind!r}")
    amax = amax.to(torch.float32)
    top = _max_finite(fmt)
    usable = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(usable, amax, torch.ones_like(amax))
    if kind == "pow2":
        # amax = m * 2^E exactly (m in [0.5, 1)); start from e = E - exponent of max, then fix up
        # with exact comparisons in float64 (amax and max * 2^e are both exact there)
        _, exp_a = torch.frexp(safe.to(torch.float64))
        _, exp_m = math.frexp(top)
        e = (exp_a - exp_m).to(torch.int64)
        a64 = safe.to(torch.float64)
        for _ in range(2):
            too_small = a64 > top * torch.pow(2.0, e.to(torch.float64))
            e = torch.where(too_small, e + 1, e)
            fits_lower = a64 <= top * torch.pow(2.0, (e - 1).to(torch.float64))
            e = torch.where(fits_lower, e - 1, e)
        e = e.clamp(-127, 127)
        s = torch.pow(2.0, e.to(torch.float64)).to(torch.float32)
    else:
        s = safe / torch.tensor(top, dtype=torch.float32)
        s = torch.where(s < 2.0 ** -126, torch.full_like(s, 2.0 ** -126), s)
    return torch.where(usable, s, torch.ones_like(s))


def _amax(x, dims):
    a = torch.where(torch.isnan(x), torch.zeros_like(x), x.abs())
    return a.amax(dim=dims, keepdim=True) if dims else a.amax()


def _blocks(x, rows, cols):
    """[R, C] -> [ceil(R/rows), ceil(C/cols)] group maxima of |x| (zero padded)."""
    r, c = x.shape
    pr, pc = -r % rows, -c % cols
    padded = torch.nn.functional.pad(torch.where(torch.isnan(x), torch.zeros_like(x), x.abs()), (0, pc, 0, pr))
    return padded.reshape((r + pr) // rows, rows, (c + pc) // cols, cols).amax(dim=(1, 3))


def expand_scales(scales, shape, granularity):
    """Per-element scales [R, C] from group scales (tensor [1, 1], rows [R, 1], tiles [R, ceil(C/128)],
    blocks [ceil(R/128), ceil(C/128)])."""
    r, c = shape
    if granularity in ("tensor", "channel", "token"):
        return scales.expand(r, c)
    if granularity == "tile":
        return scales.repeat_interleave(BLOCK, dim=1)[:, :c]
    return scales.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:r, :c]


def quantize_with(x, scales, fmt):
    """FP8 codes (uint8) of ``fp32(x / scales)`` (``scales`` broadcast to ``x``)."""
    q = x.to(torch.float32) / scales
    return golden.quantize(golden.f32_to_bits(q), fmt, saturate=True)


def quantize_weight(w, fmt="e4m3", granularity="channel", kind="pow2"):
    """Weights [N, K] -> (codes [N, K] uint8, scales): tensor [1, 1], channel [N, 1], block
    [ceil(N/128), ceil(K/128)] float32."""
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"weight granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, not {granularity!r}")
    w = w.detach().to(torch.float32)
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [out, in], not {w.dim()}-D")
    amax = {"tensor": lambda: _amax(w, None).reshape(1, 1), "channel": lambda: _amax(w, (1,)),
            "block": lambda: _blocks(w, BLOCK, BLOCK)}[granularity]()
    s = scales_from_amax(amax, fmt, kind)
    return quantize_with(w, expand_scales(s, w.shape, granularity), fmt), s


def quantize_activation(x, fmt="e4m3", granularity="token", kind="pow2"):
    """Activations [T, K] -> (codes [T, K] uint8, scales): tensor [1, 1], token [T, 1], tile
    [T, ceil(K/128)] float32."""
    if granularity not in ACTIVATION_GRANULARITIES:
        raise ValueError(f"activation granularity must be one of {', '.join(ACTIVATION_GRANULARITIES)}, "
                         f"not {granularity!r}")
    x = x.detach().to(torch.float32)
    amax = {"tensor": lambda: _amax(x, None).reshape(1, 1), "token": lambda: _amax(x, (1,)),
            "tile": lambda: _blocks(x, 1, BLOCK)}[granularity]()
    s = scales_from_amax(amax, fmt, kind)
    return quantize_with(x, expand_scales(s, x.shape, granularity), fmt), s


def dequantize(codes, scales, fmt, granularity):
    """float32 values ``decode(codes) * scales`` (exact for pow2 scales; for inspection)."""
    return golden.decode_fp8(codes, fmt) * expand_scales(scales, codes.shape, granularity)
