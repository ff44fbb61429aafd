"""The Verilator model cache (fp8npu.sim.modelcache): concurrent first runs build once, a build
killed at any point leaves nothing that breaks the next run, and a broken entry is rebuilt.

Most cases use a fast stand-in build (a Python function writing files slowly) so that many
random kill points are cheap; the real-Verilator cases build a tiny design
(tests/cache_worker.py) in separate processes on an empty cache.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from fp8npu.sim import modelcache
from fp8npu.sim.modelcache import MANIFEST, CacheError, cached_model, entry_problem

WORKER = Path(__file__).with_name("cache_worker.py")

# A stand-in build: writes a "binary" in 20 pieces with pauses, counting builds in a file.
FAKE_BUILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from fp8npu.sim.modelcache import cached_model

    def build(folder):
        with open(os.environ["COUNT_FILE"], "a") as f:
            f.write("build\\n")
        for i in range(20):
            (folder / f"part{i}.o").write_bytes(bytes(1000))
            with open(folder / "sim", "ab") as f:
                f.write(bytes([i]) * 1000)
            time.sleep(float(os.environ.get("PAUSE", "0.02")))

    entry = cached_model("fake", "k1", "sim", build)
    assert (entry / "sim").read_bytes() == b"".join(bytes([i]) * 1000 for i in range(20))
    print("ok", entry)
""")


def _env(cache, **extra):
    env = dict(os.environ, FP8NPU_CACHE=str(cache), PYTHONWARNINGS="error::DeprecationWarning")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _fake(cache, count_file, pause=0.02):
    return subprocess.Popen([sys.executable, "-c", FAKE_BUILD], env=_env(cache, COUNT_FILE=count_file,
                                                                           PAUSE=pause),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _builds(count_file):
    return len(Path(count_file).read_text().splitlines()) if Path(count_file).exists() else 0


def _leftovers(cache):
    return sorted(p.name for p in (cache / "rtl").iterdir() if p.name.startswith((".build-", ".trash-")))


def test_concurrent_first_runs_build_once(tmp_path):
    count = tmp_path / "count"
    procs = [_fake(tmp_path / "cache", count) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert _builds(count) == 1
    assert sum("waiting for another process" in err for _, err in outs) >= 1
    assert _leftovers(tmp_path / "cache") == []


def test_build_killed_at_random_points_never_breaks_the_next_run(tmp_path):
    rng = np.random.default_rng(2026)
    cache, count = tmp_path / "cache", tmp_path / "count"
    for delay in rng.uniform(0.0, 0.6, 12):
        p = _fake(cache, count)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        if p.returncode == 0:        # it finished first: start from an empty cache again
            modelcache._remove(cache / "rtl" / "fake-k1")
            continue
        again = _fake(cache, count, pause=0)
        out, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        assert _leftovers(cache) == []
        modelcache._remove(cache / "rtl" / "fake-k1")


def _make_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8NPU_CACHE", str(tmp_path))
    built = []

    def build(folder):
        built.append(folder)
        (folder / "sim").write_bytes(b"simulator" * 100)

    entry = cached_model("unit", "k", "sim", build, notify=lambda m: None)
    return entry, build, built


@pytest.mark.parametrize("damage, problem", [
    (lambda e: (e / MANIFEST).unlink(), "its manifest is missing (an interrupted build?)"),
    (lambda e: (e / MANIFEST).write_text("{not json"), "its manifest is unreadable"),
    (lambda e: (e / MANIFEST).write_text(json.dumps({"format": 0})),
     "its manifest is not one this version of fp8npu wrote"),
    (lambda e: (e / "sim").unlink(), "its simulator binary is missing"),
    (lambda e: (e / "sim").write_bytes(b"simulator" * 50),
     "its simulator binary does not match the manifest (changed or truncated)"),
    (lambda e: (e / "sim").write_bytes(b"simulatoR" * 100),
     "its simulator binary does not match the manifest (changed or truncated)"),
])
def test_broken_entry_is_rebuilt(tmp_path, monkeypatch, damage, problem):
    entry, build, built = _make_entry(tmp_path, monkeypatch)
    assert entry_problem(entry, "sim") is None
    damage(entry)
    assert entry_problem(entry, "sim") == problem
    said = []
    again = cached_model("unit", "k", "sim", build, notify=said.append)
    assert again == entry and entry_problem(entry, "sim") is None
    assert len(built) == 2
    assert said == [f"the cached model {entry} is broken ({problem}); rebuilding it"]


def test_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FP8NPU_CACHE", str(tmp_path))

    def build(folder):
        (folder / "sim").write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cached_model("unit", "k", "sim", build)
    assert sorted(p.name for p in (tmp_path / "rtl").iterdir()) == ["unit-k.lock"]


def test_cache_path_that_is_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cachefile"
    f.write_text("x")
    monkeypatch.setenv("FP8NPU_CACHE", str(f))
    with pytest.raises(CacheError, match=rf"^FP8NPU_CACHE points at '{f}', which is not a folder; "
                                         r"set FP8NPU_CACHE to a folder fp8npu may write to$"):
        cached_model("unit", "k", "sim", lambda folder: None)


def test_cache_under_a_file(tmp_path, monkeypatch):
    f = tmp_path / "cachefile"
    f.write_text("x")
    monkeypatch.setenv("FP8NPU_CACHE", str(f / "sub"))
    with pytest.raises(CacheError, match=r"^cannot create the model cache folder .*sub/rtl'.*; set FP8NPU_CACHE"):
        cached_model("unit", "k", "sim", lambda folder: None)


# ---- the real thing: Verilator builds of a tiny design in separate processes ----------------
def _worker(cache, seed=0):
    return subprocess.Popen([sys.executable, str(WORKER), str(seed)], env=_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_real_concurrent_first_runs(tmp_path):
    cache = tmp_path / "cache"
    procs = [_worker(cache, seed) for seed in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("waiting for another process that is building the model cache_adder" in e for _, e in outs) == 1
    entries = [p.name for p in (cache / "rtl").iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].startswith("cache_adder-")


def test_real_build_killed_then_corrupted(tmp_path):
    cache = tmp_path / "cache"
    rng = np.random.default_rng(7)
    for delay in rng.uniform(1.0, 8.0, 2):       # inside Verilator or the C++ compile
        p = _worker(cache)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    p = _worker(cache)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert _leftovers(cache) == []
    # corrupt the built simulator: the next run notices, rebuilds and passes
    entry = Path(out.split()[1])
    binary = entry / "cache_adder"
    binary.write_bytes(binary.read_bytes()[:1000])
    p = _worker(cache)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "is broken (its simulator binary does not match the manifest (changed or truncated)); rebuilding it" in err
