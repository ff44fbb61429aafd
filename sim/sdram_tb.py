"""cocotb testbench for :class:`fp8npu.hdl.sdram.SDRAMController` alone (runs inside the
simulator): cocotbext-axi's AXI4 master and a host-bridge driver on one side, the checking
SDRAM model (:mod:`.sdram_model`) on the pins.

The job (JSON named by ``FP8NPU_SDRAM_JOB``): ``chip``, ``clock_hz``, ``seed``, ``ops`` (random
transfers in the sequential phase), ``result`` (a JSON file this writes: counts and measured
throughput). Phases:

1. sequential: random AXI writes and reads over the whole chip (every length from 1 byte to
   2 KB, unaligned starts, row and bank crossings, transfers that run past the end of the
   memory), each read compared with a shadow copy of the memory, which starts as the chip's
   random power-up contents;
2. concurrent: an AXI writer, an AXI reader and the bridge port working at once on their own
   regions, with R and B backpressure;
3. idle: the controller left alone for many refresh intervals (the model checks every refresh);
4. throughput: a long read and a long write, timed.

At the end the whole shadow is compared with the chip's storage.
"""

import json
import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotb.utils import get_sim_time
from cocotbext.axi import AxiBus, AxiMaster
from fp8npu.hdl.sdram import CHIPS, SDRAMController

from .sdram_model import SDRAMModel

CLOCK_NS = 10


class Bridge:
    """Drives the controller's host-bridge port: one bus word per request."""

    def __init__(self, dut, bus_bytes):
        self.dut, self.bus_bytes = dut, bus_bytes
        dut.b_valid.value = 0

    async def request(self, word, write=False, data=0, enables=0):
        d = self.dut
        await FallingEdge(d.clk)
        d.b_valid.value, d.b_write.value, d.b_addr.value = 1, int(write), word
        d.b_wen.value, d.b_wdata.value = enables, data
        while True:
            await FallingEdge(d.clk)
            if int(d.b_done.value):
                value = int(d.b_rdata.value)
                d.b_valid.value = 0
                return value


def _check(got, want, what):
    if got != want:
        diff = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) if len(got) == len(want) else -1
        raise AssertionError(f"{what}: {len(got)} bytes read, first difference at byte {diff}")


@cocotb.test(timeout_time=100, timeout_unit="ms")        # a hang fails the test
async def sdram_controller(dut):
    with open(os.environ["FP8NPU_SDRAM_JOB"]) as f:
        job = json.load(f)
    chip = CHIPS[job["chip"]]
    ctrl = SDRAMController(chip, job["clock_hz"], job["data_bits"])
    B = job["data_bits"] // 8
    size = chip.bytes
    rng = random.Random(job["seed"])
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    dut.rst.value = 1
    model = SDRAMModel(dut, chip, job["clock_hz"], seed=job["seed"])
    shadow = bytearray(model.memory)
    cocotb.start_soon(model.run())
    axi = AxiMaster(AxiBus.from_prefix(dut, "s"), dut.clk, dut.rst)
    bridge = Bridge(dut, B)
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    while not int(dut.ready.value):
        await RisingEdge(dut.clk)
    counts = {"axi_writes": 0, "axi_reads": 0, "bytes_written": 0, "bytes_read": 0, "bridge_words": 0,
              "error_responses": 0}

    async def write(addr, data):
        resp = await axi.write(addr, data)
        inside = max(0, min(len(data), size - addr))
        shadow[addr:addr + inside] = data[:inside]
        counts["axi_writes"] += 1
        counts["bytes_written"] += len(data)
        want_error = inside < len(data)
        if (int(resp.resp) != 0) != want_error:
            raise AssertionError(f"write of {len(data)} bytes at {addr:#x}: response {int(resp.resp)}")
        counts["error_responses"] += want_error

    async def read(addr, n):
        resp = await axi.read(addr, n)
        inside = max(0, min(n, size - addr))
        _check(bytes(resp.data[:inside]), bytes(shadow[addr:addr + inside]), f"read of {n} bytes at {addr:#x}")
        if inside < n:
            _check(bytes(resp.data[inside:]), bytes(n - inside), f"bytes past the end read at {addr:#x}")
        counts["axi_reads"] += 1
        counts["bytes_read"] += n
        want_error = inside < n
        if (int(resp.resp) != 0) != want_error:
            raise AssertionError(f"read of {n} bytes at {addr:#x}: response {int(resp.resp)}")
        counts["error_responses"] += want_error

    # 1. sequential random transfers
    row_bytes = 2 << chip.col_bits
    for _ in range(job["ops"]):
        n = rng.choice([1, 2, 3, B - 1, B, B + 1, rng.randrange(1, 2048), row_bytes, row_bytes + 3])
        kind = rng.random()
        if kind < 0.1:
            addr = size - rng.randrange(1, 3 * B)                      # runs past the end
        elif kind < 0.3:
            addr = rng.randrange(1, size // row_bytes) * row_bytes - rng.randrange(0, 64)   # across rows
        else:
            addr = rng.randrange(0, size - n)
        if rng.random() < 0.5:
            await write(addr, rng.randbytes(n))
        await read(addr, n)

    # 2. concurrent: writer, reader and bridge on their own regions, with backpressure
    def pauses(seed, share):
        r = random.Random(seed)
        while True:
            yield r.random() < share
    axi.read_if.r_channel.set_pause_generator(pauses(1, 0.4))
    axi.write_if.b_channel.set_pause_generator(pauses(2, 0.3))

    async def writer():
        for _ in range(40):
            addr = rng.randrange(0, 1 << 16)
            await write(addr, rng.randbytes(rng.randrange(1, 600)))

    async def reader():
        for _ in range(40):
            addr = (1 << 16) + rng.randrange(0, 1 << 16)
            await read(addr, rng.randrange(1, 600))

    async def host():
        base = (1 << 17) // B
        for _ in range(120):
            word = base + rng.randrange(0, 64)
            if rng.random() < 0.5:
                lane = rng.randrange(B)
                value = rng.randrange(256)
                await bridge.request(word, write=True, data=value << (8 * lane), enables=1 << lane)
                shadow[word * B + lane] = value
            else:
                got = await bridge.request(word)
                want = int.from_bytes(shadow[word * B:(word + 1) * B], "little")
                if got != want:
                    raise AssertionError(f"bridge read of word {word:#x}: {got:#x}, want {want:#x}")
            counts["bridge_words"] += 1

    tasks = [cocotb.start_soon(c()) for c in (writer, reader, host)]
    for task in tasks:
        await task
    for channel in (axi.read_if.r_channel, axi.write_if.b_channel):
        channel.clear_pause_generator()
        channel.pause = False              # clearing the generator leaves its last value

    # 3. idle through many refresh intervals
    await ClockCycles(dut.clk, 10 * ctrl.timing["refi"])

    # 4. throughput of long transfers
    n = 16384
    data = rng.randbytes(n)
    start = get_sim_time("ns")
    await write(1 << 20, data)
    write_cycles = (get_sim_time("ns") - start) / CLOCK_NS
    start = get_sim_time("ns")
    await read(1 << 20, n)
    read_cycles = (get_sim_time("ns") - start) / CLOCK_NS

    _check(bytes(model.memory), bytes(shadow), "the whole chip against the shadow")
    counts.update({"commands": model.commands, "cycles": model.cycle, "cas_latency": model.cas_latency,
                   "read_bytes_per_clock": n / read_cycles, "write_bytes_per_clock": n / write_cycles,
                   "peak_bytes_per_clock": 2.0})
    with open(job["result"], "w") as f:
        json.dump(counts, f)
