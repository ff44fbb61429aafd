"""GEMM program builder: ``C = A @ B`` of FP8 operands as an fp8npu command stream and DRAM image.

:func:`build_gemm` returns a :class:`GemmProgram`: the program, a DRAM image holding the
operands and the program, the register values to run it with, and ``read_output``.
:func:`fp8npu.sim.reference.reference_gemm` is the same computation written directly with the
golden model, for tests.

What is computed (docs/numerics.md, isa.SEMANTICS)
--------------------------------------------------
* plain: ``acc[i][j]`` = sequential FP32 sum over k = 0..K-1 in order of the exact products
  ``A[i][k] * B[k][j]``, starting from +0;
* block scaling (``block_scales=(row_scales[M, KB], col_scales[KB, N])``, KB = ceil(K/block_k),
  ``block_k`` 128 by default; ``col_scales`` may also be [KB, NB], NB = ceil(N/128), one per
  128 columns): for each K block kb of ``block_k``, ``p`` = the sequential sum over the block
  from +0, ``s = fp32(row_scales[i][kb] * col_scales[kb][j])``, and
  ``acc = fp32(acc + fp32(p * s))`` starting from ``acc = +0``;
* epilogue: ``acc = fp32(acc * col_scale[j])``, then ``acc = fp32(acc + bias[j])``;
* output: FP32 bits, or ``convert(fp32(acc * out_scale), fmt, saturate)``.

Tiling
------
* K is cut into tiles of at most ``cfg.rows`` values that never cross a 128 boundary when
  block scaling is on; each MATMUL has ``k`` = the tile's real length, so no padded product
  is ever added. The first K tile of an output tile (of a K block, with block scaling)
  overwrites (``accumulate=0``), the following ones accumulate, in K order.
* N is cut into tiles of ``cfg.cols`` columns; STORE writes ``cols`` = the real width.
* M is cut into :attr:`GemmProgram.m_block`-row blocks, as large as the SRAMs allow (one
  MATMUL streams all rows of a block, so large blocks amortize the array's fill and drain),
  balanced so that the last block is not tiny.

Schedules
---------
The array streams one A row per cycle, so it is only busy if DMA keeps ahead of it. Two
schedules exist; :attr:`GemmProgram.schedule` says which one a program uses.

**A-resident** (``"a_resident"``, used whenever it fits with M blocks of at least
:data:`MIN_RESIDENT_ROWS` rows, or all of M when M is smaller)::

    for each M block:          load the whole A block [m x K] once
        for each N tile:       load the B column tile [K x cols] into B buffer (step % 2)
            for each K tile:   MATMUL: the block's m resident A rows x the tile's B lines
            BLOCKSCALE (per K block), EPILOGUE, then STORE from output region (u % 2)

(u counts output units, one per step; a GEMM the host finishes with several scaling blocks
has one per step and K block, each stored as the block's partial: see "Tokens".)

One *step* per (M block, N tile). A is read from DRAM once and B once per M block, and
every LOAD moves long contiguous DRAM rows, so the AXI bursts are long (the old per-K-tile
reload moved one single-beat row per A row). The next step's B tile is loaded while the
current step computes (double buffering). The A block cannot be double-buffered in a small
scratchpad: the next block's A is loaded once the current block's last step is done with
it. It is loaded in *chunks* of K tiles (a DRAM row piece of about ``max_burst`` beats per A
row), each with its own token, so the first step of a block starts on chunk 0 while the
later chunks are still arriving; only chunk 0's load is exposed.

**A-reload** (``"a_reload"``, the fallback when the A block plus two B tiles does not fit:
K too large for the scratchpad): loops M block -> N tile -> K tile, one step per K tile;
every step loads its A slice (``m`` rows of one K tile) and its B tile [rows x cols] into one
of two buffers. It needs only ``2 * (m_block + rows)`` scratchpad lines, but its A loads are
``m`` one-line DRAM rows, so the array waits for DMA much of the time.

SRAM use, A-resident
--------------------
* scratchpad: the A block from line 0: chunk ``c`` (K tiles ``t0 .. t0+n-1``) at line
  ``m * t0``, holding A row i's tiles in lines ``m*t0 + i*n + (t - t0)``; a MATMUL of tile t
  reads ``a_addr = m*t0 + (t - t0)``, ``a_stride = n`` (with one chunk: ``a_addr = t``,
  ``a_stride`` = tiles per row). Then two B buffers of K lines each (line k = B row k, the
  tile's K values in bytes 0..cols-1; a K tile is lines ``k0 .. k0+k-1``); with block scaling
  one zero line after them.
* accumulator: output regions 0 and 1 (``m_block`` lines each, used by alternate output units); with
  block scaling a temporary region (``m_block`` lines) for the K-block partial sums and the
  row-scale region (KB x ``m_block`` lines: line ``kb*m + i`` holds ``row_scales[i][kb]`` in
  lane 0, loaded with the A block); then two auxiliary areas (one per B buffer) holding the KB
  column-scale lines of the step's N tile (block scaling) and the epilogue scale and bias lines.

SRAM use, A-reload
------------------
* scratchpad buffer b (b = step % 2): ``m_block`` lines of A (row i of the tile in line i,
  its K values in bytes 0..k-1), then ``rows`` lines of B (row kk of the tile in line kk);
  with block scaling, one zero line after the two buffers;
* accumulator: output regions 0 and 1 (``m_block`` lines each, used by alternate output
  units); with block scaling a temporary region (``m_block`` lines) for the K-block partial
  sums; then two auxiliary areas (one per buffer) holding the row scales (``m_block`` lines,
  value in lane 0) and the column scale line of a K block, and the epilogue scale and bias
  lines.

In both, the output accumulator of a block-scaled tile must start at +0: a MATMUL with
``k = 1`` that reads the zero scratchpad line as both A (``a_stride = 0``) and B writes
``fp32(+0 + 0 * 0) = +0`` to all its lines. It runs on the compute unit, so it needs no
extra synchronisation, costs one pass of the array per output tile and no DMA.

Tokens
------
Commands are emitted so that every token a command pops was pushed by a command earlier in
the program: the in-order dispatcher never deadlocks, whatever ``queue_depth``. Every
counter ends at zero.

* compute <-> store (both schedules): output region ``u % 2`` for output unit u (one per
  output tile; for a GEMM the host finishes with several scaling blocks, one per output tile
  and K block, each followed by its STORE). The unit's last compute command pushes to store
  (``push_next``), the first command writing the region pops from store (``pop_next``); STORE
  pops (``pop_prev``) and gives the region back (``push_prev``, except for the last two
  units). Two SYNCs on the store unit with ``push_prev`` prime it.
* load <-> compute, A-resident: a load *group* ends with a LOAD that pushes (``push_next``).
  Groups: the B tile (+ auxiliary lines) of a step, and each A chunk (+ the row scales of the
  K blocks that end in it); the B group of a block's first step has no push of its own: it
  shares the token of A chunk 0, which follows it. Compute pops (``pop_prev``) on the first
  command of each step and, in a block's first step, on the first command of each later A
  chunk's first K tile. Compute gives B buffer ``s % 2`` back on step s's last command
  (``push_prev``, unless ``s + 2 >= steps``) and the A block (and row scales) back with a
  SYNC after the block's last step (unless it is the last block); the B group of step s pops
  (``pop_next``) iff ``s >= 2``, an A block's first chunk iff it is not the first block.
  Emission order: B(0), A chunks of block 0, then per step s: B(s+1), then per output unit
  of the step its compute commands and its STORE (the SYNC that frees the A block before
  the last unit's STORE), [A chunks of the next block after its last step]; so B(s+1) is
  queued before compute(s) and loads while step s computes.
* load <-> compute, A-reload: the load unit fills buffer b and pushes a token to compute
  (``push_next`` on the last LOAD of the step); compute pops it (``pop_prev`` on the step's
  first command) and gives the buffer back (``push_prev`` on the step's last command); the
  load unit pops that (``pop_next`` on the step's first LOAD) before refilling the buffer.
  Two SYNC commands on the compute unit with ``push_prev`` prime the two buffers; the last
  two steps push no return token.

DRAM layout (all addresses absolute; the image covers ``[0, win_limit)``)
-----------------------------------------------------------------------
From ``base`` (a multiple of 32), each region starting on a 32-byte boundary:

====================  ======================================================================
A                     M rows, each row its K tiles (:class:`TiledLayout`); A-resident: tile t
                      at byte ``t * line_bytes`` of the row (so a row's tiles fill
                      consecutive scratchpad lines; dense row-major when ``rows`` =
                      ``line_bytes``), row pitch rounded up to the bus width; A-reload:
                      every tile starting on a bus-width boundary
B                     A-resident: tile-major (:class:`TileMajorLayout`): N tile j is one
                      contiguous block of K lines of ``line_bytes`` bytes (line k = B[k, tile
                      j], zero padded), so its LOAD is one long DRAM row filling K
                      consecutive scratchpad lines; A-reload: K rows, each row its N tiles,
                      bus aligned like A
col_scale, bias       one FP32 row each, in N tiles (only when given)
row scales            ``row_scales[i][kb]`` at region offset ``(kb * M + i) * bus_bytes`` (a bus word each)
col scales            KB FP32 rows in N tiles; column j of row kb holds ``col_scales[kb][j]``
zero                  one zero scratchpad line (block scaling only)
C                     M rows of N values (FP32 little-endian or FP8 codes) in N tiles; for a
                      GEMM the host finishes with KB > 1 scaling blocks, KB x M FP32 rows
                      (K block kb's partial sum in rows ``kb * M ..``)
program               the commands; PROG_ADDR = this address
====================  ======================================================================

Every row pitch is a multiple of the bus width; padding bytes are zero and never written.
"""

import math
from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np
import torch
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.formats import format_by_name
from fp8npu.hdl.isa import Opcode, Unit
from fp8npu.sim.reference import BLOCK_K, OUTPUTS, GemmArgs, finish_gemm, scale_bits
from fp8npu.sim.reference import f32_bits as _f32_bits

from .program import Command, Layout, Program, address_space_problem, allocate

__all__ = ["BLOCK_K", "MIN_RESIDENT_ROWS", "TiledLayout", "TileMajorLayout", "GemmProgram", "GemmOp", "build_gemm",
           "lower_gemm", "lower_gemm_batch", "fence", "weight_operands", "RUNTIME_OPERANDS"]

#: Alignment of every DRAM region (a command is 32 bytes; at least the widest bus).
REGION_ALIGN = 32
#: Fewest rows of an A-resident M block (unless M itself is smaller): below that, the
#: A-reload schedule is used (short MATMULs would not amortize the array's fill and drain).
MIN_RESIDENT_ROWS = 16
#: Longest DRAM row of one LOAD (``row_bytes`` is 16 bits; a power of two keeps pieces aligned).
MAX_LOAD_ROW = 1 << 15


def _round_up(x, m):
    return -(-x // m) * m


# ---- layouts ---------------------------------------------------------------------------------
def _tiles(n, width, block=None):
    """Cut [0, n) into (start, length) tiles of at most ``width`` that never cross a multiple of
    ``block`` (an int, or a tuple of them: a multiple of any)."""
    blocks = [b for b in (block if isinstance(block, tuple) else (block,)) if b]
    out, s = [], 0
    while s < n:
        end = min([n, s + width] + [(s // b + 1) * b for b in blocks])
        out.append((s, end - s))
        s = end
    return tuple(out)


def _chain(g, plan):
    """K positions summed into one target before it is scaled or stored (a scaling block's
    partial, or a partial the host finishes), or None when the whole K is one chain."""
    return g.block_k if g.blocked else plan.part_k or None


def _acc_flags(cfg, g, k0, kw, chain):
    """The accumulation flags of the MATMUL of K tile ``[k0, k0 + kw)`` into its target (the
    output, or the partial of a chain of ``chain`` K positions, see :func:`_chain`): sequential
    mode, ``accumulate`` unless the tile starts the target's chain; block mode
    (docs/numerics.md section 3), exact blocks start at multiples of ``acc_block`` and at the
    chain's start, ``commit`` at their end, ``fresh`` on the chain's first commit."""
    k_total = g.shape[1]
    first = (k0 // chain) * chain if chain else 0
    if cfg.accumulation != "block":
        return {"accumulate": int(k0 != first)}
    ab = cfg.acc_block
    last = min(k_total, first + chain) if chain else k_total
    end = k0 + kw
    commit = end % ab == 0 or end == last
    first_end = min(last, (first // ab + 1) * ab)
    return {"accumulate": int(k0 % ab != 0 and k0 != first), "commit": int(commit),
            "fresh": int(commit and end == first_end)}


def _zero_flags(cfg):
    """Flags of the MATMUL that writes +0 over an output region (k = 1 from the zero line)."""
    return {"accumulate": 0, **({"commit": 1, "fresh": 1} if cfg.accumulation == "block" else {})}


@dataclass(frozen=True)
class TiledLayout:
    """A [rows, cols] matrix in DRAM whose rows are cut into column tiles, each starting on an
    ``align``-byte boundary (by default the bus width, so a LOAD or STORE of one tile has an
    aligned address); the row pitch is a multiple of the bus width.

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
    def build(cls, rows, tiles, esize, bus_bytes, align=None):
        align = align or bus_bytes
        offsets, at = [], 0
        for _, width in tiles:
            offsets.append(at)
            at += _round_up(width * esize, align)
        cols = tiles[-1][0] + tiles[-1][1]
        return cls(rows, cols, tuple(tiles), tuple(offsets), _round_up(at, bus_bytes), esize)

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


@dataclass(frozen=True)
class TileMajorLayout:
    """A [rows, cols] FP8 matrix in DRAM stored column tile by column tile: tile t (columns
    ``tiles[t] = (start, width)``) is a contiguous block at byte ``t * pitch`` of ``rows``
    lines of ``line_bytes`` bytes, line r holding row r's ``width`` codes (then zeros); the
    block pitch is a multiple of the bus width. One LOAD row of ``rows * line_bytes`` bytes
    copies a whole tile into ``rows`` consecutive scratchpad lines.
    """

    rows: int
    cols: int
    tiles: tuple
    line_bytes: int
    pitch: int

    @classmethod
    def build(cls, rows, tiles, line_bytes, bus_bytes):
        cols = tiles[-1][0] + tiles[-1][1]
        return cls(rows, cols, tuple(tiles), line_bytes, _round_up(rows * line_bytes, bus_bytes))

    @property
    def nbytes(self):
        return len(self.tiles) * self.pitch

    def pack(self, values):
        """[rows, cols] uint8 codes -> the region's bytes (uint8 array)."""
        values = np.asarray(values, np.uint8)
        out = np.zeros((len(self.tiles), self.pitch), np.uint8)
        for t, (start, width) in enumerate(self.tiles):
            block = out[t, :self.rows * self.line_bytes].reshape(self.rows, self.line_bytes)
            block[:, :width] = values[:, start:start + width]
        return out.reshape(-1)

    def unpack(self, data):
        """The region's bytes -> [rows, cols] uint8 codes."""
        buf = np.frombuffer(bytes(data), np.uint8)[:self.nbytes].reshape(len(self.tiles), self.pitch)
        out = np.empty((self.rows, self.cols), np.uint8)
        for t, (start, width) in enumerate(self.tiles):
            out[:, start:start + width] = buf[t, :self.rows * self.line_bytes].reshape(
                self.rows, self.line_bytes)[:, :width]
        return out


@dataclass
class GemmProgram:
    """A built GEMM: program, DRAM image, register values and where the output is.

    ``schedule`` is "a_resident" or "a_reload" (module docstring); ``steps`` counts the
    double-buffered load -> compute steps: (M block, N tile) pairs when A-resident, (M block,
    N tile, K tile) triples when A-reload. ``a_chunks`` is the number of LOAD chunks of an A
    block (A-resident; 0 for A-reload).
    """

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
    schedule: str = "a_resident"
    a_chunks: int = 0
    ir: Program = None          # the program as commands over buffers (compiler.program)
    layout: Layout = None       # where its buffers lie
    op: "GemmOp" = None         # the lowered GEMM (the host's part, when it finishes the GEMM)

    @property
    def out_stride(self):
        """Bytes from one output row to the next."""
        return self.out_layout.pitch

    def read_output(self, dram):
        """The [M, N] result from a DRAM image: int32 FP32 bits, or uint8 FP8 codes."""
        data = memoryview(dram)[self.out_addr:self.out_addr + self.out_layout.nbytes]
        if self.op is not None and self.op.host:
            return self.op.finish(data)
        return torch.from_numpy(self.out_layout.unpack(data))


# ---- tiling ----------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Tiles and SRAM line map of one GEMM (fields marked R: A-resident only, L: A-reload only)."""

    resident: bool
    k_tiles: tuple
    n_tiles: tuple
    m_blocks: tuple          # (first row, rows)
    m_block: int
    sp_zero: int
    acc_out: tuple           # first accumulator line of output region 0, 1
    acc_temp: int
    acc_aux: tuple           # first accumulator line of auxiliary area 0, 1
    aux_col: int             # offsets inside an auxiliary area
    aux_scale: int
    aux_bias: int
    sp_buf: tuple = ()       # L: first scratchpad line of buffer 0, 1 (A lines, then B lines)
    sp_b: tuple = ()         # R: first scratchpad line of B buffer 0, 1
    a_chunks: tuple = ()     # R: (first K tile, tiles) of each A chunk
    acc_rs: int = 0          # R: first accumulator line of the row-scale region
    part_k: int = 0          # K positions per stored partial (the host finishes the GEMM), 0: one output
    parts: int = 1           # partials stored per output tile (ceil(K / part_k))


def _m_blocks(m, m_max):
    """Balanced M blocks of at most ``m_max`` rows: (block rows, ((first row, rows), ...))."""
    count = math.ceil(m / m_max)
    mb = math.ceil(m / count)
    return mb, tuple((s, min(mb, m - s)) for s in range(0, m, mb))


def _plan(cfg, g, part_k=0):
    """Choose the schedule, tile sizes and the SRAM line map (see the module docstring).
    ``part_k``: the NPU stores a partial sum per ``part_k`` K positions instead of one output
    (a GEMM with several scaling blocks that the host finishes)."""
    m, k, n = g.shape
    k_tiles = _tiles(k, cfg.rows, (g.block_k if g.blocked else None, part_k or None,
                                   cfg.acc_block if cfg.accumulation == "block" else None))
    n_tiles = _tiles(n, cfg.cols)
    plan = _plan_resident(cfg, g, k_tiles, n_tiles) or _plan_reload(cfg, g, k_tiles, n_tiles)
    return replace(plan, part_k=part_k, parts=math.ceil(k / part_k) if part_k else 1)


def _plan_resident(cfg, g, k_tiles, n_tiles):
    """The A-resident plan, or None when its M blocks would be too short."""
    m, k, n = g.shape
    nt = len(k_tiles)
    kb = math.ceil(k / g.block_k) if g.blocked else 0
    vectors = (g.col_scale is not None) + (g.bias is not None)
    aux_size = kb + vectors                                   # column-scale lines, scale, bias
    zero_lines = 1 if g.blocked else 0
    sp_max = (cfg.sp_lines - 2 * k - zero_lines) // nt        # A: one line per K tile per row
    regions = 3 + kb if g.blocked else 2                      # out x2 (+ temp + KB row-scale regions)
    acc_max = (cfg.acc_lines - 2 * aux_size) // regions
    m_max = min(sp_max, acc_max, 0xFFFF)
    if m_max < max(1, min(m, MIN_RESIDENT_ROWS)):
        return None
    mb, blocks = _m_blocks(m, m_max)
    # A chunks: about max_burst bus beats of each A row, a whole number of bus words
    per_chunk = max(1, cfg.max_burst * cfg.bus_bytes // cfg.line_bytes)
    chunks = tuple((t, min(per_chunk, nt - t)) for t in range(0, nt, per_chunk))
    a_lines = mb * nt
    acc_rs = 3 * mb
    aux0 = (3 + kb) * mb if g.blocked else 2 * mb
    return _Plan(
        resident=True, k_tiles=k_tiles, n_tiles=n_tiles, m_blocks=blocks, m_block=mb,
        sp_zero=a_lines + 2 * k,
        acc_out=(0, mb), acc_temp=2 * mb, acc_aux=(aux0, aux0 + aux_size),
        aux_col=0, aux_scale=kb, aux_bias=kb + (g.col_scale is not None),
        sp_b=(a_lines, a_lines + k), a_chunks=chunks, acc_rs=acc_rs,
    )


def _plan_reload(cfg, g, k_tiles, n_tiles):
    """The A-reload plan."""
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
    mb, blocks = _m_blocks(m, m_max)
    aux_size = (mb if g.blocked else 0) + aux_fixed
    aux0 = (3 if g.blocked else 2) * mb
    return _Plan(
        resident=False, k_tiles=k_tiles, n_tiles=n_tiles, m_blocks=blocks, m_block=mb,
        sp_zero=2 * (mb + cfg.rows),
        acc_out=(0, mb), acc_temp=2 * mb, acc_aux=(aux0, aux0 + aux_size),
        aux_col=mb, aux_scale=(mb + 1 if g.blocked else 0),
        aux_bias=(mb + 1 if g.blocked else 0) + (g.col_scale is not None),
        sp_buf=(0, mb + cfg.rows),
    )


# ---- program ---------------------------------------------------------------------------------
def build_gemm(cfg, a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
               col_scale=None, bias=None, block_scales=None, base=0x0, block_k=BLOCK_K):
    """Build the program and DRAM image of ``C = A @ B`` (see the module docstring).

    ``a_codes`` [M, K] and ``b_codes`` [K, N] are uint8 FP8 codes of formats ``fmt_a`` and
    ``fmt_b`` ("e4m3", "e5m2", a Format or 0/1). ``out`` is "fp32", "e4m3" or "e5m2";
    ``out_scale`` and ``saturate`` apply to FP8 outputs. ``col_scale`` and ``bias`` are [N]
    FP32 vectors, ``block_scales`` a pair (row_scales [M, ceil(K/128)], col_scales
    [ceil(K/128), ceil(N/128)]); FP32 arguments are float tensors (rounded to binary32) or int32
    bit patterns. ``base`` is the first DRAM address used (a multiple of 32).
    """
    g = GemmArgs.from_args(a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias, block_scales,
                           block_k)
    _check_formats(cfg, g)
    if base % REGION_ALIGN or base < 0:
        raise ValueError(f"base must be a non-negative multiple of {REGION_ALIGN}, not 0x{base:x}")
    prog = Program(cfg)
    op = _lower(prog, cfg, g, base_name="", runtime=())
    prog.emit(Opcode.END, note=op.note)
    code = prog.buffer("program", nbytes=len(prog) * isa.COMMAND_BYTES, kind="program")
    layout = allocate(list(prog.buffers.values()), base)
    problem = address_space_problem(layout, cfg)
    if problem:
        raise ValueError(problem)
    program = prog.verify(layout)
    dram = layout.image(prog.buffers.values())
    prog_addr = layout.address(code)
    dram[prog_addr:prog_addr + len(program)] = program
    plan = op.plan
    steps = len(plan.m_blocks) * len(plan.n_tiles) * (1 if plan.resident else len(plan.k_tiles))
    regions = {name: (layout.address(b), b.nbytes) for name, b in prog.buffers.items()}
    return GemmProgram(cfg, program, dram, prog_addr, len(prog), base, len(dram), g.out,
                       layout.address(op.buffers["c"]), op.layouts["c"], plan.m_block, steps, regions,
                       "a_resident" if plan.resident else "a_reload", len(plan.a_chunks), prog, layout, op)


#: Operands of a GEMM that can be filled by the host at run time instead of at compile time.
RUNTIME_OPERANDS = ("a", "b", "row_scales", "col_scales", "col_scale", "bias")


@dataclass(eq=False)
class GemmOp:
    """A GEMM lowered into a :class:`~fp8npu.compiler.program.Program`: its buffers (by role:
    ``a``, ``b``, ``col_scale``, ``bias``, ``row_scales``, ``col_scales``, ``zero``, ``c``),
    their layouts, and :meth:`pack` / :meth:`unpack` for the host."""

    cfg: NPUConfig
    shape: tuple
    out: str
    plan: object
    buffers: dict
    layouts: dict
    note: str
    block_k: int = BLOCK_K
    #: When the host finishes this GEMM (the NPU lacks the vector unit or FP8 stores it needs):
    #: ``runtime``, the roles of :data:`HOST_ROLES` given to :meth:`finish` at run time;
    #: ``consts``, the others' int32 FP32 bits (lists, with their shape); ``out``,
    #: ``out_scale``, ``saturate``; ``parts``, the partial sums buffer ``c`` holds (one per
    #: scaling block, each from +0). None when the NPU computes the whole GEMM.
    host: dict = None

    @property
    def host_roles(self):
        """Runtime roles the host applies itself (:meth:`finish` takes them) instead of packing them."""
        return tuple(self.host["runtime"]) if self.host else ()

    def finish(self, data, values=None):
        """The [M, N] output from the bytes of buffer ``c`` (see :meth:`unpack`); for a GEMM the
        host finishes, the NPU's FP32 product with the scales, column scale, bias and output
        conversion applied by the contract (:func:`fp8npu.sim.reference.finish_gemm`),
        ``values`` holding the :attr:`host_roles` as :meth:`pack` takes them."""
        out = self.unpack(data)
        if not self.host:
            return out
        m, k, n = self.shape
        values = values or {}
        missing = [r for r in self.host_roles if r not in values]
        if missing:
            raise ValueError(f"{self.note}: the host finishes this GEMM and needs {', '.join(missing)}")
        fields = {role: torch.tensor(bits, dtype=torch.int64).to(torch.int32).reshape(shape)
                  for role, (shape, bits) in self.host["consts"].items()}
        for role in self.host_roles:
            if role in ("row_scales", "col_scales"):
                fields[role] = scale_bits(role, values[role], m, k, n, self.block_k)
            else:
                fields[role] = _f32_bits(values[role], role, (n,))
        parts = int(self.host.get("parts", 1))          # partial p: rows p*M .. (p+1)*M-1 of buffer c
        return finish_gemm(list(out.reshape(parts, m, n)), out=self.host["out"], out_scale=self.host["out_scale"],
                           saturate=self.host["saturate"], **fields)

    def pack(self, role, values):
        """The bytes of buffer ``role`` for ``values``: ``a`` [M, K] / ``b`` [K, N] uint8 FP8
        codes, ``row_scales`` [M, KB], ``col_scales`` [KB, N] (or [KB, NB], one per 128
        columns), ``col_scale`` / ``bias`` [N] (int32 FP32 bits or float tensors); KB =
        ceil(K / block_k)."""
        m, k, n = self.shape
        if self.host and (role in self.host_roles or role in self.host["consts"]):
            raise ValueError(f"{self.note}: the host applies {role} itself on this NPU configuration; it has no "
                             f"buffer (pass it to finish)")
        if role in ("a", "b"):
            arr = np.ascontiguousarray(np.asarray(values, dtype=np.uint8))
            want = (m, k) if role == "a" else (k, n)
            if arr.shape != want:
                raise ValueError(f"{self.note}: operand {role} must be {want[0]}x{want[1]}, not {arr.shape}")
            return self.layouts[role].pack(arr)
        kb, nb = math.ceil(k / self.block_k), math.ceil(n / BLOCK_K)
        shapes = {"row_scales": (m, kb), "col_scales": (kb, nb), "col_scale": (n,), "bias": (n,)}
        if role == "col_scales" and tuple(torch.as_tensor(values).shape) == (kb, n):
            return self.layouts["cs"].pack(_f32_bits(values, role, (kb, n)).numpy())
        bits = _f32_bits(values, role, shapes[role])
        if role == "row_scales":
            return _pack_row_scales(bits, self.cfg.bus_bytes)
        if role == "col_scales":
            return self.layouts["cs"].pack(bits[:, torch.arange(n) // BLOCK_K].numpy())
        return self.layouts["vec"].pack(bits.numpy()[None])

    def unpack(self, data):
        """The [M, N] output from the bytes of buffer ``c``: int32 FP32 bits or uint8 FP8 codes
        (for a GEMM the host finishes with several scaling blocks, the [KB * M, N] partials)."""
        return torch.from_numpy(self.layouts["c"].unpack(memoryview(data)[:self.layouts["c"].nbytes]))

    def to_spec(self):
        """What a host needs to pack and unpack this GEMM's buffers, as JSON-able data."""
        spec = {"shape": list(self.shape), "out": self.out, "note": self.note, "block_k": self.block_k,
                "layouts": {role: layout_to_dict(lay) for role, lay in self.layouts.items()}}
        if self.host:
            spec["host"] = self.host
        return spec

    @classmethod
    def from_spec(cls, cfg, spec):
        """The host side of a GEMM (pack / unpack) from :meth:`to_spec`'s data."""
        return cls(cfg, tuple(spec["shape"]), spec["out"], None, {},
                   {role: layout_from_dict(d) for role, d in spec["layouts"].items()}, spec["note"],
                   int(spec.get("block_k", BLOCK_K)), spec.get("host"))


def layout_to_dict(layout):
    """A TiledLayout or TileMajorLayout as JSON-able data."""
    from dataclasses import asdict
    kind = "tiled" if isinstance(layout, TiledLayout) else "tile_major"
    return {"kind": kind, **{k: (list(map(list, v)) if k == "tiles" else list(v) if isinstance(v, tuple) else v)
                             for k, v in asdict(layout).items()}}


def layout_from_dict(d):
    d = dict(d)
    kind = d.pop("kind")
    d["tiles"] = tuple(tuple(t) for t in d["tiles"])
    if kind == "tiled":
        d["offsets"] = tuple(d["offsets"])
        return TiledLayout(**d)
    if kind == "tile_major":
        return TileMajorLayout(**d)
    raise ValueError(f"unknown layout kind {kind!r}")


def _pack_row_scales(bits, bus):
    """Row scales [M, KB] int32 -> the region the LOADs read: (kb * M + i) * bus bytes, value in lane 0."""
    m, kb = bits.shape
    rs = np.zeros((kb, m, bus // 4), "<i4")
    rs[:, :, 0] = bits.numpy().T
    return rs.view(np.uint8).reshape(-1)


def lower_gemm(prog, cfg, a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
               col_scale=None, bias=None, block_scales=None, runtime=(), name="gemm", shared=None, block_k=BLOCK_K):
    """Append ``C = A @ B`` to ``prog`` (no END); return its :class:`GemmOp`.

    Arguments as for :func:`build_gemm`. Operands named in ``runtime`` (from
    :data:`RUNTIME_OPERANDS`) become ``input`` buffers that the host fills before a run
    (:meth:`GemmOp.pack`); the values given for them only fix their shapes. The others become
    ``const`` buffers holding their data. Buffers are named ``<name>.<role>``. ``shared`` maps
    roles to buffers that exist already (for example an expert's weights, used by programs of
    several row counts): they are used as they are (their size must match) and not added to
    ``prog``; the values given for those roles only fix shapes.
    """
    g = _checked_args(cfg, runtime, a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias,
                      block_scales, block_k)
    return _lower(prog, cfg, g, base_name=f"{name}.", runtime=tuple(runtime), shared=shared or {})


def _checked_args(cfg, runtime, *args):
    """The :class:`GemmArgs` of a lowering, its runtime roles and formats checked."""
    unknown = set(runtime) - set(RUNTIME_OPERANDS)
    if unknown:
        raise ValueError(f"runtime operands must be among {', '.join(RUNTIME_OPERANDS)}, not {sorted(unknown)}")
    g = GemmArgs.from_args(*args)
    _check_formats(cfg, g)
    return g


def lower_gemm_batch(prog, cfg, batch, a_codes, b_codes, fmt_a, fmt_b, out="fp32", out_scale=1.0, saturate=True,
                     col_scale=None, bias=None, block_scales=None, runtime=(), name="gemm", block_k=BLOCK_K):
    """Append ``batch`` GEMMs of one shape (a ``bmm``) to ``prog``; one :class:`GemmOp` each,
    buffers named ``<name>.<b>.<role>``. The values given fix shapes and the constants of
    every element (each gets its own buffers). Where the A-resident schedule fits, the GEMMs
    form one pipelined stream with no barrier between them; else they are fenced."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    g = _checked_args(cfg, runtime, a_codes, b_codes, fmt_a, fmt_b, out, out_scale, saturate, col_scale, bias,
                      block_scales, block_k)
    return _lower_batch(prog, cfg, [g] * batch, [f"{name}.{b}." for b in range(batch)], tuple(runtime),
                        [{} for _ in range(batch)])


def fence(prog):
    """Append a barrier between two lowered operations: everything before it (loads, compute,
    stores) completes before anything after it starts, so the next operation may reuse any
    SRAM line. Three SYNCs: the store unit gives compute a token after its last STORE, the
    compute unit waits for it and gives the load unit one, the load unit waits for that."""
    prog.emit(Opcode.SYNC, unit=Unit.STORE, push_prev=1)
    prog.emit(Opcode.SYNC, unit=Unit.COMPUTE, pop_next=1, push_prev=1)
    prog.emit(Opcode.SYNC, unit=Unit.LOAD, pop_next=1)


def _check_formats(cfg, g):
    """Refuse, in one sentence, a GEMM that needs what this configuration does not build."""
    for f in (g.fmt_a, g.fmt_b) + ((format_by_name(g.out),) if g.out != "fp32" else ()):
        if not cfg.supports(f.spec.name):
            raise ValueError(f"this NPU configuration does not support {f.spec.name} (formats: "
                             f"{', '.join(cfg.formats)})")


def _host_finishes(cfg, g):
    """Whether the host finishes GEMM ``g``: when it needs what this configuration does not
    build. Without the vector unit the NPU computes the plain product (a partial per scaling
    block) and the host applies scales, column scale, bias and the FP8 conversion; with the
    vector unit but without FP8 stores the NPU computes everything but the conversion."""
    return ((not cfg.vector_unit and (g.blocked or g.col_scale is not None or g.bias is not None))
            or (g.out != "fp32" and not cfg.fp8_store))


def _host_spec(cfg, g, runtime):
    """:attr:`GemmOp.host` for GEMM ``g`` with ``runtime`` roles: what the host applies."""
    present = {"row_scales": g.row_scales, "col_scales": g.col_scales, "col_scale": g.col_scale, "bias": g.bias}
    present = {role: v for role, v in present.items() if v is not None and not cfg.vector_unit}
    part_k = _device_args(cfg, g)[1]
    return {"runtime": [r for r in HOST_ROLES if r in present and r in runtime],
            "consts": {r: [list(v.shape), v.flatten().tolist()] for r, v in present.items() if r not in runtime},
            "out": g.out, "out_scale": g.out_scale, "saturate": g.saturate,
            "parts": math.ceil(g.shape[1] / part_k) if part_k else 1}


def _device_args(cfg, g):
    """What the NPU computes of a GEMM the host finishes, stored as FP32: with the vector unit,
    all but the FP8 conversion; without it, the plain product, with several scaling blocks one
    partial per block (each summed from +0, as BLOCKSCALE would take it), so ``part_k`` (the
    second value) is the block length, else 0."""
    if cfg.vector_unit:
        return replace(g, out="fp32", out_scale=0x3F800000, saturate=True), 0
    part_k = g.block_k if g.blocked and g.row_scales.shape[1] > 1 else 0
    return replace(g, out="fp32", out_scale=0x3F800000, saturate=True, col_scale=None, bias=None,
                   row_scales=None, col_scales=None), part_k


#: The GEMM operands the host applies itself when it finishes a GEMM.
HOST_ROLES = ("row_scales", "col_scales", "col_scale", "bias")


def weight_operands(cfg, m, a_fmt, b_codes, b_fmt, col_scale=None, block_scales=None, block_k=BLOCK_K):
    """The packed bytes of a GEMM's weight-side operands (``b``, and ``col_scale`` or
    ``col_scales``) as :func:`lower_gemm` lays them out for ``m`` rows, for buffers to be shared
    by programs of other row counts (``shared=``). Raises ValueError if the GEMM does not fit the
    A-resident schedule, whose B layout does not depend on the row count. Where the host
    finishes the GEMM (no vector unit), the scales have no buffer: only ``b``."""
    k = b_codes.shape[0]
    g = GemmArgs.from_args(np.zeros((m, k), np.uint8), b_codes, a_fmt, b_fmt, "fp32", 1.0, True, col_scale, None,
                           block_scales, block_k)
    _check_formats(cfg, g)
    part_k = 0
    if _host_finishes(cfg, g):
        g, part_k = _device_args(cfg, g)
    plan = _plan(cfg, g, part_k)
    if not plan.resident:
        raise ValueError(f"a {m}x{k}x{g.shape[2]} GEMM does not fit the A-resident schedule of this configuration")
    op = GemmOp(cfg, g.shape, "fp32", plan, {}, _layouts(cfg, g, plan), "weights", g.block_k)
    out = {"b": bytes(op.pack("b", g.b))}
    if g.col_scale is not None:
        out["col_scale"] = bytes(op.pack("col_scale", g.col_scale))
    if g.blocked:
        out["col_scales"] = bytes(op.pack("col_scales", g.col_scales))
    return out


def _layouts(cfg, g, plan):
    m, k, n = g.shape
    bus = cfg.bus_bytes
    lay = {
        "c": TiledLayout.build(plan.parts * m, plan.n_tiles, 4 if g.out == "fp32" else 1, bus),
        "vec": TiledLayout.build(1, plan.n_tiles, 4, bus),
    }
    if plan.resident:
        lay["a"] = TiledLayout.build(m, plan.k_tiles, 1, bus, align=cfg.line_bytes)
        lay["b"] = TileMajorLayout.build(k, plan.n_tiles, cfg.line_bytes, bus)
    else:
        lay["a"] = TiledLayout.build(m, plan.k_tiles, 1, bus)
        lay["b"] = TiledLayout.build(k, plan.n_tiles, 1, bus)
    if g.blocked:
        lay["cs"] = TiledLayout.build(g.col_scales.shape[0], plan.n_tiles, 4, bus)
    return lay


def _lower(prog, cfg, g, base_name, runtime, shared=None):
    return _lower_batch(prog, cfg, [g], [base_name], runtime, [shared or {}])[0]


def _lower_batch(prog, cfg, gs, base_names, runtime, shared):
    """Lower GEMMs of one shape and one set of options, one after the other; one GemmOp each.
    With the A-resident schedule they form one pipelined command stream (the next GEMM's
    loads overlap this one's compute); otherwise each is its own stream, fenced."""
    g = gs[0]
    m, k, n = g.shape
    host = _host_finishes(cfg, g)
    part_k = 0
    if host:                       # the NPU computes the plain product (per scaling block), the host the rest
        finish = [_host_spec(cfg, g_b, runtime) for g_b in gs]
        gs = [_device_args(cfg, g_b)[0] for g_b in gs]
        part_k = _device_args(cfg, g)[1]
    g_dev = gs[0]
    plan = _plan(cfg, g_dev, part_k)
    assert not host or all(f["parts"] == plan.parts for f in finish), "partials of the host and the plan differ"
    bus = cfg.bus_bytes
    lay = _layouts(cfg, g_dev, plan)
    ops, addrs = [], []
    zero = None
    for i, (g_b, base_name, shared_b) in enumerate(zip(gs, base_names, shared)):
        note = f"{base_name.rstrip('.') or 'gemm'} {m}x{k}x{n}"
        op = GemmOp(cfg, (m, k, n), g.out, plan, {}, lay, note, g.block_k, finish[i] if host else None)
        if shared_b.get("b") is not None and not plan.resident:
            raise ValueError(f"{note}: a shared B operand needs the A-resident schedule (its layout must not "
                             f"depend on M), and this GEMM does not fit it")

        def operand(role, values, op=op, shared_b=shared_b, base_name=base_name, note=note):
            data = op.pack(role, values)
            if role in shared_b:
                buf = shared_b[role]
                if buf.nbytes != len(data):
                    raise ValueError(f"{note}: the shared {role} buffer has {buf.nbytes} bytes, not {len(data)}")
                op.buffers[role] = buf
                return buf
            kind = "input" if role in runtime else "const"
            buf = prog.buffer(base_name + role, nbytes=len(data), kind=kind, data=None if kind == "input" else data,
                              role=role)
            op.buffers[role] = buf
            return buf

        with prog.noting(note):
            addr = {"a": operand("a", g_b.a), "b": operand("b", g_b.b)}
            if g_b.col_scale is not None:
                addr["col_scale"] = operand("col_scale", g_b.col_scale)
            if g_b.bias is not None:
                addr["bias"] = operand("bias", g_b.bias)
            if g_b.blocked:
                addr["row_scales"] = operand("row_scales", g_b.row_scales)
                addr["col_scales"] = operand("col_scales", g_b.col_scales)
                if zero is None:
                    zero = prog.buffer(base_name + "zero", kind="const", data=bytes(_round_up(cfg.line_bytes, bus)),
                                       role="zero")
                addr["zero"] = op.buffers["zero"] = zero
            addr["c"] = op.buffers["c"] = prog.buffer(base_name + "c", nbytes=lay["c"].nbytes, kind="output", role="c")
        ops.append(op)
        addrs.append(addr)
    with prog.noting(ops[0].note if len(ops) == 1 else f"{ops[0].note} (x{len(ops)})"):
        if plan.resident:
            prog.extend(_commands_resident(cfg, g_dev, plan, lay, addrs))
        else:
            for i, addr in enumerate(addrs):
                if i:
                    fence(prog)
                prog.extend(_commands_reload(cfg, g_dev, plan, lay, addr))
    return ops


def _cmd(op, **fields):
    """A command of the GEMM lowering (appended to the program by :func:`build_gemm`)."""
    return Command(op if type(op) is Opcode else Opcode(op), fields)


def _prologue(cfg, g, plan, addr, n_outputs):
    """The zero-line LOAD (block scaling) and the SYNCs that prime the output regions
    (``n_outputs``: the STOREs of the stream)."""
    out = [] if not g.blocked else [_cmd(
        Opcode.LOAD, dst=0, sram_addr=plan.sp_zero, rows=1, row_bytes=cfg.line_bytes,
        dram_addr=addr["zero"], dram_stride=0)]
    return out + [_cmd(Opcode.SYNC, unit=Unit.STORE, push_prev=1)] * min(2, n_outputs)


def _store(g, lay, addr, acc_out, m0, m, ni, nw, push):
    c = lay["c"]
    return _cmd(
        Opcode.STORE, fmt=OUTPUTS[g.out], saturate=int(g.saturate), acc_addr=acc_out, rows=m, cols=nw,
        dram_addr=addr["c"] + m0 * c.pitch + c.offsets[ni], dram_stride=c.pitch, scale=g.out_scale,
        pop_prev=1, push_prev=int(push))


def _group(loads, pop, push):
    """Encode a load group: the first LOAD pops from compute, the last pushes to it."""
    loads = [dict(f) for f in loads]
    loads[0]["pop_next"] = int(pop)
    loads[-1]["push_next"] = int(push)
    return [_cmd(Opcode.LOAD, **f) for f in loads]


def _commands_resident(cfg, g, plan, lay, addrs):
    """The A-resident command stream (a list of encoded commands); see the module docstring.
    ``addrs`` holds the buffers of one or more GEMMs of this shape: their M blocks follow
    each other as if they were M blocks of one GEMM (block ``bi`` is M block ``bi % per`` of
    GEMM ``bi // per``), so loads of the next GEMM overlap the compute of this one."""
    m_total, k_total, _ = g.shape
    fmts = {"fmt_a": g.fmt_a.value, "fmt_b": g.fmt_b.value}
    chain = _chain(g, plan)
    per = len(plan.m_blocks)
    blocks = [plan.m_blocks[i % per] for i in range(per * len(addrs))]
    steps = [(bi, m0, m, ni, nw) for bi, (m0, m) in enumerate(blocks)
             for ni, (_, nw) in enumerate(plan.n_tiles)]
    n_steps, n_blocks, n_nt = len(steps), len(blocks), len(plan.n_tiles)
    line = cfg.line_bytes
    chunk_of = [c for c, (_, n) in enumerate(plan.a_chunks) for _ in range(n)]     # K tile -> A chunk
    block_end = {}                                 # K block -> index of its last K tile
    for ti, (k0, _) in enumerate(plan.k_tiles):
        block_end[k0 // g.block_k] = ti

    def b_loads(s):
        """The B column tile and the auxiliary lines of step s."""
        bi, _, _, ni, nw = steps[s]
        addr = addrs[bi // per]
        b, aux = lay["b"], plan.acc_aux[s % 2]
        piece = MAX_LOAD_ROW // line
        loads = [dict(sram_addr=plan.sp_b[s % 2] + k0, rows=1, row_bytes=min(piece, k_total - k0) * line,
                      dram_addr=addr["b"] + ni * b.pitch + k0 * line, dram_stride=0)
                 for k0 in range(0, k_total, piece)]
        if g.blocked:
            cs = lay["cs"]
            loads.append(dict(sram_addr=aux + plan.aux_col, rows=cs.rows, row_bytes=4 * nw, dst=1,
                              dram_addr=addr["col_scales"] + cs.offsets[ni], dram_stride=cs.pitch))
        for name, at in (("col_scale", plan.aux_scale), ("bias", plan.aux_bias)):
            if name in addr:
                loads.append(dict(sram_addr=aux + at, rows=1, row_bytes=4 * nw, dst=1,
                                  dram_addr=addr[name] + lay["vec"].offsets[ni], dram_stride=0))
        return loads

    def a_loads(bi):
        """One list of loads per A chunk of M block bi (with the row scales of the K blocks
        that end in the chunk)."""
        m0, m = blocks[bi]
        addr = addrs[bi // per]
        a = lay["a"]
        groups = []
        for c, (t0, n) in enumerate(plan.a_chunks):
            loads = [dict(sram_addr=m * t0, rows=m, row_bytes=n * line,
                          dram_addr=addr["a"] + m0 * a.pitch + a.offsets[t0], dram_stride=a.pitch)]
            for kb, last in block_end.items():
                if g.blocked and chunk_of[last] == c:
                    loads.append(dict(sram_addr=plan.acc_rs + kb * m, rows=m, row_bytes=4, dst=1,
                                      dram_addr=addr["row_scales"] + (kb * m_total + m0) * cfg.bus_bytes,
                                      dram_stride=cfg.bus_bytes))
            groups.append(loads)
        return groups

    def a_block(bi, b_first):
        """Encoded A chunks of block bi; the first carries the loads of its first step's B."""
        groups = a_loads(bi)
        out = []
        for c, loads in enumerate(groups):
            out += _group((b_first if c == 0 else []) + loads, pop=c == 0 and bi > 0, push=True)
        return out

    def compute(s):
        """Step s's compute commands, one list per output unit (its partials, see _Plan.parts):
        unit u = s * parts + p uses output region u % 2."""
        bi, m0, m, ni, nw = steps[s]
        first_step = ni == 0
        buf, aux = plan.sp_b[s % 2], plan.acc_aux[s % 2]
        units, cmds = [], []
        for ti, (k0, kw) in enumerate(plan.k_tiles):
            t0, n = plan.a_chunks[chunk_of[ti]]
            kb = k0 // g.block_k
            part = k0 // plan.part_k if plan.part_k else 0
            acc_out = plan.acc_out[(s * plan.parts + part) % 2]
            last_k = ti == len(plan.k_tiles) - 1
            pop = ti == 0 or (first_step and ti == t0)
            mm = dict(fmts, a_addr=m * t0 + ti - t0, a_stride=n, b_addr=buf + k0, m=m, k=kw, pop_prev=int(pop))
            if g.blocked:
                cmds.append((Opcode.MATMUL, dict(mm, **_acc_flags(cfg, g, k0, kw, chain), acc_addr=plan.acc_temp)))
                if ti == 0:   # after the first pop, so the zero line is loaded
                    cmds.append((Opcode.MATMUL, dict(
                        fmts, **_zero_flags(cfg), a_addr=plan.sp_zero, a_stride=0, b_addr=plan.sp_zero,
                        acc_addr=acc_out, m=m, k=1, pop_next=1)))
                if block_end[kb] == ti:
                    cmds.append((Opcode.BLOCKSCALE, dict(
                        src=plan.acc_temp, dst=acc_out, rows=m, row_scale=plan.acc_rs + kb * m,
                        col_scale=aux + plan.aux_col + kb)))
            else:
                part_first = k0 == part * plan.part_k
                cmds.append((Opcode.MATMUL, dict(mm, **_acc_flags(cfg, g, k0, kw, chain), acc_addr=acc_out,
                                                 pop_next=int(part_first))))
            if last_k and (g.col_scale is not None or g.bias is not None):
                cmds.append((Opcode.EPILOGUE, dict(
                    use_scale=int(g.col_scale is not None), use_bias=int(g.bias is not None), src=acc_out,
                    dst=acc_out, rows=m, scale_addr=aux + plan.aux_scale if g.col_scale is not None else 0,
                    bias_addr=aux + plan.aux_bias if g.bias is not None else 0)))
            if last_k or (plan.part_k and (k0 + kw) % plan.part_k == 0):
                cmds[-1][1]["push_next"] = 1                 # the unit's output region is ready
                units.append(cmds)
                cmds = []
        units[-1][-1][1]["push_prev"] = int(s + 2 < n_steps)     # B buffer s % 2 is free again
        out = [[_cmd(op, **f) for op, f in unit] for unit in units]
        if ni == n_nt - 1 and bi + 1 < n_blocks:             # the A block is free again
            out[-1].append(_cmd(Opcode.SYNC, unit=Unit.COMPUTE, push_prev=1))
        return out

    # compute commands address SRAM only, so steps alike share them: (rows, first step of a
    # block, buffer, first output region, returns its B buffer, frees the A block)
    computed = {}
    n_units = n_steps * plan.parts
    out = _prologue(cfg, g, plan, addrs[0], n_units)
    out += a_block(0, b_loads(0))
    for s, (bi, m0, m, ni, nw) in enumerate(steps):
        next_first = s + 1 < n_steps and steps[s + 1][3] == 0
        if s + 1 < n_steps:     # prefetch the next B tile; a block's first B shares A chunk 0's token
            out += _group(b_loads(s + 1), pop=s + 1 >= 2, push=not next_first)
        key = (m, ni == 0, s % 2, s * plan.parts % 2, s + 2 < n_steps, ni == n_nt - 1 and bi + 1 < n_blocks)
        if key not in computed:
            computed[key] = compute(s)
        for part, unit in enumerate(computed[key]):      # each unit's STORE follows its compute
            u = s * plan.parts + part
            out += unit
            out.append(_store(g, lay, addrs[bi // per], plan.acc_out[u % 2], part * m_total + m0, m, ni, nw,
                              push=u + 2 < n_units))
        if next_first:
            out += a_block(bi + 1, [])
    return out


def _commands_reload(cfg, g, plan, lay, addr):
    """The A-reload command stream (a list of encoded commands), step by step; see the module docstring."""
    m_total = g.shape[0]
    fmts = {"fmt_a": g.fmt_a.value, "fmt_b": g.fmt_b.value}
    chain = _chain(g, plan)
    n_tiles_total = len(plan.m_blocks) * len(plan.n_tiles)
    n_steps = n_tiles_total * len(plan.k_tiles)
    n_units = n_tiles_total * plan.parts          # output units: one per output tile and partial
    out = _prologue(cfg, g, plan, addr, n_units)
    out += [_cmd(Opcode.SYNC, unit=Unit.COMPUTE, push_prev=1)] * min(2, n_steps)
    step = unit = 0
    for (m0, m), (ni, (_, nw)) in product(plan.m_blocks, enumerate(plan.n_tiles)):
        for ti, (k0, kw) in enumerate(plan.k_tiles):
            acc_out = plan.acc_out[unit % 2]
            buf, aux = plan.sp_buf[step % 2], plan.acc_aux[step % 2]
            last_k = ti == len(plan.k_tiles) - 1
            part = k0 // plan.part_k if plan.part_k else 0
            unit_end = last_k or (plan.part_k and (k0 + kw) % plan.part_k == 0)
            kb = k0 // g.block_k
            block_last = last_k or (k0 + kw) % g.block_k == 0
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
                    fmts, **_acc_flags(cfg, g, k0, kw, chain), a_addr=buf, a_stride=1, b_addr=buf + plan.m_block,
                    acc_addr=plan.acc_temp, m=m, k=kw)))
                if ti == 0:   # after the first pop, so the zero line is loaded
                    compute.append((Opcode.MATMUL, dict(
                        fmts, **_zero_flags(cfg), a_addr=plan.sp_zero, a_stride=0, b_addr=plan.sp_zero,
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
                    fmts, **_acc_flags(cfg, g, k0, kw, chain), a_addr=buf, a_stride=1, b_addr=buf + plan.m_block,
                    acc_addr=acc_out, m=m, k=kw, pop_next=int(k0 == part * plan.part_k))))
            if last_k and (g.col_scale is not None or g.bias is not None):
                for name, line in (("col_scale", plan.aux_scale), ("bias", plan.aux_bias)):
                    if name in addr:
                        loads.append(dict(sram_addr=aux + line, rows=1, row_bytes=4 * nw, dst=1,
                                          dram_addr=addr[name] + lay["vec"].offsets[ni], dram_stride=0))
                compute.append((Opcode.EPILOGUE, dict(
                    use_scale=int(g.col_scale is not None), use_bias=int(g.bias is not None), src=acc_out,
                    dst=acc_out, rows=m, scale_addr=aux + plan.aux_scale if g.col_scale is not None else 0,
                    bias_addr=aux + plan.aux_bias if g.bias is not None else 0)))
            compute[0][1]["pop_prev"] = 1
            compute[-1][1]["push_prev"] = int(step + 2 < n_steps)
            compute[-1][1]["push_next"] = int(unit_end)
            out += _group(loads, pop=True, push=True)
            out += [_cmd(op, **f) for op, f in compute]
            step += 1
            if unit_end:
                out.append(_store(g, lay, addr, acc_out, part * m_total + m0, m, ni, nw, push=unit + 2 < n_units))
                unit += 1
    return out
