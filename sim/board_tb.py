"""cocotb testbench for the board design (:class:`fp8npu.hdl.board.BoardSoC`; runs inside the
simulator): the UART pins bridged to a Unix socket, byte for byte.

The job (a JSON file named by ``FP8NPU_BOARD_JOB``) names the socket to connect to and the
UART's clocks per bit. Bytes from the socket are sent on ``rx`` as 8N1 frames; frames the
design sends on ``tx`` are decoded (sampled in the middle of each bit) and written to the
socket. The simulation runs until the host closes the socket; then, if the job names a
``line_log``, it writes the simulated time of every byte on the line there (a measure of the
link's throughput). Python acts once per bit on
the line (a timer, not a wait on each clock edge) and once every 64 cycles otherwise, so the NPU runs at Verilator speed between.
With ``sdram`` in the job, the checking SDRAM chip model (:mod:`.sdram_model`) sits on the
``sd_*`` pins (it acts on every clock, so such a board simulates several times slower).
"""

import json
import os
import select
import socket

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, Timer
from cocotb.utils import get_sim_time

from .sdram_model import SDRAMModel

CLOCK_NS = 10


@cocotb.test()
async def serial_bridge(dut):
    with open(os.environ["FP8NPU_BOARD_JOB"]) as f:
        job = json.load(f)
    divisor = job["divisor"]
    bit_ns = divisor * CLOCK_NS
    Clock(dut.clk, CLOCK_NS, unit="ns").start()
    if job.get("sdram"):
        from fp8npu.hdl.sdram import CHIPS
        cocotb.start_soon(SDRAMModel(dut, CHIPS[job["sdram"]], job["clock_hz"]).run())
    dut.rx.value = 1
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(job["socket"])
    conn.setblocking(False)
    state = {"open": True}
    received, sent = [], []

    async def receive():
        """tx -> socket."""
        while state["open"]:
            await FallingEdge(dut.tx)
            await Timer((divisor + divisor // 2) * CLOCK_NS, unit="ns")
            byte = 0
            for bit in range(8):
                byte |= int(dut.tx.value) << bit
                await Timer(bit_ns, unit="ns")
            if int(dut.tx.value) == 1 and state["open"]:     # a stop bit: a byte
                sent.append(get_sim_time("ns"))
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    state["open"] = False

    cocotb.start_soon(receive())
    # socket -> rx
    while state["open"]:
        if not select.select([conn], [], [], 0)[0]:
            await Timer(64 * CLOCK_NS, unit="ns")
            continue
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            break
        for byte in data:
            received.append(get_sim_time("ns"))
            for bit in [0] + [(byte >> k) & 1 for k in range(8)] + [1]:
                dut.rx.value = bit
                await Timer(bit_ns, unit="ns")
    state["open"] = False
    conn.close()
    if job.get("line_log"):                 # when each byte started (to the board) / ended (from it)
        with open(job["line_log"], "w") as f:
            json.dump({"to_board_ns": received, "from_board_ns": sent, "bit_ns": bit_ns}, f)
