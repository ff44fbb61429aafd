"""The board design (:class:`fp8npu.hdl.board.BoardSoC`) under Verilator, reached through a
simulated serial line: what a host does with a board on its desk, checked here without one.

::

    with BoardSimulation(cfg, memory_bytes=65536) as board:
        driver = Driver(SerialTransport(board.port()), cfg)
        result = driver.run(program, prog_addr)

The simulation runs in a thread of this process (cocotb testbench :mod:`.board_tb`); the line
between them is a Unix socket carrying the bytes the UART pins carry, at a small number of
clocks per bit (``divisor``) so that it is fast.
"""

import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path

from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.npu import hardware_problem

from .host import SocketPort
from .rtl import RTLError, RTLModel

__all__ = ["BoardSimulation"]

#: The simulated clock (the testbench's 10 ns period) and its default clocks per bit.
SIM_CLOCK_HZ = 100_000_000


class BoardSimulation:
    """Build (cached) and run the board design with ``memory_bytes`` of block RAM, or with
    ``sdram`` (a chip name of :data:`fp8npu.hdl.sdram.CHIPS`) its SDRAM controller and the
    checking chip model (:mod:`.sdram_model`); ``port()`` is the host's end of its serial line
    (a :class:`~.host.SocketPort`)."""

    def __init__(self, cfg=None, memory_bytes=65536, divisor=8, timeout=2.0, run_dir=None, sdram=None):
        from fp8npu.hdl.board import BoardSoC
        self.cfg = cfg or NPUConfig()
        problem = hardware_problem(self.cfg)
        if problem:
            raise RTLError(problem)
        self.divisor = divisor
        baud = SIM_CLOCK_HZ // divisor
        # the board design's own checks (memory size and reach, baud), before a build
        problem = BoardSoC.problem(self.cfg, memory_bytes, SIM_CLOCK_HZ, baud, sdram)
        if problem:
            raise RTLError(problem)
        self.model = RTLModel(lambda: BoardSoC(self.cfg, memory_bytes, SIM_CLOCK_HZ, baud, sdram=sdram),
                              f"board_{self.cfg.rows}x{self.cfg.cols}" + ("_sdram" if sdram else ""),
                              identity=f"BoardSoC {memory_bytes} {SIM_CLOCK_HZ} {baud} {sdram} {self.cfg.to_json()}")
        self._own_dir = run_dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="fp8npu-board-")) if run_dir is None else Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._sock_dir = Path(tempfile.mkdtemp(prefix="fp8npu-uart-"))
        path = self._sock_dir / "uart.sock"
        self.line = None
        (self.dir / "job.json").write_text(json.dumps({"socket": str(path), "divisor": divisor, "sdram": sdram,
                                                      "clock_hz": SIM_CLOCK_HZ,
                                                      "line_log": str(self.dir / "line.json")}))
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(0.5)
        self._failure = None
        self._processes = []
        self.timeout = timeout

        def simulate():
            try:
                self.model.run("fp8npu.sim.board_tb", {"FP8NPU_BOARD_JOB": str(self.dir / "job.json")}, self.dir,
                               processes=self._processes)
            except BaseException as exc:
                self._failure = exc
        self._thread = threading.Thread(target=simulate, daemon=True, name="fp8npu-board")
        self._thread.start()
        self._conn = None
        try:
            while self._conn is None:
                try:
                    self._conn, _ = self._listener.accept()
                except TimeoutError:
                    if not self._thread.is_alive():
                        raise self._failure or RTLError("the board simulation ended before it connected") from None
        except BaseException:
            self.close()
            raise

    line = None
    """After :meth:`close`: the simulated time of every byte on the line, ``{"to_board_ns":
    [...], "from_board_ns": [...], "bit_ns": ...}`` (start of each byte sent to the board, end of
    each byte it sent)."""

    def port(self):
        """The host's end of the serial line."""
        return SocketPort(self._conn, timeout=self.timeout, name="the simulated board's serial line")

    def close(self):
        from .rtl import kill_group
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None
        self._thread.join(timeout=30)
        for proc in list(self._processes):
            kill_group(proc)
        try:
            self.line = json.loads((self.dir / "line.json").read_text())
        except (OSError, ValueError):
            self.line = None
        self._listener.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        if self._own_dir and self._failure is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
