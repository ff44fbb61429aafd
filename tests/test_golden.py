"""The golden model against an independent exact reference (tests/reference.py) and against
the rules of docs/numerics.md that are easy to state directly."""

import numpy as np
import pytest
import torch
from fp8npu.hdl.formats import E4M3, E5M2, Format
from fp8npu.sim import golden, vectors

from . import reference as ref


@pytest.mark.parametrize("spec, params", [(E4M3, ref.E4M3), (E5M2, ref.E5M2)])
def test_decode_every_code(spec, params):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = golden.decode_fp8(codes, spec)
    for c in range(256):
        want = ref.decode(c, *params)
        if want is None:
            assert torch.isnan(got[c]) and bool(golden.fp8_is_nan(codes[c:c + 1], spec)[0])
        else:
            assert float(got[c]) == float(want), hex(c)
            if want == 0:
                assert bool(torch.signbit(got[c])) == bool(c & 0x80)


def test_quantize_matches_exact_reference():
    xs = vectors.converter_inputs(0)            # every boundary of both formats, both signs
    rng = np.random.default_rng(9)
    xs = np.concatenate([xs, rng.integers(0, 2**32, 3000, dtype=np.uint32)])
    xt = torch.from_numpy(xs.view(np.int32))
    checked = 0
    for spec in (E4M3, E5M2):
        for sat in (True, False):
            got = golden.quantize(xt, spec, saturate=sat).numpy()
            for i, x in enumerate(xs):
                want = ref.quantize(int(x), spec.name, sat)
                g = int(got[i])
                if spec.is_nan_code(want):
                    assert spec.is_nan_code(g), (hex(x), spec.name, sat, hex(g))
                else:
                    assert g == want, (hex(x), spec.name, sat, hex(g), hex(want))
                checked += 1
    print(f"quantize: {checked} conversions checked against the exact reference")
    assert checked > 20000


def test_add_matches_exact_reference():
    a, b = vectors.adder_vectors(12000, seed=11)
    got = golden.add(torch.from_numpy(a.view(np.int32)), torch.from_numpy(b.view(np.int32))).numpy().view(np.uint32)
    for i in range(len(a)):
        want = ref.add_fp32(int(a[i]), int(b[i]))
        if want is None:
            assert (int(got[i]) & 0x7FFFFFFF) > 0x7F800000, (hex(a[i]), hex(b[i]))
        else:
            assert int(got[i]) == want, (hex(a[i]), hex(b[i]), hex(got[i]), hex(want))
    print(f"add: {len(a)} additions checked against the exact reference")


def test_products_exact():
    a, b = vectors.all_fp8_pairs()
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    for fa, pa in ((Format.E4M3, ref.E4M3), (Format.E5M2, ref.E5M2)):
        for fb, pb in ((Format.E4M3, ref.E4M3), (Format.E5M2, ref.E5M2)):
            got = golden.mul(at, bt, fa, fb).numpy().view(np.uint32)
            # spot-check exactness against fractions on a stride of all pairs
            for i in range(0, 65536, 97):
                x, y = ref.decode(int(a[i]), *pa), ref.decode(int(b[i]), *pb)
                g = int(got[i])
                if x is None or y is None or (isinstance(x, float) and y == 0) or (isinstance(y, float) and x == 0):
                    assert (g & 0x7FFFFFFF) > 0x7F800000
                    continue
                sign = ((int(a[i]) ^ int(b[i])) >> 7) & 1
                if isinstance(x, float) or isinstance(y, float):
                    assert g == (sign << 31 | 0x7F800000)
                    continue
                p = x * y
                assert ref.decode(g, *ref.FP32) == p                      # exact, no rounding
                assert g >> 31 == sign                                     # sign, zeros included


def test_mac_is_sequential_fp32():
    """The golden MAC adds in k order with one binary32 rounding per step (a numpy float32 loop)."""
    rng = np.random.default_rng(3)
    a, b, _ = vectors.mac_chains("normal", 512, 8, 0, 0, seed=1)
    got = golden.mac(torch.from_numpy(a), torch.from_numpy(b), 0, 0).numpy().view(np.float32)
    pa = golden.decode_fp8(torch.from_numpy(a), 0).numpy()
    pb = golden.decode_fp8(torch.from_numpy(b), 0).numpy()
    acc = np.zeros(8, np.float32)
    for k in range(512):
        acc = (acc + pa[k] * pb[k]).astype(np.float32)
    assert np.array_equal(acc.view(np.uint32), got.view(np.uint32))
    # and torch.sum is a different (blocked) order: it must not be what the golden model does
    x = torch.from_numpy(rng.standard_normal((4096, 64)).astype(np.float32))
    loop = torch.zeros(64)
    for k in range(4096):
        loop = loop + x[k]
    assert not torch.equal(loop, x.sum(0))


def test_mismatches_compares_nan_by_class_and_zero_by_sign():
    got = torch.tensor([0x7FC00000, 0x7F800001, 0x00000000, 0x80000000, 0x3F800000], dtype=torch.int64)
    want = torch.tensor([0xFFC00001, 0x7FC00000, 0x80000000, 0x80000000, 0x3F800001], dtype=torch.int64)
    assert golden.mismatches(got, want, "fp32").tolist() == [False, False, True, False, True]
    assert golden.mismatches(torch.tensor([0x7F, 0xFF, 0x7E]), torch.tensor([0xFF, 0x7F, 0x7F]), E4M3).tolist() \
        == [False, False, True]
    assert golden.mismatches(torch.tensor([0x7D, 0x7C]), torch.tensor([0xFE, 0x7D]), E5M2).tolist() == [False, True]


def test_golden_rejects_unknown_format():
    with pytest.raises(ValueError, match=r"^format must be one of e4m3, e5m2, not 'e3m4'$"):
        golden.decode_fp8(torch.zeros(1, dtype=torch.uint8), "e3m4")


def test_environment_has_subnormals():
    golden.check_environment()
    assert float(golden.bits_to_f32(torch.tensor([1], dtype=torch.int32))[0]) == 2.0**-149
