"""The host side of the NPU: one driver over small transports.

:class:`Driver` is the only place that knows the host's register sequence (docs/isa.md):
check the hardware's CONFIG against the configuration a program was built for, write the
program and data to DRAM, set PROG_ADDR, PROG_LEN, WIN_BASE and WIN_LIMIT, start with CTRL,
wait for the interrupt, read the registers and the results. A transport only moves bytes
and register values:

=================  ==========================================================================
``memory_bytes``   size of the DRAM behind the NPU
``write(a, data)`` write DRAM
``read(a, n)``     read DRAM
``write_reg(r, v)`` write a register (:class:`~fp8npu.hdl.isa.Register`)
``read_reg(r)``    read a register
``wait(cycles)``   wait for the interrupt (at most ``cycles`` NPU cycles); False on timeout
``close()``        release the transport
=================  ==========================================================================

Transports here: :class:`FuncTransport` (the functional simulator, the readable definition
of every command), :class:`RTLTransport` (the generated Verilog under Verilator + cocotb),
:class:`SerialTransport` (a board, or its simulation, over a serial line speaking the
protocol of :mod:`fp8npu.hdl.board`). Every transport gives the same :class:`RunResult` for
the same program and DRAM.

:class:`RTLTransport` keeps one simulation running for its whole life: DRAM writes and reads
go into the simulated memory, register writes are applied by the testbench's AXI4-Lite
master at the launch, and the simulation runs to the interrupt. Programs must not rely on
SRAM contents at start (docs/isa.md), whatever a transport keeps.
"""

from dataclasses import dataclass, field

from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import ErrorCode, Register

__all__ = ["Driver", "FuncTransport", "RTLTransport", "SerialTransport", "SocketPort", "NoisyPort", "RunResult",
           "HostError"]


class HostError(RuntimeError):
    """The host cannot run this program on this NPU; the message says why in one sentence."""


@dataclass
class RunResult:
    """The outcome of one launch, the same for every transport."""

    error: ErrorCode
    error_addr: int
    registers: dict          # Register -> 32-bit value
    hung: bool = False       # still busy when the wait ended
    wall_seconds: float = 0.0
    extra: dict = field(default_factory=dict, repr=False)    # transport-specific details

    @property
    def ok(self):
        return not self.hung and self.error == ErrorCode.NONE and bool(self.registers[Register.STATUS] & 2)

    @property
    def cycles(self):
        return self.registers[Register.CYCLES]

    @property
    def commands(self):
        return self.registers[Register.COMMANDS]

    @property
    def mac_ops(self):
        return self.registers[Register.MAC_BUSY]

    @property
    def utilization(self):
        word = self.registers[Register.CONFIG]
        fields = isa.config_fields(word)
        rows, cols = fields["rows"], fields["cols"]
        return self.mac_ops / max(1, self.cycles * rows * cols)

    def describe(self):
        """``done`` or ``error NAME (text) at command address 0x...``."""
        if self.hung:
            return f"still busy after the cycle limit ({self.cycles:,} cycles)"
        if self.error == ErrorCode.NONE:
            return "done"
        return (f"error {self.error.name} ({isa.ERROR_TEXT[self.error]}) at command address "
                f"{self.error_addr:#x}")


class Driver:
    """Runs programs on an NPU through a transport (see the module docstring)."""

    def __init__(self, transport, cfg=None):
        self.transport = transport
        self.cfg = cfg or NPUConfig()

    def check_config(self):
        """Refuse to run on hardware built for another configuration (one clear sentence)."""
        problem = isa.config_mismatch(self.transport.read_reg(Register.CONFIG), self.cfg)
        if problem:
            raise HostError(problem)

    def write(self, addr, data):
        self._check_range(addr, len(data))
        self.transport.write(addr, bytes(data))

    def read(self, addr, n):
        self._check_range(addr, n)
        return self.transport.read(addr, n)

    def _check_range(self, addr, n):
        size = self.transport.memory_bytes
        if addr < 0 or n < 0 or addr + n > size:
            raise HostError(f"bytes [{addr:#x}, {addr + n:#x}) lie outside the {size}-byte DRAM")

    def launch(self, prog_addr, prog_len, win_base=0, win_limit=None, max_cycles=50_000_000):
        """Run the program at ``prog_addr`` (``prog_len`` commands, already in DRAM) with the DMA
        window ``[win_base, win_limit)`` (default: all of DRAM); return a :class:`RunResult`."""
        t = self.transport
        win_limit = t.memory_bytes if win_limit is None else win_limit
        problem = isa.launch_problem(t.memory_bytes, prog_addr, prog_len, win_base, win_limit,
                                     self.cfg.address_space)
        if problem:
            raise HostError(problem)
        self.check_config()
        import time
        t0 = time.perf_counter()
        for reg, value in isa.launch_writes(prog_addr, prog_len, win_base, win_limit):
            t.write_reg(reg, value)
        finished = t.wait(max_cycles)
        regs = {r: t.read_reg(r) for r in Register if r != Register.CTRL}
        regs[Register.CTRL] = 0
        hung = not finished or bool(regs[Register.STATUS] & 1)
        return RunResult(ErrorCode(regs[Register.ERROR]), regs[Register.ERROR_ADDR], regs, hung,
                         time.perf_counter() - t0, getattr(t, "last_extra", {}))

    def run(self, program, prog_addr, win_base=0, win_limit=None, max_cycles=50_000_000):
        """Write ``program`` (bytes) at ``prog_addr`` and run it; a :class:`RunResult`."""
        if len(program) % isa.COMMAND_BYTES or not program:
            raise HostError(f"a program is a non-empty whole number of {isa.COMMAND_BYTES}-byte commands, "
                            f"not {len(program)} bytes")
        self.write(prog_addr, program)
        return self.launch(prog_addr, len(program) // isa.COMMAND_BYTES, win_base, win_limit, max_cycles)


def _memory_bytes(cfg, memory_bytes):
    """A simulated DRAM's size: ``memory_bytes``, by default 1 MB or the NPU's whole address
    space if that is smaller; refused (HostError) if it does not fit the address space."""
    if memory_bytes is None:
        return min(1 << 20, cfg.address_space)
    problem = isa.memory_problem(memory_bytes, cfg.address_space)
    if problem:
        raise HostError(problem)
    return memory_bytes


class _Memory:
    """DRAM and a register file kept on the host side, shared by the simulator transports."""

    def __init__(self, cfg, memory_bytes, image=b""):
        memory_bytes = _memory_bytes(cfg, memory_bytes)
        self.cfg = cfg
        self.memory = bytearray(memory_bytes)
        self.memory[:len(image)] = image
        self.regs = {r: 0 for r in Register}
        self.regs[Register.CONFIG] = isa.config_word(cfg)
        self.last_extra = {}

    @property
    def memory_bytes(self):
        return len(self.memory)

    def write(self, addr, data):
        self.memory[addr:addr + len(data)] = data

    def read(self, addr, n):
        return bytes(self.memory[addr:addr + n])

    def read_reg(self, reg):
        return self.regs[Register(reg)]

    def close(self):
        pass


class FuncTransport(_Memory):
    """The functional simulator as a transport: a start runs the program at once."""

    def __init__(self, cfg=None, memory_bytes=None, image=b""):
        super().__init__(cfg or NPUConfig(), memory_bytes, image)

    def write_reg(self, reg, value):
        reg = Register(reg)
        if reg == Register.CTRL:
            if value & 1:
                self._start()
            return
        if reg in (Register.PROG_ADDR, Register.PROG_LEN, Register.WIN_BASE, Register.WIN_LIMIT):
            self.regs[reg] = value & 0xFFFFFFFF

    def _start(self):
        from . import funcsim
        r = self.regs
        res = funcsim.run(None, bytes(self.memory), self.cfg, r[Register.PROG_ADDR], r[Register.WIN_BASE],
                          r[Register.WIN_LIMIT], prog_len=r[Register.PROG_LEN])
        self.memory[:] = res.dram
        self.regs.update(res.registers())
        self.last_extra = {"funcsim": res}

    def wait(self, max_cycles):
        return True


class RTLTransport:
    """The NPU's Verilog under Verilator + cocotb: one long-lived simulation
    (:class:`~fp8npu.sim.npu_rtl.RTLSession`) that this transport's requests drive, so DRAM,
    registers and the design's state carry over from launch to launch as on hardware, and
    nothing starts again per launch.

    ``fast`` puts the DRAM inside the simulated design (no Python per bus beat); otherwise it
    is cocotbext-axi's AxiSlave. ``waves`` ("vcd" or "fst") dumps the waveform of the whole
    session (``waves_to``: where to copy it at :meth:`close`). Other ``options`` go to the
    session (``backpressure``, ``seed``, ``progress``, ``mapped_bytes`` ...).
    """

    def __init__(self, cfg=None, memory_bytes=None, image=b"", fast=True, waves=False, **options):
        from .npu_rtl import NPUSimulation
        self.cfg = cfg or NPUConfig()
        memory_bytes = _memory_bytes(self.cfg, memory_bytes)
        self.memory_bytes = memory_bytes
        image = bytes(image)[:memory_bytes]
        self.sim = NPUSimulation(self.cfg, waves=waves, fast_dram_bytes=memory_bytes if fast else None)
        self.session = self.sim.open(image + bytes(memory_bytes - len(image)), waves=bool(waves), **options)
        self._writes = []
        self.regs = {Register.CONFIG: self.session.read_reg(Register.CONFIG)}
        self.last_extra = {}

    def write(self, addr, data):
        self.session.write(addr, data)

    def read(self, addr, n):
        return self.session.read(addr, n)

    def write_reg(self, reg, value):
        self._writes.append((Register(reg), value & 0xFFFFFFFF))

    def read_reg(self, reg):
        reg = Register(reg)
        if reg not in self.regs:
            self.regs[reg] = self.session.read_reg(reg)
        return self.regs[reg]

    def wait(self, max_cycles):
        started = any(r == Register.CTRL and v & 1 for r, v in self._writes)
        if not started:
            return True
        writes, self._writes = self._writes, []
        run = self.session.launch(writes, max_cycles=max_cycles)
        for name, value in run.registers.items():
            self.regs[Register[name]] = value
        self.last_extra = {"rtl": run}
        return not run.hung

    def close(self):
        self.session.close()


class SocketPort:
    """A connected stream socket with the part of pyserial's ``Serial`` interface that
    :class:`SerialTransport` uses (``write``, ``read`` with a timeout, ``reset_input_buffer``,
    ``close``): a simulated board's serial line."""

    def __init__(self, sock, timeout=1.0, name="a simulated serial line"):
        self.sock, self.timeout, self.name = sock, timeout, name

    def write(self, data):
        self.sock.sendall(bytes(data))

    def read(self, n):
        """Up to ``n`` bytes; fewer if the line stays silent for ``timeout`` seconds."""
        import select
        out = bytearray()
        while len(out) < n:
            ready, _, _ = select.select([self.sock], [], [], self.timeout)
            if not ready:
                break
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def reset_input_buffer(self):
        import select
        while select.select([self.sock], [], [], 0)[0]:
            if not self.sock.recv(4096):
                break

    def close(self):
        self.sock.close()


class NoisyPort:
    """A port that damages the line, to test that :class:`SerialTransport` recovers: each byte
    either way is dropped with probability ``drop`` or has one bit flipped with probability
    ``flip`` (a ``random.Random(seed)`` decides). ``damaged`` counts the bytes hit."""

    def __init__(self, port, drop=0.0, flip=0.0, seed=1):
        import random
        self.port, self.drop, self.flip = port, drop, flip
        self.rng = random.Random(seed)
        self.damaged = 0
        self.name = getattr(port, "name", "a serial line")

    def _damage(self, data):
        out = bytearray()
        for byte in data:
            r = self.rng.random()
            if r < self.drop:
                self.damaged += 1
                continue
            if r < self.drop + self.flip:
                self.damaged += 1
                byte ^= 1 << self.rng.randrange(8)
            out.append(byte)
        return bytes(out)

    def write(self, data):
        self.port.write(self._damage(data))

    def read(self, n):
        return self._damage(self.port.read(n))

    def reset_input_buffer(self):
        self.port.reset_input_buffer()

    def close(self):
        self.port.close()


class SerialTransport:
    """A board running the fp8npu bitstream, over a serial line (:mod:`fp8npu.hdl.board`).

    ``port`` is a pyserial ``Serial`` (or anything with its ``write``, ``read``,
    ``reset_input_buffer`` and ``close``; :class:`SocketPort` for a simulation). Every request
    is checked end to end: an answer with a wrong CRC, a wrong sequence number or none at all
    is retried (after ``quiet`` seconds of silence, longer than the bridge's frame timeout, so
    both sides resynchronize) up to ``retries`` times, then a :class:`HostError` says what was
    tried. Data is never returned unless its answer's CRC was right. ``progress(done, total)``
    is called during transfers of more than 4 KB.

    ``poll`` is the time between STATUS reads while a program runs; :meth:`wait` gives up
    when CYCLES passes its limit.
    """

    def __init__(self, port, retries=8, quiet=0.05, poll=0.01, progress=None):
        from fp8npu.hdl import board
        self.board = board
        self.port, self.retries, self.quiet, self.poll, self.progress = port, retries, quiet, poll, progress
        self.seq = 0
        self.retried = 0
        self.port.reset_input_buffer()
        info = self._request(board.Op.INFO, 0, b"", 0)
        if len(info) != board.INFO_BYTES or info[11] != board.PROTOCOL_VERSION:
            raise HostError(f"the board on {self._name()} speaks protocol version {info[11] if info else '?'}, "
                            f"this host {board.PROTOCOL_VERSION}: build and flash the bitstream of this fp8npu")
        self.memory_bytes = int.from_bytes(info[0:4], "little")
        self.clock_hz = int.from_bytes(info[4:8], "little")
        self.max_payload = int.from_bytes(info[8:10], "little")
        self.bus_bytes = info[10]
        self.last_extra = {}

    def _name(self):
        return getattr(self.port, "name", None) or getattr(self.port, "port", None) or "the serial line"

    def _frame(self, op, addr, payload, length):
        body = bytes([self.seq, int(op)]) + int(addr).to_bytes(4, "little") + int(length).to_bytes(2, "little") \
            + bytes(payload)
        return bytes([self.board.SYNC_REQUEST]) + body + self.board.crc16(body).to_bytes(2, "little")

    def _answer(self):
        """(status, payload) of the next answer to this request, or None (silence, damage)."""
        b = self.board
        for _ in range(4 * b.MAX_PAYLOAD):          # skip noise before the sync byte
            first = self.port.read(1)
            if not first:
                return None
            if first[0] == b.SYNC_RESPONSE:
                break
        else:
            return None
        head = self.port.read(4)
        if len(head) != 4:
            return None
        seq, status, length = head[0], head[1], int.from_bytes(head[2:4], "little")
        if length > b.MAX_PAYLOAD:
            return None
        rest = self.port.read(length + 2)
        if len(rest) != length + 2:
            return None
        if b.crc16(head + rest[:length]) != int.from_bytes(rest[length:], "little") or seq != self.seq:
            return None
        return status, rest[:length]

    def _request(self, op, addr, payload, length):
        import time
        b = self.board
        frame = self._frame(op, addr, payload, length)
        for attempt in range(self.retries):
            if attempt:
                self.retried += 1
                time.sleep(self.quiet)             # longer than the bridge's frame timeout
                self.port.reset_input_buffer()
            self.port.write(frame)
            answer = self._answer()
            if answer is None or answer[0] == b.Status.BAD_CRC:
                continue
            status, data = answer
            self.seq = (self.seq + 1) & 0xFF
            if status != b.Status.OK:
                raise HostError(f"the board refused {b.Op(op).name} at {addr:#x} ({length} bytes): "
                                f"{b.Status(status).name}")
            return data
        raise HostError(f"no valid answer from the board on {self._name()} after {self.retries} tries of "
                        f"{b.Op(op).name}: check the cable, the port, the baud rate and that the board runs "
                        f"the fp8npu bitstream")

    def _chunks(self, addr, n):
        step = self.max_payload
        for offset in range(0, n, step):
            yield offset, addr + offset, min(step, n - offset)
            if self.progress and n > 4096:
                self.progress(min(n, offset + step), n)

    def write(self, addr, data):
        data = bytes(data)
        for offset, a, n in self._chunks(addr, len(data)):
            self._request(self.board.Op.WRITE_MEM, a, data[offset:offset + n], n)

    def read(self, addr, n):
        out = bytearray()
        for _, a, k in self._chunks(addr, n):
            got = self._request(self.board.Op.READ_MEM, a, b"", k)
            if len(got) != k:
                raise HostError(f"the board answered {len(got)} bytes to a read of {k}")
            out += got
        return bytes(out)

    def write_reg(self, reg, value):
        self._request(self.board.Op.WRITE_REG, int(Register(reg)), (value & 0xFFFFFFFF).to_bytes(4, "little"), 4)

    def read_reg(self, reg):
        return int.from_bytes(self._request(self.board.Op.READ_REG, int(Register(reg)), b"", 4), "little")

    def wait(self, max_cycles):
        import time
        while True:
            if not self.read_reg(Register.STATUS) & 1:
                return True
            if self.read_reg(Register.CYCLES) >= max_cycles:
                return False
            time.sleep(self.poll)

    def close(self):
        self.port.close()
