"""docs/numerics.md: the formats table matches the code, and every worked example holds in the
golden model and in the generated RTL (Verilator)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fp8npu.hdl.formats import E4M3, E5M2, FP32, format_by_name
from fp8npu.sim import checks, golden

DOC = Path(__file__).resolve().parent.parent / "docs" / "numerics.md"


def _examples():
    text = DOC.read_text()
    body = text.split("<!-- examples:begin -->")[1].split("<!-- examples:end -->")[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0].split(), cells[1], cells[2]))
    return rows


EXAMPLES = _examples()


def _hex_list(text):
    return [int(t, 16) for t in text.split()]


def _golden(op, operands):
    kind = op[0]
    if kind == "mul":
        a, b = _hex_list(operands)
        return golden.mul(torch.tensor([a], dtype=torch.uint8), torch.tensor([b], dtype=torch.uint8),
                          op[1], op[2])[0], "fp32"
    if kind == "add":
        a, b = _hex_list(operands)
        return golden.add(torch.tensor([a], dtype=torch.int64), torch.tensor([b], dtype=torch.int64))[0], "fp32"
    if kind == "quantize":
        (x,) = _hex_list(operands)
        spec = format_by_name(op[1]).spec
        return golden.quantize(torch.tensor([x], dtype=torch.int64), spec, op[2] == "saturate")[0], spec
    if kind == "mac":
        a, b = (_hex_list(part) for part in operands.split(";"))
        return golden.mac(torch.tensor(a, dtype=torch.uint8)[:, None], torch.tensor(b, dtype=torch.uint8)[:, None],
                          op[1], op[2])[0], "fp32"
    raise AssertionError(f"unknown operation {op}")


def test_examples_present():
    kinds = {op[0] for op, _, _ in EXAMPLES}
    assert kinds == {"mul", "add", "quantize", "mac"}
    assert len(EXAMPLES) >= 30


@pytest.mark.parametrize("op, operands, result", EXAMPLES, ids=[f"{' '.join(o)} {x}" for o, x, _ in EXAMPLES])
def test_example_holds_in_golden_model(op, operands, result):
    got, kind = _golden(op, operands)
    if result == "NaN":
        nan = golden.f32_is_nan(got.reshape(1)) if kind == "fp32" else golden.fp8_is_nan(got.reshape(1), kind)
        assert bool(nan[0]), f"expected NaN, got {int(got):#x}"
    else:
        assert not bool(golden.mismatches(got.reshape(1), torch.tensor([int(result, 16)]), kind)[0]), \
            f"documented {result}, golden model gives {int(got) & 0xFFFFFFFF:#x}"


def test_examples_hold_in_rtl():
    """The same operands through the RTL give the golden model's bits (so the documented ones)."""
    mul = [(_hex_list(x), o) for o, x, _ in EXAMPLES if o[0] == "mul"]
    r = checks.check_products([v[0][0] for v in mul], [v[0][1] for v in mul],
                              [format_by_name(o[1]).value for _, o in mul],
                              [format_by_name(o[2]).value for _, o in mul])
    assert r.ok, r.examples
    add = [_hex_list(x) for o, x, _ in EXAMPLES if o[0] == "add"]
    r = checks.check_adder(np.array([v[0] for v in add], np.uint32), np.array([v[1] for v in add], np.uint32))
    assert r.ok, r.examples
    q = [(_hex_list(x)[0], o) for o, x, _ in EXAMPLES if o[0] == "quantize"]
    r = checks.check_converter(np.array([v[0] for v in q], np.uint32), [format_by_name(o[1]).value for _, o in q],
                               [int(o[2] == "saturate") for _, o in q])
    assert r.ok, r.examples
    lanes = checks.LANES
    batches = []
    for o, x, _ in EXAMPLES:
        if o[0] != "mac":
            continue
        a, b = (np.array(_hex_list(part), np.uint8) for part in x.split(";"))
        fa, fb = format_by_name(o[1]).value, format_by_name(o[2]).value
        batches.append(checks.MacBatch(np.repeat(a[:, None], lanes, 1), np.repeat(b[:, None], lanes, 1),
                                       np.full(lanes, fa), np.full(lanes, fb), np.zeros(lanes, np.uint32),
                                       np.ones(len(a), bool)))
    r = checks.check_mac(batches)
    assert r.ok, r.examples


def test_format_table_matches_code():
    text = DOC.read_text()
    for spec, row_name in ((E4M3, "E4M3"), (E5M2, "E5M2")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {row_name} |"))
        assert f"`torch.{spec.torch_dtype}`" in row
        assert f"| {spec.bias} |" in row
        assert f"(`0x{spec.max_code:02X}`)" in row
        assert f"{int(spec.max_value)}" in row
        assert f"2^{spec.emin}" in row and f"2^{spec.emin - spec.man_bits}" in row
        assert f"1.{spec.exp_bits}.{spec.man_bits}" in row
    assert f"`0x{FP32.nan_code:08X}`" in text and f"E4M3 `0x{E4M3.nan_code:02X}`" in text \
        and f"E5M2 `0x{E5M2.nan_code:02X}`" in text
    assert re.search(r"\| FP32 \| `torch.float32` \| 1\.8\.23 \| 127 \|", text)
