"""Bit-exact RTL checks of the arithmetic units against the golden model.

Each ``check_*`` function builds (or reuses) a :class:`~fp8npu.sim.harness.LaneHarness` of
the unit with every supported ``stages`` setting side by side, simulates it under Verilator
with cocotb, and compares every output bit for bit with :mod:`fp8npu.sim.golden` (NaN by
class). It returns a :class:`CheckReport`; the tests, ``fp8npu demo`` and the benchmark all
use these functions.
"""

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from fp8npu.hdl.formats import FP8_FORMATS
from fp8npu.hdl.fpadd import FP32Adder
from fp8npu.hdl.fpconv import FP32ToFP8
from fp8npu.hdl.fpmul import FP8Multiplier
from fp8npu.hdl.fpmul32 import FP32Multiplier
from fp8npu.hdl.mac import MAC

from . import golden
from .harness import LaneHarness
from .rtl import RTLModel, nbytes, pack_lanes, unpack_lanes

__all__ = ["CheckReport", "LANES", "check_products", "check_adder", "check_fp32_mul", "check_converter", "check_mac",
           "MacBatch", "model_for"]

#: Parallel unit copies per stage setting in the check harnesses.
LANES = 16

_UNITS = {
    # unit: (factory, stage settings, per-lane inputs, outputs, shared inputs)
    "mul": (FP8Multiplier, (0, 1), {"a": 8, "b": 8, "fmt_a": 1, "fmt_b": 1}, {"product": 32}, {}),
    "add": (FP32Adder, (0, 1, 2, 3, 4, 5), {"a": 32, "b": 32}, {"result": 32}, {}),
    "mul32": (FP32Multiplier, (0, 1, 2, 3, 4, 5, 6), {"a": 32, "b": 32}, {"result": 32}, {}),
    "conv": (FP32ToFP8, (0, 1, 2, 3), {"x": 32, "fmt": 1, "saturate": 1}, {"y": 8}, {}),
    "mac": (MAC, (1, 2, 3), {"a": 8, "b": 8, "fmt_a": 1, "fmt_b": 1, "acc_in": 32}, {"acc": 32},
            {"valid": 1, "first": 1}),
}


@dataclass
class CheckReport:
    """Outcome of one bulk check."""

    name: str
    vectors: int                 # distinct input vectors (per stage setting)
    stage_settings: tuple
    mismatches: int              # over all stage settings
    examples: list = field(default_factory=list)
    cycles: int = 0
    seconds: float = 0.0

    @property
    def ok(self):
        return self.mismatches == 0

    @property
    def checked(self):
        """Output values compared (vectors x stage settings)."""
        return self.vectors * len(self.stage_settings)

    def summary(self):
        rate = self.checked / self.seconds if self.seconds else 0.0
        cps = self.cycles / self.seconds if self.seconds else 0.0
        stages = ",".join(str(s) for s in self.stage_settings)
        return (f"{self.name}: {self.vectors:,} vectors x stages {{{stages}}} = {self.checked:,} checked, "
                f"{self.mismatches} mismatches; RTL {cps:,.0f} cycles/s, {rate:,.0f} results/s")


@functools.cache
def model_for(unit, lanes=LANES):
    """The Verilator model of a unit's check harness (built once per process, cached on disk)."""
    factory, variants, inputs, outputs, shared = _UNITS[unit]
    harness = LaneHarness(factory, variants, lanes, inputs, outputs, shared)
    return RTLModel(harness, f"check_{unit}_x{lanes}")


def _i32(u32):
    return torch.from_numpy(np.ascontiguousarray(u32, dtype=np.uint32).view(np.int32))


def _rows(values, lanes):
    """1-D vectors -> [cycles, lanes] (zero-padded); 2-D arrays pass through."""
    values = np.asarray(values)
    if values.ndim == 2:
        return values
    pad = (-len(values)) % lanes
    return np.concatenate([values, np.zeros(pad, dtype=values.dtype)]).reshape(-1, lanes)


def _run(unit, lane_inputs, shared_inputs=None, lanes=LANES):
    """Stream inputs through a unit's harness; return ({(output, stages): [cycles, lanes]}, result)."""
    _, variants, in_widths, out_widths, shared_widths = _UNITS[unit]
    model = model_for(unit, lanes)
    rows = {name: pack_lanes(_rows(lane_inputs[name], lanes), w) for name, w in in_widths.items()}
    cycles = len(next(iter(rows.values())))
    for name, w in shared_widths.items():
        rows[name] = pack_lanes(np.asarray(shared_inputs[name]), w)
    outs = {f"{o}_{v}": nbytes(w, lanes) for o, w in out_widths.items() for v in variants}
    result = model.stream(rows, outs, drain=max(variants) + 2)
    aligned = {}
    for o, w in out_widths.items():
        for v in variants:
            lat = max(v, 1)
            aligned[(o, v)] = unpack_lanes(result.outputs[f"{o}_{v}"][lat:lat + cycles], w, lanes)
    return aligned, result, variants


def _compare(name, got_by_variant, want, kind, n, describe, result, variants, limit=5):
    mismatches, examples = 0, []
    for v in variants:
        got = got_by_variant[v].reshape(-1)[:n]
        bad = golden.mismatches(torch.from_numpy(got.astype(np.int64)), want, kind).numpy()
        mismatches += int(bad.sum())
        digits, mask = (8, 0xFFFFFFFF) if kind == "fp32" else (2, 0xFF)
        for i in np.flatnonzero(bad)[:max(0, limit - len(examples))]:
            examples.append(f"stages={v} {describe(i)}: got 0x{int(got[i]):0{digits}x}, "
                            f"want 0x{int(want[i]) & mask:0{digits}x}")
    return CheckReport(name, n, variants, mismatches, examples, result.cycles, result.seconds)


def check_products(a, b, fmt_a, fmt_b, name="products", lanes=LANES):
    """FP8 x FP8 -> FP32 for every (a[i], b[i]) with per-vector formats (0 = E4M3, 1 = E5M2)."""
    a, b = np.asarray(a, np.uint8), np.asarray(b, np.uint8)
    fmt_a = np.broadcast_to(np.asarray(fmt_a, np.uint8), a.shape)
    fmt_b = np.broadcast_to(np.asarray(fmt_b, np.uint8), a.shape)
    got, result, variants = _run("mul", {"a": a, "b": b, "fmt_a": fmt_a, "fmt_b": fmt_b}, lanes=lanes)
    want = golden.mul(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(fmt_a.copy()),
                      torch.from_numpy(fmt_b.copy()))

    def describe(i):
        return (f"a=0x{a[i]:02x}({FP8_FORMATS[fmt_a[i]].name}) "
                f"b=0x{b[i]:02x}({FP8_FORMATS[fmt_b[i]].name})")

    return _compare(name, {v: got[("product", v)] for v in variants}, want, "fp32", len(a), describe,
                    result, variants)


def check_adder(a, b, name="fp32 adder", lanes=LANES):
    """binary32 a[i] + b[i]."""
    a, b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
    got, result, variants = _run("add", {"a": a, "b": b}, lanes=lanes)
    want = golden.add(_i32(a), _i32(b))
    return _compare(name, {v: got[("result", v)] for v in variants}, want, "fp32", len(a),
                    lambda i: f"0x{a[i]:08x} + 0x{b[i]:08x}", result, variants)


def check_fp32_mul(a, b, name="fp32 multiplier", lanes=LANES):
    """binary32 a[i] * b[i]."""
    a, b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
    got, result, variants = _run("mul32", {"a": a, "b": b}, lanes=lanes)
    want = golden.mul_f32(_i32(a), _i32(b))
    return _compare(name, {v: got[("result", v)] for v in variants}, want, "fp32", len(a),
                    lambda i: f"0x{a[i]:08x} * 0x{b[i]:08x}", result, variants)


def check_converter(x, fmt, saturate, name="fp32->fp8 converter", lanes=LANES):
    """FP32 -> FP8 of x[i] with per-vector format and saturation flag."""
    x = np.asarray(x, np.uint32)
    fmt = np.broadcast_to(np.asarray(fmt, np.uint8), x.shape).copy()
    saturate = np.broadcast_to(np.asarray(saturate, np.uint8), x.shape).copy()
    got, result, variants = _run("conv", {"x": x, "fmt": fmt, "saturate": saturate}, lanes=lanes)
    xt = _i32(x)
    want = torch.zeros(len(x), dtype=torch.uint8)
    for f in (0, 1):
        for s in (0, 1):
            sel = torch.from_numpy((fmt == f) & (saturate == s))
            want = torch.where(sel, golden.quantize(xt, FP8_FORMATS[f], saturate=bool(s)), want)
    # NaN classes differ per format: compare each format separately.
    mismatches, examples = 0, []
    for f in (0, 1):
        idx = np.flatnonzero(fmt == f)
        if len(idx) == 0:
            continue
        rep = _compare(name, {v: got[("y", v)].reshape(-1)[idx] for v in variants}, want[idx],
                       FP8_FORMATS[f], len(idx),
                       lambda i, idx=idx, f=f: (f"x=0x{x[idx[i]]:08x} to {FP8_FORMATS[f].name} "
                                                f"saturate={saturate[idx[i]]}"), result, variants)
        mismatches += rep.mismatches
        examples += rep.examples
    return CheckReport(name, len(x), variants, mismatches, examples[:5], result.cycles, result.seconds)


@dataclass
class MacBatch:
    """One set of ``lanes`` accumulation chains run side by side on the MAC harness.

    ``a``, ``b``: ``[K, lanes]`` codes; ``fmt_a``, ``fmt_b``: ``[lanes]`` formats;
    ``acc0``: ``[lanes]`` starting accumulators (uint32 bits); ``valid``: ``[K]`` flags
    (the first row must be valid: it starts the chains).
    """

    a: np.ndarray
    b: np.ndarray
    fmt_a: np.ndarray
    fmt_b: np.ndarray
    acc0: np.ndarray
    valid: np.ndarray
    label: str = ""


def check_mac(batches, name="MAC chains", lanes=LANES):
    """Run MAC chains and compare the accumulator after *every* step with the golden loop."""
    rows = {k: [] for k in ("a", "b", "fmt_a", "fmt_b", "acc_in")}
    valid, first, wants = [], [], []
    for batch in batches:
        k = len(batch.a)
        rows["a"].append(batch.a)
        rows["b"].append(batch.b)
        rows["fmt_a"].append(np.broadcast_to(batch.fmt_a, (k, lanes)))
        rows["fmt_b"].append(np.broadcast_to(batch.fmt_b, (k, lanes)))
        rows["acc_in"].append(np.broadcast_to(batch.acc0, (k, lanes)))
        v = np.asarray(batch.valid, bool).copy()
        if not v[0]:
            raise ValueError("a MAC batch must start with a valid row")
        f = np.zeros(k, bool)
        f[0] = True
        valid.append(v)
        first.append(f)
        wants.append(golden.mac(torch.from_numpy(batch.a), torch.from_numpy(batch.b),
                                torch.from_numpy(np.asarray(batch.fmt_a, np.uint8)),
                                torch.from_numpy(np.asarray(batch.fmt_b, np.uint8)),
                                acc=_i32(batch.acc0), valid=v, first=f, trace=True))
    lane_inputs = {k: np.concatenate(v).astype(np.uint32 if k == "acc_in" else np.uint8) for k, v in rows.items()}
    shared = {"valid": np.concatenate(valid).astype(np.uint8), "first": np.concatenate(first).astype(np.uint8)}
    got, result, variants = _run("mac", lane_inputs, shared, lanes=lanes)
    want = torch.cat(wants).reshape(-1)
    n = want.numel()

    def describe(i):
        step, lane = divmod(int(i), lanes)
        return f"step {step} lane {lane}"

    return _compare(name, {v: got[("acc", v)] for v in variants}, want, "fp32", n, describe, result, variants)
