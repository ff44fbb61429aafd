"""Reference models: the contract of fp8npu's compound operations written directly with the
golden model (:mod:`.golden`), independent of any tiling or schedule, for tests and the
benchmarks. The compiler's lowerings are checked against these, bit for bit.

* :func:`reference_gemm`: ``C = A @ B`` of FP8 codes with sequential FP32 accumulation,
  optional DeepSeek-style 128-block scaling, epilogue (column scale, bias) and FP8 output.
* :func:`gemm_scales` and :func:`reference_qmatmul`: a quantized matrix product of FP32
  tensors (a linear layer, or a product of two activations) as docs/numerics.md section 7
  defines it: quantize both sides (:mod:`.quant`), then the scaled FP8 GEMM.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from fp8npu.hdl.formats import Format, format_by_name
from fp8npu.hdl.isa import StoreFormat

from . import golden

__all__ = ["BLOCK_K", "OUTPUTS", "GemmArgs", "f32_bits", "reference_gemm", "gemm_scales", "quantize_operands",
           "reference_qmatmul"]

#: Width of a fine-grained scaling block along K (row scales) and along N (column scales).
BLOCK_K = 128

#: Output formats of a GEMM and their STORE format codes.
OUTPUTS = {"fp32": StoreFormat.FP32, "e4m3": StoreFormat.E4M3, "e5m2": StoreFormat.E5M2}


# ---- arguments --------------------------------------------------------------------------------
def _codes(x, name):
    """A 2-D array of FP8 codes (uint8 torch tensor or numpy array) as a numpy uint8 array."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D uint8 array of FP8 codes, not {arr.ndim}-D {arr.dtype}")
    return np.ascontiguousarray(arr)


def _format(fmt, name):
    """An FP8 format given as a Format, 0/1 or a name."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt in (0, 1):
        return Format(fmt)
    if isinstance(fmt, str):
        return format_by_name(fmt)
    raise ValueError(f"{name} must be e4m3 or e5m2, not {fmt!r}")


def f32_bits(x, name, shape):
    """FP32 values (floats, rounded to binary32) or int32 bit patterns -> int32 bits of ``shape``."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        x = torch.tensor(float(x), dtype=torch.float64)
    t = torch.as_tensor(x)
    if t.dtype == torch.int32:
        bits = t
    elif t.is_floating_point():
        bits = t.to(torch.float32).view(torch.int32)
    else:
        raise ValueError(f"{name} must be FP32 values (a float tensor) or int32 bit patterns, not {t.dtype}")
    if tuple(bits.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, not {tuple(bits.shape)}")
    return bits.contiguous()


@dataclass
class GemmArgs:
    """The checked arguments of a GEMM (shared by ``compiler.gemm.build_gemm`` and :func:`reference_gemm`)."""

    a: np.ndarray
    b: np.ndarray
    fmt_a: Format
    fmt_b: Format
    out: str
    out_scale: int              # FP32 bits
    saturate: bool
    col_scale: torch.Tensor     # [N] int32 bits or None
    bias: torch.Tensor          # [N] int32 bits or None
    row_scales: torch.Tensor    # [M, KB] int32 bits or None
    col_scales: torch.Tensor    # [KB, NB] int32 bits or None

    @property
    def shape(self):
        return self.a.shape[0], self.a.shape[1], self.b.shape[1]

    @property
    def blocked(self):
        return self.row_scales is not None

    @classmethod
    def from_args(cls, a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales):
        a, b = _codes(a_codes, "a_codes"), _codes(b_codes, "b_codes")
        (m, k), (k2, n) = a.shape, b.shape
        if k != k2:
            raise ValueError(f"a_codes is {m}x{k} and b_codes is {k2}x{n}: the inner dimensions must match")
        if not (m and k and n):
            raise ValueError(f"every GEMM dimension must be at least 1, not M={m} K={k} N={n}")
        if out not in OUTPUTS:
            raise ValueError(f"out must be one of {', '.join(OUTPUTS)}, not {out!r}")
        scale_bits = int(f32_bits(out_scale, "out_scale", ())) & 0xFFFFFFFF
        if out == "fp32" and scale_bits != 0x3F800000:
            raise ValueError("out_scale applies only to FP8 outputs (out='e4m3' or 'e5m2')")
        rs = cs = None
        if block_scales is not None:
            if not isinstance(block_scales, (tuple, list)) or len(block_scales) != 2:
                raise ValueError("block_scales must be a pair (row_scales[M, KB], col_scales[KB, NB])")
            kb, nb = math.ceil(k / BLOCK_K), math.ceil(n / BLOCK_K)
            rs = f32_bits(block_scales[0], "row_scales", (m, kb))
            cs = f32_bits(block_scales[1], "col_scales", (kb, nb))
        return cls(
            a, b, _format(fmt_a, "fmt_a"), _format(fmt_b, "fmt_b"), out, scale_bits, bool(saturate),
            None if col_scale is None else f32_bits(col_scale, "col_scale", (n,)),
            None if bias is None else f32_bits(bias, "bias", (n,)), rs, cs)

    def column_block_scales(self):
        """[KB, N] int32: the column scale of every output column, ``col_scales[kb][j // 128]``."""
        n = self.shape[2]
        return self.col_scales[:, torch.arange(n) // BLOCK_K]


# ---- reference -------------------------------------------------------------------------------
def reference_gemm(a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
                   col_scale=None, bias=None, block_scales=None):
    """The expected GEMM output, written directly from the contract with golden functions.

    Same arguments as ``compiler.gemm.build_gemm``. Returns [M, N]: int32 FP32 bits, or uint8 FP8 codes.
    Independent of any tiling: one sequential K loop per output (per K block when scaled).
    """
    g = GemmArgs.from_args(a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales)
    m, k, n = g.shape
    a, b = torch.from_numpy(g.a), torch.from_numpy(g.b)
    fa, fb = g.fmt_a.value, g.fmt_b.value
    if not g.blocked:
        acc = golden.mac(a.T.unsqueeze(2), b.unsqueeze(1), fa, fb)
    else:
        acc = torch.zeros((m, n), dtype=torch.int32)                 # +0
        col = g.column_block_scales()
        for kb in range(g.row_scales.shape[1]):
            ks = slice(kb * BLOCK_K, min(k, (kb + 1) * BLOCK_K))
            partial = golden.mac(a[:, ks].T.unsqueeze(2), b[ks].unsqueeze(1), fa, fb)
            scale = golden.mul_f32(g.row_scales[:, kb:kb + 1], col[kb].unsqueeze(0))
            acc = golden.add(acc, golden.mul_f32(partial, scale))
    if g.col_scale is not None:
        acc = golden.mul_f32(acc, g.col_scale.unsqueeze(0))
    if g.bias is not None:
        acc = golden.add(acc, g.bias.unsqueeze(0))
    if g.out == "fp32":
        return acc
    scale = torch.tensor([g.out_scale], dtype=torch.int64).to(torch.int32)   # two's complement wrap
    return golden.quantize(golden.mul_f32(acc, scale), g.out, saturate=g.saturate)


# ---- quantized matrix products --------------------------------------------------------------
def gemm_scales(act_scales, act_granularity, w_scales, w_granularity, m, k, n):
    """The scaled GEMM's scale operands for quantized ``A [M, K]`` and ``W [N, K]`` (B = W^T):
    ``row_scales [M, KB]`` (the activation scale of row i in K block kb), ``col_scales [KB, NB]``
    (the weight scale of K block kb and 128-column block nb; 1 for per-channel weights) and
    ``col_scale [N]`` (per-channel weight scales, else None). All float32."""
    kb_n, nb_n = math.ceil(k / BLOCK_K), math.ceil(n / BLOCK_K)
    a = act_scales.to(torch.float32)
    if act_granularity == "tensor":
        rows = a.reshape(1, 1).expand(m, kb_n)
    elif act_granularity == "token":
        rows = a.reshape(m, 1).expand(m, kb_n)
    else:                                                    # tile: [M, KB]
        rows = a.reshape(m, kb_n)
    w = w_scales.to(torch.float32)
    col_scale = None
    if w_granularity == "tensor":
        cols = w.reshape(1, 1).expand(kb_n, nb_n)
    elif w_granularity == "channel":
        cols = torch.ones((kb_n, nb_n), dtype=torch.float32)
        col_scale = w.reshape(n)
    else:                                                    # block: [NB, KB] -> [KB, NB]
        cols = w.reshape(nb_n, kb_n).T
    return rows.contiguous(), cols.contiguous(), col_scale


#: How the right operand of a product is scaled (see :func:`quantize_operands`).
W_SCALINGS = (None, "n", "k")


def quantize_operands(x, w, quant, w_scaling=None):
    """Quantize ``x [M, K]`` (activations) and ``w [N, K]`` (weights, or the transposed right
    operand of a product of activations) by ``quant`` (fields ``format``, ``weights``,
    ``activations``, ``scales``); returns (a_codes, b_codes [K, N], row_scales, col_scales, col_scale).

    ``w_scaling`` overrides ``quant.weights`` for a right operand whose rows or columns are
    positions of a KV cache, so that an appended position never changes the codes or scales of
    the others (docs/numerics.md section 7): ``"n"``, one scale per row of ``w`` (an output
    column; the epilogue's column scale); ``"k"``, one scale per column of ``w`` (a K index),
    folded into ``x`` before ``x`` is quantized: ``x'[:, j] = fp32(x[:, j] * s[j])``, exact for
    power-of-two scales unless it leaves the FP32 range.
    """
    from . import quant as q
    if w_scaling not in W_SCALINGS:
        raise ValueError(f"w_scaling must be one of {W_SCALINGS}, not {w_scaling!r}")
    m, k = x.shape
    n = w.shape[0]
    if w_scaling == "k":
        b_codes, k_scales = q.quantize_weight(w.T, quant.format, "channel", quant.scales)   # [K, N], [K, 1]
        x = x.detach().to(torch.float32) * k_scales.reshape(1, k)
        a_codes, a_scales = q.quantize_activation(x, quant.format, quant.activations, quant.scales)
        rows, cols, col_scale = gemm_scales(a_scales, quant.activations, torch.ones(1, 1), "tensor", m, k, n)
        return a_codes, b_codes.contiguous(), rows, cols, col_scale
    granularity = "channel" if w_scaling == "n" else quant.weights
    a_codes, a_scales = q.quantize_activation(x, quant.format, quant.activations, quant.scales)
    w_codes, w_scales = q.quantize_weight(w, quant.format, granularity, quant.scales)
    rows, cols, col_scale = gemm_scales(a_scales, quant.activations, w_scales, granularity, m, k, n)
    return a_codes, w_codes.T.contiguous(), rows, cols, col_scale


def reference_qmatmul(x, w, bias, quant, w_scaling=None):
    """``x [M, K] @ w[N, K]^T + bias`` as the NPU computes it, written directly from the contract:
    quantize (:func:`quantize_operands`), then :func:`reference_gemm` with 128-block scaling,
    column scale and bias. Returns float32 [M, N]."""
    a_codes, b_codes, rows, cols, col_scale = quantize_operands(x, w, quant, w_scaling)
    bits = reference_gemm(a_codes, b_codes, quant.format, quant.format, block_scales=(rows, cols),
                          col_scale=col_scale, bias=None if bias is None else bias.detach().to(torch.float32))
    return golden.bits_to_f32(bits)
