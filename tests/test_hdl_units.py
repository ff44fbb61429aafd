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


@pytest.mark.parametrize("stages", [0, 1, 2, 3])
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
    (FP32ToFP8, -1, r"^converter stages must be one of 0, 1, 2, 3, not -1$"),
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


# ---- the vector unit alone, against the functional simulator's datapath -------------------

def _vector_unit_run(cols, lanes, command, acc):
    """Run one EPILOGUE or BLOCKSCALE on a VectorUnit over accumulator lines ``acc`` (int64
    array, lines x cols, modified in place) with a synchronous, read-before-write port.
    Returns the cycles from ``start`` to ``done``, both included."""
    from fp8npu.hdl.units import VectorUnit
    dut = VectorUnit(cols, lanes)
    result = {}

    def line(addr):
        return sum(int(v) << (32 * c) for c, v in enumerate(acc[addr]))

    async def bench(ctx):
        ctx.set(dut.cmd, int.from_bytes(command, "little"))
        ctx.set(dut.en, 1)
        ctx.set(dut.start, 1)
        for cycle in range(10_000):
            if ctx.get(dut.done):
                result["cycles"] = cycle + 1
                return
            read = line(ctx.get(dut.rd_addr))
            if ctx.get(dut.wr_en):
                data, lanes_on, addr = ctx.get(dut.wr_data), ctx.get(dut.wr_lanes), ctx.get(dut.wr_addr)
                for c in range(cols):
                    if lanes_on >> c & 1:
                        acc[addr, c] = (data >> (32 * c)) & 0xFFFFFFFF
            await ctx.tick()
            ctx.set(dut.start, 0)
            ctx.set(dut.rd_data, read)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return dut, result["cycles"]


def _f32_bits(x):
    return torch.tensor(np.asarray(x, dtype=np.float32)).view(torch.int32)


@pytest.mark.parametrize("lanes", [None, 2, 1])
@pytest.mark.parametrize("op", ["epilogue", "epilogue_chained", "epilogue_gap3", "blockscale"])
def test_vector_unit_alone(op, lanes, rng):
    """VectorUnit in the Amaranth simulator, 3 columns in 1, 2 or 3 passes, against the
    functional simulator's EPILOGUE/BLOCKSCALE (rows in order, each read before it is
    written), and its cycles against the functional simulator's charge."""
    from fp8npu.hdl import isa
    from fp8npu.hdl.config import NPUConfig
    from fp8npu.sim import funcsim
    cols, rows = 3, 6
    values = rng.standard_normal((40, cols)).astype(np.float32) * np.float32(2.0) ** rng.integers(-8, 9, (40, cols))
    values[5, 1] = np.float32("inf")
    acc = _f32_bits(values).numpy().astype(np.int64) & 0xFFFFFFFF
    Op = isa.Opcode
    if op == "blockscale":
        cmd = isa.encode(Op.BLOCKSCALE, rows=rows, src=4, dst=20, row_scale=30, col_scale=1)
    else:
        # chained: row i reads what row i - 1 wrote; gap3: what row i - 3 wrote
        src, dst = {"epilogue": (4, 20), "epilogue_chained": (19, 20), "epilogue_gap3": (17, 20)}[op]
        cmd = isa.encode(Op.EPILOGUE, rows=rows, src=src, dst=dst, scale_addr=1, bias_addr=2, use_scale=1,
                         use_bias=1)
    cfg = NPUConfig(rows=2, cols=cols, vector_lanes=lanes or 0, acc_lines=64, sp_lines=64)
    ref = funcsim._Datapath(bytearray(64), cfg)
    ref.acc[:40, :cols] = acc.astype(np.uint32).view(np.int32)
    decoded = isa.decode(cmd)
    charge = getattr(ref, op.split("_")[0])(decoded.fields)
    got = acc.copy()
    dut, cycles = _vector_unit_run(cols, lanes, cmd, got)
    want = ref.acc[:40, :cols].astype(np.int64) & 0xFFFFFFFF
    bad = int(golden.mismatches(torch.from_numpy(got.astype(np.uint32).view(np.int32)),
                                torch.from_numpy(want.astype(np.uint32).view(np.int32)), "fp32").sum())
    print(f"{op}, {dut.passes} passes: {rows * cols} values checked, {bad} mismatches; {cycles} cycles, "
          f"functional simulator {charge}")
    assert bad == 0
    assert (got[:20] == acc[:20]).all() and (got[26:] == acc[26:]).all()     # nothing else written
    if op in ("epilogue", "blockscale"):
        assert cycles == dut.command_cycles(decoded.opcode, rows) == charge


# ---- the load and store units alone, against the functional simulator's datapath ----------

def _unit_cfg(bus_bits):
    from fp8npu.hdl.config import NPUConfig
    return NPUConfig(rows=4, cols=3, sp_lines=64, acc_lines=32, axi_data_bits=bus_bits, max_burst=4)


def _drive_commands(ctx, dut, pending, pushes):
    """Run the unit (active, every token there), offer the next command of ``pending`` on its
    command stream (taken when ready) and count its token pops and pushes."""
    ctx.set(dut.active, 1)
    for port in (dut.tokens.have_prev, dut.tokens.have_next):
        ctx.set(port, 1)
    if pending:
        ctx.set(dut.commands.valid, 1)
        ctx.set(dut.commands.payload.cmd, int.from_bytes(pending[0], "little"))
        ctx.set(dut.commands.payload.addr, 0x100 + len(pending))
        if ctx.get(dut.commands.ready):
            pending.pop(0)
    else:
        ctx.set(dut.commands.valid, 0)
    for flag in ("pop_prev", "pop_next", "push_prev", "push_next"):
        pushes[flag] += ctx.get(getattr(dut.tokens, flag))


def _valid_commands(cfg, rng, opcode, make, count, dram_bytes):
    from fp8npu.hdl import isa
    out = []
    while len(out) < count:
        cmd = isa.encode(opcode, **make(rng))
        if isa.validate(isa.decode(cmd), cfg, 0, dram_bytes) == isa.ErrorCode.NONE:
            out.append(cmd)
    return out


@pytest.mark.parametrize("bus_bits", [32, 64])
def test_load_unit_alone(bus_bits, rng):
    """LoadUnit in the Amaranth simulator, behind an AXI read model with random ready/valid
    gaps and a busy accumulator port, against the functional simulator's LOAD: every
    scratchpad byte and accumulator value after 24 random LOADs (rows cross 4 KB, bursts
    split at max_burst, rows of 1 byte to 4 lines), and one token push per command."""
    from fp8npu.hdl import isa
    from fp8npu.hdl.dma import LoadUnit
    from fp8npu.sim import funcsim
    cfg = _unit_cfg(bus_bits)
    B = cfg.bus_bytes
    dram = bytes(rng.integers(0, 256, 8192, dtype=np.uint8))

    def make(rng):
        dst = int(rng.integers(0, 2))
        row_bytes = int(rng.integers(1, 17)) * (4 if dst else 1)
        return dict(dst=dst, rows=int(rng.integers(1, 5)), row_bytes=row_bytes,
                    sram_addr=int(rng.integers(0, 16)), dram_addr=int(rng.integers(4000, 4200)) // B * B,
                    dram_stride=int(rng.integers(1, 8)) * B * 4, push_next=1)

    commands = _valid_commands(cfg, rng, isa.Opcode.LOAD, make, 24, len(dram))
    ref = funcsim._Datapath(np.frombuffer(dram, np.uint8).copy(), cfg)
    for cmd in commands:
        ref.load(isa.decode(cmd).fields)
    dut = LoadUnit(cfg)
    sp = np.zeros((cfg.sp_lines, cfg.line_bytes), np.uint8)
    acc = np.zeros((cfg.acc_lines, cfg.acc_line_values), np.uint32)
    pushes = dict.fromkeys(("pop_prev", "pop_next", "push_prev", "push_next"), 0)
    state = {}

    async def bench(ctx):
        pending = list(commands)
        bursts, beats = [], []        # accepted bursts; (address) of beats still to send
        quiet = 0
        for cycle in range(20_000):
            _drive_commands(ctx, dut, pending, pushes)
            ctx.set(dut.ar.ready, int(rng.random() < 0.7))
            ctx.set(dut.acc_busy, int(rng.random() < 0.2))
            if ctx.get(dut.ar.valid) and ctx.get(dut.ar.ready):
                addr, length = ctx.get(dut.ar.payload.addr), ctx.get(dut.ar.payload.len) + 1
                assert addr // 4096 == (addr + length * B - 1) // 4096, "a burst crosses 4 KB"
                assert length <= cfg.max_burst
                bursts.append((addr, length))
                beats += [addr + i * B for i in range(length)]
            send = bool(beats) and rng.random() < 0.8
            ctx.set(dut.r.valid, int(send))
            if send:
                ctx.set(dut.r.payload, int.from_bytes(dram[beats[0]:beats[0] + B], "little"))
                if ctx.get(dut.r.ready):
                    beats.pop(0)
            for port, mem, width in ((dut.sp_write, sp, 8), (dut.acc_write, acc, 32)):
                if ctx.get(port.en):
                    line = ctx.get(port.data)
                    mem[ctx.get(port.addr)] = [(line >> (width * i)) & ((1 << width) - 1)
                                               for i in range(mem.shape[1])]
            quiet = quiet + 1 if not pending and not beats and ctx.get(dut.idle) else 0
            if quiet == 3:                # idle after taking the last command
                state["cycles"] = cycle
                return
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert "cycles" in state, "the load unit did not finish"
    assert pushes["push_next"] == len(commands) and pushes["pop_next"] == 0
    assert (sp == ref.sp).all()
    want_acc = ref.acc.view(np.uint32)[:, :cfg.cols]
    assert (acc[:, :cfg.cols] == want_acc).all()
    print(f"{len(commands)} LOADs, {sp.size} scratchpad bytes and {want_acc.size} accumulator values checked "
          f"in {state['cycles']} cycles")


@pytest.mark.parametrize("bus_bits", [32, 64])
def test_store_unit_alone(bus_bits, rng):
    """StoreUnit in the Amaranth simulator, behind an AXI write model with random ready and
    late responses, against the functional simulator's STORE: every DRAM byte after 16 random
    STOREs (FP32, E4M3 and E5M2 with scales, saturation, specials, partial rows, overlapping
    strides; rows split into several bursts by max_burst and at 4 KB), one token push per
    command, and nothing pushed before the last response."""
    from dataclasses import replace

    from fp8npu.hdl import isa
    from fp8npu.hdl.dma import StoreUnit
    from fp8npu.sim import funcsim
    cfg = replace(_unit_cfg(bus_bits), max_burst=2 if bus_bits == 32 else 1)
    B = cfg.bus_bytes
    values = rng.standard_normal((cfg.acc_lines, cfg.acc_line_values)).astype(np.float32)
    values *= np.float32(2.0) ** rng.integers(-12, 12, values.shape).astype(np.float32)
    values[3, 0], values[4, 1], values[5, 2] = np.inf, np.nan, -0.0
    acc = values.view(np.uint32).copy()
    dram0 = bytes(rng.integers(0, 256, 8192, dtype=np.uint8))

    def make(rng):
        fmt = int(rng.integers(0, 3))
        near_4k = rng.random() < 0.4
        scale = float(np.float32(2.0) ** int(rng.integers(-4, 5)) * np.float32(rng.choice([1.0, 1.37])))
        return dict(fmt=fmt, saturate=int(rng.integers(0, 2)), acc_addr=int(rng.integers(0, 28)),
                    rows=int(rng.integers(1, 4)), cols=int(rng.integers(1, cfg.cols + 1)),
                    dram_addr=int(rng.integers(4072, 4096) if near_4k else rng.integers(0, 1800)) // B * B,
                    dram_stride=int(rng.integers(0, 6)) * B, scale=isa.pack_f32(scale), push_prev=1)

    commands = _valid_commands(cfg, rng, isa.Opcode.STORE, make, 16, len(dram0))
    ref = funcsim._Datapath(np.frombuffer(dram0, np.uint8).copy(), cfg)
    ref.acc[:] = acc.view(np.int32)
    for cmd in commands:
        ref.store(isa.decode(cmd).fields)
    dut = StoreUnit(cfg)
    dram = bytearray(dram0)
    pushes = dict.fromkeys(("pop_prev", "pop_next", "push_prev", "push_next"), 0)
    state = {"early": 0}

    def ax(name):
        return getattr(dut, f"m_axi_{name}")

    async def bench(ctx):
        pending = list(commands)
        bursts, responses = [], []       # accepted AW (addr, beats left); B responses owed (delay)
        quiet = 0
        for cycle in range(20_000):
            _drive_commands(ctx, dut, pending, pushes)
            if ctx.get(dut.tokens.push_prev) and responses:
                state["early"] += 1
            ctx.set(ax("awready"), int(rng.random() < 0.6))
            ctx.set(ax("wready"), int(rng.random() < 0.7))
            if ctx.get(ax("awvalid")) and ctx.get(ax("awready")):
                bursts.append([ctx.get(ax("awaddr")), ctx.get(ax("awlen")) + 1])
            if ctx.get(ax("wvalid")) and ctx.get(ax("wready")):
                assert bursts, "W before AW"
                addr, left = bursts[0]
                data, strb = ctx.get(ax("wdata")), ctx.get(ax("wstrb"))
                for i in range(B):
                    if strb >> i & 1:
                        dram[addr + i] = (data >> (8 * i)) & 0xFF
                assert ctx.get(ax("wlast")) == (left == 1)
                bursts[0] = [addr + B, left - 1]
                if left == 1:
                    bursts.pop(0)
                    responses.append(int(rng.integers(1, 12)))
            give = bool(responses) and responses[0] <= 0
            ctx.set(ax("bvalid"), int(give))
            ctx.set(ax("bresp"), 0)
            if give and ctx.get(ax("bready")):
                responses.pop(0)
            responses = [r - 1 for r in responses[:1]] + responses[1:]
            addr = ctx.get(dut.acc_read.addr)
            quiet = quiet + 1 if not pending and not bursts and not responses and ctx.get(dut.idle) else 0
            if quiet == 3:                # idle after taking the last command
                state["cycles"] = cycle
                return
            await ctx.tick()
            ctx.set(dut.acc_read.data, sum(int(v) << (32 * i) for i, v in enumerate(acc[addr])))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    assert "cycles" in state, "the store unit did not finish"
    assert pushes["push_prev"] == len(commands) and pushes["pop_prev"] == 0
    assert state["early"] == 0, "a token was pushed before the command's write responses were in"
    bad = sum(a != b for a, b in zip(dram, ref.mem))
    print(f"{len(commands)} STOREs, {len(dram)} DRAM bytes checked, {bad} mismatches, {state['cycles']} cycles")
    assert bad == 0


# ---- the command checker alone, against isa.validate ---------------------------------------

#: SRAM address fields: set near the end of an SRAM now and then, to meet the range checks' edges.
_SRAM_FIELDS = ("sram_addr", "acc_addr", "b_addr", "a_addr", "src", "dst", "row_scale", "col_scale",
                "scale_addr", "bias_addr")


def _checker_command(rng, cfg):
    """A random command: mostly plausible field values (so that every check is reached, SRAM
    ranges end right at, before or past the end of an SRAM, and DMA transfers a few bytes
    before, at or past a window's limit, or spanning about 2**32 bytes), now and then any
    value of a field's width, token flags, unknown opcodes and reserved bits."""
    from fp8npu.hdl import isa
    if rng.random() < 0.02:
        return rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    op = isa.Opcode(int(rng.integers(1, 8)))
    plausible = {"k": (1, cfg.rows + 2), "cols": (0, cfg.cols + 2), "fmt": (0, 4), "unit": (0, 4),
                 "m": (0, 9), "rows": (0, 9), "row_bytes": (0, 41), "a_stride": (0, 4)}
    fields = {}
    for f in isa.FIELDS[op]:
        if rng.random() < 0.1:
            value = int(rng.integers(0, 1 << f.width, dtype=np.uint64))
        elif f.name == "dram_addr":
            value = int(rng.integers(0, 6000)) * 8 + int(rng.random() < 0.05)
        elif f.name == "dram_stride":
            value = int(rng.integers(0, 32)) * 8 + int(rng.random() < 0.05) * 4
        elif f.name in _SRAM_FIELDS:
            lines = int(rng.choice([cfg.sp_lines, cfg.acc_lines]))
            value = lines - int(rng.integers(-2, 20)) if rng.random() < 0.3 else int(rng.integers(0, 64))
        elif f.name in plausible:
            value = int(rng.integers(*plausible[f.name]))
        else:
            value = int(rng.integers(0, 1 << min(f.width, 32), dtype=np.uint64))
        fields[f.name] = value & ((1 << f.width) - 1)
    if op == isa.Opcode.LOAD and fields["dst"] and rng.random() < 0.9:
        fields["row_bytes"] -= fields["row_bytes"] % 4
    if op in (isa.Opcode.LOAD, isa.Opcode.STORE) and fields["rows"] and rng.random() < 0.3:
        # a transfer whose last byte is a few bytes before, at or after a window's limit
        row = fields["row_bytes"] if op == isa.Opcode.LOAD else fields["cols"] * (4 if fields["fmt"] == 0 else 1)
        extent = (fields["rows"] - 1) * fields["dram_stride"] + row
        limit = int(rng.choice([40_000, 1 << 20]))
        fields["dram_addr"] = max(0, ((limit - extent) & ~7) + 8 * int(rng.integers(-1, 3))) & 0xFFFFFFFF
    elif op in (isa.Opcode.LOAD, isa.Opcode.STORE) and rng.random() < 0.1:
        # rows spanning about 2**32 bytes: past any window, though the span's low 32 bits may
        # end inside one
        fields["rows"] = int(rng.choice([2, 3, 5]))
        fields["dram_stride"] = min((1 << 32) // (fields["rows"] - 1) + 8 * int(rng.integers(-1, 2)), (1 << 32) - 8)
        fields["dram_addr"] = 8 * int(rng.integers(0, 100))
    if op == isa.Opcode.MATMUL and cfg.accumulation != "block" and rng.random() < 0.9:
        fields["commit"] = fields["fresh"] = 0
    flags = {f: int(rng.random() < 0.04) for f in ("pop_prev", "pop_next", "push_prev", "push_next")}
    cmd = bytearray(isa.encode(op, **flags, **fields))
    if rng.random() < 0.02:
        cmd[0] = int(rng.integers(0, 256))                      # any opcode
    if rng.random() < 0.02:
        cmd[31] |= 1 << int(rng.integers(0, 8))                 # a bit that may be reserved
    return bytes(cmd)


@pytest.mark.parametrize("kind, spacing, held, stages", [("sequential 8x8 bus 64", 1, False, 2),
                                                         ("block 5x3 bus 32, E4M3 only", 2, False, 2),
                                                         ("block 5x3 bus 32, E4M3 only", 3, True, 2),
                                                         ("block 5x3 bus 32, E4M3 only", 2, True, 1),
                                                         ("sequential 8x8 bus 64", 1, False, 1),
                                                         ("sequential 4x4 bus 64, no vector unit, no FP8 stores", 1,
                                                          False, 2)])
def test_command_checker_alone(kind, spacing, held, stages, rng):
    """CommandChecker in the Amaranth simulator, a command every ``spacing`` cycles (random
    commands without ``valid`` between them; a held command stays on the input for the cycle
    after ``valid`` too; the checks in 2 stages or in 1), against isa.validate (the functional
    simulator's checks) on 3,000 random commands and two DMA windows: the same error code for
    every command."""
    from fp8npu.hdl import isa
    from fp8npu.hdl.checks import CommandChecker
    from fp8npu.hdl.config import NPUConfig
    if kind.endswith("no FP8 stores"):
        cfg = NPUConfig(rows=4, cols=4, sp_lines=1024, acc_lines=256, vector_unit=False, fp8_store=False)
    elif kind.startswith("sequential"):
        cfg = NPUConfig(sp_lines=1024, acc_lines=256)
    else:
        cfg = NPUConfig(rows=5, cols=3, sp_lines=256, acc_lines=64, axi_data_bits=32, accumulation="block",
                        formats=("e4m3",))
    windows = [(0, 1 << 20), (4096, 40_000)]
    n = 1500
    commands = [_checker_command(rng, cfg) for _ in range(n * len(windows))]
    dut = CommandChecker(cfg, spacing=spacing, held=held, stages=stages)
    got = []
    from fp8npu.hdl.checks import _reserved_mask
    built = [o for o in isa.Opcode if cfg.vector_unit or o not in (isa.Opcode.EPILOGUE, isa.Opcode.BLOCKSCALE)]

    def reserved(word):        # what the fetch's reserved_set gives for a known opcode (tested on the NPU: test_npu_rtl)
        return int(word[0] in built and int.from_bytes(word, "little") & _reserved_mask(isa.Opcode(word[0])) != 0)

    async def bench(ctx):
        L = dut.latency
        assert L == (2 if held else 3) - (2 - stages)
        for w, (base, limit) in enumerate(windows):
            ctx.set(dut.win_base, base)
            ctx.set(dut.win_limit, limit)
            part = commands[w * n:(w + 1) * n]
            entered = []               # the cycle each command entered
            for t in range(n * spacing + L):
                i = t // spacing
                enter = t % spacing == 0 and i < n
                kept = held and t % spacing == 1 and i < n
                word = part[i] if enter or kept else _checker_command(rng, cfg)
                ctx.set(dut.valid, enter)
                ctx.set(dut.cmd, int.from_bytes(word, "little"))
                ctx.set(dut.reserved, reserved(word))
                if enter:
                    entered.append(t)
                await ctx.tick()
                if entered and t == entered[0] + L - 1:
                    got.append(ctx.get(dut.verdict))
                    entered.pop(0)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    want = [isa.validate(isa.decode(c), cfg, *windows[i // n]) for i, c in enumerate(commands)]
    bad = [(i, got[i], int(w)) for i, w in enumerate(want) if got[i] != w]
    codes = {isa.ErrorCode(w).name for w in want}
    print(f"{kind}: {len(commands)} commands checked ({', '.join(sorted(codes))}), {len(bad)} mismatches")
    assert not bad, f"command {bad[0][0]}: hardware {bad[0][1]}, isa.validate {bad[0][2]}"
    assert len(codes) >= 6


def _does_nothing(op, f):
    """The unit does nothing with this command's bounded fields (isa._FIELD_BOUNDS)."""
    from fp8npu.hdl import isa
    return ((op == isa.Opcode.LOAD and not (f["rows"] and f["row_bytes"]))
            or (op != isa.Opcode.LOAD and not f.get("rows", f.get("m"))))


def _extremes(cfg):
    """For each bound of isa._FIELD_BOUNDS, a command the checks pass with that field at its
    largest legal value (window: the whole address space)."""
    from fp8npu.hdl.isa import Opcode as Op
    B, top, sp, acc = cfg.bus_bytes, cfg.address_space, cfg.sp_lines, cfg.acc_lines
    dst = int(acc * cfg.acc_line_bytes > sp * cfg.line_bytes)       # the LOAD target with more bytes
    deep = int(acc > sp)                                            # ... with more lines
    one = (1, 4)                                                    # the fewest bytes of a row, by dst
    return {
        (Op.LOAD, "sram_addr"): (Op.LOAD, dict(dst=deep, rows=1, row_bytes=one[deep], sram_addr=max(sp, acc) - 1)),
        (Op.LOAD, "rows"): (Op.LOAD, dict(dst=deep, rows=max(sp, acc), row_bytes=one[deep])),
        (Op.LOAD, "row_bytes"): (Op.LOAD, dict(dst=dst, rows=1, row_bytes=min(max(sp * cfg.line_bytes,
                                                                                    acc * cfg.acc_line_bytes), top))),
        (Op.LOAD, "dram_addr"): (Op.LOAD, dict(rows=1, row_bytes=B, dram_addr=top - B)),
        (Op.LOAD, "dram_stride"): (Op.LOAD, dict(rows=2, row_bytes=B, dram_stride=top - B)),
        (Op.STORE, "acc_addr"): (Op.STORE, dict(rows=1, cols=1, acc_addr=acc - 1)),
        (Op.STORE, "rows"): (Op.STORE, dict(rows=acc, cols=1)),
        (Op.STORE, "cols"): (Op.STORE, dict(rows=1, cols=cfg.cols)),
        (Op.STORE, "dram_addr"): (Op.STORE, dict(rows=1, cols=1, dram_addr=top - B)),
        (Op.STORE, "dram_stride"): (Op.STORE, dict(rows=2, cols=1, dram_stride=top - B)),
        (Op.MATMUL, "k"): (Op.MATMUL, dict(k=cfg.rows)),
        (Op.MATMUL, "b_addr"): (Op.MATMUL, dict(k=1, b_addr=sp - 1)),
        (Op.MATMUL, "m"): (Op.MATMUL, dict(k=1, m=acc)),
        (Op.MATMUL, "a_addr"): (Op.MATMUL, dict(k=1, m=1, a_addr=sp - 1)),
        (Op.MATMUL, "a_stride"): (Op.MATMUL, dict(k=1, m=2, a_stride=sp - 1)),
        (Op.MATMUL, "acc_addr"): (Op.MATMUL, dict(k=1, m=1, acc_addr=acc - 1)),
        **{(op, name): (op, dict(rows=acc) if name == "rows" else dict(rows=1, **{name: acc - 1}))
           for op, names in ((Op.EPILOGUE, ("src", "dst", "rows", "scale_addr", "bias_addr")),
                             (Op.BLOCKSCALE, ("src", "dst", "rows", "row_scale", "col_scale")))
           for name in names},
    }


FIELD_BITS_CONFIGS = {
    "default": dict(sp_lines=1024, acc_lines=256),
    "block 5x3 bus 32, E4M3 only, 20-bit addresses": dict(rows=5, cols=3, sp_lines=256, acc_lines=64,
                                                           axi_data_bits=32, accumulation="block",
                                                           formats=("e4m3",), axi_addr_bits=20),
    "trimmed 2x2, 14-bit": dict(rows=2, cols=2, sp_lines=512, acc_lines=256, axi_data_bits=32,
                                accumulation="block", formats=("e4m3",), vector_unit=False, fp8_store=False,
                                axi_addr_bits=14),
    "accumulator deeper than the scratchpad": dict(rows=4, cols=4, sp_lines=64, acc_lines=2048, axi_addr_bits=24),
}


@pytest.mark.parametrize("kind", FIELD_BITS_CONFIGS)
def test_field_bits_hold_every_command_the_checks_pass(kind, rng):
    """The queues and units keep the low isa.field_bits of the fields the checks bound. For
    each bound, a command the checks pass with the field at its largest legal value fits it;
    and on 40,000 random commands that reach every check's edges (test_command_checker_alone's),
    every command isa.validate passes fits them (a command its unit does nothing with, and a
    single row's stride, excepted)."""
    from fp8npu.hdl import isa
    from fp8npu.hdl.config import NPUConfig
    cfg = NPUConfig(**FIELD_BITS_CONFIGS[kind])
    window = (0, cfg.address_space)
    bounded = {k: isa.field_bits(cfg, *k) for k in isa._FIELD_BOUNDS}
    extremes = _extremes(cfg)
    assert set(extremes) == set(bounded)
    for (op, name), (eop, fields) in extremes.items():
        if not cfg.vector_unit and op in (isa.Opcode.EPILOGUE, isa.Opcode.BLOCKSCALE):
            continue                    # refused, and not built
        cmd = isa.decode(isa.encode(eop, **fields))
        assert isa.validate(cmd, cfg, *window) == isa.ErrorCode.NONE, (op.name, name, fields)
        assert fields[name] < 1 << bounded[op, name], (op.name, name, fields[name], bounded[op, name])
    passed = 0
    for _ in range(40_000):
        word = _checker_command(rng, cfg)
        cmd = isa.decode(word)
        if isa.validate(cmd, cfg, *window) != isa.ErrorCode.NONE:
            continue
        op = isa.Opcode(cmd.opcode)
        if _does_nothing(op, cmd.fields):
            continue
        passed += 1
        for (bop, name), bits in bounded.items():
            if bop == op:
                if name.endswith("stride") and cmd.fields.get("rows", cmd.fields.get("m")) < 2:
                    continue            # a single row's stride is never used
                assert cmd.fields[name] < 1 << bits, (op.name, name, cmd.fields[name], bits)
    print(f"{kind}: {len(extremes)} largest legal values and {passed} random commands that move data fit")
    assert passed > 500


def test_queues_keep_every_field_bit(rng):
    """A unit's queue keeps the bits of its opcodes' fields and nothing else (isa.field_ranges):
    every field lies inside the ranges, the ranges hold no bit outside a field, and packing then
    unpacking a random command in the simulator gives back exactly its field bits."""
    from amaranth.hdl import Module, Signal
    from fp8npu.hdl import isa
    from fp8npu.hdl.units import pack_fields, unpack_fields
    groups = [isa.unit_opcodes(u) for u in isa.UNIT_CHAIN] + [list(isa.Opcode)]
    for opcodes in groups:
        ranges = isa.field_ranges(opcodes)
        kept = 0
        for lsb, width in ranges:
            kept |= ((1 << width) - 1) << lsb
        fields = 0
        for op in opcodes:
            for f in isa.COMMON_FIELDS + isa.FIELDS[op]:
                fields |= ((1 << f.width) - 1) << f.lsb
        assert kept == fields, opcodes
        assert sum(w for _, w in ranges) < isa.COMMAND_BITS
        m = Module()
        cmd, out = Signal(isa.COMMAND_BITS), Signal(isa.COMMAND_BITS)
        packed = pack_fields(cmd, ranges)
        assert len(packed) == bin(kept).count("1")
        m.d.comb += out.eq(unpack_fields(packed, ranges))
        words = [int.from_bytes(rng.bytes(32), "little") for _ in range(20)] + [(1 << 256) - 1]

        async def bench(ctx, words=words, kept=kept, cmd=cmd, out=out):
            for w in words:
                ctx.set(cmd, w)
                await ctx.delay(1e-6)
                assert ctx.get(out) == w & kept

        sim = Simulator(m)
        sim.add_testbench(bench)
        sim.run()


def test_units_not_built_are_refused():
    """Without a vector unit EPILOGUE and BLOCKSCALE are unknown opcodes; without FP8 stores a
    STORE to E4M3 or E5M2 has a format the NPU lacks; both pass on the full configuration."""
    from fp8npu.hdl import isa
    from fp8npu.hdl.config import NPUConfig
    full, trimmed = NPUConfig(), NPUConfig(vector_unit=False, fp8_store=False)
    E = isa.ErrorCode
    cases = [(isa.encode(isa.Opcode.EPILOGUE, rows=1, use_scale=1), E.BAD_OPCODE),
             (isa.encode(isa.Opcode.BLOCKSCALE, rows=1, src=0, dst=1, row_scale=2, col_scale=3), E.BAD_OPCODE),
             (isa.encode(isa.Opcode.STORE, fmt=1, rows=1, cols=8, dram_addr=0, scale=0x3F800000), E.BAD_FORMAT),
             (isa.encode(isa.Opcode.STORE, fmt=2, rows=1, cols=8, dram_addr=0), E.BAD_FORMAT),
             (isa.encode(isa.Opcode.STORE, fmt=0, rows=1, cols=8, dram_addr=0), E.NONE)]
    for raw, code in cases:
        cmd = isa.decode(raw)
        assert isa.validate(cmd, full, 0, 1 << 20) == E.NONE
        assert isa.validate(cmd, trimmed, 0, 1 << 20) == code


def test_register_block_decodes_exact_offsets():
    """AxiLiteRegs: every byte address (8 bits) reads the register mapped at exactly that
    offset, else 0 (unaligned and unmapped addresses included); writes land only on writable
    registers at their exact offset; the strobe fires at its offset only."""
    from amaranth.hdl import Module, Signal
    from fp8npu.hdl.axi import AxiLiteRegs
    m = Module()
    ro = {0x04: Signal(32, init=0x11111111), 0x0C: Signal(32, init=0x22222222), 0x30: Signal(32, init=0x33333333)}
    rw = {0x10: Signal(32), 0x14: Signal(32)}
    regs = {**{o: (s, False) for o, s in ro.items()}, **{o: (s, True) for o, s in rw.items()}}
    m.submodules.regs = dut = AxiLiteRegs(regs, 0x00)
    addrs = list(range(0x100))

    async def bench(ctx):
        async def write(addr, value):
            ctx.set(dut.s_axil_awaddr, addr)
            ctx.set(dut.s_axil_wdata, value)
            ctx.set(dut.s_axil_awvalid, 1)
            ctx.set(dut.s_axil_wvalid, 1)
            strobe = ctx.get(dut.strobe)
            await ctx.tick()
            ctx.set(dut.s_axil_awvalid, 0)
            ctx.set(dut.s_axil_wvalid, 0)
            ctx.set(dut.s_axil_bready, 1)
            await ctx.tick()
            ctx.set(dut.s_axil_bready, 0)
            return strobe

        async def read(addr):
            ctx.set(dut.s_axil_araddr, addr)
            ctx.set(dut.s_axil_arvalid, 1)
            await ctx.tick()
            ctx.set(dut.s_axil_arvalid, 0)
            value = ctx.get(dut.s_axil_rdata)
            ctx.set(dut.s_axil_rready, 1)
            await ctx.tick()
            ctx.set(dut.s_axil_rready, 0)
            return value

        for n, a in enumerate(addrs):
            strobe = await write(a, 0xA0000000 + n)
            assert strobe == (a == 0)
        want = {o: 0xA0000000 + addrs.index(o) for o in rw}
        want.update({o: s.init for o, s in ro.items()})
        for a in addrs:
            assert await read(a) == want.get(a, 0), hex(a)
        # locked: writes are answered and dropped; the strobe still fires
        ctx.set(dut.locked, 1)
        for a in (0x00, 0x10, 0x14):
            assert await write(a, 0x5555) == (a == 0)
        for a in rw:
            assert await read(a) == want[a]

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


async def _axil_write(ctx, dut, addr, value):
    ctx.set(dut.s_axil_awaddr, addr)
    ctx.set(dut.s_axil_wdata, value)
    ctx.set(dut.s_axil_awvalid, 1)
    ctx.set(dut.s_axil_wvalid, 1)
    await ctx.tick().until(dut.s_axil_awready)
    ctx.set(dut.s_axil_awvalid, 0)
    ctx.set(dut.s_axil_wvalid, 0)
    ctx.set(dut.s_axil_bready, 1)
    await ctx.tick().until(dut.s_axil_bvalid)
    ctx.set(dut.s_axil_bready, 0)


async def _axil_read(ctx, dut, addr):
    ctx.set(dut.s_axil_araddr, addr)
    ctx.set(dut.s_axil_arvalid, 1)
    await ctx.tick().until(dut.s_axil_arready)
    ctx.set(dut.s_axil_arvalid, 0)
    assert ctx.get(dut.s_axil_rvalid)
    value = ctx.get(dut.s_axil_rdata)
    ctx.set(dut.s_axil_rready, 1)
    await ctx.tick()
    ctx.set(dut.s_axil_rready, 0)
    return value


def test_npu_address_space_and_run_registers():
    """An NPU with 14-bit addresses (16 KB): a window reaching past the address space stops
    the run as it starts (FETCH_WINDOW at the full 32-bit PROG_ADDR), a window ending exactly
    at 16 KB is allowed, and while the NPU is busy the run registers drop writes (the fetch
    keeps its request; nothing answers the bus here)."""
    from fp8npu.hdl.config import NPUConfig
    from fp8npu.hdl.isa import ErrorCode, Register
    from fp8npu.hdl.npu import NPU
    cfg = NPUConfig(rows=2, cols=2, sp_lines=64, acc_lines=16, axi_data_bits=32, queue_depth=0, max_burst=4,
                    accumulation="block", acc_block=8, formats=("e4m3",), vector_unit=False, fp8_store=False,
                    round_stages=1, add_stages=1, rounders=1, pe_stages=1, check_stages=1, perf_counters=False,
                    token_limit=255, multipliers="lut", axi_addr_bits=14)
    dut = NPU(cfg)
    assert len(dut.m_axi_araddr) == len(dut.m_axi_awaddr) == 14
    R = Register

    async def bench(ctx):
        async def launch(prog_addr, prog_len, win_limit):
            for reg, value in ((R.PROG_ADDR, prog_addr), (R.PROG_LEN, prog_len), (R.WIN_BASE, 0),
                               (R.WIN_LIMIT, win_limit), (R.CTRL, 1)):
                await _axil_write(ctx, dut, reg, value)
            await ctx.tick().repeat(8)
            return [await _axil_read(ctx, dut, r) for r in (R.STATUS, R.ERROR, R.ERROR_ADDR)]

        assert await launch(0x1000, 1, 0x4020) == [0b100, ErrorCode.FETCH_WINDOW, 0x1000]
        assert await launch(0x80000000, 1, 0x4000) == [0b100, ErrorCode.FETCH_WINDOW, 0x80000000]
        assert await launch(0x4000, 0, 0x4000) == [0b100, ErrorCode.NO_END, 0x4000]
        status, _, _ = await launch(0x1000, 1, 0x4000)
        assert status & 1 and ctx.get(dut.m_axi_arvalid) and ctx.get(dut.m_axi_araddr) == 0x1000
        for reg in (R.PROG_ADDR, R.PROG_LEN, R.WIN_BASE, R.WIN_LIMIT):
            await _axil_write(ctx, dut, reg, 0xFFFFFFE0)
        assert [await _axil_read(ctx, dut, r) for r in (R.PROG_ADDR, R.PROG_LEN, R.WIN_BASE, R.WIN_LIMIT)] \
            == [0x1000, 1, 0, 0x4000]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
