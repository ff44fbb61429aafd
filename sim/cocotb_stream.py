"""cocotb test: stream pre-packed input vectors through a design, one row per clock, and
record every output on every clock.

This module runs inside the simulator process. It only drives and records; all checking is
done by the caller against :mod:`fp8npu.sim.golden`, with torch, outside the simulator.

Protocol, on each falling edge ``t`` of ``clk`` (t = 0 .. cycles + drain - 1): first sample
every output into row ``t``, then apply input row ``t`` (zeros once the inputs run out). An
output of a unit with latency L >= 1 sampled at ``t`` therefore belongs to input row ``t - L``;
a combinational output (L = 0) belongs to row ``t - 1``.

The job is described by a JSON file named in ``FP8NPU_STREAM_JOB``::

    {"inputs": {"port": "file.npy"}, "outputs": {"port": nbytes}, "drain": 4,
     "result": "out.npz", "reset_cycles": 2}

Each input file is a ``[cycles, nbytes]`` uint8 array: row t is the port's value at cycle t,
little-endian.
"""

import json
import os
import time

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge


@cocotb.test()
async def stream(dut):
    with open(os.environ["FP8NPU_STREAM_JOB"]) as f:
        job = json.load(f)
    inputs = {name: np.load(path) for name, path in job["inputs"].items()}
    cycles = min((len(a) for a in inputs.values()), default=0)
    total = cycles + int(job.get("drain", 4))
    in_handles = {name: getattr(dut, name) for name in inputs}
    out_handles = {name: getattr(dut, name) for name in job["outputs"]}
    out_bytes = dict(job["outputs"])
    recorded = {name: np.zeros((total, n), dtype=np.uint8) for name, n in out_bytes.items()}

    Clock(dut.clk, 10, unit="ns").start()
    dut.rst.value = 1
    for handle in in_handles.values():
        handle.value = 0
    for _ in range(int(job.get("reset_cycles", 2))):
        await FallingEdge(dut.clk)
    dut.rst.value = 0

    rows = {name: [int.from_bytes(r.tobytes(), "little") for r in a] for name, a in inputs.items()}
    start = time.perf_counter()
    for t in range(total):
        await FallingEdge(dut.clk)
        for name, handle in out_handles.items():
            recorded[name][t] = np.frombuffer(
                handle.value.to_unsigned().to_bytes(out_bytes[name], "little"), dtype=np.uint8)
        if t < cycles:
            for name, handle in in_handles.items():
                handle.value = rows[name][t]
        elif t == cycles:
            for handle in in_handles.values():
                handle.value = 0
    elapsed = time.perf_counter() - start
    np.savez(job["result"], seconds=np.array(elapsed), cycles=np.array(total), **recorded)
