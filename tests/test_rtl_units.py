"""Bulk bit-exact checks of the generated Verilog under Verilator + cocotb.

Every stage setting of each unit runs side by side on the same vectors and each output is
compared bit for bit with the golden model (NaN by class). Counts checked by default:

* products: all 65,536 pairs for each of E4M3xE4M3, E5M2xE5M2, E4M3xE5M2, E5M2xE4M3
  (262,144 vectors x 2 stage settings);
* adder: 1,000,000 vectors (directed + random mixes) x 4 stage settings;
* converter: 1,000,000 float32 inputs x 2 formats x 2 overflow modes x 2 stage settings;
* MAC: 16 chains x 4,096 steps for each of 5 chain kinds x 3 format pairs, every
  intermediate accumulator compared, x 3 stage settings.

The ``slow`` tests run ten times more vectors: ``pytest -m slow``.
"""

import numpy as np
import pytest
from fp8npu.sim import checks, vectors

from .conftest import report

FORMAT_PAIRS = [(0, 0), (1, 1), (0, 1), (1, 0)]


def test_all_products_exhaustive():
    a, b = vectors.all_fp8_pairs()
    n = len(a)
    fa = np.repeat([p[0] for p in FORMAT_PAIRS], n).astype(np.uint8)
    fb = np.repeat([p[1] for p in FORMAT_PAIRS], n).astype(np.uint8)
    r = checks.check_products(np.tile(a, 4), np.tile(b, 4), fa, fb, name="all FP8 products")
    report(r)
    assert r.vectors == 4 * 65536
    assert r.ok, r.examples


def _adder(n, seed):
    a, b = vectors.adder_vectors(n, seed=seed)
    r = checks.check_adder(a, b)
    report(r)
    assert r.vectors >= n
    assert r.ok, r.examples


def test_adder_million():
    _adder(1_000_000, seed=1)


@pytest.mark.slow
def test_adder_ten_million():
    for seed in range(10):
        _adder(1_000_000, seed=100 + seed)


def _converter(n, seed):
    x = vectors.converter_inputs(n, seed=seed)
    k = len(x)
    fmt = np.repeat([0, 1, 0, 1], k).astype(np.uint8)
    sat = np.repeat([1, 1, 0, 0], k).astype(np.uint8)
    r = checks.check_converter(np.tile(x, 4), fmt, sat)
    report(r)
    assert k >= n
    assert r.ok, r.examples


def test_converter_million_both_formats_both_modes():
    _converter(1_000_000, seed=2)


@pytest.mark.slow
def test_converter_ten_million():
    for seed in range(10):
        _converter(1_000_000, seed=200 + seed)


def _mac_batches(length, seed):
    lanes = checks.LANES
    rng = np.random.default_rng(seed)
    batches = []
    for kind in ("normal", "random", "overflow", "underflow", "specials"):
        for fa, fb in [(0, 0), (1, 1), (0, 1)]:
            a, b, acc0 = vectors.mac_chains(kind, length, lanes, fa, fb, seed=int(rng.integers(1 << 30)))
            valid = np.ones(length, bool)
            if kind == "random":
                valid = rng.random(length) < 0.75   # bubbles: the accumulator must hold
                valid[0] = True
            batches.append(checks.MacBatch(a, b, np.full(lanes, fa), np.full(lanes, fb), acc0, valid, kind))
    return batches


def test_mac_chains_4096():
    batches = _mac_batches(4096, seed=3)
    r = checks.check_mac(batches)
    report(r)
    assert r.vectors == 15 * 4096 * checks.LANES
    assert r.ok, r.examples


@pytest.mark.slow
def test_mac_chains_long():
    r = checks.check_mac(_mac_batches(32768, seed=4))
    report(r)
    assert r.ok, r.examples


def test_mac_chains_reach_special_ranges():
    """The chain kinds really do what their names say (so the MAC test covers those paths)."""
    import torch
    from fp8npu.sim import golden
    kinds = {}
    for kind in ("overflow", "underflow", "specials"):
        a, b, acc0 = vectors.mac_chains(kind, 4096, 16, 1, 1, seed=5)
        trace = golden.mac(torch.from_numpy(a), torch.from_numpy(b), 1, 1,
                           acc=torch.from_numpy(acc0.view(np.int32)), trace=True)
        kinds[kind] = golden.bits_to_f32(trace)
    assert torch.isinf(kinds["overflow"]).any()                     # reaches infinity
    top = kinds["overflow"]
    assert ((top.abs() > 2.0**127) & torch.isfinite(top)).any()    # and finite sums stay at the top
    under = kinds["underflow"]
    assert (under == 0).any() and ((under.abs() < 2.0**-20) & (under != 0)).any()
    assert torch.isnan(kinds["specials"]).any()


def test_checker_detects_a_wrong_result(monkeypatch):
    """A check must be able to fail: corrupt one golden product and expect it to be caught."""
    from fp8npu.sim import golden
    real = golden.mul

    def corrupted(*args):
        out = real(*args).clone()
        out[3] ^= 1
        return out

    monkeypatch.setattr(golden, "mul", corrupted)
    a, b = vectors.all_fp8_pairs()
    r = checks.check_products(a[:64], b[:64], 0, 0)
    assert r.mismatches == 2  # one vector, two stage settings


def test_fp32_multiplier_million():
    a, b = vectors.multiplier_vectors(1_000_000, seed=6)
    r = checks.check_fp32_mul(a, b)
    report(r)
    assert r.vectors >= 1_000_000
    assert r.ok, r.examples
