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


@pytest.mark.parametrize("stages", [0, 1])
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
    (FP32ToFP8, -1, r"^converter stages must be one of 0, 1, not -1$"),
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
