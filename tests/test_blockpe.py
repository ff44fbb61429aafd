"""The block-accumulation processing element (hdl/blockpe.py) in the Amaranth simulator: the
decoder against the golden FP8 decode on every code, and a column of PEs summing exact
products against the golden model's exact block partial (golden.block_partial); for the
E4M3-only build and for the build with both formats (products in LUTs, units of 2^-32,
infinities)."""

import pytest
import torch
from amaranth.hdl import Module
from amaranth.sim import Simulator
from fp8npu.hdl.blockpe import (
    MAG_BITS,
    PRODUCTS,
    BlockPE,
    BlockRound,
    FP8Decode,
    block_numbers,
    column_width,
    decoded_fields,
)
from fp8npu.hdl.formats import E4M3, E5M2
from fp8npu.sim import golden


def test_decoder_on_every_code():
    dut = FP8Decode()
    got = []

    async def bench(ctx):
        for code in range(256):
            ctx.set(dut.code, code)
            await ctx.delay(1e-6)
            got.append((ctx.get(dut.sign), ctx.get(dut.mag), ctx.get(dut.nan), ctx.get(dut.man), ctx.get(dut.exp)))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    values = golden.decode_fp8(torch.arange(256, dtype=torch.int64).to(torch.uint8), E4M3).to(torch.float64)
    for code, (sign, mag, nan, man, exp) in enumerate(got):
        v = float(values[code])
        assert nan == (v != v), code
        assert mag == man << exp and man < 16 and exp <= 14 and (man >= 8 or exp == 0), code
        if v == v:
            assert sign == code >> 7 and mag == abs(v) * 2 ** 9 and mag < 1 << MAG_BITS, code


def _column(rows, product, formats=("e4m3",), fa=0, fw=0):
    """R PEs of ``product`` in a column with a decoder per weight and per activation (formats
    ``fw`` and ``fa``) and BlockRound below: (module, pes, weight decoders, activation
    decoders, rounder)."""
    nums = block_numbers(formats)
    width = column_width(rows, formats)
    m = Module()
    pes = [BlockPE(width, product, formats) for _ in range(rows)]
    decs_w = [FP8Decode(formats) for _ in range(rows)]
    decs_a = [FP8Decode(formats) for _ in range(rows)]
    for i, (pe, dw, da) in enumerate(zip(pes, decs_w, decs_a)):
        m.submodules[f"pe{i}"], m.submodules[f"dw{i}"], m.submodules[f"da{i}"] = pe, dw, da
        m.d.comb += [dw.fmt.eq(fw), da.fmt.eq(fa)]
        for name, _ in decoded_fields(product, formats):
            m.d.comb += [getattr(pe, f"w_{name}").eq(getattr(dw, name)), getattr(pe, f"a_{name}").eq(getattr(da, name))]
        if i:
            m.d.comb += [pe.psum_in.eq(pes[i - 1].psum_out), pe.negs_in.eq(pes[i - 1].negs_out)]
            m.d.comb += [getattr(pe, f"{f}_in").eq(getattr(pes[i - 1], f"{f}_out")) for f in pe.flags]
        else:
            m.d.comb += pe.neg_zero_in.eq(1)
    m.submodules.round = rnd = BlockRound(width + 1, 0, nums.frac, nums.e5m2)
    m.d.comb += rnd.total.eq(pes[-1].psum_out + pes[-1].negs_out)
    m.d.comb += [getattr(rnd, f).eq(getattr(pes[-1], f"{f}_out")) for f in pes[-1].flags]
    return m, pes, decs_w, decs_a, rnd


def _run_column(column, w, a, sample):
    """Load the weight codes ``w`` into ``column`` (from :func:`_column`), stream the
    activation rows ``a`` skewed one cycle per row (row i sees activation t at cycle t + i) and
    return ``sample(ctx)`` for each activation row as its sum leaves the bottom PE."""
    m, pes, decs_w, decs_a, _ = column
    rows, n = len(pes), len(a)
    got = []

    async def bench(ctx):
        for i in range(rows):
            ctx.set(decs_w[i].code, int(w[i]))
            ctx.set(pes[i].w_load, 1)
        await ctx.tick()
        for i in range(rows):
            ctx.set(pes[i].w_load, 0)
        for t in range(n + rows + BlockPE.LATENCY):
            for i in range(rows):
                s = t - i
                ctx.set(pes[i].a_valid, int(0 <= s < n))
                ctx.set(decs_a[i].code, int(a[s, i]) if 0 <= s < n else 0)
            await ctx.tick()
            if 0 <= t - (rows - 1) - (BlockPE.LATENCY - 1) < n:
                got.append(sample(ctx))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return got


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_column_of_pes_sums_exactly(product):
    """R PEs in a column, weights loaded, activations skewed one cycle per row, BlockRound
    below: the column's sum is the exact sum of the R products (NaN when one is NaN) and its
    rounding golden.block_round's bits (-0 when every product is -0), for 400 rows of random
    E4M3 codes, NaNs and zeros of both signs included, every magnitude; products on a
    multiplier and in LUTs."""
    rows, n = 8, 400
    column = _column(rows, product)
    pes, rnd = column[1], column[4]
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(0, 256, (rows,), generator=gen, dtype=torch.uint8)
    w[:3] = torch.tensor([0x00, 0x80, 0x41], dtype=torch.uint8)         # zeros of both signs
    a = torch.randint(0, 256, (n, rows), generator=gen, dtype=torch.uint8)
    a[:100, 2:] = 0x00                                                   # rows of zero products
    a[:50] = torch.where(w >= 0x80, 0x00, 0x80).to(torch.uint8)         # zeros signed against w: all -0
    got = _run_column(column, w, a, lambda ctx: (ctx.get(pes[-1].psum_out) + ctx.get(pes[-1].negs_out),
                                                 ctx.get(pes[-1].nan_out), ctx.get(rnd.result)))
    part = golden.block_partial(a.T, w.unsqueeze(1).expand(rows, n), E4M3, E4M3)
    exact = (part["hi"] * (1 << 32) + part["lo"]).tolist()             # units of 2^-32
    rounded = (golden.block_round(part).to(torch.int64) & 0xFFFFFFFF).tolist()
    for s, (psum, nan, result) in enumerate(got):
        assert nan == bool(part["nan"][s]), s
        if not nan:
            assert psum * (1 << 14) == exact[s], (s, psum, exact[s])    # PE units are 2^-18
        assert result == rounded[s], (s, hex(result), hex(rounded[s]))   # the column's rounded block sum
    assert len(got) == n
    assert sum(r == 0x80000000 for r in rounded) > 10 and sum(r == 0 for r in rounded) > 10


def test_block_round_against_the_golden_rounding():
    """BlockRound (combinational, and with 1 to 4 pipeline stages) on exact sums of every size: sums of random E4M3 blocks (NaN, zeros and
    cancellation included) and crafted integers (ties, just off ties, carries into the next
    binade, single units), against golden.block_round bit for bit."""
    width = 48
    gen = torch.Generator().manual_seed(12)
    totals, nans, negzeros, want = [], [], [], []
    # sums of real blocks of up to 128 products
    for length in (1, 2, 16, 128):
        a = torch.randint(0, 256, (length, 300), generator=gen, dtype=torch.uint8)
        b = torch.randint(0, 256, (length, 300), generator=gen, dtype=torch.uint8)
        b[:, :40] = 0x80                                      # -0 products where a is positive
        a[:, :40] &= 0x7F
        a[:, 40:60] = a[:, 40:60] ^ 0x80 * (torch.arange(length) % 2 == 1).to(torch.uint8)[:, None]
        part = golden.block_partial(a, b, E4M3, E4M3)
        exact = part["hi"] * (1 << 32) + part["lo"]           # units of 2^-32
        totals += (exact >> 14).tolist()                      # E4M3 products: multiples of 2^-18
        nans += part["nan"].tolist()
        negzeros += part["neg_zero"].tolist()
        want += golden.block_round(part).tolist()
    # crafted: ties at every binade, one unit off, all-ones carries, single units
    crafted = []
    for top in range(25, 47):
        base = 1 << top
        half = 1 << (top - 24)
        crafted += [base + half, base + 3 * half, base + half + 1, base + half - 1, (1 << (top + 1)) - 1]
    crafted += [1, 2, 3, (1 << 24) - 1, 1 << 24, (1 << 24) + 1]
    crafted += [-c for c in crafted]
    for c in crafted:
        v = torch.tensor([c << 14], dtype=torch.int64)        # back to units of 2^-32
        state = {"hi": v >> 32, "lo": v & 0xFFFFFFFF, "nan": torch.tensor([False]),
                 "pos_inf": torch.tensor([False]), "neg_inf": torch.tensor([False]),
                 "neg_zero": torch.tensor([False])}
        totals.append(c)
        nans.append(False)
        negzeros.append(False)
        want += golden.block_round(state).tolist()
    for stages in (0, 1, 2, 3, 4):
        dut = BlockRound(width, stages)
        got = []

        async def bench(ctx, dut=dut, got=got, stages=stages):
            lag = max(stages - 1, 0)        # after the tick that ends cycle i, result holds input i - lag
            for i in range(len(totals) + lag):
                if i < len(totals):
                    ctx.set(dut.total, int(totals[i]))
                    ctx.set(dut.nan, int(nans[i]))
                    ctx.set(dut.neg_zero, int(negzeros[i]))
                if stages:
                    await ctx.tick()
                else:
                    await ctx.delay(1e-6)
                if i >= lag:
                    got.append(ctx.get(dut.result))

        sim = Simulator(dut)
        if stages:
            sim.add_clock(1e-6)
        sim.add_testbench(bench)
        sim.run()
        bad = [(t, hex(g), hex(w & 0xFFFFFFFF)) for t, g, w in zip(totals, got, want) if g != w & 0xFFFFFFFF]
        assert not bad, (stages, bad[:5])
        assert len(got) == len(totals) > 1300


@pytest.mark.parametrize("stages", (3, 2, 1))
@pytest.mark.parametrize("product", PRODUCTS)
def test_pe_product_on_every_pair_of_codes(product, stages):
    """One PE on all 65,536 (weight, activation) E4M3 code pairs: psum_out + negs_out is the
    exact product in units of 2^-18 (golden.block_partial), the NaN flag and the negative-zero
    flag as the golden model says; a PE above it feeds a fixed partial sum that must come
    through. For each PE latency (``pe_stages``)."""
    width = column_width(16)
    m = Module()
    m.submodules.pe = pe = BlockPE(width, product, stages=stages)
    m.submodules.dw = dw = FP8Decode()
    m.submodules.da = da = FP8Decode()
    for name, _ in decoded_fields(product):
        m.d.comb += [getattr(pe, f"w_{name}").eq(getattr(dw, name)), getattr(pe, f"a_{name}").eq(getattr(da, name))]
    m.d.comb += [pe.neg_zero_in.eq(1), pe.psum_in.eq(-12345), pe.a_valid.eq(1)]
    got = []

    async def bench(ctx):
        for w in range(256):
            ctx.set(dw.code, w)
            ctx.set(pe.w_load, 1)
            await ctx.tick()
            ctx.set(pe.w_load, 0)
            for a in range(256 + pe.latency - 1):
                ctx.set(da.code, a & 0xFF)
                await ctx.tick()
                if a >= pe.latency - 1:
                    got.append((ctx.get(pe.psum_out) + ctx.get(pe.negs_out) + 12345, ctx.get(pe.nan_out),
                                ctx.get(pe.neg_zero_out)))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    w = codes.repeat_interleave(256).unsqueeze(0)
    a = codes.repeat(256).unsqueeze(0)
    part = golden.block_partial(a, w, E4M3, E4M3)
    exact = ((part["hi"] * (1 << 32) + part["lo"]) >> 14).tolist()    # units of 2^-18
    assert len(got) == 65536
    for i, (psum, nan, neg_zero) in enumerate(got):
        assert nan == bool(part["nan"][i]), i
        if not nan:
            assert psum == exact[i], (i >> 8, i & 0xFF, psum, exact[i])
            assert neg_zero == bool(part["neg_zero"][i]), i


# ---- the build with both formats (E5M2 enabled) --------------------------------------------------
BOTH = ("e4m3", "e5m2")
FORMATS = {0: E4M3, 1: E5M2}


def _exact32(part):
    """A golden partial's exact sum in units of 2^-32 (Python integers: E5M2 products reach 2^63.1)."""
    return [hi * (1 << 32) + lo for hi, lo in zip(part["hi"].tolist(), part["lo"].tolist())]


def test_decoder_on_every_code_of_both_formats():
    """The decoder of the build with both formats, every code of E4M3 (fmt 0) and E5M2
    (fmt 1): ``man << exp`` is the magnitude in units of 2^-16, and the sign, zero, NaN and
    infinity flags are the golden decode's (an E5M2 infinity or NaN has magnitude 0)."""
    dut = FP8Decode(BOTH)
    got = {}

    async def bench(ctx):
        for fmt in (0, 1):
            ctx.set(dut.fmt, fmt)
            for code in range(256):
                ctx.set(dut.code, code)
                await ctx.delay(1e-6)
                got[fmt, code] = tuple(ctx.get(getattr(dut, f)) for f in ("sign", "man", "exp", "nan", "zero", "inf"))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    assert len(got) == 512
    for fmt, form in FORMATS.items():
        values = golden.decode_fp8(torch.arange(256, dtype=torch.int64).to(torch.uint8), form).to(torch.float64)
        for code in range(256):
            sign, man, exp, nan, zero, inf = got[fmt, code]
            v = float(values[code])
            assert nan == (v != v) and inf == (abs(v) == float("inf")) and zero == (v == 0), (fmt, code)
            assert sign == code >> 7 and man < 16 and exp <= 29, (fmt, code)
            if v == v and abs(v) != float("inf"):
                assert man << exp == abs(v) * 2 ** 16, (fmt, code, man, exp)
            else:
                assert man << exp == 0 or fmt == 0, (fmt, code)


def test_dsp_products_take_e4m3_only():
    with pytest.raises(ValueError, match="LUTs"):
        decoded_fields("dsp", BOTH)
    assert block_numbers(BOTH).frac == 32 and block_numbers().frac == 18


def test_pe_of_both_formats_on_every_pair_of_codes():
    """One PE of the two-format build on all 65,536 (weight, activation) code pairs of each of
    the four format pairs (262,144 products): psum_out + negs_out is the exact product in
    units of 2^-32 (golden.block_partial), and the NaN (inf x 0 included), -0 and +inf/-inf
    flags are the golden model's."""
    width = column_width(16, BOTH)
    m = Module()
    m.submodules.pe = pe = BlockPE(width, "lut", BOTH)
    m.submodules.dw = dw = FP8Decode(BOTH)
    m.submodules.da = da = FP8Decode(BOTH)
    for name, _ in decoded_fields("lut", BOTH):
        m.d.comb += [getattr(pe, f"w_{name}").eq(getattr(dw, name)), getattr(pe, f"a_{name}").eq(getattr(da, name))]
    m.d.comb += [pe.neg_zero_in.eq(1), pe.psum_in.eq(-12345), pe.a_valid.eq(1)]
    got = {}

    async def bench(ctx):
        for fw in (0, 1):
            for fa in (0, 1):
                ctx.set(dw.fmt, fw)
                ctx.set(da.fmt, fa)
                out = got[fw, fa] = []
                for w in range(256):
                    ctx.set(dw.code, w)
                    ctx.set(pe.w_load, 1)
                    await ctx.tick()
                    ctx.set(pe.w_load, 0)
                    for a in range(256 + BlockPE.LATENCY - 1):
                        ctx.set(da.code, a & 0xFF)
                        await ctx.tick()
                        if a >= BlockPE.LATENCY - 1:
                            out.append((ctx.get(pe.psum_out) + ctx.get(pe.negs_out) + 12345,
                                        *(ctx.get(getattr(pe, f"{f}_out")) for f in ("nan", "neg_zero", "pos_inf",
                                                                                      "neg_inf"))))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    w = codes.repeat_interleave(256).unsqueeze(0)
    a = codes.repeat(256).unsqueeze(0)
    checked = infinite = 0
    for (fw, fa), out in got.items():
        part = golden.block_partial(a, w, FORMATS[fa], FORMATS[fw])
        exact = _exact32(part)
        assert len(out) == 65536
        for i, (psum, nan, neg_zero, pos_inf, neg_inf) in enumerate(out):
            assert nan == bool(part["nan"][i]), (fw, fa, i >> 8, i & 0xFF)
            if not nan:
                assert (pos_inf, neg_inf) == (bool(part["pos_inf"][i]), bool(part["neg_inf"][i])), (fw, fa, i)
                infinite += pos_inf | neg_inf
                if not (pos_inf or neg_inf):
                    assert psum == exact[i], (fw, fa, i >> 8, i & 0xFF, psum, exact[i])
                    assert neg_zero == bool(part["neg_zero"][i]), (fw, fa, i)
            checked += 1
    assert checked == 4 * 65536 and infinite > 1000


def _e5m2_spread(gen, shape):
    """Codes of both formats' extremes: E5M2 57344, 49152 and subnormals, infinities now and then."""
    big = torch.tensor([0x7B, 0x7A, 0x79, 0x78], dtype=torch.uint8)
    tiny = torch.tensor([0x01, 0x02, 0x03, 0x04], dtype=torch.uint8)
    pick = torch.randint(0, 4, shape, generator=gen)
    c = torch.where(torch.rand(shape, generator=gen) < 0.5, big[pick], tiny[pick])
    return c | (torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7)


@pytest.mark.parametrize("fmts", [(1, 1), (1, 0)], ids=["e5m2 x e5m2", "e5m2 x e4m3"])
def test_a_column_of_both_format_pes_rounds_like_the_golden_model(fmts):
    """R PEs of the two-format build in a column, BlockRound (units of 2^-32, infinities)
    below: 400 rows of E5M2 activations (random codes with infinities and NaNs, zeros of both
    signs, the widest exponent spread) against E5M2 or E4M3 weights give golden.block_round's
    bits."""
    rows, n = 8, 400
    fa, fw = fmts
    column = _column(rows, "lut", BOTH, fa, fw)
    rnd = column[4]
    gen = torch.Generator().manual_seed(13)
    # weights: zeros of both signs and a small normal, then finite codes at the extremes
    w_codes = torch.randint(0, 0x7F, (rows,), generator=gen, dtype=torch.uint8)   # E4M3: no NaN below 0x7F
    if fw == 1:
        w_codes = _e5m2_spread(gen, (rows,))
    w_codes[:3] = torch.tensor([0x00, 0x80, 0x41], dtype=torch.uint8)
    a = torch.randint(0, 256, (n, rows), generator=gen, dtype=torch.uint8)
    a[100:250] = _e5m2_spread(gen, (150, rows))
    a[:100, 2:] = 0x00
    a[:50] = torch.where(w_codes >= 0x80, 0x00, 0x80).to(torch.uint8)     # zeros signed against w: all -0
    a[60:70, 3], a[70:80, 4] = 0x7C, 0xFC                                 # infinities in finite rows
    got = _run_column(column, w_codes, a, lambda ctx: ctx.get(rnd.result))
    part = golden.block_partial(a.T, w_codes.unsqueeze(1).expand(rows, n), FORMATS[fa], FORMATS[fw])
    rounded = (golden.block_round(part).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert len(got) == n
    bad = [(s, hex(g), hex(r)) for s, (g, r) in enumerate(zip(got, rounded)) if g != r]
    assert not bad, bad[:5]
    assert {0x7FC00000, 0x80000000, 0, 0x7F800000, 0xFF800000}.issubset(set(rounded))
    assert sum(r & 0x7F800000 != 0x7F800000 for r in rounded) > 250           # most rows finite


def test_block_round_of_both_formats_against_the_golden_rounding():
    """BlockRound in units of 2^-32 with infinity flags (0 and 4 stages) on the exact sums of
    random E5M2 and mixed blocks of up to 128 products (up to 2^71) and crafted ties, against
    golden.block_round bit for bit."""
    nums = block_numbers(BOTH)
    width = 73
    gen = torch.Generator().manual_seed(14)
    states = []
    for length in (1, 2, 16, 128):
        for fa, fb in ((E5M2, E5M2), (E4M3, E5M2)):
            a = torch.randint(0, 256, (length, 300), generator=gen, dtype=torch.uint8)
            b = torch.randint(0, 256, (length, 300), generator=gen, dtype=torch.uint8)
            a[:, 100:200] = _e5m2_spread(gen, (length, 100))
            b[:, 100:200] = _e5m2_spread(gen, (length, 100)) if fb is E5M2 else 0x7E
            states.append(golden.block_partial(a, b, fa, fb))
    totals, want, flags = [], [], []
    for part in states:
        totals += _exact32(part)
        want += golden.block_round(part).tolist()
        flags += zip(*(part[f].tolist() for f in ("nan", "neg_zero", "pos_inf", "neg_inf")))
    for top in range(25, 71, 3):                     # ties and one unit off at many binades
        base, half = 1 << top, 1 << (top - 24)
        for c in (base + half, base + 3 * half, base + half + 1, base + half - 1, -(base + half)):
            state = {"hi": torch.tensor([c >> 32]), "lo": torch.tensor([c & 0xFFFFFFFF])}
            state.update({f: torch.tensor([False]) for f in ("nan", "neg_zero", "pos_inf", "neg_inf")})
            totals.append(c)
            want += golden.block_round(state).tolist()
            flags.append((False, False, False, False))
    assert max(abs(t) for t in totals) > 1 << 64
    for stages in (0, 4):
        dut = BlockRound(width, stages, nums.frac, infinities=True)
        got = []

        async def bench(ctx, dut=dut, got=got, stages=stages):
            lag = max(stages - 1, 0)
            for i in range(len(totals) + lag):
                if i < len(totals):
                    ctx.set(dut.total, int(totals[i]))
                    for f, value in zip(("nan", "neg_zero", "pos_inf", "neg_inf"), flags[i]):
                        ctx.set(getattr(dut, f), int(value))
                if stages:
                    await ctx.tick()
                else:
                    await ctx.delay(1e-6)
                if i >= lag:
                    got.append(ctx.get(dut.result))

        sim = Simulator(dut)
        if stages:
            sim.add_clock(1e-6)
        sim.add_testbench(bench)
        sim.run()
        bad = [(t, hex(g), hex(w & 0xFFFFFFFF)) for t, g, w in zip(totals, got, want) if g != w & 0xFFFFFFFF]
        assert not bad, (stages, bad[:5])
        assert len(got) == len(totals) > 2000
