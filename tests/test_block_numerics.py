"""Block accumulation (docs/numerics.md section 3): the golden model's exact block sum
(``golden.block_sum``, ``golden.mac_blocks``) against an exact integer reference
(tests/reference.py) on 1,000,000 blocks: random codes (NaN and infinities included),
finite products of every magnitude, huge and tiny products mixed, exact cancellation to
zero, sums exactly halfway between two binary32 values (and just off it), all-negative-zero
blocks, and infinities and NaNs placed among finite products. Every format pair."""

import random

import numpy as np
import pytest
import torch
from fp8npu.hdl.formats import E4M3, E5M2
from fp8npu.sim import golden

from . import reference as ref

FORMATS = [("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e4m3"), ("e5m2", "e5m2")]
FMT = {"e4m3": E4M3, "e5m2": E5M2}
_TABLES = {}


def _tables(fa, fb):
    """Per code pair (index a * 256 + b): the exact product in 2^-32 units (object ints; 0 for
    specials) and its class: 0 finite, 1 negative zero, 2 NaN, 3 +inf, 4 -inf."""
    if (fa, fb) not in _TABLES:
        units = np.zeros(65536, dtype=object)
        cls = np.zeros(65536, dtype=np.int8)
        kinds = {"-0": 1, "nan": 2, "+inf": 3, "-inf": 4}
        for a in range(256):
            for b in range(256):
                p = ref.product_units(a, b, fa, fb)
                if isinstance(p, str):
                    cls[a * 256 + b] = kinds[p]
                else:
                    units[a * 256 + b] = p
        _TABLES[fa, fb] = units, cls
    return _TABLES[fa, fb]


def _expected(a, b, fa, fb):
    """The reference block sums of blocks ``a[n, L]``, ``b[n, L]``: uint32 bits (NaN: -1)."""
    units, cls = _tables(fa, fb)
    idx = a.astype(np.int64) * 256 + b.astype(np.int64)
    totals = units[idx].sum(axis=1)
    c = cls[idx]
    nan = (c == 2).any(1) | ((c == 3).any(1) & (c == 4).any(1))
    out = np.array([ref.round_units_fp32(int(t)) for t in totals], dtype=np.int64)
    out = np.where((c == 1).all(1), 0x80000000, out)
    out = np.where((c == 3).any(1), 0x7F800000, np.where((c == 4).any(1), 0xFF800000, out))
    return np.where(nan, -1, out)


def _check(a, b, fa, fb):
    """Golden block sums of the blocks against the reference; returns the number checked."""
    want = _expected(a, b, fa, fb)
    got = golden.block_sum(torch.from_numpy(a.T.copy()), torch.from_numpy(b.T.copy()), FMT[fa], FMT[fb])
    got = got.numpy().astype(np.int64) & 0xFFFFFFFF
    is_nan = (got & 0x7FFFFFFF) > 0x7F800000
    bad = np.flatnonzero(np.where(want == -1, ~is_nan, got != want))
    assert not len(bad), (f"{fa} x {fb}: {len(bad)} of {len(a)} blocks differ; first: a={a[bad[0]].tolist()} "
                          f"b={b[bad[0]].tolist()} got {got[bad[0]]:#x} want {want[bad[0]]:#x}")
    return len(a)


def _finite_codes(fmt):
    """The codes of finite non-zero values, in code order (magnitudes up, then negatives)."""
    if fmt not in _TABLES:
        spec = ref.E4M3 if fmt == "e4m3" else ref.E5M2
        _TABLES[fmt] = np.array([c for c in range(256) if isinstance(ref.decode(c, *spec), ref.Fraction)
                                 and ref.decode(c, *spec) != 0], dtype=np.uint8)
    return _TABLES[fmt]


def _pow2_products(fa, fb):
    """exponent e -> (code a, code b) pairs whose product is exactly +2^e."""
    units, cls = _tables(fa, fb)
    out = {}
    for i in range(65536):
        u = units[i]
        if cls[i] == 0 and u > 0 and u & (u - 1) == 0:
            out.setdefault(u.bit_length() - 1 - ref.UNITS, []).append((i >> 8, i & 255))
    return out


def _halfway(fa, fb, n, rng):
    """Blocks whose exact sum is halfway between two binary32 values (ties to even), or a
    tiny product away from it: B (a power of two), optionally one ulp of B, half an ulp, and
    optionally a tiny product below half an ulp; random signs of the whole; zero padding."""
    pow2 = _pow2_products(fa, fb)
    es = [e for e in pow2 if e - 24 in pow2]
    fillers = _finite_codes(fb).tolist()
    rows_a, rows_b = [], []
    for _ in range(n):
        e = rng.choice(es)
        terms = [e, e - 24]
        if e - 23 in pow2 and rng.random() < 0.5:
            terms.append(e - 23)                       # B + ulp: the tie rounds the other way
        tiny = [t for t in pow2 if t < e - 24]
        if tiny and rng.random() < 0.5:
            terms.append(rng.choice(tiny))             # just above the tie
        neg = rng.random() < 0.5
        pa, pb = [], []
        for t in terms:
            x, y = rng.choice(pow2[t])
            pa.append(x ^ (0x80 if neg else 0))
            pb.append(y)
        while len(pa) < 8:
            pa.append(0)
            pb.append(rng.choice(fillers))
        order = rng.sample(range(8), 8)
        rows_a.append([pa[i] for i in order])
        rows_b.append([pb[i] for i in order])
    return np.array(rows_a, dtype=np.uint8), np.array(rows_b, dtype=np.uint8)


def test_reference_rounding_matches_the_fraction_encoder():
    """The integer rounding of the reference against tests/reference.py's Fraction encoder."""
    rng = random.Random(5)
    for _ in range(20000):
        total = rng.choice([1, -1]) * rng.getrandbits(rng.randrange(1, 72))
        if total == 0:
            continue
        want = ref.encode(ref.Fraction(total, 1 << ref.UNITS), 1 if total < 0 else 0, *ref.FP32, overflow="inf")
        assert ref.round_units_fp32(total) == want, total


@pytest.mark.parametrize("fa, fb", FORMATS)
def test_block_sum_on_a_quarter_million_blocks(fa, fb):
    """250,000 blocks per format pair (1,000,000 in all), each kind of block below."""
    rng = np.random.default_rng(abs(hash((fa, fb))) % 2 ** 32)
    prng = random.Random(f"{fa}{fb}")
    finite_a, finite_b = _finite_codes(fa), _finite_codes(fb)
    counts = {}

    def run(kind, a, b):
        counts[kind] = counts.get(kind, 0) + _check(a, b, fa, fb)

    for length in (1, 2, 3, 8, 16, 32, 64, 128):
        n = 12_500
        run("random codes", rng.integers(0, 256, (n, length), dtype=np.uint8),
            rng.integers(0, 256, (n, length), dtype=np.uint8))
        n = 6_250
        run("finite", rng.choice(finite_a, (n, length)), rng.choice(finite_b, (n, length)))
    # huge and tiny: only the largest and smallest magnitudes of each format
    ext_a = np.concatenate([finite_a[:6], finite_a[-6:], finite_a[:6] | 0x80, finite_a[-6:] | 0x80])
    ext_a = np.unique(np.concatenate([ext_a, [c for c in finite_a if (c & 0x7F) in (0x01, 0x02, 0x7E, 0x7B, 0x7A)]]))
    ext_b = np.unique(np.concatenate([finite_b[:6], finite_b[-6:], finite_b[:6] ^ 0x80, finite_b[-6:] ^ 0x80]))
    for length in (2, 16, 128):
        run("huge and tiny", rng.choice(ext_a, (8_333, length)), rng.choice(ext_b, (8_333, length)))
    # exact cancellation: every product appears once with each sign, in a random order
    for length in (2, 8, 64, 128):
        half = length // 2
        n = 6_250
        a = rng.choice(finite_a, (n, half))
        b = rng.choice(finite_b, (n, half))
        a = np.concatenate([a, a ^ 0x80], axis=1)
        b = np.concatenate([b, b], axis=1)
        perm = rng.permuted(np.tile(np.arange(length), (n, 1)), axis=1)
        run("exact cancellation", np.take_along_axis(a, perm, 1), np.take_along_axis(b, perm, 1))
    run("halfway", *_halfway(fa, fb, 25_000, prng))
    # all negative zeros (and the same with one positive zero, which gives +0)
    for length in (1, 4, 32):
        n = 4_000
        a = rng.choice(np.array([0x00, 0x80], dtype=np.uint8), (n, length))
        b = rng.choice(finite_b, (n, length))
        b = np.where((a == 0x80) == (b >= 0x80), b ^ 0x80, b)     # sign of every product: -
        a[: n // 2, 0] ^= 0x80
        b[: n // 2, 0] ^= 0x80                                   # first half: still -, same magnitude
        a[n // 4: n // 2, 0] ^= 0x80                             # a quarter: one +0 product
        run("zeros", a, b)
    # infinities and NaNs among finite products
    special_a = np.array([c for c in range(256) if ref.product_units(c, 0x38, fa, "e4m3") in ("nan", "+inf", "-inf")]
                         + [0x00], dtype=np.uint8)
    for length in (1, 8, 128):
        n = 7_000
        a = rng.choice(finite_a, (n, length))
        b = rng.choice(finite_b, (n, length))
        places = rng.integers(0, length, (n, 3))
        for j in range(3):
            chosen = rng.random(n) < 0.7
            a[np.arange(n)[chosen], places[chosen, j]] = rng.choice(special_a, chosen.sum())
        if fb == "e5m2":   # infinities on the other side too, against zeros
            b[np.arange(n), places[:, 0]] = rng.choice(np.array([0x7C, 0xFC, 0x00], dtype=np.uint8), n)
        run("inf and NaN", a, b)
    total = sum(counts.values())
    print(f"{fa} x {fb}: {total:,} blocks bit-exact (" + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")")
    assert total >= 250_000


def test_mac_blocks_adds_rounded_block_sums_in_k_order():
    """K = 300 in blocks of 128 (the last one 44): each block's exact sum rounded once, then
    added to the FP32 accumulator from +0 in K order; block boundaries at fixed positions."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (300, 20), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (300, 20), generator=gen, dtype=torch.uint8)
    a[(a & 0x7F) == 0x7F] = 0x38                                 # E4M3: no NaN, for a plain comparison
    b[(b & 0x7F) == 0x7F] = 0x38
    got = golden.mac_blocks(a, b, E4M3, E4M3, 128)
    acc = torch.zeros(20, dtype=torch.int32)
    for k0 in (0, 128, 256):
        acc = golden.add(acc, golden.block_sum(a[k0:k0 + 128], b[k0:k0 + 128], E4M3, E4M3))
    assert torch.equal(got, acc)
    # one block spanning K: the exact dot product rounded once (then +0 + it)
    exact = [ref.block_sum_fp32([ref.product_units(int(x), int(y), "e4m3", "e4m3") for x, y in zip(a[:, j], b[:, j])])
             for j in range(20)]
    whole = (golden.mac_blocks(a, b, E4M3, E4M3, 512).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert whole == [0 if e == 0x80000000 else e for e in exact]


def test_accumulation_benchmark_table():
    """`fp8npu bench accumulation` at a small size: every scheme's row, and limited-precision
    accumulation far less accurate than the exact block sums."""
    from fp8npu.compiler.bench import run_accumulation_bench
    lines = []
    assert run_accumulation_bench(echo=lines.append, k=512, outputs=8) == 0
    rows = [ln for ln in lines if "|" in ln and "scheme" not in ln]
    assert len(rows) == 10
    err = {(r.split("|")[0][:20].strip(), r.split("|")[0][20:].strip()): float(r.split("|")[1].split()[0]) for r in rows}
    for data in ("random", "outlier channels"):
        assert err[data, "H800-style: 14 bits, FP32 every 128"] > 10 * err[data, "block, acc_block 128"]
