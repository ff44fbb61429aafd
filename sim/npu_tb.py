"""cocotb testbench for the NPU (runs inside the simulator).

Roles: the *DRAM model* is cocotbext-axi's ``AxiSlave`` over an ``AddressSpace`` on the
``m_axi`` port, or, on the fast path, the simulation DRAM inside the design
(:mod:`fp8npu.sim.simdram`); the *host driver* is cocotbext-axi's ``AxiLiteMaster`` on
``s_axil``. The job (a JSON file named by ``FP8NPU_NPU_JOB``) gives the DRAM image, one or
more launches (each the host's register writes, ending with the CTRL start), whether to apply
random backpressure, a cycle limit, and optionally ``mapped_bytes``. Only the image's bytes (or the first ``mapped_bytes``)
exist: both DRAM models answer SLVERR to an access above them and never wrap an address
around. The testbench loads the image, programs the registers, starts the NPU, waits for its
``irq`` output, then records the registers and the whole DRAM for the caller to check. The
testbench itself acts only at these transaction boundaries; the cocotbext-axi model acts on
every clock while the bus is busy, which is why long runs use the simulation DRAM (``fast``),
where no Python runs between start and ``irq`` and the image moves through files in bulk.
"""

import json
import os
import random
import time

import cocotb
from cocotb.clock import Clock
from cocotb.simtime import get_sim_time
from cocotb.triggers import ClockCycles, First, RisingEdge, Timer
from cocotbext.axi import AddressSpace, AxiBus, AxiLiteBus, AxiLiteMaster, AxiSlave, MemoryRegion
from fp8npu.hdl.isa import Register


class _SimDRAM:
    """The simulation DRAM inside the design (fp8npu.sim.simdram): loaded from a file by the
    simulator before time 0; words dumped to a file on a pulse of ``dram_dump`` and loaded
    from one on a pulse of ``dram_load``."""

    def __init__(self, dut, job):
        self.dut = dut
        self.job = job
        self.bus = job["bus_bytes"]

    def write(self, address, data):
        pass            # loaded by $readmemh from the job's hex file

    async def _pulse(self, port):
        port.value = 1
        await RisingEdge(self.dut.clk)
        await RisingEdge(self.dut.clk)
        port.value = 0
        await RisingEdge(self.dut.clk)

    async def words(self, first, last):
        """The bytes of words ``first`` .. ``last``."""
        from fp8npu.sim.simdram import read_hex
        self.dut.dram_first.value = first
        self.dut.dram_last.value = last
        await self._pulse(self.dut.dram_dump)
        return read_hex(self.job["dram_hex_out"], self.bus, (last - first + 1) * self.bus)

    async def dump(self):
        return (await self.words(0, -(-self.job["dram_size"] // self.bus) - 1))[:self.job["dram_size"]]

    async def get(self, address, length):
        first, last = address // self.bus, (address + length - 1) // self.bus
        data = await self.words(first, last)
        return data[address - first * self.bus:][:length]

    async def put(self, address, data):
        """Write bytes at any address: the words they cover, edges merged with what is there."""
        from fp8npu.sim.simdram import write_hex_at
        first, last = address // self.bus, (address + len(data) - 1) // self.bus
        head, tail = address - first * self.bus, (last + 1) * self.bus - address - len(data)
        if head:
            data = (await self.words(first, first))[:head] + data
        if tail:
            data = data + (await self.words(last, last))[self.bus - tail:]
        write_hex_at(self.job["dram_hex_load"], first, data, self.bus)
        await self._pulse(self.dut.dram_load)


CLOCK_NS = 10


class _MappedDRAM:
    """cocotbext-axi's ``AxiSlave`` over an address space where only ``[0, mapped)`` is memory:
    bursts that touch anything above are answered SLVERR, never wrapped around (AxiRam would
    wrap an address modulo its size)."""

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

    async def get(self, address, length):
        return self.read(address, length)

    async def put(self, address, data):
        self.write(address, data)


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
    mapped = job["dram_size"] if job.get("mapped_bytes") is None else job["mapped_bytes"]
    if fast:
        # DRAM inside the design (fp8npu.sim.simdram), loaded and dumped through files
        ram = _SimDRAM(dut, job)
        dut.stall_threshold.value = int(job.get("backpressure", 0) * 256) if job.get("backpressure") else 0
        dut.dram_limit.value = mapped
        dut.dram_dump.value = 0
        dut.dram_load.value = 0
    else:
        ram = _MappedDRAM(dut, mapped)
    if job.get("backpressure") and not fast:
        rng = random.Random(job.get("seed", 1))
        for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel,
                   ram.write_if.w_channel, ram.write_if.b_channel):
            ch.set_pause_generator(_pauses(random.Random(rng.random()), job["backpressure"]))
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    if not fast:
        with open(job["dram_in"], "rb") as f:
            ram.write(0, f.read())

    async def wr(reg, value):
        await host.write_dword(int(reg), value)

    async def rd(reg):
        return await host.read_dword(int(reg))

    if job.get("serve"):
        await _serve(dut, job, ram, wr, rd)
        return
    # one or more launches on the same DRAM; each start resets the core. The register writes
    # come from the host driver (fp8npu.sim.host, isa.launch_writes): this bench only applies them.
    launches = job["launches"]
    runs = []
    for launch in launches:
        run = await _launch(dut, job, launch, wr, rd)
        runs.append(run)
        if run["hung"]:
            break
    await RisingEdge(dut.clk)
    image = await ram.dump() if fast else ram.read(0, job["dram_size"])
    with open(job["dram_out"], "wb") as f:
        f.write(image)
    with open(job["result"], "w") as f:
        json.dump({"runs": runs}, f)


async def _launch(dut, job, launch, wr, rd):
    """Apply the host's register writes (the last one starts the NPU), wait for the interrupt
    (or the cycle limit), read every register."""
    for reg, value in launch["writes"]:
        await wr(reg, value)
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
    return {"registers": regs, "hung": bool(status & 1), "wall_seconds": elapsed, "waited_cycles": waited}


async def _serve(dut, job, ram, wr, rd):
    """Serve a host over the Unix socket named by the job: one JSON request a line, one JSON
    answer a line. Requests: ``write`` (addr, hex data), ``read`` (addr, n), ``read_reg`` (reg),
    ``launch`` (the register writes ending with the CTRL start, as in a job's launches),
    ``close``. The simulation stands still while it waits for the host."""
    import socket
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(job["serve"])
    stream = conn.makefile("rwb")
    try:
        while True:
            line = stream.readline()
            if not line:
                return                      # the host went away
            req = json.loads(line)
            op = req.get("op")
            try:
                if op == "write":
                    data = bytes.fromhex(req["data"])
                    if data:
                        await ram.put(req["addr"], data)
                    answer = {}
                elif op == "read":
                    answer = {"data": (await ram.get(req["addr"], req["n"])).hex() if req["n"] else ""}
                elif op == "read_reg":
                    answer = {"value": await rd(req["reg"])}
                elif op == "launch":
                    job["max_cycles"] = req.get("max_cycles", job["max_cycles"])
                    answer = await _launch(dut, job, req, wr, rd)
                elif op == "close":
                    stream.write(b"{}\n")
                    stream.flush()
                    return
                else:
                    answer = {"error": f"unknown request {op!r}"}
            except Exception as exc:        # answered, not ignored: the host raises it
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            stream.write(json.dumps(answer).encode() + b"\n")
            stream.flush()
    finally:
        stream.close()
        conn.close()
