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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .toolchain import find_verilator, verilator_env

__all__ = ["RTLError", "RTLModel", "StreamResult", "cache_root", "pack_lanes", "unpack_lanes", "to_verilog"]

# Verilator warnings that Amaranth's generated Verilog triggers by design (implicit width
# changes in arithmetic, unused bits of shared signals). They are not errors.
# cocotb's runner marks every signal public (--public-flat-rw), which keeps Verilator from
# inlining or removing anything, so large designs simulate many times slower and compile to
# far more C++. Only top-level ports are made visible instead; a signal a testbench needs inside
# the design carries a /*verilator public_flat_rw*/ comment. Waveforms still show every signal.
VERILATOR_ARGS = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNUSEDSIGNAL", "-O3",
                  "--no-public-flat-rw", "--public-depth", "1"]


class RTLError(RuntimeError):
    """A Verilator build or a cocotb run failed; the message names the log to read."""


def cache_root():
    """Where built models are kept: ``$FP8NPU_CACHE`` or ``~/.cache/fp8npu``."""
    root = os.environ.get("FP8NPU_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fp8npu"


def to_verilog(design, name):
    """Verilog text of an Amaranth component, with ``name`` as the top module."""
    from amaranth.back import verilog
    return verilog.convert(design, name=name, emit_src=False)


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

    Parameters
    ----------
    design : wiring.Component
        The design; it must use the default ``sync`` domain (ports ``clk`` and ``rst``).
    name : str
        Top-level module name and build-folder prefix.
    waves : bool or str
        Build with tracing so runs can dump waveforms: ``"vcd"`` (or True) for ``dump.vcd``,
        ``"fst"`` for the smaller ``dump.fst``, in the run directory.
    """

    def __init__(self, design, name, waves=False, extra_verilog=""):
        import cocotb

        self.name = name
        self.waves = self.wave_format(waves)
        self.verilog = to_verilog(design, name) + extra_verilog
        verilator = find_verilator()
        key = hashlib.sha256(
            "\0".join([self.verilog, verilator.version_text, cocotb.__version__, str(self.waves),
                       " ".join(VERILATOR_ARGS)]).encode()).hexdigest()[:16]
        self.build_dir = cache_root() / "rtl" / f"{name}-{key}"
        self._build()

    def _build(self):
        """Verilate and compile; a second call on an up-to-date build directory is a no-op
        (Verilator skips identical inputs and make finds nothing to do)."""
        from cocotb_tools.runner import get_runner

        binary = self.build_dir / self.name
        self.build_dir.mkdir(parents=True, exist_ok=True)
        source = self.build_dir / f"{self.name}.v"
        if not source.exists() or source.read_text() != self.verilog:
            source.write_text(self.verilog)
        log = self.build_dir / "build.log"
        runner = get_runner("verilator")
        with _environment(verilator_env()):
            try:
                runner.build(sources=[source], hdl_toplevel=self.name, build_dir=self.build_dir,
                             build_args=VERILATOR_ARGS + (["--trace-fst"] if self.waves == "fst" else []),
                             waves=bool(self.waves), log_file=log)
            except (SystemExit, Exception) as exc:
                raise RTLError(f"Verilator build of {self.name} failed ({exc}); see {log}:\n"
                               f"{_log_tail(log)}") from None
        if not binary.exists():
            raise RTLError(f"Verilator build of {self.name} produced no simulator; see {log}:\n{_log_tail(log)}")
        self._runner = runner

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

    def run(self, test_module, extra_env, run_dir, waves=False):
        """Run a cocotb test module against the built model in ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "sim.log"
        runner = self._runner
        env = verilator_env()
        env["COCOTB_LOG_LEVEL"] = env.get("COCOTB_LOG_LEVEL", "WARNING")
        with _environment(env):
            try:
                results = runner.test(test_module=test_module, hdl_toplevel=self.name,
                                      build_dir=self.build_dir, test_dir=run_dir, extra_env=extra_env,
                                      waves=bool(waves and self.waves), log_file=log,
                                      results_xml=str(run_dir / "results.xml"))
            except (SystemExit, Exception) as exc:
                raise RTLError(f"simulation of {self.name} failed ({exc}); see {log}:\n{_log_tail(log)}") from None
        from cocotb_tools.runner import get_results
        tests, failed = get_results(results)
        if tests == 0 or failed:
            raise RTLError(f"simulation of {self.name}: {failed} of {tests} cocotb tests failed; "
                           f"see {log}:\n{_log_tail(log)}")
        return run_dir

    def stream(self, inputs, outputs, drain=4, run_dir=None, waves=False):
        """Drive packed input rows one per clock and record outputs (see :mod:`.cocotb_stream`).

        ``inputs`` maps port names to ``[cycles, nbytes]`` uint8 arrays; ``outputs`` maps port
        names to their width in bytes. Returns a :class:`StreamResult` whose arrays have
        ``cycles + drain`` rows.
        """
        with contextlib.ExitStack() as stack:
            if run_dir is None:
                run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{self.name}-"))
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
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
