"""The host driver (sim/host.py) over its transports: the functional simulator and the RTL give
the same result object, the same registers that do not depend on timing and the same DRAM;
DRAM carries over between launches; a program built for another configuration is refused."""

import numpy as np
import pytest
from fp8npu.compiler.gemm import build_gemm
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import ErrorCode, Opcode, Register
from fp8npu.sim.host import Driver, FuncTransport, HostError, RTLTransport
from fp8npu.sim.reference import reference_gemm

CFG = NPUConfig(rows=2, cols=2, sp_lines=64, acc_lines=16)
TIMING = (Register.CYCLES, Register.STALL, Register.DMA_BYTES)


def _transports(size, image):
    return {"func": FuncTransport(CFG, size, image), "rtl": RTLTransport(CFG, size, image, fast=True)}


def test_gemm_then_a_copy_give_the_same_bits_on_both_transports():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 0x78, (6, 5), dtype=np.uint8)
    b = rng.integers(0, 0x78, (5, 3), dtype=np.uint8)
    g = build_gemm(CFG, a, b, "e4m3", "e4m3")
    size = len(g.dram) + 4096
    copy_at = len(g.dram) + 2048
    # second program: copy the first output row (3 FP32 values = 12 bytes, padded) elsewhere
    copy = isa.encode_program([
        (Opcode.LOAD, dict(dst=1, sram_addr=0, rows=1, row_bytes=16, dram_addr=g.out_addr, dram_stride=0,
                           push_next=1)),
        (Opcode.SYNC, dict(unit=1, pop_prev=1, push_next=1)),
        (Opcode.STORE, dict(acc_addr=0, rows=1, cols=2, dram_addr=copy_at, dram_stride=0, pop_prev=1)),
        (Opcode.END, {})])
    results, images = {}, {}
    for name, t in _transports(size, bytes(g.dram)).items():
        d = Driver(t, CFG)
        first = d.launch(g.prog_addr, g.prog_len, g.win_base, g.win_limit)
        second = d.run(copy, copy_at + 1024)
        results[name] = (first, second)
        images[name] = d.read(0, size)
        t.close()
    for i in range(2):
        f, r = results["func"][i], results["rtl"][i]
        assert type(f) is type(r) and f.ok and r.ok
        assert {k: v for k, v in f.registers.items() if k not in TIMING} == \
            {k: v for k, v in r.registers.items() if k not in TIMING}
    assert images["func"] == images["rtl"]
    got = g.read_output(images["rtl"])
    assert bool((got == reference_gemm(a, b, "e4m3", "e4m3")).all())
    assert images["rtl"][copy_at:copy_at + 8] == images["rtl"][g.out_addr:g.out_addr + 8]


def test_program_for_another_configuration_is_refused():
    other = NPUConfig(rows=4, cols=4)
    t = FuncTransport(other, 4096)
    with pytest.raises(HostError, match=r"^the NPU is a 4x4 array, 64-bit bus, 16384 scratchpad lines, 1024 "
                                        r"accumulator lines, e4m3\+e5m2, sequential accumulation, but the program was "
                                        r"built for a 2x2 array, 64-bit bus, 64 scratchpad lines, 16 accumulator lines, "
                                        r"e4m3\+e5m2, sequential accumulation$"):
        Driver(t, CFG).run(isa.encode(Opcode.END), 0)


@pytest.mark.parametrize("call, message", [
    (lambda d: d.write(4090, bytes(8)), r"^bytes \[0xffa, 0x1002\) lie outside the 4096-byte DRAM$"),
    (lambda d: d.read(-1, 4), r"^bytes \[-0x1, 0x3\) lie outside the 4096-byte DRAM$"),
    (lambda d: d.launch(0, 1, 0, 8192), r"^the DMA window \[0x0, 0x2000\) must lie inside the 4096-byte DRAM image$"),
    (lambda d: d.run(bytes(40), 0), r"^a program is a non-empty whole number of 32-byte commands, not 40 bytes$"),
])
def test_driver_errors(call, message):
    with pytest.raises(HostError, match=message):
        call(Driver(FuncTransport(CFG, 4096), CFG))


def test_errors_come_back_the_same_way():
    results = []
    for t in _transports(4096, b"").values():
        results.append(Driver(t, CFG).run(isa.encode(Opcode.MATMUL, k=3, m=1), 64))
    for r in results:
        assert (r.error, r.error_addr) == (ErrorCode.BAD_FIELD, 64)
        assert r.describe() == "error BAD_FIELD (a reserved bit is set or a field is out of range) at command address 0x40"
