"""The compiler's program representation (compiler/program.py): buffers and references, the
token verifier, the ISA and bounds verifier, and the DRAM allocator."""

from dataclasses import replace

import numpy as np
import pytest
from fp8npu.compiler.gemm import build_gemm
from fp8npu.compiler.program import ALIGN, Program, VerifyError, allocate
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import Opcode, Unit
from fp8npu.sim import funcsim

CFG = NPUConfig(rows=4, cols=4, sp_lines=256, acc_lines=64)


def _copy_program(n_bytes=64):
    """LOAD src -> scratchpad, (tokens) , STORE... a tiny valid program over two buffers."""
    p = Program(CFG)
    src = p.buffer("src", kind="input", nbytes=n_bytes)
    dst = p.buffer("dst", kind="output", nbytes=64)
    p.emit(Opcode.LOAD, dst=1, sram_addr=0, rows=1, row_bytes=16, dram_addr=src + 0, dram_stride=0, push_next=1)
    p.emit(Opcode.SYNC, unit=Unit.COMPUTE, pop_prev=1, push_next=1)
    p.emit(Opcode.STORE, acc_addr=0, rows=1, cols=4, dram_addr=dst, dram_stride=0, pop_prev=1)
    p.emit(Opcode.END)
    return p, src, dst


def test_a_valid_program_verifies_encodes_and_runs():
    p, src, dst = _copy_program()
    code = p.buffer("program", kind="program", nbytes=len(p) * 32)
    layout = allocate(list(p.buffers.values()), base=0x100)
    program = p.verify(layout)
    assert program == p.encode(layout)
    assert layout.address(src) == 0x100 and layout.address(dst) == 0x140 and layout.address(code) == 0x180
    dram = layout.image(p.buffers.values())
    dram[layout.address(src):layout.address(src) + 16] = bytes(range(1, 17))
    r = funcsim.run(program, bytes(dram), CFG, layout.address(code), layout.base, layout.end)
    assert r.ok
    assert r.dram[0x140:0x150] == bytes(range(1, 17))


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.commands.pop(), r"^a program must end with END$"),
    (lambda p: p.commands.insert(0, p.commands[-1]), r"^command 0 \(END\): END before the end of the program$"),
    (lambda p: p.commands[1].fields.update(push_next=0),
     r"^command 2 \(STORE\) pops COMPUTE_TO_STORE with no token pushed before it in program order"),
    (lambda p: p.commands[2].fields.update(pop_prev=0), r"^tokens left over at END: \{'COMPUTE_TO_STORE': 1\}$"),
    (lambda p: p.commands[0].fields.update(row_bytes=80),
     r"^command 0 \(LOAD\) would stop the NPU with SRAM_RANGE|^command 0 \(LOAD\): dram_addr reaches bytes \[0, 80\)"),
    (lambda p: p.commands[0].fields.update(dram_addr=p.buffers["src"] + 56),
     r"^command 0 \(LOAD\): dram_addr reaches bytes \[56, 72\) of buffer 'src', which has 64$"),
    (lambda p: p.commands[2].fields.update(cols=5), r"^command 2 \(STORE\) would stop the NPU with BAD_FIELD"),
    (lambda p: p.commands[0].fields.update(dram_addr=p.buffers["src"] + 4),
     r"^command 0 \(LOAD\) would stop the NPU with MISALIGNED"),
])
def test_verifier_names_the_command(mutate, message):
    p, _, _ = _copy_program()
    mutate(p)
    layout = allocate(list(p.buffers.values()))
    with pytest.raises(VerifyError, match=message):
        p.verify(layout)


def test_token_limit_is_checked():
    p = Program(CFG)
    for _ in range(isa.TOKEN_LIMIT + 1):
        p.emit(Opcode.SYNC, unit=Unit.LOAD, push_next=1)
    p.emit(Opcode.END)
    with pytest.raises(VerifyError, match=rf"^command {isa.TOKEN_LIMIT} \(SYNC\) takes LOAD_TO_COMPUTE past the "
                                          rf"configuration's token_limit \({isa.TOKEN_LIMIT}\)$"):
        p.verify_tokens()
    # a configuration's own limit
    small = Program(replace(CFG, token_limit=15))
    for _ in range(16):
        small.emit(Opcode.SYNC, unit=Unit.COMPUTE, push_next=1)
    small.emit(Opcode.END)
    with pytest.raises(VerifyError, match=r"^command 15 \(SYNC\) takes COMPUTE_TO_STORE past the configuration's "
                                          r"token_limit \(15\)$"):
        small.verify_tokens()


def test_notes_say_which_operation_emitted_a_command():
    p = Program(CFG)
    with p.noting("layers.0.mlp.up_proj"):
        p.emit(Opcode.SYNC, unit=Unit.COMPUTE, pop_prev=1)
    p.emit(Opcode.END)
    with pytest.raises(VerifyError, match=r"^command 0 \(SYNC, layers.0.mlp.up_proj\) pops LOAD_TO_COMPUTE"):
        p.verify_tokens()


def test_allocator_shares_bytes_between_buffers_that_do_not_live_together():
    p = Program(CFG)
    a = p.buffer("a", nbytes=100)
    b = p.buffer("b", nbytes=40)
    c = p.buffer("c", nbytes=64)
    life = {a: (0, 3), b: (4, 9), c: (2, 5)}
    layout = allocate([a, b, c], lifetimes=life)
    assert layout.address(a) == 0
    assert layout.address(c) == 128              # overlaps a's life: after a
    assert layout.address(b) == 0                # a is dead by then; c lives on at 128
    assert layout.end == 192
    for x in (a, b, c):
        assert layout.address(x) % ALIGN == 0
    plain = allocate([a, b, c])
    assert [plain.address(x) for x in (a, b, c)] == [0, 128, 192]


def test_allocator_refuses_more_than_the_address_space():
    p = Program(CFG)
    big = p.buffer("big", nbytes=1 << 32)
    with pytest.raises(ValueError, match="more than the 32-bit address space"):
        allocate([big], base=32)


def test_gemm_lowering_produces_the_representation():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 0x78, (20, 12), dtype=np.uint8)
    b = rng.integers(0, 0x78, (12, 9), dtype=np.uint8)
    g = build_gemm(CFG, a, b, "e4m3", "e4m3")
    assert len(g.ir) == g.prog_len
    assert {b.kind for b in g.ir.buffers.values()} == {"const", "output", "program"}
    assert g.ir.encode(g.layout) == g.program
    assert all(c.note == "gemm 20x12x9" for c in g.ir.commands)
    refs = [ref.buffer.name for c in g.ir.commands for _, ref in c.refs()]
    assert {"a", "b", "c"} <= set(refs)
