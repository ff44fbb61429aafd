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

__all__ = ["BLOCK_K", "OUTPUTS", "GemmArgs", "f32_bits", "reference_gemm", "finish_gemm", "scale_bits", "scale_block", "weight_col_scales", "gemm_scales",
           "quantize_operands", "reference_qmatmul"]

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


def scale_bits(role, values, m, k, n, block_k):
    """Block scales of an M x K x N GEMM as int32 FP32 bits: ``row_scales`` [M, KB], or
    ``col_scales`` [KB, N] from [KB, N] or [KB, NB] (one per 128 columns); KB = ceil(K /
    block_k), NB = ceil(N / 128). A wrong shape raises ValueError naming the one expected."""
    kb, nb = math.ceil(k / block_k), math.ceil(n / BLOCK_K)
    if role == "row_scales":
        return f32_bits(values, "row_scales", (m, kb))
    cs = torch.as_tensor(values)
    if tuple(cs.shape) == (kb, n):
        return f32_bits(cs, "col_scales", (kb, n))
    return f32_bits(cs, "col_scales", (kb, nb))[:, torch.arange(n) // BLOCK_K]


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
    col_scales: torch.Tensor    # [KB, N] int32 bits (one per column) or None
    block_k: int = BLOCK_K      # K positions per scaling block

    @property
    def shape(self):
        return self.a.shape[0], self.a.shape[1], self.b.shape[1]

    @property
    def blocked(self):
        return self.row_scales is not None

    def finish_fields(self):
        """The arguments of :func:`finish_gemm` for this GEMM."""
        return {"row_scales": self.row_scales, "col_scales": self.col_scales, "col_scale": self.col_scale,
                "bias": self.bias, "out": self.out, "out_scale": self.out_scale, "saturate": self.saturate}

    @classmethod
    def from_args(cls, a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales,
                  block_k=BLOCK_K):
        a, b = _codes(a_codes, "a_codes"), _codes(b_codes, "b_codes")
        (m, k), (k2, n) = a.shape, b.shape
        if k != k2:
            raise ValueError(f"a_codes is {m}x{k} and b_codes is {k2}x{n}: the inner dimensions must match")
        if not (m and k and n):
            raise ValueError(f"every GEMM dimension must be at least 1, not M={m} K={k} N={n}")
        if out not in OUTPUTS:
            raise ValueError(f"out must be one of {', '.join(OUTPUTS)}, not {out!r}")
        out_bits = int(f32_bits(out_scale, "out_scale", ())) & 0xFFFFFFFF
        if out == "fp32" and out_bits != 0x3F800000:
            raise ValueError("out_scale applies only to FP8 outputs (out='e4m3' or 'e5m2')")
        if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1:
            raise ValueError(f"block_k must be a positive number of K positions, not {block_k!r}")
        rs = cs = None
        if block_scales is not None:
            if not isinstance(block_scales, (tuple, list)) or len(block_scales) != 2:
                raise ValueError("block_scales must be a pair (row_scales[M, KB], col_scales[KB, NB] or [KB, N])")
            rs = scale_bits("row_scales", block_scales[0], m, k, n, block_k)
            cs = scale_bits("col_scales", block_scales[1], m, k, n, block_k)
        return cls(
            a, b, _format(fmt_a, "fmt_a"), _format(fmt_b, "fmt_b"), out, out_bits, bool(saturate),
            None if col_scale is None else f32_bits(col_scale, "col_scale", (n,)),
            None if bias is None else f32_bits(bias, "bias", (n,)), rs, cs.contiguous() if cs is not None else None,
            block_k)


# ---- reference -------------------------------------------------------------------------------
def reference_gemm(a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
                   col_scale=None, bias=None, block_scales=None, block_k=BLOCK_K, accumulation="sequential",
                   acc_block=128):
    """The expected GEMM output, written directly from the contract with golden functions.

    Same arguments as ``compiler.gemm.build_gemm``. Returns [M, N]: int32 FP32 bits, or uint8 FP8 codes.
    Independent of any tiling: one K loop per output (per K block of ``block_k`` when scaled):
    sequential FP32, or with ``accumulation="block"`` exact sums of ``acc_block`` positions
    rounded once (docs/numerics.md section 3; a scaling block's partial starts a new exact
    block, so exact blocks are cut at scaling-block boundaries too).
    """
    if accumulation not in ("sequential", "block"):
        raise ValueError(f"accumulation must be sequential or block, not {accumulation!r}")

    def dot(a_part, b_part, fa, fb):
        if accumulation == "block":
            return golden.mac_blocks(a_part, b_part, fa, fb, acc_block)
        return golden.mac(a_part, b_part, fa, fb)

    g = GemmArgs.from_args(a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales,
                           block_k)
    m, k, n = g.shape
    a, b = torch.from_numpy(g.a), torch.from_numpy(g.b)
    fa, fb = g.fmt_a.value, g.fmt_b.value
    if not g.blocked:
        return finish_gemm([dot(a.T.unsqueeze(2), b.unsqueeze(1), fa, fb)], **g.finish_fields())
    partials = []
    for kb in range(g.row_scales.shape[1]):
        ks = slice(kb * g.block_k, min(k, (kb + 1) * g.block_k))
        partials.append(dot(a[:, ks].T.unsqueeze(2), b[ks].unsqueeze(1), fa, fb))
    return finish_gemm(partials, **g.finish_fields())


def finish_gemm(partials, row_scales=None, col_scales=None, col_scale=None, bias=None, out="fp32",
                out_scale=0x3F800000, saturate=True):
    """A GEMM's output from its K-block partial sums by the contract (the fields of a
    :class:`GemmArgs`, as int32 FP32 bits): ``partials`` holds one [M, N] sum per K block
    (``row_scales`` [M, KB], ``col_scales`` [KB, N]; then ``acc = fp32(acc + fp32(p *
    fp32(row_scale * col_scale)))`` from +0, block by block), or, unscaled, the one
    accumulator; then the column scale, the bias and the output conversion. The reference and
    the host side of a GEMM on an NPU without a vector unit both use it."""
    if row_scales is None:
        (acc,) = partials
    else:
        acc = torch.zeros(partials[0].shape, dtype=torch.int32)     # +0
        for kb, partial in enumerate(partials):
            scale = golden.mul_f32(row_scales[:, kb:kb + 1], col_scales[kb].unsqueeze(0))
            acc = golden.add(acc, golden.mul_f32(partial, scale))
    if col_scale is not None:
        acc = golden.mul_f32(acc, col_scale.unsqueeze(0))
    if bias is not None:
        acc = golden.add(acc, bias.unsqueeze(0))
    if out == "fp32":
        return acc
    scale = torch.tensor([out_scale], dtype=torch.int64).to(torch.int32)   # two's complement wrap
    return golden.quantize(golden.mul_f32(acc, scale), out, saturate=saturate)


# ---- quantized matrix products --------------------------------------------------------------
def scale_block(act_granularity, w_granularity, k):
    """K positions per scaling block of a quantized product: 128 when a scale changes along K
    (1 x 128 activation tiles, 128 x 128 weight blocks), else all of K (one block)."""
    return BLOCK_K if act_granularity == "tile" or w_granularity == "block" else max(1, k)


def weight_col_scales(w_scales, w_granularity, k, n, block_k):
    """``col_scales [KB, N]`` float32: the weight scale of K block kb (of ``block_k``) and
    column j, from weight scales of ``w_granularity`` (:func:`fp8npu.sim.quant.quantize_weight`)."""
    kb_n = math.ceil(k / block_k)
    w = w_scales.to(torch.float32)
    if w_granularity == "tensor":
        return w.reshape(1, 1).expand(kb_n, n).contiguous()
    if w_granularity == "channel":
        return w.reshape(1, n).expand(kb_n, n).contiguous()
    nb_n = math.ceil(n / BLOCK_K)                            # block: [NB, KB] -> [KB, N]
    return w.reshape(nb_n, kb_n).T[:, torch.arange(n) // BLOCK_K].contiguous()


def gemm_scales(act_scales, act_granularity, w_scales, w_granularity, m, k, n, block_k=None):
    """The scaled GEMM's scale operands for quantized ``A [M, K]`` and ``W [N, K]`` (B = W^T):
    ``row_scales [M, KB]`` (the activation scale of row i in K block kb), ``col_scales [KB, N]``
    (the weight scale of K block kb and column j) and the block length ``block_k``
    (default :func:`scale_block`; KB = ceil(K / block_k)). Float32 tensors and an int."""
    block_k = block_k or scale_block(act_granularity, w_granularity, k)
    kb_n = math.ceil(k / block_k)
    a = act_scales.to(torch.float32)
    if act_granularity == "tensor":
        rows = a.reshape(1, 1).expand(m, kb_n)
    elif act_granularity == "token":
        rows = a.reshape(m, 1).expand(m, kb_n)
    else:                                                    # tile: [M, KB]
        rows = a.reshape(m, kb_n)
    cols = weight_col_scales(w_scales, w_granularity, k, n, block_k)
    return rows.contiguous(), cols.contiguous(), block_k


#: How the right operand of a product is scaled (see :func:`quantize_operands`).
W_SCALINGS = (None, "n", "k")


def quantize_operands(x, w, quant, w_scaling=None):
    """Quantize ``x [M, K]`` (activations) and ``w [N, K]`` (weights, or the transposed right
    operand of a product of activations) by ``quant`` (fields ``format``, ``weights``,
    ``activations``, ``scales``); returns (a_codes, b_codes [K, N], row_scales, col_scales,
    block_k) as :func:`gemm_scales` defines them.

    ``w_scaling`` overrides ``quant.weights`` for a right operand whose rows or columns are
    positions of a KV cache, so that an appended position never changes the codes or scales of
    the others (docs/numerics.md section 7): ``"n"``, one scale per row of ``w`` (an output
    column); ``"k"``, one scale per column of ``w`` (a K index), folded into ``x`` before ``x``
    is quantized: ``x'[:, j] = fp32(x[:, j] * s[j])``, exact for power-of-two scales unless it
    leaves the FP32 normal range.
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
        rows, cols, block_k = gemm_scales(a_scales, quant.activations, torch.ones(1, 1), "tensor", m, k, n)
        return a_codes, b_codes.contiguous(), rows, cols, block_k
    granularity = "channel" if w_scaling == "n" else quant.weights
    a_codes, a_scales = q.quantize_activation(x, quant.format, quant.activations, quant.scales)
    w_codes, w_scales = q.quantize_weight(w, quant.format, granularity, quant.scales)
    rows, cols, block_k = gemm_scales(a_scales, quant.activations, w_scales, granularity, m, k, n)
    return a_codes, w_codes.T.contiguous(), rows, cols, block_k


def reference_qmatmul(x, w, bias, quant, w_scaling=None, accumulation="sequential", acc_block=128):
    """``x [M, K] @ w[N, K]^T + bias`` as the NPU computes it, written directly from the contract:
    quantize (:func:`quantize_operands`), then :func:`reference_gemm` with block scaling and
    the bias in the epilogue, in the NPU's accumulation mode. Returns float32 [M, N]."""
    a_codes, b_codes, rows, cols, block_k = quantize_operands(x, w, quant, w_scaling)
    bits = reference_gemm(a_codes, b_codes, quant.format, quant.format, block_scales=(rows, cols), block_k=block_k,
                          bias=None if bias is None else bias.detach().to(torch.float32),
                          accumulation=accumulation, acc_block=acc_block)
    return golden.bits_to_f32(bits)
