"""The fp8npu command line: help on every subcommand, Verilog generation that Verilator lints
cleanly, clear one-sentence errors, and the demo's report."""

import subprocess
import sys

import pytest
from fp8npu.compiler import cli
from fp8npu.sim.toolchain import verilator_env

SUBCOMMANDS = ["generate", "demo", "bench"]


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
    (["generate", "adder", "--stages", "9"], "fp8npu: error: adder stages must be one of 0, 1, 2, 3, not 9\n"),
    (["generate", "mac", "-o", "/nonexistent/dir/mac.v"],
     "fp8npu: error: output folder '/nonexistent/dir' does not exist\n"),
])
def test_errors_are_one_sentence(args, message, capsys):
    assert cli.main(args) == 2
    assert capsys.readouterr().err == message


@pytest.mark.parametrize("args, fragment", [
    (["generate", "fpu"], "argument unit: invalid choice: 'fpu'"),
    (["generate", "mac", "--stages", "two"], "argument --stages: must be an integer, not 'two'"),
    (["demo", "--vectors", "0"], "argument --vectors: must be a positive integer, not '0'"),
    (["bench", "npu"], "argument target: invalid choice: 'npu'"),
])
def test_argument_errors(args, fragment):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_reports_zero_mismatches(tmp_path, capsys):
    assert cli.main(["demo", "--out-dir", str(tmp_path), "--vectors", "512"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "mac.v").exists()
    assert "PASS:" in out and ", 0 mismatches" in out
    assert "cycles/s" in out
