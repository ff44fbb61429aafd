"""Where the RTL and the functional simulator could disagree: counter widths, queue depths,
address widths, memory edges. Each limit is defined once (hdl/isa.py, docs/isa.md) and both
engines must stop the same way at it: same ERROR, same ERROR_ADDR, same DRAM.

The RTL runs use a small configuration with the in-design simulation DRAM (one model build).
"""

import functools
import shutil
from pathlib import Path

import pytest
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import ErrorCode, Opcode, Token
from fp8npu.sim import funcsim
from fp8npu.sim.npu_rtl import NPUSimulation

CFG = NPUConfig(rows=2, cols=2, sp_lines=64, acc_lines=16)
BASE = 4096          # programs start here; the bytes below are data


@functools.cache
def rtl(fast=True):
    return NPUSimulation(CFG, fast_dram_bytes=1 if fast else None)


def both(dram, prog_addr, prog_len, win_base=0, win_limit=None, fast=True, mapped_bytes=None, max_cycles=5_000_000):
    """Run on both engines; assert they agree; return (error, error_addr, rtl run)."""
    r = rtl(fast).run(dram, prog_addr, prog_len, win_base, win_limit, max_cycles=max_cycles,
                      mapped_bytes=mapped_bytes)
    f = funcsim.run(None, dram, CFG, prog_addr, win_base, len(dram) if win_limit is None else win_limit,
                    prog_len=prog_len)
    assert not r.hung
    assert (r.error, r.error_addr) == (f.error, f.error_addr), \
        f"RTL {r.error.name} at {r.error_addr:#x}, funcsim {f.error.name} at {f.error_addr:#x}"
    assert r.registers["COMMANDS"] == f.commands
    if f.error == ErrorCode.NONE:
        assert r.dram == f.dram
    return f.error, f.error_addr, r


def image(program, data=b""):
    dram = bytearray(BASE) + program
    dram[:len(data)] = data
    return bytes(dram), len(program) // isa.COMMAND_BYTES


def sync(unit, **flags):
    return isa.encode(Opcode.SYNC, unit=int(unit), **flags)


END = isa.encode(Opcode.END)

#: For each counter: a SYNC that pushes to it and one that pops from it.
PUSH_POP = {
    Token.LOAD_TO_COMPUTE: (sync(isa.Unit.LOAD, push_next=1), sync(isa.Unit.COMPUTE, pop_prev=1)),
    Token.COMPUTE_TO_LOAD: (sync(isa.Unit.COMPUTE, push_prev=1), sync(isa.Unit.LOAD, pop_next=1)),
    Token.COMPUTE_TO_STORE: (sync(isa.Unit.COMPUTE, push_next=1), sync(isa.Unit.STORE, pop_prev=1)),
    Token.STORE_TO_COMPUTE: (sync(isa.Unit.STORE, push_prev=1), sync(isa.Unit.COMPUTE, pop_next=1)),
}


@pytest.mark.parametrize("token", list(Token))
def test_token_limit_is_the_same_on_both_engines(token):
    """TOKEN_LIMIT + 1 pushes ahead of their pops stop at the last push on both engines (the
    RTL's counters would otherwise need more bits); the limit itself runs to END."""
    push, pop = PUSH_POP[token]
    dram, n = image(push * (isa.TOKEN_LIMIT + 1) + pop + END)
    error, addr, _ = both(dram, BASE, n)
    assert error == ErrorCode.TOKEN_LIMIT
    assert addr == BASE + isa.TOKEN_LIMIT * isa.COMMAND_BYTES


def test_token_limit_reached_exactly_runs_to_the_end():
    push, pop = PUSH_POP[Token.LOAD_TO_COMPUTE]
    dram, n = image(push * isa.TOKEN_LIMIT + pop * isa.TOKEN_LIMIT + push + pop + END)
    error, _, r = both(dram, BASE, n)
    assert error == ErrorCode.NONE and r.done


def test_token_balance_counts_program_order_not_timing():
    """Interleaved pushes and pops never accumulate, however many there are."""
    push, pop = PUSH_POP[Token.COMPUTE_TO_STORE]
    dram, n = image((push + pop) * (isa.TOKEN_LIMIT + 10) + END)
    error, _, _ = both(dram, BASE, n)
    assert error == ErrorCode.NONE


@pytest.mark.parametrize("extra", [-1, 0, 1, 2])
def test_queue_capacity_is_the_same_on_both_engines(extra):
    """Pops queued ahead of the pushes that feed them: the dispatcher can queue queue_depth + 1
    of them (the queue and the unit's waiting command) on both engines; one more deadlocks."""
    push, pop = PUSH_POP[Token.LOAD_TO_COMPUTE]
    n_pops = CFG.queue_depth + 1 + extra
    dram, n = image(pop * n_pops + push * n_pops + END)
    error, addr, _ = both(dram, BASE, n)
    if extra <= 0:
        assert error == ErrorCode.NONE
    else:
        assert (error, addr) == (ErrorCode.DEADLOCK, BASE + (CFG.queue_depth + 1) * isa.COMMAND_BYTES)


def fetch_cases():
    """PROG_ADDR / PROG_LEN / window combinations around every edge of the fetch check,
    including lengths whose byte size needs more than 32 bits."""
    size = 8192
    for prog_len in (0, 1, 2, 1 << 27, 1 << 28, (1 << 28) + 1, (1 << 32) - 1):
        for prog_addr in (BASE, BASE + 16, size - 32, size, size + 32, 0):
            for win in ((0, size), (BASE + 32, size), (0, BASE + 32)):
                if prog_addr >= (1 << 32):
                    continue
                yield prog_addr, prog_len, win


def test_fetch_window_edges_agree():
    """All the combinations in one simulation (each start resets the core)."""
    dram = bytearray(8192)
    for a in range(BASE, 8192, 32):
        dram[a:a + 32] = END
    dram = bytes(dram)
    cases = list(fetch_cases())
    runs = rtl().run_many(dram, [(a, n, lo, hi) for a, n, (lo, hi) in cases], max_cycles=100_000)
    assert len(runs) == len(cases)
    seen = set()
    for (prog_addr, prog_len, (lo, hi)), r in zip(cases, runs):
        f = funcsim.run(None, dram, CFG, prog_addr, lo, hi, prog_len=prog_len)
        assert not r.hung
        assert (r.error, r.error_addr) == (f.error, f.error_addr), (prog_addr, prog_len, lo, hi)
        seen.add(f.error)
    assert {ErrorCode.NONE, ErrorCode.FETCH_WINDOW, ErrorCode.NO_END} <= seen
    assert len(cases) > 100


def test_windows_past_memory_are_refused_alike():
    dram, n = image(END)
    msgs = []
    for run in (lambda: rtl().run(dram, BASE, n, 0, len(dram) + 32),
                lambda: funcsim.run(None, dram, CFG, BASE, 0, len(dram) + 32, prog_len=n)):
        with pytest.raises(ValueError) as info:
            run()
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1] == f"the DMA window [0x0, 0x{len(dram) + 32:x}) must lie inside the {len(dram)}-byte DRAM image"


@pytest.mark.parametrize("fast", [True, False])
def test_simulated_dram_never_wraps(fast):
    """Only the first 4 KB of an 8 KB image exist: a LOAD from 4 KB up and a STORE to 4 KB up
    are bus errors on both simulated DRAMs, and nothing is read from or written to the bytes an
    address wrapped modulo 4 KB would reach."""
    mapped, prog_addr = 0x1000, 0x800
    load = isa.encode(Opcode.LOAD, rows=1, row_bytes=8, dram_addr=mapped, dram_stride=8)
    store = isa.encode(Opcode.STORE, rows=1, cols=2, dram_addr=mapped + 64, dram_stride=8)
    for prog in (load + END, store + END):
        dram = bytearray(range(256)) * 32                       # 8 KB, no zero stretch
        dram[prog_addr:prog_addr + len(prog)] = prog
        r = rtl(fast).run(bytes(dram), prog_addr, len(prog) // 32, mapped_bytes=mapped)
        assert (r.error, r.error_addr) == (ErrorCode.BUS_ERROR, prog_addr)
        assert r.dram[:mapped] == bytes(dram[:mapped]), "memory inside the mapped part changed"


def test_counters_are_32_bit_on_both_engines():
    """The performance registers count modulo 2^32 (docs/isa.md); the functional simulator's
    register view wraps the same way as the RTL's 32-bit counters."""
    dram, n = image(END)
    f = funcsim.run(None, dram, CFG, BASE, prog_len=n)
    f.cycles, f.mac_ops, f.dma_bytes = (1 << 32) + 5, (1 << 33) + 7, (1 << 32) - 1
    regs = f.registers()
    assert (regs[isa.Register.CYCLES], regs[isa.Register.MAC_BUSY], regs[isa.Register.DMA_BYTES]) == \
        (5, 7, (1 << 32) - 1)


def test_failed_simulation_keeps_its_log_and_says_why_in_one_line(tmp_path):
    from fp8npu.sim.rtl import RTLError
    model = rtl().model
    with pytest.raises(RTLError) as info:
        model.run("fp8npu.sim.no_such_testbench", {}, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "No module named 'fp8npu.sim.no_such_testbench'" in msg
    log = msg.rsplit("(log kept in ", 1)[1].rstrip(")")
    assert "no_such_testbench" in open(log).read()


def test_failed_npu_run_keeps_its_folder(monkeypatch):
    """NPUSimulation.run's temporary run folder survives a failed simulation, so the log the
    message names can be read."""
    from fp8npu.sim.rtl import RTLError
    sim = rtl()
    real = sim.model.run
    monkeypatch.setattr(sim.model, "run", lambda module, *a, **k: real("fp8npu.sim.no_such_testbench", *a, **k))
    dram, n = image(END)
    with pytest.raises(RTLError) as info:
        sim.run(dram, BASE, n)
    log = str(info.value).rsplit("(log kept in ", 1)[1].rstrip(")")
    assert "no_such_testbench" in open(log).read()
    shutil.rmtree(Path(log).parent)
