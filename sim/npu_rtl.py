"""Run programs on the NPU RTL under Verilator with cocotb (see :mod:`.npu_tb`)."""

import json
import threading
from dataclasses import dataclass

from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import ErrorCode, Register, config_fields, launch_problem, launch_writes
from fp8npu.hdl.npu import NPU, hardware_problem

from .rtl import RTLModel, run_folder

__all__ = ["NPUSimulation", "RTLRun", "RTLSession"]


@dataclass
class RTLRun:
    dram: bytes
    registers: dict
    hung: bool
    wall_seconds: float

    @property
    def error(self):
        return ErrorCode(self.registers["ERROR"])

    @property
    def error_addr(self):
        return self.registers["ERROR_ADDR"]

    @property
    def done(self):
        return bool(self.registers["STATUS"] & 2)

    @property
    def cycles(self):
        return self.registers["CYCLES"]

    @property
    def utilization(self):
        cfg_word = self.registers["CONFIG"]
        fields = config_fields(cfg_word)
        rows, cols = fields["rows"], fields["cols"]
        return self.registers["MAC_BUSY"] / max(1, self.cycles * rows * cols)


def _watch(path, callback, stop, every):
    """Every ``every`` seconds, pass the newest record of the progress log to ``callback``."""
    while not stop.wait(every):
        try:
            lines = path.read_text().splitlines()
            if lines:
                callback(json.loads(lines[-1]))
        except (OSError, ValueError):    # not written yet, or a line half written
            pass


def _changes_only(callback):
    last = []

    def report(p):
        if not last or last[0] != p:
            last[:] = [p]
            callback(p)
    return report


#: Smallest simulation DRAM built for the fast path (bytes).
FAST_DRAM_MIN = 16 << 20


class NPUSimulation:
    """The NPU for one :class:`NPUConfig`, built once (cached) and run on DRAM images."""

    def __init__(self, cfg=None, waves=False, fast_dram_bytes=None):
        """With ``fast_dram_bytes`` the DRAM is simulated inside the design
        (:class:`~fp8npu.sim.simdram.NPUWithDRAM`, for speed); otherwise by cocotbext-axi's AxiSlave (over an AddressSpace)."""
        self.cfg = cfg or NPUConfig()
        problem = hardware_problem(self.cfg)
        if problem:
            from .rtl import RTLError
            raise RTLError(problem)
        waves = RTLModel.wave_format(waves)
        self.fast_dram_bytes = fast_dram_bytes
        key = "x".join(str(v) for v in (self.cfg.rows, self.cfg.cols, self.cfg.axi_data_bits))
        if fast_dram_bytes:
            from .simdram import SIM_MEMORY_VERILOG, NPUWithDRAM
            # one build serves every image up to 16 MiB, then one per power of two
            self.fast_dram_bytes = fast_dram_bytes = max(1 << (fast_dram_bytes - 1).bit_length(), FAST_DRAM_MIN)
            self.model = RTLModel(lambda: NPUWithDRAM(self.cfg, fast_dram_bytes), f"npudram_{key}", waves=waves,
                                  extra_verilog=SIM_MEMORY_VERILOG,
                                  identity=f"NPUWithDRAM {fast_dram_bytes} {self.cfg.to_json()}")
        else:
            self.model = RTLModel(lambda: NPU(self.cfg), f"npu_{key}", waves=waves,
                                  identity=f"NPU {self.cfg.to_json()}")

    def _job(self, d, dram, launches=(), **settings):
        """The testbench job for folder ``d`` with the image ``dram`` written there (a hex file
        the simulator loads, or a binary the AxiSlave model reads), and the plusargs to run it."""
        plusargs = []
        if self.fast_dram_bytes:
            from .simdram import write_hex
            write_hex(d / "dram_in.hex", dram, self.cfg.bus_bytes)
            plusargs = [f"+fp8npu_dram_in={d / 'dram_in.hex'}", f"+fp8npu_dram_out={d / 'dram_out.hex'}",
                        f"+fp8npu_dram_load={d / 'dram_load.hex'}"]
        else:
            (d / "dram_in.bin").write_bytes(bytes(dram))
        job = {"dram_in": str(d / "dram_in.bin"), "dram_out": str(d / "dram_out.bin"),
               "result": str(d / "result.json"), "dram_size": len(dram), "launches": list(launches),
               "fast": bool(self.fast_dram_bytes), "bus_bytes": self.cfg.bus_bytes,
               "dram_hex_out": str(d / "dram_out.hex"), "dram_hex_load": str(d / "dram_load.hex"), **settings}
        return job, plusargs

    def open(self, dram, **options):
        """A long-lived :class:`RTLSession` on the DRAM image ``dram`` (options as for
        :meth:`run_many`, except ``launches``)."""
        return RTLSession(self, bytes(dram), **options)

    def run(self, dram, prog_addr, prog_len, win_base=0, win_limit=None, **options):
        """Run the program at ``prog_addr`` (``prog_len`` commands) in ``dram``; return an
        :class:`RTLRun`. The options are those of :meth:`run_many`."""
        return self.run_many(dram, [(prog_addr, prog_len, win_base, win_limit)], **options)[0]

    def run_many(self, dram, launches, backpressure=0.0, seed=1, max_cycles=2_000_000, run_dir=None,
                 waves=False, waves_to=None, progress=None, mapped_bytes=None, progress_every=2.0,
                 progress_cycles=1 << 16):
        """Start the NPU once per launch on one DRAM, in one simulation, as a host would: write
        the registers, start, wait for the interrupt, read the registers. A launch is
        ``(prog_addr, prog_len, win_base, win_limit)`` (``win_limit`` None: the end of ``dram``)
        or the host's register writes themselves, ``[(Register, value), ...]`` ending with the
        CTRL start (:func:`fp8npu.hdl.isa.launch_writes`). Each start resets the
        core; the DRAM carries over. Returns one :class:`RTLRun` per launch run, each with the
        final DRAM (a launch that hangs ends the list).

        ``progress``, if given, is called about every ``progress_every`` seconds with a dict of
        the NPU's CYCLES and COMMANDS counters, when they have changed (the simulation appends
        them to ``progress.jsonl`` in the run directory every ``progress_cycles`` cycles), and
        once more at the end with the final counts. Only the image's bytes exist: the DRAM answers
        SLVERR to any access at or above ``len(dram)``, or above ``mapped_bytes`` if that is
        given (the DRAM returned is zero there). ``max_cycles`` applies to each launch.
        """
        dram = bytes(dram)
        if waves and not self.model.waves:
            raise ValueError("this simulation was built without waveforms: create it with "
                             "NPUSimulation(cfg, waves='vcd' or 'fst')")
        if self.fast_dram_bytes:
            if len(dram) > self.fast_dram_bytes:
                raise ValueError(f"the DRAM image ({len(dram)} bytes) is larger than the simulated DRAM "
                                 f"({self.fast_dram_bytes} bytes)")
        checked = []
        for launch in launches:
            if len(launch) == 4 and not isinstance(launch[0], (tuple, list)):
                prog_addr, prog_len, win_base, win_limit = launch
                win_limit = len(dram) if win_limit is None else win_limit
                writes = launch_writes(prog_addr, prog_len, win_base, win_limit)
            else:
                writes = list(launch)
            regs = dict(writes)
            problem = launch_problem(len(dram), regs.get(Register.PROG_ADDR, 0), regs.get(Register.PROG_LEN, 0),
                                     regs.get(Register.WIN_BASE, 0), regs.get(Register.WIN_LIMIT, 0),
                                     self.cfg.address_space)
            if problem:
                raise ValueError(problem)
            checked.append({"writes": [[int(r), int(v)] for r, v in writes]})
        with run_folder(run_dir, "fp8npu-run-") as d:
            job, plusargs = self._job(d, dram, backpressure=backpressure, seed=seed, max_cycles=max_cycles,
                                      mapped_bytes=mapped_bytes, launches=checked)
            if progress:
                job["progress"] = str(d / "progress.jsonl")
                job["poll"] = progress_cycles
            (d / "job.json").write_text(json.dumps(job))
            stop = threading.Event()
            if progress:
                progress = _changes_only(progress)
            watcher = threading.Thread(target=_watch, args=(d / "progress.jsonl", progress, stop, progress_every),
                                       daemon=True)
            if progress:
                watcher.start()
            try:
                self.model.run("fp8npu.sim.npu_tb", {"FP8NPU_NPU_JOB": str(d / "job.json")}, d, waves=waves,
                               plusargs=plusargs)
            finally:
                stop.set()
                if progress:
                    watcher.join()
            runs = json.loads((d / "result.json").read_text())["runs"]
            if progress:
                last = runs[-1]["registers"]
                progress({"cycles": last["CYCLES"], "commands": last["COMMANDS"]})
            if waves and waves_to:
                import shutil
                shutil.copy(d / self.model.wave_file, waves_to)
            final = (d / "dram_out.bin").read_bytes()
            return [RTLRun(final, r["registers"], r["hung"], r["wall_seconds"]) for r in runs]


class RTLSession:
    """One long-lived simulation of the NPU that a host drives request by request
    (:meth:`NPUSimulation.open`): write and read DRAM, read registers, launch. The simulated
    design keeps its state (DRAM, registers) between requests, and nothing is started again
    per launch. The simulation runs in a thread of this process, talking to the cocotb
    testbench (:func:`fp8npu.sim.npu_tb._serve`) over a Unix socket."""

    def __init__(self, sim, dram, backpressure=0.0, seed=1, max_cycles=2_000_000, run_dir=None, waves=False,
                 waves_to=None, progress=None, mapped_bytes=None, progress_every=2.0, progress_cycles=1 << 16):
        import socket
        import tempfile
        from pathlib import Path
        self.sim = sim
        self.size = len(dram)
        self.max_cycles = max_cycles
        self.progress = _changes_only(progress) if progress else None
        self.progress_every = progress_every
        self.waves_to = waves_to if waves else None
        if waves and not sim.model.waves:
            raise ValueError("this simulation was built without waveforms: create it with "
                             "NPUSimulation(cfg, waves='vcd' or 'fst')")
        if sim.fast_dram_bytes and len(dram) > sim.fast_dram_bytes:
            raise ValueError(f"the DRAM image ({len(dram)} bytes) is larger than the simulated DRAM "
                             f"({sim.fast_dram_bytes} bytes)")
        self._own_dir = run_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="fp8npu-rtl-")) if run_dir is None else Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        d = self.dir
        sock_path = Path(tempfile.mkdtemp(prefix="fp8npu-sock-")) / "npu.sock"    # short: socket paths are limited
        self._sock_dir = sock_path.parent
        job, plusargs = sim._job(d, dram, backpressure=backpressure, seed=seed, max_cycles=max_cycles,
                                 mapped_bytes=mapped_bytes, serve=str(sock_path))
        if progress:
            job["progress"] = str(d / "progress.jsonl")
            job["poll"] = progress_cycles
        (d / "job.json").write_text(json.dumps(job))
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(sock_path))
        self._listener.listen(1)
        self._listener.settimeout(0.5)
        self._failure = None
        self._processes = []
        self._conn = self._stream = None

        def simulate():
            try:
                sim.model.run("fp8npu.sim.npu_tb", {"FP8NPU_NPU_JOB": str(d / "job.json")}, d, waves=waves,
                              plusargs=plusargs, processes=self._processes)
            except BaseException as exc:       # reported to the host by the next request
                self._failure = exc
        self._thread = threading.Thread(target=simulate, daemon=True, name="fp8npu-rtl")
        self._thread.start()
        try:
            while self._conn is None:
                try:
                    self._conn, _ = self._listener.accept()
                except TimeoutError:
                    if not self._thread.is_alive():
                        self._cleanup()
                        raise self._failure or RuntimeError("the simulation ended before it connected") from None
        except BaseException:
            self._abort()
            raise
        self._stream = self._conn.makefile("rwb")

    def _abort(self):
        """Stop the simulator process (an interrupt, or a host that gives up) and clean up."""
        from .rtl import kill_group
        self._aborted = True
        for proc in list(self._processes):
            kill_group(proc)
        self._thread.join(timeout=30)
        for handle in (self._stream, self._conn):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
        self._stream = None
        self._cleanup()

    def _request(self, **req):
        if self._stream is None:
            raise RuntimeError("this RTL session is closed")
        try:
            self._stream.write(json.dumps(req).encode() + b"\n")
            self._stream.flush()
            line = self._stream.readline()
        except OSError:
            line = b""
        except BaseException:       # Ctrl-C, SIGTERM: the simulator must not outlive us
            self._abort()
            raise
        if not line:
            self._thread.join(timeout=30)
            failure = self._failure
            self.close()
            raise failure or RuntimeError("the simulation ended unexpectedly")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the RTL testbench could not {req['op']}: {answer['error']}")
        return answer

    def write(self, addr, data):
        self._request(op="write", addr=int(addr), data=bytes(data).hex())

    def read(self, addr, n):
        return bytes.fromhex(self._request(op="read", addr=int(addr), n=int(n))["data"])

    def read_reg(self, reg):
        return self._request(op="read_reg", reg=int(reg))["value"]

    def launch(self, writes, max_cycles=None):
        """Apply the host's register writes (ending with the CTRL start), run to the interrupt
        or ``max_cycles``; an :class:`RTLRun` (its ``dram`` empty: read what you need)."""
        writes = [[int(r), int(v)] for r, v in writes]
        regs = dict(writes)
        problem = launch_problem(self.size, regs.get(Register.PROG_ADDR, 0), regs.get(Register.PROG_LEN, 0),
                                 regs.get(Register.WIN_BASE, 0), regs.get(Register.WIN_LIMIT, 0),
                                 self.sim.cfg.address_space)
        if problem:
            raise ValueError(problem)
        stop = threading.Event()
        watcher = None
        if self.progress:
            (self.dir / "progress.jsonl").write_text("")
            watcher = threading.Thread(target=_watch, args=(self.dir / "progress.jsonl", self.progress, stop,
                                                            self.progress_every), daemon=True)
            watcher.start()
        try:
            r = self._request(op="launch", writes=writes, max_cycles=int(max_cycles or self.max_cycles))
        finally:
            stop.set()
            if watcher:
                watcher.join()
        if self.progress:
            self.progress({"cycles": r["registers"]["CYCLES"], "commands": r["registers"]["COMMANDS"]})
        return RTLRun(b"", r["registers"], r["hung"], r["wall_seconds"])

    def close(self):
        """End the simulation (and copy the waveform, if asked for)."""
        if self._stream is not None:
            try:
                self._stream.write(b'{"op": "close"}\n')
                self._stream.flush()
                self._stream.readline()
            except OSError:
                pass
            self._stream.close()
            self._conn.close()
            self._stream = None
            self._thread.join(timeout=60)
            if self.waves_to and (self.dir / self.sim.model.wave_file).exists():
                import shutil
                shutil.copy(self.dir / self.sim.model.wave_file, self.waves_to)
        self._cleanup()

    def _cleanup(self):
        """Remove the socket and, unless the simulation failed (its log is kept for the error
        message), the run folder."""
        import shutil

        from .rtl import RTLError
        self._listener.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        failed = isinstance(self._failure, RTLError) and not getattr(self, "_aborted", False)
        if self._own_dir and not self._thread.is_alive() and not failed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
