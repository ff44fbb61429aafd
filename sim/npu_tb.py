"""cocotb testbench for the NPU (runs inside the simulator).

Roles: the *DRAM model* is cocotbext-axi's ``AxiRam`` on the ``m_axi`` port, the *host
driver* is cocotbext-axi's ``AxiLiteMaster`` on ``s_axil``. The job (a JSON file named by
``FP8NPU_NPU_JOB``) gives the DRAM image, the program address and length, the DMA window,
whether to apply random backpressure, a cycle limit, and optionally ``mapped_bytes``: only
that much DRAM exists and the bus answers SLVERR above it (``AxiSlave`` over an
``AddressSpace``, for bus-error tests). The testbench writes the image,
programs the registers, starts the NPU, waits for its ``irq`` output, then records the
registers and the whole DRAM for the caller to check. The testbench itself acts only at these
transaction boundaries; the cocotbext-axi DRAM models act on every clock while the bus is
busy, which is why long runs use the simulation DRAM (``fast``), where no Python runs
between start and ``irq``.
"""

import json
import os
import random
import time

import cocotb
from cocotb.clock import Clock
from cocotb.simtime import get_sim_time
from cocotb.triggers import ClockCycles, First, RisingEdge, Timer
from cocotbext.axi import AddressSpace, AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam, AxiSlave, MemoryRegion
from fp8npu.hdl.isa import Register


class _ArrayDRAM:
    """Byte-level access to the simulation DRAM's word array (only non-zero words are written)."""

    def __init__(self, mem, bus_bytes):
        self.mem = mem
        self.bus_bytes = bus_bytes

    def write(self, address, data):
        import numpy as np
        assert address == 0
        b = self.bus_bytes
        data = bytes(data) + bytes(-len(data) % b)
        words = np.frombuffer(data, dtype=np.uint8).reshape(-1, b)
        for i in np.flatnonzero(words.any(axis=1)):
            self.mem[int(i)].value = int.from_bytes(words[i].tobytes(), "little")

    def read(self, address, length):
        assert address == 0
        b = self.bus_bytes
        out = bytearray()
        for i in range((length + b - 1) // b):
            out += int(self.mem[i].value).to_bytes(b, "little")
        return bytes(out[:length])


CLOCK_NS = 10


class _MappedDRAM:
    """cocotbext-axi's ``AxiSlave`` over an address space where only ``[0, mapped)`` is memory:
    bursts that touch anything above are answered SLVERR (to test bus-error handling)."""

    def __init__(self, dut, mapped):
        space = AddressSpace(2 ** 32)
        self.region = MemoryRegion(mapped)
        space.register_region(self.region, 0)
        self.slave = AxiSlave(AxiBus.from_prefix(dut, "m_axi"), dut.clk, dut.rst, target=space)
        self.read_if, self.write_if = self.slave.read_if, self.slave.write_if
        self.mapped = mapped

    def write(self, address, data):
        data = bytes(data)[:self.mapped - address]
        self.region[address:address + len(data)] = data

    def read(self, address, length):
        data = bytes(self.region[address:min(address + length, self.mapped)])
        return data + bytes(length - len(data))


def _pauses(rng, probability):
    while True:
        yield rng.random() < probability


@cocotb.test()
async def run_program(dut):
    with open(os.environ["FP8NPU_NPU_JOB"]) as f:
        job = json.load(f)
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    fast = bool(job.get("fast"))
    host = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil"), dut.clk, dut.rst)
    if fast:
        # DRAM inside the design (fp8npu.sim.simdram): load and read it through the simulator
        ram = _ArrayDRAM(dut.dram.store.words, job["bus_bytes"])
        dut.stall_threshold.value = int(job.get("backpressure", 0) * 256) if job.get("backpressure") else 0
    elif job.get("mapped_bytes") is not None:
        ram = _MappedDRAM(dut, job["mapped_bytes"])
    else:
        ram = AxiRam(AxiBus.from_prefix(dut, "m_axi"), dut.clk, dut.rst, size=job["dram_size"])
    if job.get("backpressure") and not fast:
        rng = random.Random(job.get("seed", 1))
        for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel,
                   ram.write_if.w_channel, ram.write_if.b_channel):
            ch.set_pause_generator(_pauses(random.Random(rng.random()), job["backpressure"]))
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    with open(job["dram_in"], "rb") as f:
        ram.write(0, f.read())

    async def wr(reg, value):
        await host.write_dword(int(reg), value)

    async def rd(reg):
        return await host.read_dword(int(reg))

    await wr(Register.PROG_ADDR, job["prog_addr"])
    await wr(Register.PROG_LEN, job["prog_len"])
    await wr(Register.WIN_BASE, job["win_base"])
    await wr(Register.WIN_LIMIT, job["win_limit"])
    await wr(Register.CTRL, 1)
    start = time.perf_counter()
    t_start = get_sim_time("ns")
    max_ns = job["max_cycles"] * CLOCK_NS
    # Between start and the end, cocotb only waits for the NPU's interrupt (or a timeout):
    # no Python runs per clock on the fast path. With a progress file it wakes every
    # ``poll`` cycles to record progress.
    progress = job.get("progress")
    chunk_ns = int(job.get("poll", 1 << 16)) * CLOCK_NS if progress else max_ns
    status = await rd(Register.STATUS)
    while status & 1:
        left = max_ns - (get_sim_time("ns") - t_start)
        if left <= 0:
            break
        if not dut.irq.value:
            await First(RisingEdge(dut.irq), Timer(min(chunk_ns, left), unit="ns"))
        status = await rd(Register.STATUS)
        if progress:     # one JSON line per record, appended
            record = {"cycles": await rd(Register.CYCLES), "commands": await rd(Register.COMMANDS)}
            with open(progress, "a") as f:
                f.write(json.dumps(record) + "\n")
    waited = int((get_sim_time("ns") - t_start) // CLOCK_NS)
    elapsed = time.perf_counter() - start
    regs = {r.name: await rd(r) for r in Register if r != Register.CTRL}
    await RisingEdge(dut.clk)
    with open(job["dram_out"], "wb") as f:
        f.write(ram.read(0, job["dram_size"]))
    with open(job["result"], "w") as f:
        json.dump({"registers": regs, "hung": bool(status & 1), "wall_seconds": elapsed,
                   "waited_cycles": waited}, f)
