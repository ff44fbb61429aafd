"""GEMM program builder: ``C = A @ B`` of FP8 operands as an fp8npu command stream and DRAM image.

:func:`build_gemm` returns a :class:`GemmProgram`: the program, a DRAM image holding the
operands and the program, the register values to run it with, and ``read_output``.
:func:`reference_gemm` is the same computation written directly with the golden model, for
tests.

What is computed (docs/numerics.md, isa.SEMANTICS)
--------------------------------------------------
* plain: ``acc[i][j]`` = sequential FP32 sum over k = 0..K-1 in order of the exact products
  ``A[i][k] * B[k][j]``, starting from +0;
* block scaling (``block_scales=(row_scales[M, KB], col_scales[KB, NB])``, KB = ceil(K/128),
  NB = ceil(N/128)): for each 128-wide K block kb, ``p`` = the sequential sum over the block
  from +0, ``s = fp32(row_scales[i][kb] * col_scales[kb][j // 128])``, and
  ``acc = fp32(acc + fp32(p * s))`` starting from ``acc = +0``;
* epilogue: ``acc = fp32(acc * col_scale[j])``, then ``acc = fp32(acc + bias[j])``;
* output: FP32 bits, or ``convert(fp32(acc * out_scale), fmt, saturate)``.

Tiling
------
* K is cut into tiles of at most ``cfg.rows`` values that never cross a 128 boundary when
  block scaling is on; each MATMUL has ``k`` = the tile's real length, so no padded product
  is ever added. The first K tile of an output tile (of a K block, with block scaling)
  overwrites (``accumulate=0``), the following ones accumulate.
* N is cut into tiles of ``cfg.cols`` columns; STORE writes ``cols`` = the real width.
* M is cut into :attr:`GemmProgram.m_block`-row blocks, as large as the SRAMs allow with
  double buffering (one MATMUL streams all rows of a block), balanced so that the last
  block is not tiny.
* Loop order: M blocks, N tiles, K tiles (innermost); one "step" per K tile.

SRAM use (two of everything, so DMA overlaps compute)
----------------------------------------------------
* scratchpad buffer b (b = step % 2): ``m_block`` lines of A (row i of the tile in line i,
  its K values in bytes 0..k-1), then ``rows`` lines of B (row kk of the tile in line kk);
  with block scaling, one zero line after the two buffers;
* accumulator: output regions 0 and 1 (``m_block`` lines each, used by alternate output
  tiles); with block scaling a temporary region (``m_block`` lines) for the K-block partial
  sums; then two auxiliary areas (one per buffer) holding the row scales (``m_block`` lines,
  value in lane 0) and the column scale line of a K block, and the epilogue scale and bias
  lines.

The output accumulator of a block-scaled tile must start at +0: a MATMUL with ``k = 1``
that reads the zero scratchpad line as both A (``a_stride = 0``) and B writes
``fp32(+0 + 0 * 0) = +0`` to all its lines. It runs on the compute unit, so it needs no
extra synchronisation, costs one pass of the array per output tile and no DMA.

Tokens
------
The load unit fills buffer b and pushes a token to compute (``push_next`` on the last LOAD
of the step); compute pops it (``pop_prev`` on the step's first command) and gives the buffer
back (``push_prev`` on the step's last command); the load unit pops that (``pop_next`` on the
step's first LOAD) before refilling the buffer. Two SYNC commands on the compute unit with
``push_prev`` prime the two buffers. Output regions work the same way between compute
(``push_next`` on the tile's last command, ``pop_next`` on the first command writing the
region) and store (``pop_prev``, ``push_prev``), primed by two SYNCs on the store unit. The
last two steps (tiles) push no return token, so every counter ends at zero. Commands are
emitted step by step (loads, compute, then the tile's STORE), so every token a command pops
was pushed by an earlier command: the in-order dispatcher never deadlocks, whatever
``queue_depth``.

DRAM layout (all addresses absolute; the image covers ``[0, win_limit)``)
-----------------------------------------------------------------------
From ``base`` (a multiple of 32), each region starting on a 32-byte boundary:

====================  ======================================================================
A                     M rows, each row its K tiles, every tile starting on a bus-width
                      boundary (:class:`TiledLayout`; dense row-major when ``rows`` is a
                      multiple of the bus width)
B                     K rows, each row its N tiles, bus aligned the same way
col_scale, bias       one FP32 row each, in N tiles (only when given)
row scales            ``row_scales[i][kb]`` at region offset ``(kb * M + i) * bus_bytes`` (a bus word each)
col scales            KB FP32 rows in N tiles; column j of row kb holds ``col_scales[kb][j//128]``
zero                  one zero scratchpad line (block scaling only)
C                     M rows of N values (FP32 little-endian or FP8 codes) in N tiles
program               the commands; PROG_ADDR = this address
====================  ======================================================================

Every row pitch is a multiple of the bus width; padding bytes are zero and never written.
"""

import math
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.formats import Format, format_by_name
from fp8npu.hdl.isa import Opcode, StoreFormat, Unit
from fp8npu.sim import golden

__all__ = ["BLOCK_K", "TiledLayout", "GemmProgram", "build_gemm", "reference_gemm"]

#: Width of a fine-grained scaling block along K (row scales) and along N (column scales).
BLOCK_K = 128
#: Alignment of every DRAM region (a command is 32 bytes; at least the widest bus).
REGION_ALIGN = 32

_OUTPUTS = {"fp32": StoreFormat.FP32, "e4m3": StoreFormat.E4M3, "e5m2": StoreFormat.E5M2}


def _round_up(x, m):
    return -(-x // m) * m


# ---- operands --------------------------------------------------------------------------------
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


def _f32_bits(x, name, shape):
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
class _Gemm:
    """The checked arguments of a GEMM (shared by :func:`build_gemm` and :func:`reference_gemm`)."""

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
        if out not in _OUTPUTS:
            raise ValueError(f"out must be one of {', '.join(_OUTPUTS)}, not {out!r}")
        scale_bits = int(_f32_bits(out_scale, "out_scale", ())) & 0xFFFFFFFF
        if out == "fp32" and scale_bits != 0x3F800000:
            raise ValueError("out_scale applies only to FP8 outputs (out='e4m3' or 'e5m2')")
        rs = cs = None
        if block_scales is not None:
            if not isinstance(block_scales, (tuple, list)) or len(block_scales) != 2:
                raise ValueError("block_scales must be a pair (row_scales[M, KB], col_scales[KB, NB])")
            kb, nb = math.ceil(k / BLOCK_K), math.ceil(n / BLOCK_K)
            rs = _f32_bits(block_scales[0], "row_scales", (m, kb))
            cs = _f32_bits(block_scales[1], "col_scales", (kb, nb))
        return cls(
            a, b, _format(fmt_a, "fmt_a"), _format(fmt_b, "fmt_b"), out, scale_bits, bool(saturate),
            None if col_scale is None else _f32_bits(col_scale, "col_scale", (n,)),
            None if bias is None else _f32_bits(bias, "bias", (n,)), rs, cs)

    def column_block_scales(self):
        """[KB, N] int32: the column scale of every output column, ``col_scales[kb][j // 128]``."""
        n = self.shape[2]
        return self.col_scales[:, torch.arange(n) // BLOCK_K]


# ---- reference -------------------------------------------------------------------------------
def reference_gemm(a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
                   col_scale=None, bias=None, block_scales=None):
    """The expected GEMM output, written directly from the contract with golden functions.

    Same arguments as :func:`build_gemm`. Returns [M, N]: int32 FP32 bits, or uint8 FP8 codes.
    Independent of any tiling: one sequential K loop per output (per K block when scaled).
    """
    g = _Gemm.from_args(a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales)
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


# ---- layouts ---------------------------------------------------------------------------------
def _tiles(n, width, block=None):
    """Cut [0, n) into (start, length) tiles of at most ``width`` that never cross a multiple of
    ``block``."""
    block = block or n
    return tuple((s, min(width, n - s, (s // block + 1) * block - s))
                 for b0 in range(0, n, block) for s in range(b0, min(n, b0 + block), width))


@dataclass(frozen=True)
class TiledLayout:
    """A [rows, cols] matrix in DRAM whose rows are cut into column tiles, each starting on a
    bus-width boundary (so a LOAD or STORE of one tile has an aligned address).

    Row r, tile t (columns ``tiles[t] = (start, width)``) is at byte ``r * pitch + offsets[t]``;
    values are ``esize`` bytes (1: FP8 code, 4: FP32 little-endian). Padding bytes are zero.
    """

    rows: int
    cols: int
    tiles: tuple
    offsets: tuple
    pitch: int
    esize: int

    @classmethod
    def build(cls, rows, tiles, esize, bus_bytes):
        offsets, at = [], 0
        for _, width in tiles:
            offsets.append(at)
            at += _round_up(width * esize, bus_bytes)
        cols = tiles[-1][0] + tiles[-1][1]
        return cls(rows, cols, tuple(tiles), tuple(offsets), at, esize)

    @property
    def nbytes(self):
        return self.rows * self.pitch

    def pack(self, values):
        """[rows, cols] uint8 codes or int32 bits -> the region's bytes (uint8 array)."""
        values = np.asarray(values)
        raw = np.ascontiguousarray(values.astype("<i4") if self.esize == 4 else values.astype(np.uint8))
        raw = raw.view(np.uint8).reshape(self.rows, self.cols * self.esize)
        out = np.zeros((self.rows, self.pitch), np.uint8)
        for (start, width), off in zip(self.tiles, self.offsets):
            out[:, off:off + width * self.esize] = raw[:, start * self.esize:(start + width) * self.esize]
        return out.reshape(-1)

    def unpack(self, data):
        """The region's bytes -> [rows, cols] numpy array (uint8 codes or int32 bits)."""
        buf = np.frombuffer(bytes(data), np.uint8)[:self.nbytes].reshape(self.rows, self.pitch)
        raw = np.empty((self.rows, self.cols * self.esize), np.uint8)
        for (start, width), off in zip(self.tiles, self.offsets):
            raw[:, start * self.esize:(start + width) * self.esize] = buf[:, off:off + width * self.esize]
        return raw.view("<i4").astype(np.int32) if self.esize == 4 else raw


@dataclass
class GemmProgram:
    """A built GEMM: program, DRAM image, register values and where the output is."""

    cfg: NPUConfig
    program: bytes
    dram: bytearray
    prog_addr: int
    prog_len: int
    win_base: int
    win_limit: int
    out: str
    out_addr: int
    out_layout: TiledLayout
    m_block: int
    steps: int
    regions: dict = field(default_factory=dict)     # name -> (address, bytes)

    @property
    def out_stride(self):
        """Bytes from one output row to the next."""
        return self.out_layout.pitch

    def read_output(self, dram):
        """The [M, N] result from a DRAM image: int32 FP32 bits, or uint8 FP8 codes."""
        data = memoryview(dram)[self.out_addr:self.out_addr + self.out_layout.nbytes]
        return torch.from_numpy(self.out_layout.unpack(data))


# ---- tiling ----------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Tiles and SRAM line map of one GEMM."""

    k_tiles: tuple
    n_tiles: tuple
    m_blocks: tuple          # (first row, rows)
    m_block: int
    sp_buf: tuple            # first scratchpad line of buffer 0, 1 (A lines, then B lines)
    sp_zero: int
    acc_out: tuple           # first accumulator line of output region 0, 1
    acc_temp: int
    acc_aux: tuple           # first accumulator line of auxiliary area 0, 1
    aux_col: int             # offsets inside an auxiliary area
    aux_scale: int
    aux_bias: int


def _plan(cfg, g):
    """Choose tile sizes and the SRAM line map (see the module docstring)."""
    m, k, n = g.shape
    vectors = (g.col_scale is not None) + (g.bias is not None)
    aux_fixed = (1 if g.blocked else 0) + vectors             # aux lines besides the row scales
    zero_lines = 1 if g.blocked else 0
    sp_max = (cfg.sp_lines - zero_lines) // 2 - cfg.rows
    regions = 5 if g.blocked else 2                           # out x2 (+ temp + row scales x2)
    acc_max = (cfg.acc_lines - 2 * aux_fixed) // regions
    m_max = min(sp_max, acc_max, 0xFFFF)
    if m_max < 1:
        raise ValueError(f"the scratchpad ({cfg.sp_lines} lines) or accumulator ({cfg.acc_lines} lines) is "
                         f"too small for double-buffered {cfg.rows}x{cfg.cols} GEMM tiles")
    count = math.ceil(m / m_max)
    mb = math.ceil(m / count)
    aux_size = (mb if g.blocked else 0) + aux_fixed
    aux0 = (3 if g.blocked else 2) * mb
    return _Plan(
        k_tiles=_tiles(k, cfg.rows, BLOCK_K if g.blocked else None),
        n_tiles=_tiles(n, cfg.cols),
        m_blocks=tuple((s, min(mb, m - s)) for s in range(0, m, mb)),
        m_block=mb,
        sp_buf=(0, mb + cfg.rows),
        sp_zero=2 * (mb + cfg.rows),
        acc_out=(0, mb),
        acc_temp=2 * mb,
        acc_aux=(aux0, aux0 + aux_size),
        aux_col=mb,
        aux_scale=(mb + 1 if g.blocked else 0),
        aux_bias=(mb + 1 if g.blocked else 0) + (g.col_scale is not None),
    )


class _Image:
    """Places regions in DRAM, each on a REGION_ALIGN boundary."""

    def __init__(self, base):
        self.end = base
        self.regions = {}
        self.contents = []

    def add(self, name, data=None, nbytes=None):
        addr = _round_up(self.end, REGION_ALIGN)
        size = len(data) if data is not None else nbytes
        self.regions[name] = (addr, size)
        if data is not None:
            self.contents.append((addr, data))
        self.end = addr + size
        return addr

    def bytes(self):
        out = bytearray(_round_up(self.end, REGION_ALIGN))
        for addr, data in self.contents:
            out[addr:addr + len(data)] = bytes(data)
        return out


# ---- program ---------------------------------------------------------------------------------
def build_gemm(cfg, a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
               col_scale=None, bias=None, block_scales=None, base=0x0):
    """Build the program and DRAM image of ``C = A @ B`` (see the module docstring).

    ``a_codes`` [M, K] and ``b_codes`` [K, N] are uint8 FP8 codes of formats ``fmt_a`` and
    ``fmt_b`` ("e4m3", "e5m2", a Format or 0/1). ``out`` is "fp32", "e4m3" or "e5m2";
    ``out_scale`` and ``saturate`` apply to FP8 outputs. ``col_scale`` and ``bias`` are [N]
    FP32 vectors, ``block_scales`` a pair (row_scales [M, ceil(K/128)], col_scales
    [ceil(K/128), ceil(N/128)]); FP32 arguments are float tensors (rounded to binary32) or int32
    bit patterns. ``base`` is the first DRAM address used (a multiple of 32).
    """
    g = _Gemm.from_args(a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales)
    for f in (g.fmt_a, g.fmt_b) + ((format_by_name(out),) if out != "fp32" else ()):
        if not cfg.supports(f.spec.name):
            raise ValueError(f"this NPU configuration does not support {f.spec.name} (formats: "
                             f"{', '.join(cfg.formats)})")
    if base % REGION_ALIGN or base < 0:
        raise ValueError(f"base must be a non-negative multiple of {REGION_ALIGN}, not 0x{base:x}")
    m, k, n = g.shape
    plan = _plan(cfg, g)
    bus = cfg.bus_bytes
    lay = {
        "a": TiledLayout.build(m, plan.k_tiles, 1, bus),
        "b": TiledLayout.build(k, plan.n_tiles, 1, bus),
        "c": TiledLayout.build(m, plan.n_tiles, 4 if out == "fp32" else 1, bus),
        "vec": TiledLayout.build(1, plan.n_tiles, 4, bus),
    }
    img = _Image(base)
    addr = {"a": img.add("a", lay["a"].pack(g.a)), "b": img.add("b", lay["b"].pack(g.b))}
    if g.col_scale is not None:
        addr["col_scale"] = img.add("col_scale", lay["vec"].pack(g.col_scale.numpy()[None]))
    if g.bias is not None:
        addr["bias"] = img.add("bias", lay["vec"].pack(g.bias.numpy()[None]))
    if g.blocked:
        rs = np.zeros((g.row_scales.shape[1], m, bus // 4), "<i4")
        rs[:, :, 0] = g.row_scales.numpy().T
        addr["row_scales"] = img.add("row_scales", rs.view(np.uint8).reshape(-1))
        lay["cs"] = TiledLayout.build(g.col_scales.shape[0], plan.n_tiles, 4, bus)
        addr["col_scales"] = img.add("col_scales", lay["cs"].pack(g.column_block_scales().numpy()))
        addr["zero"] = img.add("zero", bytes(_round_up(cfg.line_bytes, bus)))
    addr["c"] = img.add("c", nbytes=lay["c"].nbytes)
    commands = _commands(cfg, g, plan, lay, addr)
    program = b"".join(commands)
    prog_addr = img.add("program", program)
    dram = img.bytes()
    if len(dram) > 1 << 32:
        raise ValueError(f"the GEMM needs {len(dram)} bytes of DRAM, more than a 32-bit address space")
    return GemmProgram(cfg, program, dram, prog_addr, len(commands), base, len(dram), out, addr["c"], lay["c"],
                       plan.m_block, len(plan.m_blocks) * len(plan.n_tiles) * len(plan.k_tiles), img.regions)


def _commands(cfg, g, plan, lay, addr):
    """The command stream (a list of encoded commands), step by step; see the module docstring."""
    m_total = g.shape[0]
    fmts = {"fmt_a": g.fmt_a.value, "fmt_b": g.fmt_b.value}
    n_tiles_total = len(plan.m_blocks) * len(plan.n_tiles)
    n_steps = n_tiles_total * len(plan.k_tiles)
    out = [] if not g.blocked else [isa.encode(
        Opcode.LOAD, dst=0, sram_addr=plan.sp_zero, rows=1, row_bytes=cfg.line_bytes,
        dram_addr=addr["zero"], dram_stride=0)]
    out += [isa.encode(Opcode.SYNC, unit=Unit.COMPUTE, push_prev=1)] * min(2, n_steps)
    out += [isa.encode(Opcode.SYNC, unit=Unit.STORE, push_prev=1)] * min(2, n_tiles_total)
    step = 0
    for tile, ((m0, m), (ni, (_, nw))) in enumerate(product(plan.m_blocks, enumerate(plan.n_tiles))):
        acc_out = plan.acc_out[tile % 2]
        for ti, (k0, kw) in enumerate(plan.k_tiles):
            buf, aux = plan.sp_buf[step % 2], plan.acc_aux[step % 2]
            last_k = ti == len(plan.k_tiles) - 1
            kb = k0 // BLOCK_K
            block_first, block_last = k0 % BLOCK_K == 0, last_k or (k0 + kw) % BLOCK_K == 0
            a, b = lay["a"], lay["b"]
            loads = [
                dict(sram_addr=buf, rows=m, row_bytes=kw, dram_addr=addr["a"] + m0 * a.pitch + a.offsets[ti],
                     dram_stride=a.pitch),
                dict(sram_addr=buf + plan.m_block, rows=kw, row_bytes=nw,
                     dram_addr=addr["b"] + k0 * b.pitch + b.offsets[ni], dram_stride=b.pitch),
            ]
            compute = []
            if g.blocked:
                compute.append((Opcode.MATMUL, dict(
                    fmts, accumulate=int(not block_first), a_addr=buf, a_stride=1, b_addr=buf + plan.m_block,
                    acc_addr=plan.acc_temp, m=m, k=kw)))
                if ti == 0:   # after the first pop, so the zero line is loaded
                    compute.append((Opcode.MATMUL, dict(
                        fmts, accumulate=0, a_addr=plan.sp_zero, a_stride=0, b_addr=plan.sp_zero,
                        acc_addr=acc_out, m=m, k=1, pop_next=1)))
                if block_last:
                    loads.append(dict(sram_addr=aux, rows=m, row_bytes=4, dst=1,
                                      dram_addr=addr["row_scales"] + (kb * m_total + m0) * cfg.bus_bytes,
                                      dram_stride=cfg.bus_bytes))
                    cs = lay["cs"]
                    loads.append(dict(sram_addr=aux + plan.aux_col, rows=1, row_bytes=4 * nw, dst=1,
                                      dram_addr=addr["col_scales"] + kb * cs.pitch + cs.offsets[ni],
                                      dram_stride=cs.pitch))
                    compute.append((Opcode.BLOCKSCALE, dict(
                        src=plan.acc_temp, dst=acc_out, rows=m, row_scale=aux, col_scale=aux + plan.aux_col)))
            else:
                compute.append((Opcode.MATMUL, dict(
                    fmts, accumulate=int(ti > 0), a_addr=buf, a_stride=1, b_addr=buf + plan.m_block,
                    acc_addr=acc_out, m=m, k=kw, pop_next=int(ti == 0))))
            if last_k and (g.col_scale is not None or g.bias is not None):
                for name, line in (("col_scale", plan.aux_scale), ("bias", plan.aux_bias)):
                    if name in addr:
                        loads.append(dict(sram_addr=aux + line, rows=1, row_bytes=4 * nw, dst=1,
                                          dram_addr=addr[name] + lay["vec"].offsets[ni], dram_stride=0))
                compute.append((Opcode.EPILOGUE, dict(
                    use_scale=int(g.col_scale is not None), use_bias=int(g.bias is not None), src=acc_out,
                    dst=acc_out, rows=m, scale_addr=aux + plan.aux_scale if g.col_scale is not None else 0,
                    bias_addr=aux + plan.aux_bias if g.bias is not None else 0)))
            loads[0]["pop_next"] = 1
            loads[-1]["push_next"] = 1
            compute[0][1]["pop_prev"] = 1
            compute[-1][1]["push_prev"] = int(step + 2 < n_steps)
            compute[-1][1]["push_next"] = int(last_k)
            out += [isa.encode(Opcode.LOAD, **f) for f in loads]
            out += [isa.encode(op, **f) for op, f in compute]
            step += 1
        c = lay["c"]
        out.append(isa.encode(
            Opcode.STORE, fmt=_OUTPUTS[g.out], saturate=int(g.saturate), acc_addr=acc_out, rows=m, cols=nw,
            dram_addr=addr["c"] + m0 * c.pitch + c.offsets[ni], dram_stride=c.pitch, scale=g.out_scale,
            pop_prev=1, push_prev=int(tile + 2 < n_tiles_total)))
    out.append(isa.encode(Opcode.END))
    return out
