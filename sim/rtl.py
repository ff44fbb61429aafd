"""Build Amaranth designs under Verilator for cocotb, and stream vectors through them.

* :class:`RTLModel` converts a design to Verilog, builds it once with cocotb's runner (cached
  by the hash of the Verilog, the Verilator version and the cocotb version) and runs cocotb
  test modules against it.
* :meth:`RTLModel.stream` drives pre-packed vectors with :mod:`fp8npu.sim.cocotb_stream`.
* :func:`pack_lanes` / :func:`unpack_lanes` convert between ``[cycles, lanes]`` arrays and the
  packed rows a :class:`~fp8npu.sim.harness.LaneHarness` port takes.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .modelcache import cache_root, cached_model
from .toolchain import find_verilator, verilator_env

__all__ = ["RTLError", "RTLModel", "StreamResult", "cache_root", "log_cause", "pack_lanes", "run_folder",
           "to_verilog", "unpack_lanes"]

# Verilator warnings that Amaranth's generated Verilog triggers by design (implicit width
# changes in arithmetic, unused bits of shared signals). They are not errors.
# cocotb's runner marks every signal public (--public-flat-rw), which keeps Verilator from
# inlining or removing anything, so large designs simulate many times slower and compile to
# far more C++. Only top-level ports are made visible instead (a signal a testbench needs inside
# the design would carry a /*verilator public_flat_rw*/ comment). Waveforms still show every signal.
VERILATOR_ARGS = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNUSEDSIGNAL", "-O3",
                  "--no-public-flat-rw", "--public-depth", "1"]


class RTLError(RuntimeError):
    """Verilog generation, a Verilator build or a cocotb run failed. The message is one sentence that says what
    went wrong and names the log (which is kept); :attr:`detail` holds the log's last lines."""

    def __init__(self, message, detail=""):
        super().__init__(message)
        self.detail = detail


def to_verilog(design, name):
    """Verilog text of an Amaranth component, with ``name`` as the top module.

    A failure of the yosys that Amaranth runs (for example when the disk is full) is an
    :class:`RTLError` naming the cause in one line."""
    from amaranth.back import verilog
    try:
        return verilog.convert(design, name=name, emit_src=False)
    except Exception as exc:
        if type(exc).__name__ not in ("YosysError", "WasmtimeError") and not isinstance(exc, OSError):
            raise
        found = _CAUSE.findall(str(exc))
        cause = " ".join(found[-1].split()) if found else " ".join(str(exc).split())[-200:]
        raise RTLError(f"Verilog generation with Amaranth's yosys failed: {cause}") from None


@contextlib.contextmanager
def _environment(env):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _log_tail(path, lines=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_CAUSE = re.compile(r"(%Error[^\n]*|\b[A-Za-z_.]*(?:Error|Exception|Failure|Interrupt)\b: [^\n]+|"
                    r"\bKilled\b[^\n]*|[Ss]egmentation fault[^\n]*)")


def log_cause(path):
    """The most telling line of a build or simulation log: the last Python exception line or
    Verilator ``%Error``, shortened to one line (empty if none is found)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    found = _CAUSE.findall(text)
    if not found:
        return ""
    cause = " ".join(found[-1].split())
    return cause if len(cause) <= 300 else cause[:297] + "..."


def _failure(what, log, fallback):
    cause = log_cause(log) or fallback
    return RTLError(f"{what} failed: {cause} (log kept in {log})", _log_tail(log))


def _design_fingerprint():
    """Hash of everything a design built from fp8npu.hdl depends on besides its parameters:
    the hardware sources, the simulation DRAM and the Amaranth version."""
    import amaranth
    import fp8npu.hdl
    h = hashlib.sha256(amaranth.__version__.encode())
    files = sorted(Path(fp8npu.hdl.__file__).parent.glob("*.py")) + [Path(__file__).with_name("simdram.py")]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _runner(processes=None):
    """cocotb's Verilator runner whose commands run in their own process group, so that an
    interrupt (Ctrl-C, SIGTERM turned into :class:`KeyboardInterrupt` by the CLI) stops the
    whole build or simulation, compilers included, before the exception goes on. The live
    child is kept in ``processes`` (a list), if given, for a caller in another thread to stop
    (:func:`kill_group`)."""
    import subprocess

    from cocotb_tools.runner import get_runner

    runner = get_runner("verilator")

    def execute_cmds(cmds, cwd, stdout=None):
        for cmd in cmds:
            stderr = None if stdout is None else subprocess.STDOUT
            proc = subprocess.Popen(cmd, cwd=cwd, env=runner.env, stdout=stdout, stderr=stderr,
                                    start_new_session=True)
            if processes is not None:
                processes.append(proc)
            try:
                code = proc.wait()
            except BaseException:
                kill_group(proc)
                raise
            finally:
                if processes is not None:
                    processes.remove(proc)
            if code != 0:
                raise RuntimeError(f"{Path(str(cmd[0])).name} exited with status {code}")

    runner._execute_cmds = execute_cmds
    return runner


def kill_group(proc):
    """Terminate a child's process group, then kill what is left after a grace period."""
    import signal
    import subprocess
    for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def run_folder(run_dir, prefix):
    """A folder for one simulation run: ``run_dir`` if given (kept), else a new temporary
    folder that is removed when the run succeeds and kept when it fails, so the log an error
    names is still there."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        yield run_dir
        return
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    except RTLError:
        raise                      # keep the folder: the message names its log
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class StreamResult:
    outputs: dict      # name -> [rows, nbytes] uint8
    cycles: int
    seconds: float

    @property
    def cycles_per_second(self):
        return self.cycles / self.seconds if self.seconds > 0 else float("inf")


class RTLModel:
    """An Amaranth design built under Verilator, ready for cocotb runs.

    The build is cached (:mod:`.modelcache`). Its key is the hash of the Verilog, or, when
    ``identity`` is given, of ``identity`` and the sources of :mod:`fp8npu.hdl` (then the
    Verilog is only generated on a cache miss and ``design`` may be a function returning the
    design), together with the Verilator and cocotb versions and the build options.

    Parameters
    ----------
    design : wiring.Component or callable
        The design; it must use the default ``sync`` domain (ports ``clk`` and ``rst``).
    name : str
        Top-level module name and cache-entry prefix.
    waves : bool or str
        Build with tracing so runs can dump waveforms: ``"vcd"`` (or True) for ``dump.vcd``,
        ``"fst"`` for the smaller ``dump.fst``, in the run directory.
    extra_verilog : str
        Verilog appended to the design's (modules it instantiates).
    identity : str, optional
        Everything that determines the design besides fp8npu's sources (for example a
        configuration as JSON).
    """

    def __init__(self, design, name, waves=False, extra_verilog="", identity=None):
        import cocotb

        self.name = name
        self.waves = self.wave_format(waves)
        verilator = find_verilator()
        # the model links cocotb's libraries by absolute path: a model built in another
        # environment (a venv made again, or elsewhere) is another cache entry, not a broken one
        libs = str(Path(cocotb.__file__).resolve().parent / "libs")
        options = [verilator.version_text, cocotb.__version__, libs, str(self.waves), " ".join(VERILATOR_ARGS)]
        if identity is None:
            verilog = to_verilog(design() if callable(design) else design,
                                 name) + extra_verilog
            key_text = [verilog]
            self._verilog = lambda: verilog
        else:
            key_text = [identity, _design_fingerprint(), extra_verilog]

            def generate():
                made = design() if callable(design) else design
                return to_verilog(made, name) + extra_verilog
            self._verilog = generate
        key = hashlib.sha256("\0".join(key_text + options).encode()).hexdigest()[:16]
        self.key = key
        self.build_dir = cached_model(name, key, name, self._build)
        self._runner = _runner()

    @property
    def verilog(self):
        """The model's Verilog (kept in its cache entry)."""
        return (self.build_dir / f"{self.name}.v").read_text()

    def _build(self, folder):
        """Verilate and compile into the empty private ``folder`` (see :mod:`.modelcache`)."""
        source = folder / f"{self.name}.v"
        source.write_text(self._verilog())
        log = folder / "build.log"
        runner = _runner()
        with _environment(verilator_env()):
            try:
                runner.build(sources=[source], hdl_toplevel=self.name, build_dir=folder,
                             build_args=VERILATOR_ARGS + (["--trace-fst"] if self.waves == "fst" else []),
                             waves=bool(self.waves), log_file=log)
            except (SystemExit, Exception) as exc:
                kept = cache_root() / "failed-builds" / f"{self.name}-{self.key}"
                shutil.rmtree(kept, ignore_errors=True)
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(folder, kept, ignore=shutil.ignore_patterns("*.o", "*.a", "*.gch"))
                raise _failure(f"Verilator build of {self.name}", kept / "build.log", str(exc)) from None

    @staticmethod
    def wave_format(waves):
        """``"vcd"``, ``"fst"`` or False for a ``waves`` argument; raises :class:`RTLError` if
        this machine cannot build it (call before creating the design, so nothing is wasted)."""
        if waves not in (False, True, None, "vcd", "fst"):
            raise ValueError(f"waves must be 'vcd', 'fst' or False, not {waves!r}")
        if waves == "fst":
            from .toolchain import fst_missing
            why = fst_missing()
            if why:
                raise RTLError(f"Verilator cannot write FST waveforms on this machine: {why}; "
                               f"dump a .vcd instead")
        return "vcd" if waves is True else (waves or False)

    @property
    def wave_file(self):
        """Name of the waveform file a run with waves writes in its run directory."""
        return f"dump.{self.waves}" if self.waves else None

    def run(self, test_module, extra_env, run_dir, waves=False, plusargs=(), processes=None):
        """Run a cocotb test module against the built model in ``run_dir`` (the simulator
        process is kept in the list ``processes`` while it runs, if given)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "sim.log"
        runner = self._runner if processes is None else _runner(processes)
        env = verilator_env()
        env["COCOTB_LOG_LEVEL"] = env.get("COCOTB_LOG_LEVEL", "WARNING")
        with _environment(env):
            try:
                results = runner.test(test_module=test_module, hdl_toplevel=self.name, hdl_toplevel_lang="verilog",
                                      build_dir=self.build_dir, test_dir=run_dir, extra_env=extra_env,
                                      waves=bool(waves and self.waves), log_file=log,
                                      results_xml=str(run_dir / "results.xml"), plusargs=list(plusargs))
            except (SystemExit, Exception) as exc:
                raise _failure(f"simulation of {self.name}", log, str(exc)) from None
        from cocotb_tools.runner import get_results
        try:
            tests, failed = get_results(results)
        except (OSError, RuntimeError, ValueError) as exc:
            raise _failure(f"simulation of {self.name}", log, f"no test results ({exc})") from None
        if tests == 0 or failed:
            raise _failure(f"simulation of {self.name}", log,
                           f"{failed} of {tests} cocotb tests failed")
        return run_dir

    def stream(self, inputs, outputs, drain=4, run_dir=None, waves=False):
        """Drive packed input rows one per clock and record outputs (see :mod:`.cocotb_stream`).

        ``inputs`` maps port names to ``[cycles, nbytes]`` uint8 arrays; ``outputs`` maps port
        names to their width in bytes. Returns a :class:`StreamResult` whose arrays have
        ``cycles + drain`` rows.
        """
        with run_folder(run_dir, f"{self.name}-") as run_dir:
            job = {"inputs": {}, "outputs": dict(outputs), "drain": drain,
                   "result": str(run_dir / "result.npz")}
            for port, rows in inputs.items():
                path = run_dir / f"in_{port}.npy"
                np.save(path, np.ascontiguousarray(rows, dtype=np.uint8))
                job["inputs"][port] = str(path)
            job_path = run_dir / "job.json"
            job_path.write_text(json.dumps(job))
            self.run("fp8npu.sim.cocotb_stream", {"FP8NPU_STREAM_JOB": str(job_path)}, run_dir, waves)
            with np.load(job["result"]) as data:
                recorded = {name: data[name].copy() for name in outputs}
                return StreamResult(recorded, int(data["cycles"]), float(data["seconds"]))


def pack_lanes(values, width):
    """``[cycles, lanes]`` integers of ``width`` bits -> ``[cycles, nbytes]`` packed rows (lane 0 lowest)."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values[:, None]
    cycles, lanes = values.shape
    v = values.astype(np.uint64)
    bits = ((v[:, :, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(cycles, lanes * width), axis=1, bitorder="little")


def unpack_lanes(rows, width, lanes):
    """Inverse of :func:`pack_lanes`: ``[cycles, nbytes]`` -> ``[cycles, lanes]`` uint64."""
    rows = np.asarray(rows, dtype=np.uint8)
    bits = np.unpackbits(rows, axis=1, bitorder="little")[:, :lanes * width]
    bits = bits.reshape(len(rows), lanes, width).astype(np.uint64)
    return (bits << np.arange(width, dtype=np.uint64)).sum(axis=2, dtype=np.uint64)


def nbytes(width, lanes=1):
    return (width * lanes + 7) // 8
