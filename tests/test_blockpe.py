"""The block-accumulation processing element (hdl/blockpe.py) in the Amaranth simulator: the
decoder against the golden FP8 decode on every code, and a column of PEs summing exact
products against the golden model's exact block partial (golden.block_partial)."""

import torch
from amaranth.hdl import Module
from amaranth.sim import Simulator
from fp8npu.hdl.blockpe import MAG_BITS, BlockPE, E4M3Decode, column_width
from fp8npu.hdl.formats import E4M3
from fp8npu.sim import golden


def test_decoder_on_every_code():
    dut = E4M3Decode()
    got = []

    async def bench(ctx):
        for code in range(256):
            ctx.set(dut.code, code)
            await ctx.delay(1e-6)
            got.append((ctx.get(dut.sign), ctx.get(dut.mag), ctx.get(dut.nan)))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    values = golden.decode_fp8(torch.arange(256, dtype=torch.int64).to(torch.uint8), E4M3).to(torch.float64)
    for code, (sign, mag, nan) in enumerate(got):
        v = float(values[code])
        assert nan == (v != v), code
        if v == v:
            assert sign == code >> 7 and mag == abs(v) * 2 ** 9 and mag < 1 << MAG_BITS, code


def test_a_column_of_pes_sums_exactly():
    """R PEs in a column, weights loaded, activations skewed one cycle per row: the column's
    output is the exact sum of the R products (and NaN when one is NaN), for 400 rows of
    random E4M3 codes, NaNs included, every magnitude."""
    rows, n = 8, 400
    width = column_width(rows)
    m = Module()
    pes = [BlockPE(width) for _ in range(rows)]
    decs_w = [E4M3Decode() for _ in range(rows)]
    decs_a = [E4M3Decode() for _ in range(rows)]
    for i, (pe, dw, da) in enumerate(zip(pes, decs_w, decs_a)):
        m.submodules[f"pe{i}"] = pe
        m.submodules[f"dw{i}"] = dw
        m.submodules[f"da{i}"] = da
        m.d.comb += [pe.w_sign.eq(dw.sign), pe.w_mag.eq(dw.mag), pe.w_nan.eq(dw.nan),
                     pe.a_sign.eq(da.sign), pe.a_mag.eq(da.mag), pe.a_nan.eq(da.nan)]
        if i:
            m.d.comb += [pe.psum_in.eq(pes[i - 1].psum_out), pe.negs_in.eq(pes[i - 1].negs_out),
                         pe.nan_in.eq(pes[i - 1].nan_out)]
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(0, 256, (rows,), generator=gen, dtype=torch.uint8)
    a = torch.randint(0, 256, (n, rows), generator=gen, dtype=torch.uint8)
    got = []

    async def bench(ctx):
        for i in range(rows):
            ctx.set(decs_w[i].code, int(w[i]))
            ctx.set(pes[i].w_load, 1)
        await ctx.tick()
        for i in range(rows):
            ctx.set(pes[i].w_load, 0)
        # row i of the column sees activation t at cycle t + 2 i (its PE above is 2 cycles ahead)
        for t in range(n + 2 * rows + 2):
            for i in range(rows):
                s = t - 2 * i
                ctx.set(pes[i].a_valid, int(0 <= s < n))
                ctx.set(decs_a[i].code, int(a[s, i]) if 0 <= s < n else 0)
            await ctx.tick()
            s = t - 2 * (rows - 1) - 1
            if 0 <= s < n:
                got.append((ctx.get(pes[-1].psum_out) + ctx.get(pes[-1].negs_out), ctx.get(pes[-1].nan_out)))

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    part = golden.block_partial(a.T, w.unsqueeze(1).expand(rows, n), E4M3, E4M3)
    exact = (part["hi"] * (1 << 32) + part["lo"]).tolist()             # units of 2^-32
    for s, (psum, nan) in enumerate(got):
        assert nan == bool(part["nan"][s]), s
        if not nan:
            assert psum * (1 << 14) == exact[s], (s, psum, exact[s])    # PE units are 2^-18
    assert len(got) == n
