"""The block-accumulation processing element (hdl/blockpe.py) in the Amaranth simulator: the
decoder against the golden FP8 decode on every code, and a column of PEs summing exact
products against the golden model's exact block partial (golden.block_partial)."""

import pytest
import torch
from amaranth.hdl import Module
from amaranth.sim import Simulator
from fp8npu.hdl.blockpe import (
    MAG_BITS,
    PRODUCTS,
    BlockPE,
    BlockRound,
    E4M3Decode,
    column_width,
    decoded_fields,
)
from fp8npu.hdl.formats import E4M3
from fp8npu.sim import golden


def test_decoder_on_every_code():
    dut = E4M3Decode()
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


@pytest.mark.parametrize("product", PRODUCTS)
def test_a_column_of_pes_sums_exactly(product):
    """R PEs in a column, weights loaded, activations skewed one cycle per row, BlockRound
    below: the column's sum is the exact sum of the R products (NaN when one is NaN) and its
    rounding golden.block_round's bits (-0 when every product is -0), for 400 rows of random
    E4M3 codes, NaNs and zeros of both signs included, every magnitude; products on a
    multiplier and in LUTs."""
    rows, n = 8, 400
    width = column_width(rows)
    m = Module()
    pes = [BlockPE(width, product) for _ in range(rows)]
    decs_w = [E4M3Decode() for _ in range(rows)]
    decs_a = [E4M3Decode() for _ in range(rows)]
    for i, (pe, dw, da) in enumerate(zip(pes, decs_w, decs_a)):
        m.submodules[f"pe{i}"] = pe
        m.submodules[f"dw{i}"] = dw
        m.submodules[f"da{i}"] = da
        for name, _ in decoded_fields(product):
            m.d.comb += [getattr(pe, f"w_{name}").eq(getattr(dw, name)), getattr(pe, f"a_{name}").eq(getattr(da, name))]
        if i:
            m.d.comb += [pe.psum_in.eq(pes[i - 1].psum_out), pe.negs_in.eq(pes[i - 1].negs_out),
                         pe.nan_in.eq(pes[i - 1].nan_out), pe.neg_zero_in.eq(pes[i - 1].neg_zero_out)]
        else:
            m.d.comb += pe.neg_zero_in.eq(1)
    m.submodules.round = rnd = BlockRound(width + 1)
    m.d.comb += [rnd.total.eq(pes[-1].psum_out + pes[-1].negs_out), rnd.nan.eq(pes[-1].nan_out),
                 rnd.neg_zero.eq(pes[-1].neg_zero_out)]
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(0, 256, (rows,), generator=gen, dtype=torch.uint8)
    w[:3] = torch.tensor([0x00, 0x80, 0x41], dtype=torch.uint8)         # zeros of both signs
    a = torch.randint(0, 256, (n, rows), generator=gen, dtype=torch.uint8)
    a[:100, 2:] = 0x00                                                   # rows of zero products
    a[:50] = torch.where(w >= 0x80, 0x00, 0x80).to(torch.uint8)         # zeros signed against w: all -0
    got = []

    async def bench(ctx):
        for i in range(rows):
            ctx.set(decs_w[i].code, int(w[i]))
            ctx.set(pes[i].w_load, 1)
        await ctx.tick()
        for i in range(rows):
            ctx.set(pes[i].w_load, 0)
        # row i of the column sees activation t at cycle t + i (its PE above is a cycle ahead)
        for t in range(n + rows + BlockPE.LATENCY):
            for i in range(rows):
                s = t - i
                ctx.set(pes[i].a_valid, int(0 <= s < n))
                ctx.set(decs_a[i].code, int(a[s, i]) if 0 <= s < n else 0)
            await ctx.tick()
            s = t - (rows - 1) - (BlockPE.LATENCY - 1)
            if 0 <= s < n:
                got.append((ctx.get(pes[-1].psum_out) + ctx.get(pes[-1].negs_out), ctx.get(pes[-1].nan_out),
                            ctx.get(rnd.result)))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
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


@pytest.mark.parametrize("product", PRODUCTS)
def test_pe_product_on_every_pair_of_codes(product):
    """One PE on all 65,536 (weight, activation) E4M3 code pairs: psum_out + negs_out is the
    exact product in units of 2^-18 (golden.block_partial), the NaN flag and the negative-zero
    flag as the golden model says; a PE above it feeds a fixed partial sum that must come
    through."""
    width = column_width(16)
    m = Module()
    m.submodules.pe = pe = BlockPE(width, product)
    m.submodules.dw = dw = E4M3Decode()
    m.submodules.da = da = E4M3Decode()
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
            for a in range(256 + BlockPE.LATENCY - 1):
                ctx.set(da.code, a & 0xFF)
                await ctx.tick()
                if a >= BlockPE.LATENCY - 1:
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
