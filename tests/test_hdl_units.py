"""Amaranth-simulator tests of the arithmetic units (small vector counts; bulk runs are in
test_rtl_units.py under Verilator), latency checks and parameter validation."""

import numpy as np
import pytest
import torch
from amaranth.hdl import Value
from amaranth.sim import Simulator
from fp8npu.hdl.formats import E4M3, E5M2, FP32, Format, format_by_name
from fp8npu.hdl.fpadd import FP32Adder
from fp8npu.hdl.fpconv import FP32ToFP8
from fp8npu.hdl.fpmul import FP8Multiplier
from fp8npu.hdl.mac import MAC
from fp8npu.sim import golden, vectors


def _run(dut, inputs, outputs, latency, n):
    """Apply input row i on cycle i; sample outputs `latency` cycles later (comb: same cycle)."""
    got = {name: [] for name in outputs}
    inputs = [(Value.cast(port), values) for port, values in inputs]

    async def bench(ctx):
        for t in range(n + latency):
            if t < n:
                for port, values in inputs:
                    ctx.set(port, int(values[t]))
            if t >= latency:
                for name, port in outputs.items():
                    got[name].append(ctx.get(port))
            if latency:
                await ctx.tick()
            else:
                await ctx.delay(1e-6)

    sim = Simulator(dut)
    if latency:
        sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return {k: np.array(v, dtype=np.int64) for k, v in got.items()}


@pytest.mark.parametrize("stages", [0, 1])
def test_multiplier_amaranth(stages, rng):
    n = 400
    a = rng.integers(0, 256, n)
    b = rng.integers(0, 256, n)
    fa = rng.integers(0, 2, n)
    fb = rng.integers(0, 2, n)
    dut = FP8Multiplier(stages=stages)
    got = _run(dut, [(dut.a, a), (dut.b, b), (dut.fmt_a, fa), (dut.fmt_b, fb)], {"p": dut.product}, stages, n)["p"]
    want = golden.mul(torch.tensor(a, dtype=torch.uint8), torch.tensor(b, dtype=torch.uint8),
                      torch.tensor(fa), torch.tensor(fb))
    assert int(golden.mismatches(torch.from_numpy(got), want, "fp32").sum()) == 0


@pytest.mark.parametrize("stages", [0, 1, 2, 3, 4, 5])
def test_adder_amaranth(stages):
    a, b = vectors.adder_vectors(300, seed=stages)
    dut = FP32Adder(stages=stages)
    assert dut.latency == stages
    got = _run(dut, [(dut.a, a), (dut.b, b)], {"r": dut.result}, stages, len(a))["r"]
    want = golden.add(torch.from_numpy(a.view(np.int32)), torch.from_numpy(b.view(np.int32)))
    assert int(golden.mismatches(torch.from_numpy(got), want, "fp32").sum()) == 0


@pytest.mark.parametrize("stages", [0, 1, 2, 3])
def test_converter_amaranth(stages, rng):
    x = vectors.converter_inputs(0)[::7][:300]
    fmt = rng.integers(0, 2, len(x))
    sat = rng.integers(0, 2, len(x))
    dut = FP32ToFP8(stages=stages)
    got = _run(dut, [(dut.x, x), (dut.fmt, fmt), (dut.saturate, sat)], {"y": dut.y}, stages, len(x))["y"]
    for f, spec in enumerate((E4M3, E5M2)):
        for s in (0, 1):
            sel = (fmt == f) & (sat == s)
            want = golden.quantize(torch.from_numpy(x[sel].view(np.int32)), spec, saturate=bool(s))
            assert int(golden.mismatches(torch.from_numpy(got[sel]), want, spec).sum()) == 0


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_mac_amaranth_latency_and_chain(stages, rng):
    k = 40
    a = rng.integers(0, 0x78, k)      # positive finite E4M3 codes
    b = rng.integers(0, 0x78, k)
    valid = np.ones(k, int)
    valid[5] = 0
    first = np.zeros(k, int)
    first[0] = 1
    dut = MAC(stages=stages)
    got = _run(dut, [(dut.a, a), (dut.b, b), (dut.valid, valid), (dut.first, first)],
               {"acc": dut.acc, "v": dut.acc_valid}, stages, k)
    want = golden.mac(torch.tensor(a, dtype=torch.uint8), torch.tensor(b, dtype=torch.uint8),
                      Format.E4M3, Format.E4M3, valid=valid.astype(bool), first=first.astype(bool), trace=True)
    assert int(golden.mismatches(torch.from_numpy(got["acc"]), want, "fp32").sum()) == 0
    assert list(got["v"]) == list(valid)


@pytest.mark.parametrize("cls, stages, message", [
    (MAC, 0, r"^MAC stages must be one of 1, 2, 3, not 0$"),
    (MAC, "2", r"^MAC stages must be one of 1, 2, 3, not '2'$"),
    (FP32Adder, 6, r"^adder stages must be one of 0, 1, 2, 3, 4, 5, not 6$"),
    (FP8Multiplier, 2, r"^multiplier stages must be one of 0, 1, not 2$"),
    (FP32ToFP8, -1, r"^converter stages must be one of 0, 1, 2, 3, not -1$"),
    (MAC, True, r"^MAC stages must be one of 1, 2, 3, not True$"),
])
def test_stage_parameter_errors(cls, stages, message):
    with pytest.raises(ValueError, match=message):
        cls(stages=stages)


def test_format_names():
    assert format_by_name("e4m3") is Format.E4M3
    assert format_by_name("e5m2") is Format.E5M2
    with pytest.raises(ValueError, match=r"^format must be one of e4m3, e5m2, not 'fp8'$"):
        format_by_name("fp8")


def test_format_parameters_match_ocp():
    assert (E4M3.max_code, E4M3.max_value, E4M3.min_subnormal, E4M3.nan_code) == (0x7E, 448.0, 2.0**-9, 0x7F)
    assert (E5M2.max_code, E5M2.max_value, E5M2.min_subnormal, E5M2.inf_code) == (0x7B, 57344.0, 2.0**-16, 0x7C)
    assert FP32.nan_code == 0x7FC00000 and FP32.max_code == 0x7F7FFFFF
    for spec in (E4M3, E5M2):
        dtype = getattr(torch, spec.torch_dtype)
        assert torch.finfo(dtype).max == spec.max_value
        assert torch.finfo(dtype).tiny == spec.min_normal


# ---- the vector unit alone, against the functional simulator's datapath -------------------

def _vector_unit_run(cols, lanes, command, acc):
    """Run one EPILOGUE or BLOCKSCALE on a VectorUnit over accumulator lines ``acc`` (int64
    array, lines x cols, modified in place) with a synchronous, read-before-write port.
    Returns the cycles from ``start`` to ``done``, both included."""
    from fp8npu.hdl.units import VectorUnit
    dut = VectorUnit(cols, lanes)
    result = {}

    def line(addr):
        return sum(int(v) << (32 * c) for c, v in enumerate(acc[addr]))

    async def bench(ctx):
        ctx.set(dut.cmd, int.from_bytes(command, "little"))
        ctx.set(dut.en, 1)
        ctx.set(dut.start, 1)
        for cycle in range(10_000):
            if ctx.get(dut.done):
                result["cycles"] = cycle + 1
                return
            read = line(ctx.get(dut.rd_addr))
            if ctx.get(dut.wr_en):
                data, lanes_on, addr = ctx.get(dut.wr_data), ctx.get(dut.wr_lanes), ctx.get(dut.wr_addr)
                for c in range(cols):
                    if lanes_on >> c & 1:
                        acc[addr, c] = (data >> (32 * c)) & 0xFFFFFFFF
            await ctx.tick()
            ctx.set(dut.start, 0)
            ctx.set(dut.rd_data, read)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return dut, result["cycles"]


def _f32_bits(x):
    return torch.tensor(np.asarray(x, dtype=np.float32)).view(torch.int32)


@pytest.mark.parametrize("lanes", [None, 2, 1])
@pytest.mark.parametrize("op", ["epilogue", "epilogue_chained", "epilogue_gap3", "blockscale"])
def test_vector_unit_alone(op, lanes, rng):
    """VectorUnit in the Amaranth simulator, 3 columns in 1, 2 or 3 passes, against the
    functional simulator's EPILOGUE/BLOCKSCALE (rows in order, each read before it is
    written), and its cycles against the functional simulator's charge."""
    from fp8npu.hdl import isa
    from fp8npu.hdl.config import NPUConfig
    from fp8npu.sim import funcsim
    cols, rows = 3, 6
    values = rng.standard_normal((40, cols)).astype(np.float32) * np.float32(2.0) ** rng.integers(-8, 9, (40, cols))
    values[5, 1] = np.float32("inf")
    acc = _f32_bits(values).numpy().astype(np.int64) & 0xFFFFFFFF
    Op = isa.Opcode
    if op == "blockscale":
        cmd = isa.encode(Op.BLOCKSCALE, rows=rows, src=4, dst=20, row_scale=30, col_scale=1)
    else:
        # chained: row i reads what row i - 1 wrote; gap3: what row i - 3 wrote
        src, dst = {"epilogue": (4, 20), "epilogue_chained": (19, 20), "epilogue_gap3": (17, 20)}[op]
        cmd = isa.encode(Op.EPILOGUE, rows=rows, src=src, dst=dst, scale_addr=1, bias_addr=2, use_scale=1,
                         use_bias=1)
    cfg = NPUConfig(rows=2, cols=cols, vector_lanes=lanes or 0, acc_lines=64, sp_lines=64)
    ref = funcsim._Datapath(bytearray(64), cfg)
    ref.acc[:40, :cols] = acc.astype(np.uint32).view(np.int32)
    decoded = isa.decode(cmd)
    charge = getattr(ref, op.split("_")[0])(decoded.fields)
    got = acc.copy()
    dut, cycles = _vector_unit_run(cols, lanes, cmd, got)
    want = ref.acc[:40, :cols].astype(np.int64) & 0xFFFFFFFF
    bad = int(golden.mismatches(torch.from_numpy(got.astype(np.uint32).view(np.int32)),
                                torch.from_numpy(want.astype(np.uint32).view(np.int32)), "fp32").sum())
    print(f"{op}, {dut.passes} passes: {rows * cols} values checked, {bad} mismatches; {cycles} cycles, "
          f"functional simulator {charge}")
    assert bad == 0
    assert (got[:20] == acc[:20]).all() and (got[26:] == acc[26:]).all()     # nothing else written
    if op in ("epilogue", "blockscale"):
        assert cycles == dut.command_cycles(decoded.opcode, rows) == charge
