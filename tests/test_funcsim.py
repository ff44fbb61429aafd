"""The functional simulator, command by command: semantics against the golden model, every error
it can report with its address, the DMA window, token flow and the timing estimate."""


import numpy as np
import pytest
import torch
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import ErrorCode, Opcode, Register, Unit
from fp8npu.sim import funcsim, golden

from . import reference as ref

# 4x4 array: 4-byte scratchpad lines, 4-value accumulator lines, 8-byte bus.
CFG = NPUConfig(rows=4, cols=4, sp_lines=64, acc_lines=64)
# 3 columns: accumulator lines have a fourth lane that must stay 0.
CFG3 = NPUConfig(rows=4, cols=3, sp_lines=64, acc_lines=64)
DRAM_BYTES = 0x1000
PROG = 0x800          # program address in these tests


def cmd(op, **fields):
    return isa.encode(op, **fields)


END = cmd(Opcode.END)


def run(commands, dram=None, cfg=CFG, **kw):
    """Run a list of encoded commands placed at PROG in a DRAM image (zeros by default)."""
    dram = bytearray(DRAM_BYTES) if dram is None else dram
    return funcsim.run(b"".join(commands), dram, cfg, kw.pop("prog_addr", PROG), **kw)


def image(dram, commands):
    """The DRAM as the host leaves it before the start: ``dram`` with the program at PROG."""
    out = bytearray(dram)
    program = b"".join(commands)
    out[PROG:PROG + len(program)] = program
    return out


def addr_of(i, prog_addr=PROG):
    return prog_addr + 32 * i


def random_dram(rng):
    return bytearray(rng.integers(0, 256, DRAM_BYTES, dtype=np.uint8).tobytes())


def random_f32(rng, n):
    """Random binary32 patterns: half arbitrary bits (NaN, inf, subnormals...), half normal values."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    normal = rng.standard_normal(n).astype(np.float32).view(np.uint32)
    return torch.from_numpy(np.where(rng.random(n) < 0.5, bits, normal).view(np.int32))


def acc_bits(dram, addr, rows, values):
    """int32 tensor [rows, values] read from FP32 words in DRAM."""
    return torch.from_numpy(np.frombuffer(bytes(dram[addr:addr + 4 * rows * values]), "<i4")
                            .astype(np.int32).reshape(rows, values))


def put_words(dram, addr, bits):
    data = bits.numpy().astype("<i4").tobytes()
    dram[addr:addr + len(data)] = data


def assert_same(got, want, kind="fp32"):
    bad = golden.mismatches(got, want, kind)
    assert not bool(bad.any()), f"{int(bad.sum())} mismatches, first at {bad.nonzero()[0].tolist()}"


# ---- golden.mul_f32 ----------------------------------------------------------------------------
def _mul_exact(a_bits, b_bits):
    """Exact binary32 product rounded once (fractions), None for NaN."""
    a, b = ref.decode(a_bits, *ref.FP32), ref.decode(b_bits, *ref.FP32)
    sign = (a_bits ^ b_bits) >> 31 & 1
    if a is None or b is None:
        return None
    if isinstance(a, float) or isinstance(b, float):
        if a == 0 or b == 0:
            return None
        return sign << 31 | 0x7F800000
    p = a * b
    if p == 0:
        return sign << 31
    return ref.encode(p, sign, *ref.FP32, overflow="inf")


def test_mul_f32_matches_exact_reference(rng):
    a = random_f32(rng, 6000).numpy().view(np.uint32)
    b = random_f32(rng, 6000).numpy().view(np.uint32)
    # products around the subnormal and overflow boundaries
    a[:1000] = (rng.integers(0, 2**23, 1000) | (rng.integers(40, 90, 1000) << 23)).astype(np.uint32)
    b[:1000] = (rng.integers(0, 2**23, 1000) | (rng.integers(20, 60, 1000) << 23)).astype(np.uint32)
    a[1000:2000] = (rng.integers(0, 2**23, 1000) | (rng.integers(190, 254, 1000) << 23)).astype(np.uint32)
    b[1000:2000] = (rng.integers(0, 2**23, 1000) | (rng.integers(60, 130, 1000) << 23)).astype(np.uint32)
    got = golden.mul_f32(torch.from_numpy(a.view(np.int32)), torch.from_numpy(b.view(np.int32)))
    got = got.numpy().view(np.uint32)
    for x, y, g in zip(a.tolist(), b.tolist(), got.tolist()):
        want = _mul_exact(x, y)
        if want is None:
            assert (g & 0x7FFFFFFF) > 0x7F800000, (hex(x), hex(y), hex(g))
        else:
            assert g == want, (hex(x), hex(y), hex(g), hex(want))
    print(f"mul_f32: {len(a)} products checked against the exact reference")


# ---- command semantics ------------------------------------------------------------------------
def test_load_fills_lines_and_pads(rng):
    dram = random_dram(rng)
    # 3 rows of 6 bytes, stride 16: each row fills two 4-byte lines, the second zero padded
    r = run([cmd(Opcode.LOAD, dst=0, sram_addr=5, rows=3, row_bytes=6, dram_addr=0x100, dram_stride=16), END], dram)
    assert r.ok
    for row in range(3):
        src = np.frombuffer(bytes(dram[0x100 + 16 * row:0x100 + 16 * row + 6]), np.uint8)
        lines = r.sp[5 + 2 * row:7 + 2 * row].reshape(-1)
        assert lines[:6].tolist() == src.tolist() and lines[6:].tolist() == [0, 0]
    assert not r.sp[:5].any() and not r.sp[11:].any()


def test_load_accumulator_keeps_unused_lanes_zero(rng):
    dram = random_dram(rng)
    # CFG3: lines of 4 lanes, 3 used. A 20-byte row fills 2 lines: words 0-3, then word 4 and padding.
    r = run([cmd(Opcode.LOAD, dst=1, sram_addr=2, rows=2, row_bytes=20, dram_addr=0x200, dram_stride=24), END],
            dram, cfg=CFG3)
    assert r.ok
    for row in range(2):
        words = acc_bits(dram, 0x200 + 24 * row, 1, 5)[0]
        assert r.acc[2 + 2 * row].tolist() == words[:3].tolist() + [0]
        assert r.acc[3 + 2 * row].tolist() == [int(words[4]), 0, 0, 0]


def test_store_fp32_writes_only_the_values(rng):
    dram = random_dram(rng)
    commands = [cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=4, row_bytes=16, dram_addr=0x100, dram_stride=16),
                cmd(Opcode.STORE, fmt=0, acc_addr=1, rows=3, cols=3, dram_addr=0x400, dram_stride=24), END]
    r = run(commands, dram, cfg=CFG3)
    assert r.ok
    before = bytes(dram)
    out = image(dram, commands)
    for row in range(3):
        out[0x400 + 24 * row:0x400 + 24 * row + 12] = before[0x100 + 16 * (row + 1):0x100 + 16 * (row + 1) + 12]
    assert r.dram == bytes(out)


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("saturate", [0, 1])
def test_store_fp8_scales_and_converts(rng, fmt, saturate):
    dram = random_dram(rng)
    put_words(dram, 0x100, random_f32(rng, 16))
    scale = float(np.float32(rng.uniform(0.1, 3000)))
    r = run([cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=4, row_bytes=16, dram_addr=0x100, dram_stride=16),
             cmd(Opcode.STORE, fmt=fmt, saturate=saturate, acc_addr=0, rows=4, cols=4, dram_addr=0x300,
                 dram_stride=8, scale=isa.pack_f32(scale)), END], dram)
    assert r.ok
    x = acc_bits(dram, 0x100, 4, 4)
    want = golden.quantize(golden.mul_f32(x, golden.f32_to_bits(torch.tensor(scale))), fmt - 1, bool(saturate))
    got = torch.from_numpy(np.frombuffer(r.dram, np.uint8)[0x300:0x320].reshape(4, 8)[:, :4].copy())
    assert_same(got, want, golden.FP8_FORMATS[fmt - 1])
    gaps = np.frombuffer(r.dram, np.uint8)[0x300:0x320].reshape(4, 8)[:, 4:]
    assert gaps.tolist() == np.frombuffer(bytes(dram), np.uint8)[0x300:0x320].reshape(4, 8)[:, 4:].tolist()


def test_store_overlapping_rows_last_wins(rng):
    dram = random_dram(rng)
    commands = [cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=3, row_bytes=16, dram_addr=0x100, dram_stride=16),
                cmd(Opcode.STORE, fmt=0, acc_addr=0, rows=3, cols=4, dram_addr=0x400, dram_stride=8), END]
    r = run(commands, dram)
    want = image(dram, commands)
    for row in range(3):
        want[0x400 + 8 * row:0x410 + 8 * row] = dram[0x100 + 16 * row:0x110 + 16 * row]
    assert r.ok and r.dram == bytes(want)


def _matmul_expected(sp, acc, a_addr, a_stride, b_addr, acc_addr, m, k, fa, fb, accumulate, cols):
    """Per-element loop over i, j with golden.mac on 1-D vectors (a different path from funcsim's)."""
    out = torch.zeros((m, cols), dtype=torch.int32)
    for i in range(m):
        for j in range(cols):
            a = torch.from_numpy(sp[a_addr + i * a_stride, :k].copy())
            w = torch.from_numpy(sp[b_addr:b_addr + k, j].copy())
            start = torch.tensor(int(acc[acc_addr + i, j]), dtype=torch.int32) if accumulate else None
            out[i, j] = golden.mac(a, w, fa, fb, acc=start)
    return out


@pytest.mark.parametrize("fa, fb", [(0, 0), (1, 1), (0, 1), (1, 0)])
@pytest.mark.parametrize("a_stride, k, accumulate", [(1, 4, 0), (2, 3, 1), (0, 1, 1), (3, 2, 0)])
def test_matmul_matches_per_element_mac(rng, fa, fb, a_stride, k, accumulate):
    dram = random_dram(rng)
    put_words(dram, 0x600, random_f32(rng, 32))
    pre = [cmd(Opcode.LOAD, dst=0, sram_addr=0, rows=1, row_bytes=64, dram_addr=0x100, dram_stride=0),
           cmd(Opcode.LOAD, dst=1, sram_addr=8, rows=1, row_bytes=128, dram_addr=0x600, dram_stride=0)]
    mm = cmd(Opcode.MATMUL, fmt_a=fa, fmt_b=fb, accumulate=accumulate, a_addr=1, a_stride=a_stride, b_addr=12,
             acc_addr=9, m=5, k=k)
    r0 = run(pre + [END], dram, cfg=CFG3)
    r = run(pre + [mm, END], dram, cfg=CFG3)
    assert r.ok and r.mac_ops == 5 * k * 3
    want = _matmul_expected(r0.sp, r0.acc, 1, a_stride, 12, 9, 5, k, fa, fb, accumulate, 3)
    assert_same(torch.from_numpy(r.acc[9:14, :3].copy()), want)
    assert not r.acc[:, 3].any()                                  # the unused lane stays 0
    assert np.array_equal(r.acc[:9], r0.acc[:9]) and np.array_equal(r.acc[14:], r0.acc[14:])


@pytest.mark.parametrize("use_scale, use_bias", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_epilogue(rng, use_scale, use_bias):
    dram = random_dram(rng)
    put_words(dram, 0x100, random_f32(rng, 48))
    r = run([cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=1, row_bytes=48 * 4, dram_addr=0x100, dram_stride=0),
             cmd(Opcode.EPILOGUE, use_scale=use_scale, use_bias=use_bias, src=2, dst=20, rows=5, scale_addr=0,
                 bias_addr=1), END], dram)
    assert r.ok
    x = acc_bits(dram, 0x100, 12, 4)
    want = x[2:7]
    if use_scale:
        want = golden.mul_f32(want, x[0:1])
    if use_bias:
        want = golden.add(want, x[1:2])
    assert_same(torch.from_numpy(r.acc[20:25].copy()), want)


def test_epilogue_in_place_and_blockscale(rng):
    dram = random_dram(rng)
    put_words(dram, 0x100, random_f32(rng, 64))
    x = acc_bits(dram, 0x100, 16, 4)
    r = run([cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=1, row_bytes=256, dram_addr=0x100, dram_stride=0),
             cmd(Opcode.EPILOGUE, use_scale=1, use_bias=1, src=4, dst=4, rows=4, scale_addr=0, bias_addr=1),
             cmd(Opcode.BLOCKSCALE, src=8, dst=12, rows=4, row_scale=4, col_scale=2), END], dram)
    assert r.ok
    epi = golden.add(golden.mul_f32(x[4:8], x[0:1]), x[1:2])
    s = golden.mul_f32(epi[:, :1], x[2:3])            # row scales are lane 0 of lines 4.. (after EPILOGUE)
    want = golden.add(x[12:16], golden.mul_f32(x[8:12], s))
    assert_same(torch.from_numpy(r.acc[4:8].copy()), epi)
    assert_same(torch.from_numpy(r.acc[12:16].copy()), want)


def test_tokens_order_units():
    """compute waits for load's token, store for compute's; the counters end at zero."""
    dram = bytearray(DRAM_BYTES)
    dram[0x100:0x104] = bytes([0x38, 0x40, 0x48, 0x50])          # E4M3 1, 2, 4, 8 (A row)
    dram[0x108:0x10C] = bytes([0x38, 0x38, 0x38, 0x38])          # B rows of ones
    r = run([cmd(Opcode.LOAD, dst=0, sram_addr=0, rows=1, row_bytes=4, dram_addr=0x100, dram_stride=0),
             cmd(Opcode.LOAD, dst=0, sram_addr=1, rows=4, row_bytes=4, dram_addr=0x108, dram_stride=0, push_next=1),
             cmd(Opcode.MATMUL, a_addr=0, a_stride=1, b_addr=1, acc_addr=0, m=1, k=4, pop_prev=1, push_next=1),
             cmd(Opcode.STORE, fmt=0, acc_addr=0, rows=1, cols=4, dram_addr=0x200, dram_stride=0, pop_prev=1), END],
            dram)
    assert r.ok and all(v == 0 for v in r.tokens.values())
    assert np.frombuffer(r.dram[0x200:0x210], "<f4").tolist() == [15.0] * 4


# ---- errors -----------------------------------------------------------------------------------
def _with_bit(command, bit):
    word = int.from_bytes(command, "little") | 1 << bit
    return word.to_bytes(32, "little")


SYNC_C = cmd(Opcode.SYNC, unit=Unit.COMPUTE)
ERROR_CASES = {
    "bad opcode": ([SYNC_C, bytes([0x55]) + bytes(31), END], 1, ErrorCode.BAD_OPCODE),
    "opcode zero": ([bytes(32), END], 0, ErrorCode.BAD_OPCODE),
    "reserved bit": ([SYNC_C, SYNC_C, _with_bit(SYNC_C, 200), END], 2, ErrorCode.BAD_FIELD),
    "k = 0": ([cmd(Opcode.MATMUL, m=1, k=0), END], 0, ErrorCode.BAD_FIELD),
    "k > rows": ([cmd(Opcode.MATMUL, m=1, k=5), END], 0, ErrorCode.BAD_FIELD),
    "load pops prev": ([cmd(Opcode.LOAD, pop_prev=1), END], 0, ErrorCode.BAD_FIELD),
    "sync unit 3": ([cmd(Opcode.SYNC, unit=3), END], 0, ErrorCode.BAD_FIELD),
    "store cols 0": ([cmd(Opcode.STORE, rows=1, cols=0), END], 0, ErrorCode.BAD_FIELD),
    "sp range": ([SYNC_C, cmd(Opcode.LOAD, sram_addr=63, rows=2, row_bytes=4), END], 1, ErrorCode.SRAM_RANGE),
    "acc range": ([cmd(Opcode.EPILOGUE, src=60, dst=0, rows=5), END], 0, ErrorCode.SRAM_RANGE),
    "matmul range": ([cmd(Opcode.MATMUL, a_addr=60, a_stride=2, m=3, k=1), END], 0, ErrorCode.SRAM_RANGE),
    "misaligned address": ([cmd(Opcode.LOAD, rows=1, row_bytes=4, dram_addr=0x104), END], 0, ErrorCode.MISALIGNED),
    "misaligned stride": ([cmd(Opcode.STORE, rows=2, cols=1, dram_stride=12), END], 0, ErrorCode.MISALIGNED),
    "dram window": ([SYNC_C, cmd(Opcode.STORE, rows=2, cols=4, dram_addr=DRAM_BYTES - 16, dram_stride=16), END],
                    1, ErrorCode.DRAM_WINDOW),
    "end with a flag": ([_with_bit(END, 8)], 0, ErrorCode.BAD_FIELD),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_static_errors(name):
    commands, index, error = ERROR_CASES[name]
    r = run(commands)
    assert (r.error, r.error_addr, r.done) == (error, addr_of(index), False)
    assert r.registers()[Register.STATUS] == 4 and r.registers()[Register.ERROR_ADDR] == addr_of(index)


def test_bad_format():
    cfg = NPUConfig(rows=4, cols=4, sp_lines=64, acc_lines=64, formats=("e4m3",))
    r = run([cmd(Opcode.MATMUL, m=1, k=1, fmt_a=0), cmd(Opcode.MATMUL, m=1, k=1, fmt_b=1), END], cfg=cfg)
    assert (r.error, r.error_addr) == (ErrorCode.BAD_FORMAT, addr_of(1))
    r = run([cmd(Opcode.STORE, fmt=2, rows=1, cols=1), END], cfg=cfg)
    assert (r.error, r.error_addr) == (ErrorCode.BAD_FORMAT, addr_of(0))


def test_dram_window_is_the_register_window():
    load = cmd(Opcode.LOAD, rows=1, row_bytes=8, dram_addr=0x100)
    assert run([load, END], win_base=0x100, win_limit=0x1000).ok
    r = run([load, END], win_base=0x108, win_limit=0x1000)
    assert (r.error, r.error_addr) == (ErrorCode.DRAM_WINDOW, addr_of(0))


def test_deadlock_at_end():
    """A pop that no command ever pushes: the dispatcher waits at END forever."""
    r = run([SYNC_C, cmd(Opcode.MATMUL, m=1, k=1, pop_prev=1), END])
    assert (r.error, r.error_addr) == (ErrorCode.DEADLOCK, addr_of(2))


def test_deadlock_on_a_full_queue():
    """The token would come from a command behind a full queue: deadlock at the blocked command."""
    cfg = NPUConfig(rows=4, cols=4, sp_lines=64, acc_lines=64, queue_depth=2)
    # the compute unit holds one waiting command plus queue_depth queued ones: the fourth blocks
    waits = [cmd(Opcode.SYNC, unit=Unit.COMPUTE, pop_next=1)] * 4
    r = run(waits + [cmd(Opcode.SYNC, unit=Unit.STORE, push_prev=1), END], cfg=cfg)
    assert (r.error, r.error_addr) == (ErrorCode.DEADLOCK, addr_of(3))
    # with a deeper queue the same program runs: the push arrives in time
    cfg8 = NPUConfig(rows=4, cols=4, sp_lines=64, acc_lines=64, queue_depth=8)
    r = run(waits + [cmd(Opcode.SYNC, unit=Unit.STORE, push_prev=1)] * 4 + [END], cfg=cfg8)
    assert r.ok and r.tokens[funcsim.Token.STORE_TO_COMPUTE] == 0


def test_no_end():
    r = run([SYNC_C, SYNC_C])
    assert (r.error, r.error_addr) == (ErrorCode.NO_END, addr_of(2))
    r = funcsim.run(b"", bytearray(DRAM_BYTES), CFG, PROG)
    assert (r.error, r.error_addr) == (ErrorCode.NO_END, PROG)


@pytest.mark.parametrize("prog_addr, win_base, win_limit", [
    (PROG + 8, 0, DRAM_BYTES),            # misaligned program
    (PROG, PROG + 32, DRAM_BYTES),        # starts below the window
    (PROG, 0, PROG + 32),                 # ends past the window
])
def test_fetch_window(prog_addr, win_base, win_limit):
    r = run([SYNC_C, END], prog_addr=prog_addr, win_base=win_base, win_limit=win_limit)
    assert (r.error, r.error_addr, r.commands) == (ErrorCode.FETCH_WINDOW, prog_addr, 0)


def test_address_space():
    """A narrow NPU (axi_addr_bits 14: 16 KB) runs a program and moves data at the top of its
    address space; the hosts refuse a larger DRAM in one sentence; a window reaching past the
    address space (only raw register writes can set one) stops the run as it starts."""
    cfg = NPUConfig(rows=4, cols=4, sp_lines=64, acc_lines=64, axi_addr_bits=14)
    dram = bytearray(1 << 14)
    dram[0x3FF0:0x4000] = bytes(range(1, 17))
    program = b"".join([cmd(Opcode.LOAD, rows=1, row_bytes=16, dram_addr=0x3FF0, sram_addr=1, dst=1),
                        cmd(Opcode.STORE, rows=1, cols=4, acc_addr=1, dram_addr=0x3FE0), END])
    r = funcsim.run(program, dram, cfg, 0x1000)
    assert r.ok and bytes(r.dram[0x3FE0:0x3FF0]) == bytes(range(1, 17))
    for size in (1 << 15, (1 << 14) + 1):
        with pytest.raises(ValueError, match=f"^a DRAM of {size:#x} bytes does not fit the NPU's 14-bit address "
                                             "space \\(at most 0x4000 bytes; axi_addr_bits sets it\\)$"):
            funcsim.run(program, bytearray(size), cfg, 0x1000)
    sim = funcsim._Simulator(bytearray(1 << 15), cfg, 0x1000, 3, 0, (1 << 14) + 32, None)
    r = sim.run()
    assert (r.error, r.error_addr, r.commands) == (ErrorCode.FETCH_WINDOW, 0x1000, 0)


def test_first_error_wins():
    r = run([SYNC_C, cmd(Opcode.LOAD, rows=1, row_bytes=4, dram_addr=4), bytes(32), END])
    assert (r.error, r.error_addr, r.commands) == (ErrorCode.MISALIGNED, addr_of(1), 1)


def test_invalid_host_arguments():
    with pytest.raises(ValueError, match="must lie inside"):
        funcsim.run(END, bytearray(64), CFG, 0, 0, 128)
    with pytest.raises(ValueError, match="whole number"):
        funcsim.run(END[:31], bytearray(64), CFG)
    with pytest.raises(ValueError, match="prog_len is required"):
        funcsim.run(None, bytearray(64), CFG)


# ---- DMA window and robustness (random programs) ------------------------------------------------
#: Value ranges [lo, hi) of the random command fields that are mostly valid on CFG.
_RANDOM_RANGES = {"fmt": (0, 3), "unit": (0, 3), "k": (1, 5), "cols": (1, 5), "m": (0, 9), "rows": (0, 9),
                  "row_bytes": (0, 41), "a_stride": (0, 4)}


def _random_command(rng, win_base, win_limit):
    """A random command: now and then garbage, otherwise small, mostly valid field values
    (DRAM addresses mostly inside the window)."""
    if rng.random() < 0.03:
        return rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    op = Opcode(int(rng.integers(1, 7)) if rng.random() < 0.97 else Opcode.END)
    flags = {} if op == Opcode.END else {
        f: int(rng.random() < 0.05) for f in ("pop_prev", "pop_next", "push_prev", "push_next")}
    fields = {}
    for f in isa.FIELDS[op]:
        if f.name == "dram_addr":
            lo, hi = (win_base, win_limit) if rng.random() < 0.8 else (0, DRAM_BYTES)
            value = int(rng.integers(lo // 8, hi // 8)) * 8 + (rng.random() < 0.05)
        elif f.name == "dram_stride":
            value = int(rng.integers(0, 32)) * 8
        elif f.name == "scale":
            value = isa.pack_f32(float(rng.choice([0.5, 1.0, 3.0, 1e6])))
        elif f.width <= 2 or f.name in _RANDOM_RANGES:
            lo, hi = _RANDOM_RANGES.get(f.name, (0, 1 << f.width))
            value = int(rng.integers(lo, hi))
        else:                                       # SRAM line addresses
            value = int(rng.integers(0, 64))
        fields[f.name] = value
    if op == Opcode.LOAD and fields["dst"]:
        fields["row_bytes"] -= fields["row_bytes"] % 4
    return isa.encode(op, **flags, **fields)


def test_random_programs_never_touch_dram_outside_the_window(rng):
    """Random programs: no exception, no byte written outside [WIN_BASE, WIN_LIMIT), and the
    same final DRAM whatever the queue depth (confluence) when both runs finish."""
    cfg2 = NPUConfig(rows=4, cols=4, sp_lines=64, acc_lines=64, queue_depth=2)
    outcomes, wrote, confluent = {}, 0, 0
    for trial in range(600):
        dram = random_dram(rng)
        win_base = int(rng.integers(0, 64)) * 16
        win_limit = int(rng.integers(win_base // 16 + 1, DRAM_BYTES // 16 + 1)) * 16
        program = b"".join(_random_command(rng, win_base, win_limit) for _ in range(int(rng.integers(1, 16)))) + END
        prog_addr = -(-win_base // 32) * 32
        if rng.random() < 0.1 or prog_addr + len(program) > win_limit:
            prog_addr = int(rng.integers(0, (DRAM_BYTES - len(program)) // 32 + 1)) * 32
        before = bytearray(dram)
        before[prog_addr:prog_addr + len(program)] = program
        r = funcsim.run(program, dram, CFG, prog_addr, win_base, win_limit)
        outcomes[r.error.name] = outcomes.get(r.error.name, 0) + 1
        after = np.frombuffer(r.dram, np.uint8)
        ref_bytes = np.frombuffer(bytes(before), np.uint8)
        assert np.array_equal(after[:win_base], ref_bytes[:win_base]), trial
        assert np.array_equal(after[win_limit:], ref_bytes[win_limit:]), trial
        assert r.done == (r.error == ErrorCode.NONE)
        wrote += not np.array_equal(after, ref_bytes)
        if r.ok:
            r2 = funcsim.run(program, dram, cfg2, prog_addr, win_base, win_limit)
            if r2.ok:
                assert r2.dram == r.dram, trial
                confluent += 1
    print(f"random programs: {dict(sorted(outcomes.items()))}; {wrote} wrote DRAM; "
          f"{confluent} gave the same DRAM with queue depth 2")
    assert outcomes.get("NONE", 0) >= 20 and len(outcomes) >= 7 and wrote >= 20


# ---- timing estimate, registers, partial runs -----------------------------------------------------
def test_timing_estimate_of_a_small_program():
    """One LOAD of 3 rows x 16 bytes on an 8-byte bus, then END: fetch 4 cycles, then the
    latency and per row 2 beats in one burst (one cycle of address)."""
    r = run([cmd(Opcode.LOAD, rows=3, row_bytes=16, dram_addr=0x100, dram_stride=16), END])
    assert r.ok and r.cycles == 4 + funcsim.DMA_LATENCY + 3 * (2 + 1)
    assert r.dma_bytes == 2 * 32 + 48 and r.commands == 2 and r.mac_ops == 0
    regs = r.registers()
    assert regs[Register.STATUS] == 2 and regs[Register.CYCLES] == r.cycles
    fields = isa.config_fields(regs[Register.CONFIG])
    assert (fields["rows"], fields["cols"], fields["bus"], fields["block"]) == (4, 4, 3, 0)
    assert regs[Register.PROG_ADDR] == PROG and regs[Register.PROG_LEN] == 2


def test_shared_rounders_time_committing_rows():
    """Block mode with fewer rounders than columns: a committing MATMUL's rows take
    round_passes cycles each and the array's fill grows by passes - 1; rows that only add to
    the partials still take one cycle; results are the same."""
    def cycles(rounders, commit):
        cfg = NPUConfig(rows=4, cols=4, accumulation="block", acc_block=4, rounders=rounders)
        mm = cmd(Opcode.MATMUL, a_addr=0, a_stride=1, b_addr=0, acc_addr=0, m=40, k=4, commit=commit,
                 fresh=commit)
        r = run([mm, END], cfg=cfg)
        assert r.ok
        return r.cycles, r.dram
    for commit in (0, 1):
        (one, d1), (three, d3) = cycles(0, commit), cycles(3, commit)       # 3 rounders: 2 passes
        assert d1 == d3
        assert three - one == (40 * (2 - 1) + 1 if commit else 1), (commit, one, three)


def test_matmul_overlaps_load():
    """Compute starts when the load's token arrives; the units overlap."""
    load = cmd(Opcode.LOAD, rows=40, row_bytes=4, dram_addr=0x100, dram_stride=8, push_next=1)
    mm = cmd(Opcode.MATMUL, a_addr=0, a_stride=1, b_addr=0, acc_addr=0, m=40, k=4, pop_prev=1)
    r = run([load, mm, load, mm, END])
    load_t, mm_t = funcsim.DMA_LATENCY + 40 * 2, 40 + 4 + funcsim.MATMUL_FILL
    assert r.cycles == 4 + 2 * load_t + mm_t              # the first MATMUL hides behind the second LOAD
    assert r.mac_ops == 2 * 40 * 4 * 4
    assert 0 < r.utilization <= 1


def test_max_commands_runs_a_prefix(rng):
    dram = random_dram(rng)
    store = cmd(Opcode.STORE, fmt=0, acc_addr=0, rows=1, cols=4, dram_addr=0x300, dram_stride=0)
    commands = [cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=1, row_bytes=16, dram_addr=0x100, dram_stride=0), store,
                cmd(Opcode.LOAD, dst=1, sram_addr=0, rows=1, row_bytes=16, dram_addr=0x200, dram_stride=0), store,
                END]
    r = run(commands, dram, max_commands=2)
    assert (r.done, r.error, r.commands) == (False, ErrorCode.NONE, 2)
    assert r.dram[0x300:0x310] == bytes(dram[0x100:0x110])
    assert run(commands, dram).dram[0x300:0x310] == bytes(dram[0x200:0x210])
