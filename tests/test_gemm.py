"""GEMM programs from compiler/gemm.py, run on the functional simulator, against reference_gemm
(the contract written directly with the golden model), bit for bit."""

import math
import re
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from fp8npu.compiler.gemm import BLOCK_K, TiledLayout, TileMajorLayout, build_gemm
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.formats import E4M3, E5M2
from fp8npu.hdl.isa import Opcode
from fp8npu.sim import funcsim, golden
from fp8npu.sim.reference import reference_gemm

CONFIGS = {
    "1x1": NPUConfig(rows=1, cols=1),
    "4x8": NPUConfig(rows=4, cols=8),
    "8x8": NPUConfig(),
    "16x16": NPUConfig(rows=16, cols=16),
    # odd sizes, small SRAMs (several M blocks), shallow queues, narrow and wide buses
    "5x12-small": NPUConfig(rows=5, cols=12, sp_lines=64, acc_lines=64, queue_depth=2, axi_data_bits=32),
    "12x3-wide": NPUConfig(rows=12, cols=3, sp_lines=128, acc_lines=128, axi_data_bits=256),
}
SIZES = [(13, 21, 10), (1, 1, 1), (64, 64, 64)]
FORMATS = [("e4m3", "e4m3"), ("e5m2", "e5m2"), ("e4m3", "e5m2"), ("e5m2", "e4m3")]
KIND = {"fp32": "fp32", "e4m3": E4M3, "e5m2": E5M2}


def codes(shape, fmt, kind, gen):
    """FP8 codes: "any" = every code (NaN, inf, subnormals), "normal" = N(0, 1) quantized."""
    if kind == "any":
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    return torch.randn(shape, generator=gen).to(dtype).view(torch.uint8)


def f32_values(n, gen, specials=True):
    """FP32 bit patterns: normal values, and with ``specials`` some arbitrary bit patterns."""
    bits = golden.f32_to_bits(torch.randn(n, generator=gen) * 4)
    if specials:
        raw = torch.randint(-2**31, 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
        bits = torch.where(torch.rand(n, generator=gen) < 0.2, raw, bits)
    return bits


def pow2_scales(shape, gen):
    return 2.0 ** torch.randint(-8, 9, shape, generator=gen).to(torch.float32)


def check(cfg, a, b, fmt_a, fmt_b, base=0, **kw):
    """Build, simulate, compare with reference_gemm bit for bit; return (outputs checked, program, result)."""
    g = build_gemm(cfg, a, b, fmt_a, fmt_b, base=base, **kw)
    r = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
    assert r.ok, f"{r.error.name} at 0x{r.error_addr:x}"
    assert all(v == 0 for v in r.tokens.values()), r.tokens
    got = g.read_output(r.dram)
    want = reference_gemm(a, b, fmt_a, fmt_b, **kw)
    bad = golden.mismatches(got, want, KIND[kw.get("out", "fp32")])
    assert not bool(bad.any()), f"{int(bad.sum())} of {bad.numel()} outputs differ, first {bad.nonzero()[0].tolist()}"
    return got.numel(), g, r


def commands_of(g):
    return isa.decode_program(g.program)


# ---- plain GEMM on every configuration --------------------------------------------------------------
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("fmt_a, fmt_b", FORMATS)
def test_gemm_sizes_and_formats(cfg_name, fmt_a, fmt_b):
    cfg = CONFIGS[cfg_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg_name} {fmt_a} {fmt_b}".encode()))
    checked = 0
    for i, (m, k, n) in enumerate(SIZES):
        kind = ("any", "normal")[i % 2]
        a, b = codes((m, k), fmt_a, kind, gen), codes((k, n), fmt_b, kind, gen)
        checked += check(cfg, a, b, fmt_a, fmt_b)[0]
    print(f"{cfg_name} {fmt_a} x {fmt_b}: {checked} outputs bit-exact")


def test_accumulates_across_k_tiles_in_order():
    """K = 100 on a 4-row array: 25 K tiles, the first overwrites, the rest accumulate, in k order."""
    cfg = CONFIGS["4x8"]
    gen = torch.Generator().manual_seed(7)
    a, b = codes((33, 100), "e4m3", "any", gen), codes((100, 19), "e4m3", "any", gen)
    a[(a & 0x7F) == 0x7F] = 0x38                      # no NaN: every output is a finite sum
    b[(b & 0x7F) == 0x7F] = 0x38
    checked, g, r = check(cfg, a, b, "e4m3", "e4m3")
    mms = [c for c in commands_of(g) if c.opcode == Opcode.MATMUL]
    assert [c.accumulate for c in mms[:25]] == [0] + [1] * 24
    assert all(c.k == 4 for c in mms)
    # one rounding per step is not a once-rounded exact sum: the test can tell them apart
    once = golden.f32_to_bits((golden.decode_fp8(a, 0).double() @ golden.decode_fp8(b, 0).double()).float())
    assert bool(golden.mismatches(g.read_output(r.dram), once, "fp32").any())
    print(f"25 K tiles: {checked} outputs bit-exact")


@pytest.mark.parametrize("cfg_name", ["4x8", "5x12-small", "12x3-wide"])
def test_no_padded_products(cfg_name):
    """Every MATMUL's k is its tile's real length: MAC work is exactly M x K x (N tiles x cols)."""
    cfg = CONFIGS[cfg_name]
    gen = torch.Generator().manual_seed(3)
    m, k, n = 23, 29, 17
    a, b = codes((m, k), "e5m2", "any", gen), codes((k, n), "e5m2", "any", gen)
    checked, g, r = check(cfg, a, b, "e5m2", "e5m2")
    assert r.mac_ops == m * k * math.ceil(n / cfg.cols) * cfg.cols
    assert all(c.k <= cfg.rows for c in commands_of(g) if c.opcode == Opcode.MATMUL)
    print(f"{cfg_name}: {checked} outputs bit-exact")


def test_several_m_blocks_and_queue_depths():
    """Small SRAMs force several M blocks (both output regions in turn); any queue depth gives
    the same DRAM (confluence)."""
    gen = torch.Generator().manual_seed(11)
    a, b = codes((70, 37), "e4m3", "normal", gen), codes((37, 21), "e5m2", "normal", gen)
    images, checked = [], 0
    for depth in (2, 4, 64):
        cfg = NPUConfig(rows=8, cols=8, sp_lines=64, acc_lines=32, queue_depth=depth)
        n, g, r = check(cfg, a, b, "e4m3", "e5m2")
        assert g.m_block < 70 and len(_stores(g)) == math.ceil(70 / g.m_block) * 3
        images.append(r.dram)
        checked += n
    assert images[0] == images[1] == images[2]
    print(f"M blocks: {checked} outputs bit-exact")


def _stores(g):
    return [c for c in commands_of(g) if c.opcode == Opcode.STORE]


# ---- epilogue ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_name", ["1x1", "4x8", "8x8", "16x16", "5x12-small"])
@pytest.mark.parametrize("which", ["scale", "bias", "both"])
def test_epilogue_scale_and_bias(cfg_name, which):
    cfg = CONFIGS[cfg_name]
    gen = torch.Generator().manual_seed(5)
    m, k, n = 19, 40, 27
    a, b = codes((m, k), "e4m3", "normal", gen), codes((k, n), "e5m2", "any", gen)
    kw = {}
    if which in ("scale", "both"):
        kw["col_scale"] = f32_values(n, gen)
    if which in ("bias", "both"):
        kw["bias"] = golden.bits_to_f32(f32_values(n, gen))      # float values work too
    checked = check(cfg, a, b, "e4m3", "e5m2", **kw)[0]
    print(f"{cfg_name} epilogue {which}: {checked} outputs bit-exact")


# ---- fine-grained (block) scaling -----------------------------------------------------------------
@pytest.mark.parametrize("cfg_name", ["4x8", "8x8", "16x16", "5x12-small", "12x3-wide"])
def test_block_scaling(cfg_name):
    """K = 300: blocks of 128, 128 and 44; N = 140: two column-scale blocks."""
    cfg = CONFIGS[cfg_name]
    gen = torch.Generator().manual_seed(17)
    m, k, n = 21, 300, 140
    a, b = codes((m, k), "e4m3", "normal", gen), codes((k, n), "e4m3", "normal", gen)
    kb, nb = math.ceil(k / BLOCK_K), math.ceil(n / BLOCK_K)
    checked, g, r = check(cfg, a, b, "e4m3", "e4m3", block_scales=(pow2_scales((m, kb), gen), pow2_scales((kb, nb), gen)))
    tiles = len(_stores(g))
    assert sum(c.opcode == Opcode.BLOCKSCALE for c in commands_of(g)) == kb * tiles
    ks = [c.k for c in commands_of(g) if c.opcode == Opcode.MATMUL and c.a_stride]   # not the +0 fills
    ends = np.cumsum(ks[:len(ks) // tiles]).tolist()
    assert ends[-1] == k and 128 in ends and 256 in ends                         # no tile crosses a block
    print(f"{cfg_name} block scaling: {checked} outputs bit-exact")


@pytest.mark.parametrize("out, saturate", [("fp32", True), ("e4m3", True), ("e5m2", False)])
def test_block_scaling_any_scales_with_epilogue(out, saturate):
    """Non-power-of-two and special scales (the three roundings), with an epilogue and FP8 output."""
    cfg = CONFIGS["8x8"]
    gen = torch.Generator().manual_seed(23)
    m, k, n = 9, 300, 131
    a, b = codes((m, k), "e5m2", "any", gen), codes((k, n), "e4m3", "any", gen)
    rs, cs = f32_values(m * 3, gen).reshape(m, 3), f32_values(3 * 2, gen).reshape(3, 2)
    kw = dict(block_scales=(rs, cs), col_scale=f32_values(n, gen), bias=f32_values(n, gen), out=out,
              saturate=saturate)
    if out != "fp32":
        kw["out_scale"] = 0.5
    checked = check(cfg, a, b, "e5m2", "e4m3", **kw)[0]
    print(f"block scaling, arbitrary scales, {out}: {checked} outputs bit-exact")


# ---- FP8 outputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["e4m3", "e5m2"])
@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("out_scale", [2.0 ** -6, 3.0, 1e4])
def test_fp8_outputs(out, saturate, out_scale):
    cfg = CONFIGS["4x8"]
    gen = torch.Generator().manual_seed(29)
    m, k, n = 17, 24, 20
    a, b = codes((m, k), "e4m3", "normal", gen), codes((k, n), "e4m3", "normal", gen)
    checked, g, r = check(cfg, a, b, "e4m3", "e4m3", out=out, out_scale=out_scale, saturate=saturate)
    got = g.read_output(r.dram)
    spec = KIND[out]
    if out_scale == 1e4:   # many values overflow: saturation to max, or inf / NaN
        mags = got & 0x7F
        if saturate:
            assert bool((mags == spec.max_code).any())
        else:
            assert bool(golden.fp8_is_nan(got, spec).any() if spec is E4M3 else (mags == spec.inf_code).any())
    print(f"{out} saturate={saturate} scale={out_scale}: {checked} outputs bit-exact")


# ---- DRAM image and window ------------------------------------------------------------------------
def test_nothing_outside_the_window_is_written():
    cfg = CONFIGS["5x12-small"]
    gen = torch.Generator().manual_seed(31)
    a, b = codes((30, 50), "e4m3", "any", gen), codes((50, 26), "e4m3", "any", gen)
    kb = math.ceil(50 / BLOCK_K)
    kw = dict(block_scales=(pow2_scales((30, kb), gen), pow2_scales((kb, 1), gen)), bias=f32_values(26, gen))
    g = build_gemm(cfg, a, b, "e4m3", "e4m3", base=0x140, **kw)
    guard = torch.randint(0, 256, (0x200,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    dram = bytearray(guard[:0x140]) + g.dram[0x140:] + guard
    r = funcsim.run(g.program, dram, cfg, g.prog_addr, g.win_base, g.win_limit)
    assert r.ok
    assert r.dram[:0x140] == bytes(dram[:0x140]) and r.dram[g.win_limit:] == bytes(dram[g.win_limit:])
    assert not bool(golden.mismatches(g.read_output(r.dram), reference_gemm(a, b, "e4m3", "e4m3", **kw), "fp32").any())
    print(f"window: {30 * 26} outputs bit-exact, {len(dram) - (g.win_limit - g.win_base)} guard bytes untouched")


def test_layout_is_bus_aligned_and_round_trips():
    layout = TiledLayout.build(3, ((0, 5), (5, 5), (10, 2)), 4, 32)
    assert layout.offsets == (0, 32, 64) and layout.pitch == 96
    values = torch.randint(-2**31, 2**31, (3, 12), dtype=torch.int64).to(torch.int32).numpy()
    assert np.array_equal(layout.unpack(layout.pack(values)), values)
    dense = TiledLayout.build(2, ((0, 8), (8, 8), (16, 3)), 1, 8)   # 8-wide tiles on an 8-byte bus: row-major
    assert dense.offsets == (0, 8, 16) and dense.pitch == 24
    cfg = CONFIGS["12x3-wide"]
    g = build_gemm(cfg, np.zeros((5, 30), np.uint8), np.zeros((30, 7), np.uint8), "e4m3", "e4m3")
    for c in commands_of(g):
        if c.opcode in (Opcode.LOAD, Opcode.STORE):
            assert c.dram_addr % cfg.bus_bytes == 0 and c.dram_stride % cfg.bus_bytes == 0
    assert g.prog_addr % 32 == 0 and g.win_base == 0 and g.win_limit == len(g.dram)
    assert g.dram[g.prog_addr:g.prog_addr + len(g.program)] == g.program


def _tokens_balanced_in_program_order(g):
    """Every token counter ends at zero, and every pop is covered by pushes of commands earlier in
    the program (so the in-order dispatcher cannot deadlock, whatever the queue depth)."""
    flags = {  # unit -> (pop_prev, pop_next, push_prev, push_next) counters
        isa.Unit.LOAD: (None, "c2l", None, "l2c"), isa.Unit.COMPUTE: ("l2c", "s2c", "c2l", "c2s"),
        isa.Unit.STORE: ("c2s", None, "s2c", None)}
    pushed, popped = dict.fromkeys(("l2c", "c2l", "c2s", "s2c"), 0), dict.fromkeys(("l2c", "c2l", "c2s", "s2c"), 0)
    for c in commands_of(g):
        if c.opcode == Opcode.END:
            continue
        pop_prev, pop_next, push_prev, push_next = flags[c.unit]
        for counter, on in ((pop_prev, c.pop_prev), (pop_next, c.pop_next)):
            if on:
                popped[counter] += 1
                assert popped[counter] <= pushed[counter], f"{counter} popped before an earlier push"
        for counter, on in ((push_prev, c.push_prev), (push_next, c.push_next)):
            if on:
                pushed[counter] += 1
    assert pushed == popped, (pushed, popped)


def _loads(g):
    return [c for c in commands_of(g) if c.opcode == Opcode.LOAD]


def test_token_protocol_shape_a_resident():
    """A-resident: 2 store-priming SYNCs, one B LOAD per step (buffer 0, 1, 0, ...), one A chunk per
    M block; tokens balanced in program order; the program ends with END."""
    cfg = CONFIGS["4x8"]
    g = build_gemm(cfg, np.zeros((10, 12), np.uint8), np.zeros((12, 16), np.uint8), "e4m3", "e4m3")
    assert g.schedule == "a_resident" and g.steps == 2 and g.m_block == 10 and g.a_chunks == 1
    cmds = commands_of(g)
    assert [(c.opcode, c.unit) for c in cmds[:2]] == [(Opcode.SYNC, isa.Unit.STORE)] * 2
    assert cmds[-1].opcode == Opcode.END
    loads = _loads(g)
    # B(0) [no token of its own], A (10 rows of 3 tiles = 3 lines each) [push], B(1) [push]
    assert [(c.sram_addr, c.rows, c.row_bytes) for c in loads] == [(30, 1, 12 * 8), (0, 10, 3 * 8), (42, 1, 12 * 8)]
    assert [c.push_next for c in loads] == [0, 1, 1] and not any(c.pop_next for c in loads)
    mms = [c for c in cmds if c.opcode == Opcode.MATMUL]
    assert [(c.a_addr, c.a_stride, c.b_addr, c.k) for c in mms[:3]] == [(0, 3, 30, 4), (1, 3, 34, 4), (2, 3, 38, 4)]
    assert sum(c.pop_next for c in cmds if c.opcode == Opcode.LOAD) == 0
    assert sum(c.pop_prev for c in cmds if c.opcode == Opcode.STORE) == 2
    _tokens_balanced_in_program_order(g)


def test_token_protocol_shape_a_reload():
    """A-reload (the scratchpad cannot hold A and two B tiles): primed double buffering, 2 + 2
    SYNCs, every LOAD step pops and pushes, the program ends with END."""
    cfg = NPUConfig(rows=4, cols=8, sp_lines=32)
    g = build_gemm(cfg, np.zeros((10, 12), np.uint8), np.zeros((12, 16), np.uint8), "e4m3", "e4m3")
    assert g.schedule == "a_reload" and g.a_chunks == 0
    cmds = commands_of(g)
    assert [c.opcode for c in cmds[:4]] == [Opcode.SYNC] * 4 and cmds[-1].opcode == Opcode.END
    assert sum(c.pop_next for c in cmds if c.opcode == Opcode.LOAD) == g.steps == 2 * 3
    assert sum(c.push_next for c in cmds if c.opcode == Opcode.LOAD) == g.steps
    assert sum(c.pop_prev for c in cmds if c.opcode == Opcode.STORE) == 2
    _tokens_balanced_in_program_order(g)


@pytest.mark.parametrize("cfg_name, shape, sram, blocked, schedule", [
    ("8x8", (70, 300, 37), {}, True, "a_resident"),          # 3 A chunks, each ends a K block
    ("8x8", (70, 300, 37), {"sp_lines": 2048}, False, "a_resident"),  # 2 M blocks
    ("8x8", (70, 300, 37), {"sp_lines": 2048}, True, "a_resident"),
    ("8x8", (70, 300, 37), {"sp_lines": 1024}, True, "a_reload"),
    ("4x8", (70, 100, 37), {"sp_lines": 128}, False, "a_reload"),
    ("5x12-small", (70, 21, 30), {"sp_lines": 256, "acc_lines": 128}, True, "a_resident"),  # 2 chunks, 3 blocks
    ("5x12-small", (13, 21, 30), {}, True, "a_reload"),
    ("12x3-wide", (29, 33, 10), {}, False, "a_resident"),
])
def test_schedules_several_blocks_and_chunks(cfg_name, shape, sram, blocked, schedule):
    """Several M blocks, A chunks and N tiles, with block scaling and an epilogue, on both schedules:
    bit-exact, tokens balanced in program order, any queue depth gives the same DRAM."""
    cfg = NPUConfig(**dict(CONFIGS[cfg_name].to_dict(), **sram))
    m, k, n = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg_name} {shape} {sram} {blocked}".encode()))
    a, b = codes((m, k), "e4m3", "normal", gen), codes((k, n), "e5m2", "normal", gen)
    kw = dict(bias=f32_values(n, gen, specials=False))
    if blocked:
        kb, nb = math.ceil(k / BLOCK_K), math.ceil(n / BLOCK_K)
        kw["block_scales"] = (pow2_scales((m, kb), gen), pow2_scales((kb, nb), gen))
    images = []
    for depth in (2, 64):
        checked, g, r = check(NPUConfig(**dict(cfg.to_dict(), queue_depth=depth)), a, b, "e4m3", "e5m2", **kw)
        assert g.schedule == schedule
        _tokens_balanced_in_program_order(g)
        images.append(r.dram)
    assert images[0] == images[1]
    print(f"{cfg_name} {shape} {sram}: {g.schedule}, M block {g.m_block} ({len(g.program) // 32} commands, "
          f"{g.a_chunks} A chunks), {checked} outputs bit-exact")


def test_tile_major_layout_round_trips():
    layout = TileMajorLayout.build(5, ((0, 8), (8, 8), (16, 3)), 8, 32)
    assert layout.pitch == 64 and layout.nbytes == 3 * 64
    values = np.arange(5 * 19, dtype=np.int64).reshape(5, 19).astype(np.uint8)
    raw = layout.pack(values)
    assert raw[64 + 8 * 2:64 + 8 * 2 + 8].tolist() == values[2, 8:16].tolist()   # tile 1, line 2
    assert raw[128 + 3:128 + 8].tolist() == [0] * 5                                 # padding
    assert np.array_equal(layout.unpack(raw), values)


def test_512_cubed_is_a_resident():
    """512 x 512 x 512 E4M3 on 8x8: the A block is loaded once per M block (in a few chunks), each B
    column tile once per (M block, N tile), in long DRAM rows. With a scratchpad that holds all
    of A or with the default one, funcsim's utilization estimate (within ~2 % of the RTL's
    counters) is >= 0.95."""
    gen = torch.Generator().manual_seed(512)
    a, b = codes((512, 512), "e4m3", "normal", gen), codes((512, 512), "e4m3", "normal", gen)
    for cfg in (NPUConfig(), NPUConfig(sp_lines=65536)):
        g = build_gemm(cfg, a, b, "e4m3", "e4m3")
        blocks, n_tiles = math.ceil(512 / g.m_block), 512 // cfg.cols
        assert g.schedule == "a_resident" and g.steps == blocks * n_tiles
        loads = _loads(g)
        a_loads = [c for c in loads if c.sram_addr < g.m_block * 512 // cfg.rows]
        b_loads = [c for c in loads if c.sram_addr >= g.m_block * 512 // cfg.rows]
        assert len(a_loads) == blocks * g.a_chunks and g.a_chunks <= 4
        assert len(b_loads) == blocks * n_tiles
        assert all(c.rows == 1 and c.row_bytes == 512 * cfg.line_bytes for c in b_loads)
        assert sum(c.rows * c.row_bytes for c in a_loads) == 512 * 512
        assert len(loads) == len(a_loads) + len(b_loads)
        _tokens_balanced_in_program_order(g)
        print(f"sp_lines={cfg.sp_lines}: M block {g.m_block}, {blocks} M blocks x {g.a_chunks} A LOADs, "
              f"{len(b_loads)} B LOADs, {len(loads)} LOADs in all")
    for cfg in (NPUConfig(), NPUConfig(sp_lines=65536)):
        g = build_gemm(cfg, a, b, "e4m3", "e4m3")
        r = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
        assert r.ok and all(v == 0 for v in r.tokens.values())
        rows = [0, 137, 511]
        want = reference_gemm(a[rows], b, "e4m3", "e4m3")
        assert not bool(golden.mismatches(g.read_output(r.dram)[rows], want, "fp32").any())
        print(f"512^3 E4M3 on 8x8, sp_lines={cfg.sp_lines}, M block {g.m_block}: funcsim estimate "
              f"{r.cycles} cycles, utilization {r.utilization:.1%}")
        assert r.utilization >= 0.95


def test_argument_errors():
    a, b = np.zeros((4, 5), np.uint8), np.zeros((5, 3), np.uint8)
    cfg = CONFIGS["8x8"]
    with pytest.raises(ValueError, match="inner dimensions must match"):
        build_gemm(cfg, a, np.zeros((4, 3), np.uint8), "e4m3", "e4m3")
    with pytest.raises(ValueError, match="does not support e5m2"):
        build_gemm(NPUConfig(formats=("e4m3",)), a, b, "e4m3", "e5m2")
    with pytest.raises(ValueError, match="out_scale applies only to FP8 outputs"):
        build_gemm(cfg, a, b, "e4m3", "e4m3", out_scale=2.0)
    with pytest.raises(ValueError, match=r"row_scales must have shape \(4, 1\)"):
        build_gemm(cfg, a, b, "e4m3", "e4m3", block_scales=(torch.ones(4, 2), torch.ones(1, 1)))
    with pytest.raises(ValueError, match="uint8"):
        build_gemm(cfg, a.astype(np.int32), b, "e4m3", "e4m3")
    with pytest.raises(ValueError, match="too small"):      # neither A-resident nor A-reload fits
        build_gemm(NPUConfig(rows=16, cols=16, sp_lines=16, acc_lines=16), np.zeros((4, 40), np.uint8),
                   np.zeros((40, 3), np.uint8), "e4m3", "e4m3")


def test_bench_runs_small():
    """The --bench code path (no timing assertion)."""
    from fp8npu.compiler.bench import run_funcsim_bench
    assert run_funcsim_bench(size=48, cfg=CONFIGS["4x8"], check_rows=3)


def _run_batch(cfg, batch, shape, blocked, block_k, gen, engine="func"):
    """A batch of GEMMs of one shape lowered by lower_gemm_batch, every operand filled at run
    time; returns (outputs checked, commands, the lowered ops)."""
    from fp8npu.compiler.gemm import lower_gemm_batch
    from fp8npu.compiler.program import Program, allocate
    from fp8npu.sim.host import Driver, FuncTransport, RTLTransport
    m, k, n = shape
    kb = math.ceil(k / block_k)
    elems = []
    for _ in range(batch):
        a, b = codes((m, k), "e4m3", "normal", gen), codes((k, n), "e5m2", "normal", gen)
        scales = (pow2_scales((m, kb), gen), pow2_scales((kb, n), gen)) if blocked else None
        elems.append((a, b, scales))
    prog = Program(cfg)
    runtime = ("a", "b") + (("row_scales", "col_scales") if blocked else ())
    ops = lower_gemm_batch(prog, cfg, batch, elems[0][0], elems[0][1], "e4m3", "e5m2", block_scales=elems[0][2],
                           block_k=block_k, runtime=runtime, name="bmm")
    prog.emit(Opcode.END)
    code = prog.buffer("program", nbytes=len(prog) * isa.COMMAND_BYTES, kind="program")
    layout = allocate(list(prog.buffers.values()), 0)
    program = prog.verify(layout)
    image = layout.image(prog.buffers.values())
    transport = (FuncTransport if engine == "func" else RTLTransport)(cfg, max(layout.end, 4096), bytes(image))
    driver = Driver(transport, cfg)
    driver.write(layout.address(code), program)
    for op, (a, b, scales) in zip(ops, elems):
        values = {"a": a, "b": b}
        if blocked:
            values.update(row_scales=scales[0], col_scales=scales[1])
        for role in runtime:
            driver.write(layout.address(op.buffers[role]), op.pack(role, values[role]))
    result = driver.launch(layout.address(code), len(prog))
    assert result.ok, result.describe()
    checked = 0
    for op, (a, b, scales) in zip(ops, elems):
        got = op.unpack(driver.read(layout.address(op.buffers["c"]), op.buffers["c"].nbytes))
        want = reference_gemm(a, b, "e4m3", "e5m2", block_scales=scales, block_k=block_k)
        assert torch.equal(got, want)
        checked += got.numel()
    transport.close()
    return checked, len(prog), ops, result


@pytest.mark.parametrize("cfg_name, shape, sram, blocked, block_k", [
    ("8x8", (20, 64, 24), {}, True, 64),                         # one block spanning K
    ("8x8", (70, 300, 37), {"sp_lines": 2048}, True, 128),       # 2 M blocks per element
    ("5x12-small", (70, 21, 30), {"sp_lines": 256, "acc_lines": 128}, True, 128),  # chunks, 3 blocks
    ("4x8", (70, 100, 37), {"sp_lines": 128}, False, 128),       # A-reload: fenced
])
def test_batched_gemms_pipeline_bit_exact(cfg_name, shape, sram, blocked, block_k):
    """A bmm lowered as one stream (the next element's loads overlap this one's compute) gives
    every element's contract bits, on one or several M blocks per element and both schedules."""
    cfg = NPUConfig(**dict(CONFIGS[cfg_name].to_dict(), **sram))
    gen = torch.Generator().manual_seed(zlib.crc32(f"batch {cfg_name} {shape}".encode()))
    checked, commands, ops, _ = _run_batch(cfg, 3, shape, blocked, block_k, gen)
    print(f"{cfg_name} {shape}: 3 GEMMs, {commands} commands, "
          f"{'one stream' if ops[0].plan.resident else 'fenced'}, {checked} outputs bit-exact")
    assert checked == 3 * shape[0] * shape[2]


def test_batched_gemms_on_the_rtl():
    """The same stream on the Verilog: 3 GEMMs of several M blocks and three K blocks each."""
    cfg = NPUConfig(rows=4, cols=4, sp_lines=1024, acc_lines=256)     # the model tests' NPU (one Verilator build)
    gen = torch.Generator().manual_seed(8)
    checked, _, ops, result = _run_batch(cfg, 3, (48, 40, 9), True, 16, gen, engine="rtl")
    assert "rtl" in result.extra and result.cycles > 0
    assert ops[0].plan.resident and len(ops[0].plan.m_blocks) >= 2 and checked == 3 * 48 * 9


def test_batched_gemms_are_faster_than_fenced_ones():
    cfg = NPUConfig()
    gen = torch.Generator().manual_seed(7)
    _, _, _, one = _run_batch(cfg, 4, (32, 64, 32), True, 64, gen)
    separate = 0
    for _ in range(4):
        separate += _run_batch(cfg, 1, (32, 64, 32), True, 64, gen)[3].cycles
    assert one.cycles < 0.95 * separate, (one.cycles, separate)


# ---- block accumulation (docs/numerics.md section 3) ----------------------------------------------
@pytest.mark.parametrize("cfg_name, shape, acc_block, scaled, block_k", [
    ("8x8", (20, 300, 24), 128, False, 128),
    ("8x8", (20, 300, 24), 32, True, 128),
    ("8x8", (20, 300, 24), 128, True, 300),        # scaling block = all of K, exact blocks of 128 inside
    ("4x8", (13, 100, 37), 4, True, 64),
    ("5x12-small", (70, 21, 30), 8, False, 128),   # rows 5: tiles cut at exact-block ends
    ("16x16", (9, 200, 20), 64, True, 128),
])
def test_block_accumulation_gemms(cfg_name, shape, acc_block, scaled, block_k):
    """GEMMs in block mode on the functional simulator equal reference_gemm's block contract
    bit for bit (every code, NaN and infinities included, with block scaling and an epilogue)."""
    cfg = NPUConfig(**dict(CONFIGS[cfg_name].to_dict(), accumulation="block", acc_block=acc_block))
    m, k, n = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"block {cfg_name} {shape} {acc_block}".encode()))
    for kind in ("normal", "any"):
        a, b = codes((m, k), "e4m3", kind, gen), codes((k, n), "e5m2", kind, gen)
        kw = dict(bias=f32_values(n, gen, specials=False), block_k=block_k)
        if scaled:
            kb = math.ceil(k / block_k)
            kw["block_scales"] = (pow2_scales((m, kb), gen), pow2_scales((kb, n), gen))
        g = build_gemm(cfg, a, b, "e4m3", "e5m2", **kw)
        r = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
        assert r.ok, f"{r.error.name} at 0x{r.error_addr:x}"
        got = g.read_output(r.dram)
        want = reference_gemm(a, b, "e4m3", "e5m2", accumulation="block", acc_block=acc_block, **kw)
        nan = golden.f32_is_nan(want)
        assert torch.equal(golden.f32_is_nan(got), nan) and torch.equal(got[~nan], want[~nan])


def test_block_accumulation_does_not_depend_on_the_array():
    """Block boundaries are fixed positions in K: 4x4, 8x8, 16x16 and 5x12 arrays give the same bits."""
    gen = torch.Generator().manual_seed(9)
    a, b = codes((17, 260), "e4m3", "any", gen), codes((260, 19), "e4m3", "normal", gen)
    outs = []
    for rows, cols in ((4, 4), (8, 8), (16, 16), (5, 12)):
        cfg = NPUConfig(rows=rows, cols=cols, accumulation="block", acc_block=64)
        g = build_gemm(cfg, a, b, "e4m3", "e4m3")
        r = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
        outs.append(g.read_output(r.dram))
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(outs[0], reference_gemm(a, b, "e4m3", "e4m3", accumulation="block", acc_block=64))


def test_block_flags_are_refused_where_not_built():
    """commit/fresh on a sequential configuration, fresh without commit anywhere: BAD_FIELD;
    the hardware generator refuses E5M2 block mode on hardware multipliers in one sentence."""
    from fp8npu.hdl.isa import ErrorCode, validate
    from fp8npu.hdl.npu import NPU
    seq, blk = NPUConfig(), NPUConfig(accumulation="block", acc_block=32)
    mm = dict(a_addr=0, a_stride=1, b_addr=0, acc_addr=0, m=1, k=1)
    for cfg, fields, want in ((seq, dict(commit=1), ErrorCode.BAD_FIELD), (seq, dict(commit=1, fresh=1), ErrorCode.BAD_FIELD),
                              (blk, dict(fresh=1), ErrorCode.BAD_FIELD), (blk, dict(commit=1, fresh=1), ErrorCode.NONE),
                              (blk, dict(commit=1), ErrorCode.NONE)):
        cmd = isa.decode(isa.encode(Opcode.MATMUL, **mm, **fields))
        assert validate(cmd, cfg, 0, 1 << 20) == want, (cfg.accumulation, fields)
    sentence = ("block accumulation with E5M2 forms its products in LUTs (an E5M2 magnitude is wider than the "
                "18-bit multipliers): set multipliers to \"lut\", not \"dsp\", or formats to [\"e4m3\"]")
    with pytest.raises(ValueError, match=f"^{re.escape(sentence)}$"):
        NPU(blk)
    NPU(replace(blk, multipliers="lut"))            # both formats build with LUT products
    with pytest.raises(ValueError, match="acc_block must be a power of two from 1 to 128, not 96"):
        NPUConfig(accumulation="block", acc_block=96)
    with pytest.raises(ValueError, match="accumulation must be one of sequential, block, not 'kahan'"):
        NPUConfig(accumulation="kahan")


@pytest.mark.parametrize("accumulation, vector_unit", [("sequential", False), ("block", False), ("block", True)])
def test_host_finishes_what_the_npu_lacks(accumulation, vector_unit):
    """On an NPU without a vector unit or without FP8 stores, a GEMM that needs them is split.
    Without the vector unit the NPU computes the plain product (one partial per scaling block
    when there are several) and the host applies scales, column scale, bias and FP8
    conversion by the contract; with it, the NPU computes all but the FP8 conversion. The
    outputs equal reference_gemm bit for bit on both schedules; no program holds an FP8 STORE."""
    gen = torch.Generator().manual_seed(11)
    m, k, n = 19, 37, 10
    a, b = codes((m, k), "e4m3", "normal", gen), codes((k, n), "e4m3", "normal", gen)
    col_scale, bias = f32_values(n, gen, specials=False), f32_values(n, gen)
    one_block = (pow2_scales((m, 1), gen), pow2_scales((1, n), gen))
    three_blocks = (pow2_scales((m, 3), gen), pow2_scales((3, n), gen))     # K = 16 + 16 + 5
    cases = [dict(block_scales=one_block, block_k=k, col_scale=col_scale, bias=bias, out="e4m3", out_scale=0.25),
             dict(bias=bias), dict(block_scales=one_block, block_k=k),
             dict(block_scales=three_blocks, block_k=16),
             dict(block_scales=three_blocks, block_k=16, col_scale=col_scale, bias=bias, out="e4m3", out_scale=0.25)]
    for sp_lines, schedule in ((256, "a_resident"), (64, "a_reload")):
        cfg = NPUConfig(rows=4, cols=4, sp_lines=sp_lines, acc_lines=256, vector_unit=vector_unit, fp8_store=False,
                        accumulation=accumulation,
                        formats=("e4m3",) if accumulation == "block" else ("e4m3", "e5m2"))
        for build in cases:
            g = build_gemm(cfg, a, b, "e4m3", "e4m3", **build)
            assert g.schedule == schedule
            ops = [c.opcode for c in commands_of(g)]
            assert bool(g.op.host) == (not vector_unit or "out" in build)
            if g.op.host and not vector_unit:      # the NPU computes the plain product (partials)
                assert Opcode.EPILOGUE not in ops and Opcode.BLOCKSCALE not in ops
                parts = 3 if build.get("block_k") == 16 else 1
            else:                                  # the NPU computes all but an FP8 conversion
                assert (Opcode.BLOCKSCALE in ops) == ("block_scales" in build)
                assert (Opcode.EPILOGUE in ops) == ("bias" in build)
                parts = 1
            assert ops.count(Opcode.STORE) == parts * len(g.op.plan.n_tiles) * len(g.op.plan.m_blocks)
            assert all(c.fmt == 0 for c in commands_of(g) if c.opcode == Opcode.STORE)
            r = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
            assert r.ok, r.error.name
            want = reference_gemm(a, b, "e4m3", "e4m3", accumulation=accumulation, **build)
            got = g.read_output(r.dram)
            assert not bool(golden.mismatches(got, want, KIND[build.get("out", "fp32")]).any()), (schedule, build.keys())
