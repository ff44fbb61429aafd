"""The board design (hdl/board.py) under Verilator behind a simulated serial line: the host
bridge protocol, the board memory, and programs and compiled models run through the same
driver and runtime as on a board, bit for bit equal to the functional simulator, with and
without a noisy line."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from fp8npu.compiler.gemm import build_gemm
from fp8npu.compiler.model import QuantConfig, compile
from fp8npu.compiler.runtime import run
from fp8npu.hdl import board as hb
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import ErrorCode, Register, config_word
from fp8npu.sim import funcsim, golden
from fp8npu.sim.board_sim import BoardSimulation
from fp8npu.sim.host import Driver, HostError, NoisyPort, SerialTransport
from fp8npu.sim.reference import reference_gemm
from fp8npu.sim.rtl import RTLError

CFG = NPUConfig(rows=2, cols=2, sp_lines=256, acc_lines=64, queue_depth=2, accumulation="block", acc_block=4,
                formats=("e4m3",), vector_lanes=1, store_lanes=1, axi_addr_bits=14)
MEMORY = 16384                  # 2^14 bytes: the NPU addresses the board memory and no more, as on a board


@pytest.fixture(scope="module")
def board():
    with BoardSimulation(CFG, memory_bytes=MEMORY, timeout=2.0) as b:
        yield b


@pytest.fixture
def link(board):
    t = SerialTransport(board.port(), quiet=0.05)
    yield t


def _frame(seq, op, addr, length, payload=b""):
    body = bytes([seq, op]) + addr.to_bytes(4, "little") + length.to_bytes(2, "little") + payload
    return bytes([hb.SYNC_REQUEST]) + body + hb.crc16(body).to_bytes(2, "little")


def _answer(port):
    head = port.read(5)
    assert head[0] == hb.SYNC_RESPONSE, head.hex()
    length = int.from_bytes(head[3:5], "little")
    rest = port.read(length + 2)
    assert hb.crc16(head[1:] + rest[:length]) == int.from_bytes(rest[length:], "little")
    return head[1], head[2], rest[:length]


def test_board_design_refuses_what_it_cannot_build():
    """One sentence each: a memory size the bus cannot address, a baud rate the clock cannot
    make, a memory past the NPU's address space."""
    with pytest.raises(ValueError, match="must be a power of two of at least 8 bytes, not 3000"):
        hb.BoardSoC(CFG, memory_bytes=3000)
    with pytest.raises(ValueError, match="cannot make 3,000,000 baud within 2 %"):
        hb.BoardSoC(CFG, memory_bytes=MEMORY, clock_hz=10_000_000, baud=3_000_000)
    with pytest.raises(ValueError, match=r"a DRAM of 0x8000 bytes does not fit the NPU.s 14-bit address space \(at most 0x4000 bytes; "):
        hb.BoardSoC(CFG, memory_bytes=2 * MEMORY)
    hb.BoardSoC(CFG, memory_bytes=MEMORY)
    # the same checks without building anything (the simulated board asks before its build)
    assert hb.BoardSoC.problem(CFG, MEMORY, 25_000_000, 1_000_000) is None
    assert "cannot make 3,000,000 baud" in hb.BoardSoC.problem(CFG, MEMORY, 10_000_000, 3_000_000)
    assert "does not fit the NPU" in hb.BoardSoC.problem(CFG, 0, 45_000_000, 3_000_000, sdram="MT48LC16M16A2")


def test_crc_is_ccitt_false():
    assert hb.crc16(b"123456789") == 0x29B1             # the catalogue check value


def test_info_and_memory_round_trip(link):
    assert (link.memory_bytes, link.bus_bytes, link.max_payload) == (MEMORY, CFG.bus_bytes, hb.MAX_PAYLOAD)
    data = np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8).tobytes()
    link.write(13, data)                                # unaligned, several frames
    assert link.read(13, 700) == data
    link.write(MEMORY - 5, b"\x01\x02\x03\x04\x05")            # the last bytes of the memory
    assert link.read(MEMORY - 5, 5) == b"\x01\x02\x03\x04\x05"
    assert link.read_reg(Register.CONFIG) == config_word(CFG)


def test_protocol_errors_are_answered_and_change_nothing(board, link):
    port = link.port
    link.write(0, b"\x11" * 16)
    seq = 200
    # a damaged frame: answered BAD_CRC, nothing written
    frame = bytearray(_frame(seq, hb.Op.WRITE_MEM, 0, 4, b"\xEE" * 4))
    frame[-1] ^= 0x40
    port.write(bytes(frame))
    assert _answer(port)[:2] == (seq, hb.Status.BAD_CRC)
    # outside the memory, over the payload limit, unknown op, a register of the wrong length
    cases = [(_frame(seq + 1, hb.Op.WRITE_MEM, MEMORY - 2, 4, b"\xEE" * 4), hb.Status.BAD_RANGE),
             (_frame(seq + 2, hb.Op.READ_MEM, 0, hb.MAX_PAYLOAD + 1), hb.Status.BAD_LENGTH),
             (_frame(seq + 3, 0x77, 0, 0), hb.Status.BAD_OP),
             (_frame(seq + 4, hb.Op.WRITE_REG, int(Register.PROG_ADDR), 2, b"\x01\x02"), hb.Status.BAD_LENGTH)]
    for frame, status in cases:
        port.write(frame)
        got_seq, got_status, payload = _answer(port)
        assert (got_seq, got_status, payload) == (frame[1], status, b"")
    # a frame cut short: abandoned after the timeout, the next one is understood
    port.write(_frame(seq + 5, hb.Op.WRITE_MEM, 0, 4, b"\xEE" * 4)[:7])
    import time
    time.sleep(0.05)
    port.write(_frame(seq + 6, hb.Op.READ_MEM, 0, 4))
    assert _answer(port) == (seq + 6, hb.Status.OK, b"\x11" * 4)
    # a register write resent with the same sequence number is not done twice
    port.write(_frame(seq + 7, hb.Op.WRITE_REG, int(Register.PROG_ADDR), 4, (0x100).to_bytes(4, "little")))
    assert _answer(port)[1] == hb.Status.OK
    port.write(_frame(seq + 7, hb.Op.WRITE_REG, int(Register.PROG_ADDR), 4, (0x200).to_bytes(4, "little")))
    assert _answer(port)[1] == hb.Status.OK
    port.write(_frame(seq + 8, hb.Op.READ_REG, int(Register.PROG_ADDR), 4))
    assert _answer(port) == (seq + 8, hb.Status.OK, (0x100).to_bytes(4, "little"))
    assert link.read(0, 16) == b"\x11" * 16


def _gemm(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    b = rng.integers(0, 256, (9, 3), dtype=np.uint8)
    a[a & 0x7F == 0x7F] = 0x01                          # no NaN codes: E4M3 NaN is tested elsewhere
    b[b & 0x7F == 0x7F] = 0x02
    bias = torch.tensor(rng.normal(size=3), dtype=torch.float32)
    return a, b, build_gemm(CFG, a, b, "e4m3", "e4m3", out="e4m3", out_scale=0.25, bias=bias), bias


@pytest.mark.parametrize("noise", [0.0, 0.003], ids=["clean line", "noisy line"])
def test_gemm_on_the_board_equals_the_functional_simulator(board, noise):
    """A GEMM with a bias and an FP8 store, run through the host driver over the serial line
    (dropped bytes and flipped bits on the noisy one): DRAM and registers equal the
    functional simulator's bit for bit."""
    a, b, g, bias = _gemm(5)
    port = NoisyPort(board.port(), drop=noise / 2, flip=noise / 2, seed=3) if noise else board.port()
    getattr(port, "port", port).timeout = 0.3 if noise else 2.0       # a lost answer is given up on sooner
    link = SerialTransport(port, quiet=0.02, retries=20)
    n = len(g.dram)                                 # the DMA window: the NPU touches nothing else
    dram = bytes(g.dram)
    driver = Driver(link, CFG)
    driver.write(0, dram)
    result = driver.launch(g.prog_addr, g.prog_len, 0, n)
    got = driver.read(0, n)
    fs = funcsim.run(None, dram, CFG, g.prog_addr, 0, n, prog_len=g.prog_len)
    want = reference_gemm(a, b, "e4m3", "e4m3", out="e4m3", out_scale=0.25, bias=bias, accumulation="block",
                          acc_block=CFG.acc_block)
    out = g.read_output(bytearray(got))
    bad = int(golden.mismatches(out.to(torch.int64), want.to(torch.int64), golden.E4M3).sum())
    print(f"{want.numel()} outputs over the serial line: {bad} mismatches; {n} DRAM bytes compared; "
          f"{getattr(port, 'damaged', 0)} bytes damaged on the line, {link.retried} requests resent")
    assert result.error == ErrorCode.NONE and result.ok
    assert bad == 0
    assert got == fs.dram[:n]
    assert result.registers[Register.MAC_BUSY] == fs.mac_ops and result.registers[Register.COMMANDS] == fs.commands
    if noise:
        assert port.damaged > 0 and link.retried > 0


def test_gemm_on_an_sdram_board():
    """The board with the SDRAM controller and the checking chip model as the NPU's DRAM (the
    ULX3S's 32 MB): the last bytes of the chip round trip, and a GEMM run over the serial line
    equals the functional simulator bit for bit (the chip starts with random contents)."""
    from fp8npu.hdl.sdram import CHIPS
    chip = CHIPS["MT48LC16M16A2"]
    with pytest.raises(RTLError, match="does not fit the NPU's 14-bit address space"):
        BoardSimulation(CFG, sdram=chip.name)
    cfg = replace(CFG, axi_addr_bits=25)                # 32 MB
    with BoardSimulation(cfg, sdram=chip.name, timeout=5.0) as board:
        link = SerialTransport(board.port(), quiet=0.05)
        assert link.memory_bytes == chip.bytes
        link.write(chip.bytes - 300, bytes(range(256)) + bytes(44))
        assert link.read(chip.bytes - 300, 300) == bytes(range(256)) + bytes(44)
        a, b, g, bias = _gemm(6)
        n = len(g.dram)
        driver = Driver(link, cfg)
        driver.write(0, bytes(g.dram))
        result = driver.launch(g.prog_addr, g.prog_len, 0, n)
        got = driver.read(0, n)
    fs = funcsim.run(None, bytes(g.dram), cfg, g.prog_addr, 0, n, prog_len=g.prog_len)
    print(f"GEMM over the SDRAM board: {n} DRAM bytes compared with the functional simulator")
    assert result.error == ErrorCode.NONE and result.ok
    assert got == fs.dram[:n]
    assert result.registers[Register.MAC_BUSY] == fs.mac_ops


def test_compiled_model_runs_over_the_serial_backend(board):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.GELU()).eval()
    x = torch.randn(3, 12)
    model = compile(module, (x,), CFG, QuantConfig("e4m3", "channel", "token", "pow2"), estimate=False)
    want = run(model, x)
    got = run(model, x, backend="serial", port=board.port())
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_silent_line_is_one_sentence():
    class Silent:
        name = "/dev/ttyNOWHERE"

        def write(self, data):
            pass

        def read(self, n):
            return b""

        def reset_input_buffer(self):
            pass

        def close(self):
            pass
    with pytest.raises(HostError, match=r"^no valid answer from the board on /dev/ttyNOWHERE after 2 tries of "
                                        r"INFO: check the cable"):
        SerialTransport(Silent(), retries=2, quiet=0)
