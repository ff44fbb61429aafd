"""Robustness of the command line against careless and hostile input.

Every command is fed generated bad files, bad configs, bad paths and hostile register values.
The properties checked for every case:

* the exit status is 0, 1 (the NPU stopped with a documented error) or 2 (a usage error);
* a usage error prints exactly one line, ``fp8npu: error: ...``, and nothing else on stderr;
* never a traceback or an ``internal error``, never a hang (each case runs under a deadline);
* no input file changes (every file in the case's folder is hashed before and after).
"""

import faulthandler
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from fp8npu.compiler import cli
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig

DEADLINE = 120     # seconds for any one in-process case


def _snapshot(folder):
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_case(argv, capsys, folder, allowed=(0, 1, 2), outputs=()):
    """Run ``fp8npu argv`` in this process; check the properties above; return (status, out, err)."""
    before = _snapshot(folder)
    faulthandler.dump_traceback_later(DEADLINE, exit=True, file=sys.__stderr__)
    try:
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exc:          # argparse
            status = exc.code
    finally:
        faulthandler.cancel_dump_traceback_later()
    out, err = capsys.readouterr()
    assert status in allowed, (argv, status, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    if status == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fp8npu: error: "), (argv, err)
    after = _snapshot(folder)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= {str(Path(o)) for o in outputs}, (argv, changed)
    return status, out, err


# ---- generated bad input files -------------------------------------------------------------
def bad_files(folder):
    """(label, path) pairs of files no command should choke on."""
    folder = Path(folder)
    rng = np.random.default_rng(99)
    cases = []

    def make(label, data):
        p = folder / label
        p.write_bytes(data)
        cases.append((label, p))

    cases.append(("missing", folder / "does-not-exist"))
    (folder / "a-folder").mkdir()
    cases.append(("folder", folder / "a-folder"))
    fifo = folder / "a-fifo"
    os.mkfifo(fifo)
    cases.append(("fifo", fifo))
    cases.append(("char-device", Path("/dev/zero")))
    cases.append(("null-device", Path("/dev/null")))
    make("empty", b"")
    for n in (1, 31, 32, 33, 1000):
        make(f"random{n}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    make("not-utf8", b"LOAD \xff\xfe rows=1\n")
    make("huge-literal.s", b"LOAD rows=" + b"9" * 5000 + b"\n")
    make("huge-float.s", b"STORE cols=1 scale=" + b"9" * 5000 + b".0\n")
    make("long-line.s", b"X" * 1_000_000)
    make("nul-bytes.s", b"\0" * 100)
    make("json-deep", b"[" * 200_000 + b"]" * 200_000)
    make("json-huge-number", b'{"rows": ' + b"9" * 5000 + b"}")
    make("json-list", b'["rows", 8]')
    make("json-formats-list", b'{"formats": [["e4m3"]]}')
    valid = isa.encode(isa.Opcode.END)
    make("truncated-program", (isa.encode(isa.Opcode.SYNC) + valid)[:40])
    return cases


@pytest.fixture
def files(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    return work, bad_files(work)


def test_bad_input_files_for_every_command(files, capsys):
    work, cases = files
    out = work / "out.bin"
    slots = [
        lambda p: ["asm", p, "-o", out],
        lambda p: ["disasm", p],
        lambda p: ["sim", p, "--engine", "func"],
        lambda p: ["sim", work / "prog.s", "--dram", p, "--engine", "func"],
        lambda p: ["sim", work / "prog.s", "--config", p, "--engine", "func"],
        lambda p: ["generate", "npu", "--config", p, "-o", out],
    ]
    (work / "prog.s").write_text("END\n")
    seen = 0
    for label, path in cases:
        for slot in slots:
            argv = slot(path)
            status, _, err = run_case(argv, capsys, work, outputs=(out,))
            seen += 1
            if label in ("missing", "folder", "fifo", "char-device"):
                assert status == 2, (argv, err)
    assert seen == 6 * len(cases)


BAD_VALUES = [None, True, False, -1, 0, 3, 1.5, "8", "", [], {}, [8], 2 ** 64, 10 ** 30, "e4m3", float("inf")]


def config_cases():
    """Every field of NPUConfig with every bad value, plus malformed documents."""
    for f in fields(NPUConfig):
        for v in BAD_VALUES:
            try:
                text = json.dumps({f.name: v})
            except ValueError:
                continue
            yield f"{f.name}={v!r}", text
    yield "formats-dup", json.dumps({"formats": ["e4m3", "e4m3"]})
    yield "formats-empty", json.dumps({"formats": []})
    yield "formats-unknown", json.dumps({"formats": ["e3m4"]})
    yield "unknown-key", json.dumps({"rowz": 8})
    yield "root-list", "[1, 2]"
    yield "root-string", '"8x8"'
    yield "deep", "{" + '"a": {' * 50_000 + "}" * 50_001
    yield "truncated", '{"rows": 4'
    yield "nan", '{"rows": NaN}'


def test_every_bad_config_is_one_sentence(tmp_path):
    n = 0
    for label, text in config_cases():
        p = tmp_path / "cfg.json"
        p.write_text(text)
        try:
            cfg = cli.load_cfg(str(p))
        except cli.UsageError as exc:
            msg = str(exc)
            # (the longest: an unknown key, with every allowed key named)
            assert "\n" not in msg and len(msg) < 500, (label, msg)
            assert msg.startswith(f"{str(p)!r}: "), (label, msg)
            n += 1
            continue
        # accepted: it must be a real, valid configuration that round-trips
        assert NPUConfig.from_json(cfg.to_json()) == cfg, label
    assert n >= 120


# ---- output paths ----------------------------------------------------------------------------
def output_cases(work, suffix=".out"):
    """(label, path, expected message) for outputs that must be refused before any work."""
    (work / f"sub{suffix}").mkdir(exist_ok=True)
    return [
        ("folder", work / f"sub{suffix}", "is a folder; give a file name"),
        ("missing-folder", work / "nope" / f"x{suffix}", "folder '{parent}' does not exist"),
        ("sysfs", Path(f"/sys/fp8npu-test{suffix}"), "cannot write to the folder '/sys'"),
        ("char-device", Path("/dev/full"), "is not a regular file"),
    ]


def test_bad_output_paths_for_every_command(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "prog.s"
    src.write_text("END\n")
    binary = work / "prog.bin"
    binary.write_bytes(isa.encode(isa.Opcode.END))
    commands = [
        (".out", lambda o: ["generate", "mac", "-o", o]),
        (".out", lambda o: ["asm", src, "-o", o]),
        (".out", lambda o: ["disasm", binary, "-o", o]),
        (".out", lambda o: ["sim", src, "--engine", "func", "-o", o]),
        (".out", lambda o: ["sim", src, "--engine", "rtl", "-o", o]),
        (".vcd", lambda o: ["sim", src, "--engine", "rtl", "--waves", o]),
    ]
    n = 0
    for suffix, make in commands:
        for label, path, message in output_cases(work, suffix):
            if label == "char-device" and suffix == ".vcd":
                continue              # /dev/full has no .vcd suffix; refused for that instead
            argv = make(path)
            t0 = time.monotonic()
            status, _, err = run_case(argv, capsys, work, allowed=(2,))
            assert message.format(parent=path.parent) in err, (label, argv, err)
            assert time.monotonic() - t0 < 30, "an output path must be checked before any long work"
            n += 1
    assert n == 23


@pytest.mark.parametrize("argv_of", [
    lambda w: ["asm", w / "p.s", "-o", w / "p.s"],
    lambda w: ["asm", w / "p.s", "-o", w / "link.s"],
    lambda w: ["disasm", w / "p.bin", "-o", w / "p.bin"],
    lambda w: ["disasm", w / "p.bin", "-o", w / "sub" / ".." / "p.bin"],
    lambda w: ["sim", w / "p.bin", "--engine", "func", "-o", w / "p.bin"],
    lambda w: ["sim", w / "p.bin", "--engine", "func", "--dram", w / "img", "-o", w / "img"],
    lambda w: ["sim", w / "p.bin", "--engine", "func", "--dram", w / "img", "-o", w / "hard"],
    lambda w: ["generate", "npu", "--config", w / "c.json", "-o", w / "c.json"],
    lambda w: ["sim", w / "p.bin", "--engine", "rtl", "--waves", w / "p.bin"],
])
def test_an_output_never_replaces_an_input(tmp_path, capsys, argv_of):
    w = tmp_path
    (w / "sub").mkdir()
    (w / "p.s").write_text("END\n")
    (w / "p.bin").write_bytes(isa.encode(isa.Opcode.END))
    (w / "img").write_bytes(bytes(64))
    os.link(w / "img", w / "hard")
    (w / "link.s").symlink_to(w / "p.s")
    (w / "c.json").write_text("{}")
    status, _, err = run_case(argv_of(w), capsys, w, allowed=(2,))
    assert "would overwrite the input" in err or "must name a .vcd" in err


def _file_size_limit(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_full_disk_leaves_no_partial_file(tmp_path):
    """A write that fails part way (here: a file size limit, as a full disk would) is one error
    line, and neither a partial output nor a temporary file is left; an old output survives."""
    src = tmp_path / "p.s"
    src.write_text("SYNC unit=1\n" * 300 + "END\n")          # 9,632 bytes of program
    out = tmp_path / "p.bin"
    out.write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-m", "fp8npu.compiler", "asm", str(src), "-o", str(out)],
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(4096))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"fp8npu: error: cannot write '{out}': File too large\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.bin", "p.s"]
    assert out.read_bytes() == b"old"


def test_full_disk_while_generating_verilog(tmp_path):
    """With almost no room, even the yosys that Amaranth runs fails: still one line."""
    out = tmp_path / "mac.v"
    proc = subprocess.run([sys.executable, "-m", "fp8npu.compiler", "generate", "mac", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(4096))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("fp8npu: error: ")
    assert "File too large" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_demo_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    status, _, err = run_case(["demo", "mac", "--out-dir", f], capsys, tmp_path, allowed=(2,))
    assert err == f"fp8npu: error: --out-dir '{f}' is a file, not a folder\n"


@pytest.mark.parametrize("top", ["1abc", "a-b", "module", "x" * 200, "a b", "", "wire", "é"])
def test_bad_top_names(tmp_path, capsys, top):
    status, _, err = run_case(["generate", "mac", "--top", top], capsys, tmp_path, allowed=(2,))
    assert "--top must be a Verilog identifier" in err


def test_cache_that_is_a_file(tmp_path, capsys, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("x")
    monkeypatch.setenv("FP8NPU_CACHE", str(f))
    (tmp_path / "p.s").write_text("END\n")
    status, _, err = run_case(["sim", tmp_path / "p.s"], capsys, tmp_path, allowed=(2,))
    assert err == (f"fp8npu: error: FP8NPU_CACHE points at '{f}', which is not a folder; "
                   f"set FP8NPU_CACHE to a folder fp8npu may write to\n")


# ---- hostile register values and sizes -----------------------------------------------------
def register_cases():
    """Generated: the sim command's address options at and past the 32-bit limits, and windows
    that do not lie inside the DRAM. Every one must be refused, alike on both engines."""
    past = [1 << 32, (1 << 32) + 32, 1 << 40, 10 ** 30]
    for v in past + [0xFFFFFFE1, 17, -32]:
        yield ["--prog-addr", hex(v)]
    for v in past[1:] + [-1]:
        yield ["--dram-size", hex(v)]
    for v in past + [0x100000]:
        yield ["--window", f"0:{v:#x}"]
        yield ["--window", f"{v:#x}:0x20"]
    for w in ("0x100:0x80", "a:b", "1:2:3", ":", "-32:0x20"):
        yield ["--window", w]


def test_hostile_addresses_are_refused_alike_before_any_work(tmp_path, capsys):
    (tmp_path / "p.s").write_text("END\n")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = 0
    for extra in register_cases():
        errors = []
        for engine in ("func", "rtl"):
            t0 = time.monotonic()
            status, _, err = run_case(["sim", tmp_path / "p.s", "--engine", engine, *extra], capsys, tmp_path,
                                      allowed=(2,))
            assert time.monotonic() - t0 < 30, (extra, "checked late")
            errors.append(err)
            n += 1
        assert errors[0] == errors[1], extra
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mb < 512, f"memory grew by {grown_mb:.0f} MB"
    assert n >= 50


def test_window_past_the_image_is_refused_on_both_engines(tmp_path, capsys):
    (tmp_path / "p.s").write_text("END\n")
    img = tmp_path / "img"
    img.write_bytes(bytes(4096))
    errs = []
    for engine in ("func", "rtl"):
        status, _, err = run_case(["sim", tmp_path / "p.s", "--dram", img, "--engine", engine,
                                   "--window", "0:0x100000"], capsys, tmp_path, allowed=(2,))
        errs.append(err)
    assert errs[0] == errs[1] == ("fp8npu: error: the DMA window [0x0, 0x100000) must lie inside the "
                                  "4128-byte DRAM image\n")


# ---- signals ----------------------------------------------------------------------------------
def _long_program(n):
    push = isa.encode(isa.Opcode.SYNC, unit=0, push_next=1)
    pop = isa.encode(isa.Opcode.SYNC, unit=1, pop_prev=1)
    return (push + pop) * n + isa.encode(isa.Opcode.END)


SMALL = {"rows": 2, "cols": 2, "sp_lines": 64, "acc_lines": 16}


@pytest.mark.parametrize("sig, status, word", [(signal.SIGTERM, 143, "terminated"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_signal_stops_the_simulator_and_cleans_up(tmp_path, sig, status, word):
    """SIGTERM (and SIGINT) to fp8npu during an RTL run: the simulator child ends, the run's
    temporary folder is removed, and the exit status says why."""
    (tmp_path / "cfg.json").write_text(json.dumps(SMALL))
    (tmp_path / "p.bin").write_bytes(_long_program(150_000))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    # the child starts with SIGINT at its default action, as from a shell, even if this process
    # inherited it ignored (a child of a process that ignores SIGINT ignores it too)
    proc = subprocess.Popen([sys.executable, "-m", "fp8npu.compiler", "sim", str(tmp_path / "p.bin"), "--fast",
                             "--config", str(tmp_path / "cfg.json"), "--max-cycles", "100000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait until the simulator runs (its progress file appears), then signal fp8npu alone
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if any(tmpdir.glob("fp8npu-rtl-*/progress.jsonl")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    run_dirs = list(tmpdir.glob("fp8npu-rtl-*"))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert err.splitlines()[-1] == f"fp8npu: {word}"
    assert "Traceback" not in err
    for d in run_dirs:
        assert not d.exists(), "the run folder was left behind"
    # no process is left running in the run folder
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cwd = os.readlink(p / "cwd")
            except OSError:
                continue
            assert not any(cwd.startswith(str(d)) for d in run_dirs), f"process {p.name} still runs"


# ---- the model commands: compile, run, report -----------------------------------------------
FACTORY = """
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), (torch.randn(3, 8),)

def raises():
    raise RuntimeError("the factory failed\\non two lines")

def wrong():
    return 42

def not_module():
    return "model", (torch.randn(3, 8),)

def nan_weights():
    m = torch.nn.Linear(8, 8)
    with torch.no_grad():
        m.weight[2, 3] = float("inf")
    return m, (torch.randn(3, 8),)

NOT_CALLABLE = 3
"""


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "f.py").write_text(FACTORY)
    (tmp_path / "broken.py").write_text("def make(:\n")
    (tmp_path / "cfg.json").write_text(json.dumps(SMALL))
    return tmp_path


def test_compile_run_report_with_hostile_inputs(model_dir, capsys):
    w = model_dir
    out = w / "m.npu"
    status, _, err = run_case(["compile", f"{w / 'f.py'}:make", "-o", out, "--config", w / "cfg.json"], capsys, w,
                              allowed=(0,), outputs=(out,))
    import torch
    torch.save(torch.randn(3, 8), w / "x.pt")
    torch.save(torch.randn(4, 8), w / "wrong_shape.pt")
    torch.save({"not": "a tensor"}, w / "dict.pt")
    np.save(w / "x.npy", np.zeros((3, 8), np.float32))
    np.save(w / "x64.npy", np.zeros((3, 8)))
    (w / "garbage.npu").write_bytes(bytes(range(256)) * 4)
    data = out.read_bytes()
    (w / "truncated.npu").write_bytes(data[:len(data) // 3])
    (w / "flipped.npu").write_bytes(data[:100] + bytes([data[100] ^ 0x40]) + data[101:])
    (w / "pickle.pt").write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.")
    cases = [
        (["compile", f"{w / 'f.py'}:raises", "-o", w / "a.npu"], "f.py:raises() raised RuntimeError: the factory failed"),
        (["compile", f"{w / 'f.py'}:wrong", "-o", w / "a.npu"], "must return (module, example_inputs), not int"),
        (["compile", f"{w / 'f.py'}:not_module", "-o", w / "a.npu"], "compile() takes a torch.nn.Module, not str"),
        (["compile", f"{w / 'f.py'}:nan_weights", "-o", w / "a.npu"], "the weight holds 1 NaN or infinite values"),
        (["compile", f"{w / 'f.py'}:NOT_CALLABLE", "-o", w / "a.npu"], "has no function 'NOT_CALLABLE'"),
        (["compile", f"{w / 'f.py'}:missing", "-o", w / "a.npu"], "has no function 'missing'"),
        (["compile", f"{w / 'broken.py'}:make", "-o", w / "a.npu"], "failed to import: SyntaxError"),
        (["compile", f"{w / 'nope.py'}:make", "-o", w / "a.npu"], "cannot read the Python file"),
        (["compile", "f.py", "-o", w / "a.npu"], "must be given as FILE.py:FACTORY"),
        (["compile", f"{w / 'f.py'}:make", "-o", w / "f.py"], "would overwrite the input"),
        (["compile", f"{w / 'f.py'}:make", "-o", w / "a.npu", "--quant", "weights=rows"],
         "quantization weights must be one of tensor, channel, block, not 'rows'"),
        (["compile", f"{w / 'f.py'}:make", "-o", w / "a.npu", "--quant", "zzz"], "--quant takes KEY=VALUE pairs"),
        (["run", w / "garbage.npu", "--inputs", w / "x.pt"], "is not an fp8npu model file"),
        (["run", w / "truncated.npu", "--inputs", w / "x.pt"], "is corrupt or truncated"),
        (["run", w / "flipped.npu", "--inputs", w / "x.pt"], "is corrupt or truncated"),
        (["run", w / "f.py", "--inputs", w / "x.pt"], "is not an fp8npu model file"),
        (["run", out, "--inputs", w / "wrong_shape.pt"], "input input must have shape (3, 8)"),
        (["run", out, "--inputs", w / "x64.npy"], "must be float32, not float64"),
        (["run", out, "--inputs", w / "dict.pt"], "must hold a tensor or a tuple or list of tensors"),
        (["run", out, "--inputs", w / "pickle.pt"], "cannot read"),
        (["run", out, "--inputs", w / "x.pt", w / "x.pt"], "the model takes 1 input(s)"),
        (["run", out, "--inputs", w / "f.py"], "inputs must be .pt or .npy files"),
        (["run", out, "--inputs", w / "x.pt", "-o", w / "y.txt"], "-o must name a .pt or .npy file"),
        (["run", out, "--inputs", w / "x.pt", "-o", w / "x.pt"], "would overwrite the input"),
        (["run", out, "--inputs", w / "x.pt", "--backend", "gpu"], "invalid choice: 'gpu'"),
        (["report", w / "garbage.npu"], "is not an fp8npu model file"),
        (["report", w / "missing.npu"], "cannot read the model"),
    ]
    for argv, fragment in cases:
        status, _, err = run_case(argv, capsys, w, allowed=(2,))
        assert fragment in err, (argv, err)
    for argv in (["run", out, "--inputs", w / "x.pt", "-o", w / "y.pt"], ["run", out, "--inputs", w / "x.npy"],
                 ["report", out], ["report", out, "--json"], ["run", out, "--inputs", w / "x.pt", "--json"]):
        run_case(argv, capsys, w, allowed=(0,), outputs=(w / "y.pt",))


# ---- cases an outside review found (each a root cause; kept so they stay fixed) ----------------
def test_paths_that_cannot_be_looked_at(tmp_path, capsys, monkeypatch):
    w = tmp_path
    (w / "ok.s").write_text("END\n")
    (w / "ok.bin").write_bytes(isa.encode(isa.Opcode.END))
    os.symlink(w / "loopb.s", w / "loopa.s")
    os.symlink(w / "loopa.s", w / "loopb.s")
    long = "a" * 300
    deep = "/".join(["d"] * 2600) + "/x.bin"
    cases = [
        ["asm", w / "loopa.s", "-o", w / "a.bin"],
        ["disasm", w / "ok.bin", "-o", w / "loopa.s"],
        ["sim", w / "ok.bin", "--engine", "func", "-o", w / "loopa.s"],
        ["generate", "--config", w / "loopa.s", "-o", w / "x.v"],
        ["compile", f"{w / 'loopa.s'}:f", "-o", w / "m.npu"],
        ["asm", w / "ok.s", "-o", w / long],
        ["asm", w / "ok.s", "-o", w / deep],
        ["disasm", w / "ok.bin", "-o", w / long / "x.s"],
        ["asm", w / f"{long}.s"],
        ["asm", "."],
        ["asm", "/"],
        ["asm", ""],
        ["demo", "--out-dir", w / long],
        ["asm", w / "ok.s", "-o", ""],
        ["run", w / "m.npu", "--inputs", w / "x.pt", "-o", "-"],
    ]
    for argv in cases:
        run_case(argv, capsys, w, allowed=(2,))
    for cache in (str(w / long), "~nosuchuser_zz/cache", str(w / "ok.s" / "sub")):
        monkeypatch.setenv("FP8NPU_CACHE", cache)
        run_case(["sim", w / "ok.s", "--engine", "rtl"], capsys, w, allowed=(2,))


def test_messages_stay_one_line(tmp_path, capsys):
    w = tmp_path
    bad = w / "bad\nname.s"
    bad.write_text("BOGUS\n")
    (w / "bad\nprog.bin").write_bytes(b"abc")
    (w / "bad\ncfg.json").write_text("not json")
    (w / "ok.bin").write_bytes(isa.encode(isa.Opcode.END))
    for argv in (["asm", bad, "-o", w / "a.bin"], ["sim", bad, "--engine", "func"], ["disasm", w / "bad\nprog.bin"],
                 ["generate", "--config", w / "bad\ncfg.json"], ["sim", w / "ok.bin", "--config", w / "bad\ncfg.json"]):
        status, _, err = run_case(argv, capsys, w, allowed=(2,))
        assert "\\n" in err


def test_huge_numbers_never_reach_a_decimal_conversion(tmp_path, capsys):
    (tmp_path / "ok.s").write_text("END\n")
    h, z = "f" * 5000, "0" * 5000
    for extra in (["--window", f"0:0x{h}"], [f"--window=0x1{z}:0"], [f"--prog-addr=-0x1{z}"], [f"--dram-size=-0x{h}"],
                  ["--window", "0:" + "9" * 5000]):
        run_case(["sim", tmp_path / "ok.s", "--engine", "func", *extra], capsys, tmp_path, allowed=(2,))
    for argv in (["bench", "funcsim", "--size", "100000000"], ["bench", "funcsim", "--size", "9" * 30],
                 ["bench", "mac", "--vectors", "9" * 30], ["bench", "npu", "--sizes", "9" * 30],
                 ["demo", "mac", "--seed=-1"], ["demo", "--seed", str(2 ** 70)], ["demo", "mac", "--vectors", "9" * 30],
                 ["sim", tmp_path / "ok.s", "--max-cycles", "9" * 40]):
        run_case(argv, capsys, tmp_path, allowed=(2,))


def test_config_corner_cases(tmp_path):
    for text, message in (('{"rows": ' + "[" * 990 + "]" * 990 + "}", "rows must be an integer|nested too deeply"),
                          ('{"axi_addr_bits": 32.0}', "axi_addr_bits must be an integer from 12 to 32, not 32.0"),
                          ('{"rows": 4, "rows": 8}', "config key 'rows' is given twice")):
        p = tmp_path / "c.json"
        p.write_text(text)
        with pytest.raises(cli.UsageError, match=message):
            cli.load_cfg(str(p))


@pytest.mark.parametrize("redirect, status, message", [
    ("> /dev/full", 2, "fp8npu: error: cannot write the output: No space left on device"),
    (">&-", 2, "fp8npu: error: cannot write the output: standard output is closed"),
    ("| true", None, ""),
])
def test_standard_output_failures(tmp_path, redirect, status, message):
    (tmp_path / "ok.bin").write_bytes(isa.encode(isa.Opcode.END) * 200)
    cmd = f"{sys.executable} -m fp8npu.compiler disasm ok.bin {redirect}"
    if redirect.startswith("|"):
        cmd = f"{sys.executable} -m fp8npu.compiler disasm ok.bin 2>err.txt | true; cat err.txt >&2"
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    if status is not None:
        assert proc.returncode == status and proc.stderr.strip() == message, proc.stderr


def test_crash_handler_without_a_temporary_folder(monkeypatch):
    def refuse(*a, **k):
        raise FileNotFoundError(2, "No usable temporary directory found")
    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    line = cli._internal_error(ValueError("boom\nagain"))
    assert line.startswith("fp8npu: internal error (ValueError: boom\\nagain); the traceback could not be saved")
    assert "\n" not in line


def test_malformed_model_files_with_a_valid_checksum(tmp_path, capfd):
    import hashlib
    import struct

    from fp8npu.compiler.model import MAGIC, ModelFileError, load

    def file(body):
        return MAGIC + body + hashlib.sha256(body).digest()

    def parts(*ps):
        return struct.pack("<II", 2, len(ps)) + b"".join(struct.pack("<Q", len(p)) + p for p in ps)

    graph = {"mode": "forward", "segments": [], "inputs": [], "host_ops": []}
    cases = [file(struct.pack("<II", 2, 3)), file(struct.pack("<II", 2, 1 << 31)),
             file(parts(b"not json", b"", b"")), file(parts(b"[]", b"", b"")),
             file(parts(b"{}", b"", b"")), file(parts(b'{"config": {"rows": 99}}', b"", b"")),
             file(struct.pack("<II", 2, 3) + struct.pack("<Q", 1 << 63)),
             file(parts(json.dumps({"config": {}, "quant": {}, "graphs": []}).encode(), b"")),
             file(parts(json.dumps({"config": {}, "quant": {}, "graphs": [graph, graph]}).encode(), b"", b"x")),
             file(parts(json.dumps({"config": {}, "quant": {}, "graphs": [graph]}).encode(), b"", b"PK not a zip"))]
    for blob in cases:
        with pytest.raises(ModelFileError):
            load("m.npu", blob)
    out, err = capfd.readouterr()
    assert err == "", err
