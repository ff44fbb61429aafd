"""The functional simulator: the command-level, bit-exact model of the fp8npu core.

:func:`run` executes a command stream (:mod:`fp8npu.hdl.isa`) against a DRAM image and
returns the final DRAM, the error state and performance estimates. It is the golden model
above GEMM level: every arithmetic step goes through :mod:`fp8npu.sim.golden`, and the RTL
core is compared against it bit for bit.

State
-----
* scratchpad: ``cfg.sp_lines`` x ``cfg.line_bytes`` FP8 codes (uint8),
* accumulator: ``cfg.acc_lines`` x ``cfg.acc_line_values`` binary32 bit patterns (int32);
  lanes ``>= cfg.cols`` are always 0 and no command reads them,
* four token counters: load->compute, compute->load, compute->store, store->compute.

Execution model (the hardware's)
--------------------------------
The host writes the program to DRAM and sets PROG_ADDR, PROG_LEN, WIN_BASE and WIN_LIMIT
(:class:`~fp8npu.hdl.isa.Register`). The program must be 32-byte aligned and lie inside
``[WIN_BASE, WIN_LIMIT)`` (an empty program: ``WIN_BASE <= PROG_ADDR <= WIN_LIMIT``), and
the window inside the address space (``WIN_LIMIT <= cfg.address_space``), else FETCH_WINDOW
at PROG_ADDR. A dispatcher then fetches the
commands in order, decodes them and applies :func:`~fp8npu.hdl.isa.validate`; the first
error stops everything, with ERROR_ADDR = the address of that command. A valid command
enters its unit's FIFO queue (``cfg.queue_depth`` deep, plus the head command the unit
holds while it waits for tokens; SYNC goes to the unit named by its
``unit`` field). END waits until all queues are empty and all units idle, then sets DONE.
Reaching PROG_LEN without END is NO_END at the address just past the program.

Before a command is queued, the dispatcher also keeps each token counter's program-order
balance (pushes minus pops of the commands dispatched so far); a command that would take one
past the configuration's ``token_limit`` stops the run with TOKEN_LIMIT at its address, on both engines alike.

Each unit (load, compute, store) runs its queue in order. A command whose pop flags need
tokens waits until those counters are positive, consumes one token from each, executes
atomically, then pushes its push tokens. If the dispatcher is blocked (its command's queue
is full, or it waits at END) and no unit can make progress, the run stops with DEADLOCK at
the address of the command the dispatcher is blocked on.

Every token counter has exactly one consumer and units are in order, so the system is
confluent: any interleaving gives the same final state. This module uses the simplest one:
dispatch while possible, else run one unit whose head command is ready, else stop. After
an error the DRAM holds whatever was written before the error was found; with real timing
more of the already queued commands may have run, so only ERROR and ERROR_ADDR are
comparable with the hardware then. The window must lie inside the DRAM image (an ideal
memory never answers with an AXI error, so BUS_ERROR does not occur here).

Overlapping ranges: EPILOGUE and BLOCKSCALE read their scale and bias lines once, then
process rows in increasing order, each row read before it is written; and a STORE whose rows overlap in DRAM (``dram_stride`` < row bytes)
writes them in row order, so the last row wins.

Timing model (estimates, not cycle exact)
-----------------------------------------
Each command gets a start time ``max(enqueued, unit free, arrival of each token it pops)``
and an end time ``start + duration``; the tokens it pushes become available at its end.

* program fetch: ``ceil(32 / bus_bytes)`` cycles per command; the dispatcher fetches the
  next command once the previous one is queued; a command is queued when its queue has
  room (the command ``queue_depth`` places ahead in the same unit has started);
* LOAD: ``DMA_LATENCY`` + per row its beats plus one cycle per burst (``max_burst`` beats);
* STORE: the same plus ``STORE_ROW_OVERHEAD`` cycles per row (and ``STORE_CONVERT`` more to FP8,
  plus one per requantizer pass after the first: ``NPUConfig.store_passes``);
* MATMUL: the unit is busy ``max(m, k + WEIGHT_LOAD_EXTRA)`` cycles (one A row per cycle; in
  block mode a committing row ``NPUConfig.round_passes`` cycles, so ``m`` times that;
  the next MATMUL's k weight lines load meanwhile, so consecutive MATMULs stream back to back
  unless they are shorter than their weight load, as in decoding one token); its results,
  and the tokens it pushes, are ready ``rows + MATMUL_FILL`` cycles after its last row
  (``+ NPUConfig.block_fill`` in block accumulation: the column sum, rounding and FP32
  addition below the array);
* EPILOGUE (``vector_passes`` cycles a row), BLOCKSCALE (max(3, ``vector_passes``) a row, and
  the last row's passes), plus ``VECTOR_FILL``, as hdl.units.VectorUnit.command_cycles; they
  start after the array has drained. SYNC, and commands that move no data: 1.

The three units overlap; load and store do not contend for the bus. CYCLES is the end of the
last command (or the time END completes). MAC_BUSY is the sum over MATMULs of
``m * k * cols``, utilization ``MAC_BUSY / (CYCLES * rows * cols)``. DMA_BYTES counts
program fetch (32 bytes a command), LOAD ``rows * row_bytes`` and STORE
``rows * cols * value_bytes``. STALL is the time the compute unit waited for a command or
a token.

``fp8npu bench funcsim`` prints the speed of a 1024^3 E4M3 GEMM.
"""

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.formats import FP32
from fp8npu.hdl.isa import COMMAND_BYTES, ErrorCode, Opcode, Register, StoreFormat, Unit
from numpy.lib.stride_tricks import as_strided

from . import golden

__all__ = ["Result", "Token", "run", "DMA_LATENCY", "STORE_ROW_OVERHEAD", "MATMUL_FILL", "STORE_CONVERT",
           "WEIGHT_LOAD_EXTRA", "VECTOR_FILL"]

#: Cycles from the start of a LOAD or STORE to its first data beat, and to wrap up.
DMA_LATENCY = 8
#: Cycles a STORE spends per row besides its data beats (accumulator read, conversion, address).
STORE_ROW_OVERHEAD = 3
#: Extra cycles per row of a STORE to FP8: the line's register, scaling and conversion
#: (hdl.dma.StoreUnit.STORE_CONVERT).
STORE_CONVERT = 10
#: Cycles from a MATMUL's last row entering the array to its results in the accumulator, beyond ``rows``.
MATMUL_FILL = 3
#: Cycles a MATMUL's weight load takes beyond its k lines (command hand-over), measured on the RTL.
WEIGHT_LOAD_EXTRA = 4
#: Cycles of an EPILOGUE or BLOCKSCALE beyond its per-row cycles: scale and bias reads, the
#: row buffer, the vector unit's pipeline (hdl.units.VectorUnit.fill).
VECTOR_FILL = 24


Token = isa.Token
_TOKEN_OF_FLAG = isa.TOKEN_OF_FLAG

_STORE_BYTES = {StoreFormat.FP32: 4, StoreFormat.E4M3: 1, StoreFormat.E5M2: 1}


@dataclass
class Result:
    """Outcome of one :func:`run`: final DRAM, error state and performance estimates."""

    dram: bytes
    error: ErrorCode
    error_addr: int
    done: bool
    commands: int
    cycles: int
    mac_ops: int
    dma_bytes: int
    stall_cycles: int
    tokens: dict
    cfg: NPUConfig = field(repr=False)
    sp: np.ndarray = field(default=None, repr=False)    # final scratchpad [sp_lines, line_bytes] uint8
    acc: np.ndarray = field(default=None, repr=False)   # final accumulator [acc_lines, acc_line_values] int32
    prog_addr: int = 0
    prog_len: int = 0
    win_base: int = 0
    win_limit: int = 0

    @property
    def ok(self):
        """True when the program reached END without error."""
        return self.done and self.error == ErrorCode.NONE

    @property
    def utilization(self):
        """MAC array utilization: MAC_BUSY / (CYCLES x rows x cols)."""
        return self.mac_ops / (self.cycles * self.cfg.rows * self.cfg.cols) if self.cycles else 0.0

    def registers(self):
        """The AXI4-Lite register file after the run, as {Register: 32-bit value}."""
        cfg = self.cfg
        values = {
            Register.CTRL: 0,
            Register.STATUS: (2 if self.done else 0) | (4 if self.error else 0),
            Register.ERROR: int(self.error),
            Register.ERROR_ADDR: self.error_addr,
            Register.PROG_ADDR: self.prog_addr,
            Register.PROG_LEN: self.prog_len,
            Register.WIN_BASE: self.win_base,
            Register.WIN_LIMIT: self.win_limit,
            Register.CYCLES: self.cycles,
            # (not built without perf_counters: they read 0)
            Register.MAC_BUSY: self.mac_ops if cfg.perf_counters else 0,
            Register.DMA_BYTES: self.dma_bytes if cfg.perf_counters else 0,
            Register.STALL: self.stall_cycles if cfg.perf_counters else 0,
            Register.CONFIG: isa.config_word(cfg),
            Register.COMMANDS: self.commands,
        }
        return {reg: v & 0xFFFFFFFF for reg, v in values.items()}


def _canonical_nan(bits):
    """Replace every NaN (int32 binary32 bits) by the canonical NaN the hardware produces, so
    that whole DRAM images compare bit for bit (docs/numerics.md: NaN results are canonical)."""
    return torch.where(golden.f32_is_nan(bits), torch.tensor(FP32.nan_code, dtype=torch.int32), bits)


def _signed32(bits):
    """A 32-bit pattern as a Python int in the int32 range (for torch.int32 tensors)."""
    bits &= 0xFFFFFFFF
    return bits - (1 << 32) if bits & 0x80000000 else bits


class _Datapath:
    """The SRAMs and the command semantics (isa.SEMANTICS); each method returns its cycles."""

    def __init__(self, mem, cfg):
        self.cfg = cfg
        self.mem = mem
        self.sp = np.zeros((cfg.sp_lines, cfg.line_bytes), np.uint8)
        self.acc = np.zeros((cfg.acc_lines, cfg.acc_line_values), np.int32)
        self.part = {}       # block mode: accumulator line -> its exact partial sums (golden.block_partial)
        self.mac_ops = 0
        self.dma_bytes = 0
        self.execute = {
            Opcode.LOAD: self.load, Opcode.STORE: self.store, Opcode.MATMUL: self.matmul,
            Opcode.EPILOGUE: self.epilogue, Opcode.BLOCKSCALE: self.blockscale, Opcode.SYNC: self.sync,
        }

    # ---- DRAM access (addresses are validated against the window, which lies inside mem) --
    def _read_rows(self, addr, stride, rows, nbytes):
        view = as_strided(self.mem[addr:], shape=(rows, nbytes), strides=(stride, 1), writeable=False)
        return np.ascontiguousarray(view)

    def _write_rows(self, addr, stride, data):
        rows, nbytes = data.shape
        if rows == 1 or stride >= nbytes:
            as_strided(self.mem[addr:], shape=(rows, nbytes), strides=(stride, 1))[...] = data
        else:  # overlapping rows: write in row order so the last row wins
            for r in range(rows):
                self.mem[addr + r * stride:addr + r * stride + nbytes] = data[r]

    def _beats(self, nbytes):
        return -(-nbytes // self.cfg.bus_bytes)

    # ---- commands ------------------------------------------------------------------------
    def sync(self, f):
        """SYNC: no operation; only its token flags act."""
        return 1

    def load(self, f):
        """LOAD: DRAM rows -> consecutive SRAM lines, ceil(row_bytes / line) lines a row, zero padded."""
        rows, row_bytes = f["rows"], f["row_bytes"]
        if not rows or not row_bytes:
            return 1
        cfg = self.cfg
        data = self._read_rows(f["dram_addr"], f["dram_stride"], rows, row_bytes)
        to_acc = f["dst"] == 1
        line = cfg.acc_line_bytes if to_acc else cfg.line_bytes
        per_row = -(-row_bytes // line)
        if row_bytes != per_row * line:
            padded = np.zeros((rows, per_row * line), np.uint8)
            padded[:, :row_bytes] = data
            data = padded
        lines = data.reshape(rows * per_row, line)
        first, last = f["sram_addr"], f["sram_addr"] + rows * per_row
        if to_acc:
            self.acc[first:last, :cfg.cols] = lines.view("<i4")[:, :cfg.cols]
            self.acc[first:last, cfg.cols:] = 0
        else:
            self.sp[first:last] = lines
        self.dma_bytes += rows * row_bytes
        beats = self._beats(row_bytes)
        return DMA_LATENCY + rows * (beats + -(-beats // cfg.max_burst))

    def store(self, f):
        """STORE: the first ``cols`` values of ``rows`` accumulator lines -> DRAM, FP32 or FP8."""
        rows, cols = f["rows"], f["cols"]
        if not rows:
            return 1
        vals = np.ascontiguousarray(self.acc[f["acc_addr"]:f["acc_addr"] + rows, :cols])
        fmt = StoreFormat(f["fmt"])
        if fmt == StoreFormat.FP32:
            data = vals.astype("<i4", copy=False).view(np.uint8).reshape(rows, cols * 4)
        else:
            scaled = golden.mul_f32(torch.from_numpy(vals), _signed32(f["scale"]))
            data = golden.quantize(scaled, int(fmt) - 1, saturate=bool(f["saturate"])).numpy()
        self._write_rows(f["dram_addr"], f["dram_stride"], data)
        self.dma_bytes += data.size
        beats = self._beats(data.shape[1])
        overhead = STORE_ROW_OVERHEAD + (STORE_CONVERT + self.cfg.store_passes - 1 if fmt != StoreFormat.FP32 else 0)
        return DMA_LATENCY + rows * (overhead + beats + -(-beats // self.cfg.max_burst))

    def matmul(self, f):
        """MATMUL: sequential FP32 accumulation in kk order, vectorized over rows and columns."""
        m, k, cols = f["m"], f["k"], self.cfg.cols
        if not m:
            return 1
        a_addr, a_stride = f["a_addr"], f["a_stride"]
        if a_stride == 1:
            a_rows = self.sp[a_addr:a_addr + m, :k]
        else:
            a_rows = self.sp[a_addr + a_stride * np.arange(m), :k]
        a = torch.from_numpy(a_rows).T.unsqueeze(2)                                     # [k, m, 1]
        w = torch.from_numpy(self.sp[f["b_addr"]:f["b_addr"] + k, :cols]).unsqueeze(1)  # [k, 1, cols]
        out = self.acc[f["acc_addr"]:f["acc_addr"] + m, :cols]
        if self.cfg.accumulation == "block":
            self._matmul_block(f, a, w, out)
        else:
            start = torch.from_numpy(out) if f["accumulate"] else None
            out[...] = _canonical_nan(golden.mac(a, w, f["fmt_a"], f["fmt_b"], acc=start)).numpy()
        self.mac_ops += m * k * cols
        # the unit streams one row a cycle and takes the next command at once, once the weight
        # loader has filled its weights (k lines, overlapped with the previous command's rows);
        # results (and the tokens the command pushes) are ready when the last row leaves the array
        passes = self.cfg.round_passes if self.cfg.accumulation == "block" and f["commit"] else 1
        busy = max(m * passes, k + WEIGHT_LOAD_EXTRA)
        return busy, busy + self.cfg.rows + MATMUL_FILL + (self.cfg.block_fill if self.cfg.accumulation == "block" else 0)

    def _matmul_block(self, f, a, w, out):
        """Block accumulation: add the tile's exact products to each output's exact partial
        (kept per accumulator line); with ``commit`` round it once into the accumulator."""
        lines = range(f["acc_addr"], f["acc_addr"] + f["m"])
        prev = None
        if f["accumulate"]:
            parts = [self.part.get(i) for i in lines]
            if any(p is None for p in parts):      # never written: an exact zero of +0 products
                zero = golden.block_partial(torch.zeros((1, 1, out.shape[1]), dtype=torch.uint8),
                                            torch.zeros((1, 1, out.shape[1]), dtype=torch.uint8), 0, 0)
                zero = {key: v[0] for key, v in zero.items()}
                parts = [zero if p is None else p for p in parts]
            prev = {key: torch.stack([p[key] for p in parts]) for key in parts[0]}
        new = golden.block_partial(a, w, f["fmt_a"], f["fmt_b"], prev)
        for n, i in enumerate(lines):
            self.part[i] = {key: v[n].clone() for key, v in new.items()}
        if f["commit"]:
            start = torch.zeros(out.shape, dtype=torch.int32) if f["fresh"] else torch.from_numpy(out.copy())
            out[...] = _canonical_nan(golden.add(start, golden.block_round(new))).numpy()

    def _lines(self, first, rows):
        """A copy of accumulator lines [first, first + rows), lanes < cols, as an int32 tensor."""
        return torch.from_numpy(self.acc[first:first + rows, :self.cfg.cols].copy())

    def epilogue(self, f):
        """EPILOGUE: x = ACC[src+i]; x = fp32(x * scale); x = fp32(x + bias); ACC[dst+i] = x.

        The scale and bias lines are read once, before the first row; rows then go in
        increasing order, each read before it is written (as the hardware does).
        """
        rows = f["rows"]
        if not rows:
            return 1
        scale = self._lines(f["scale_addr"], 1)
        bias = self._lines(f["bias_addr"], 1)

        def apply(x):
            if f["use_scale"]:
                x = golden.mul_f32(x, scale)
            if f["use_bias"]:
                x = golden.add(x, bias)
            return x

        self._rowwise(f["src"], f["dst"], rows, (f["src"],), lambda first, n: apply(self._lines(first, n)))
        return rows * self.cfg.vector_passes + VECTOR_FILL

    def blockscale(self, f):
        """BLOCKSCALE: ACC[dst+i] = fp32(ACC[dst+i] + fp32(ACC[src+i] * fp32(row_scale[i] * col_scale))).

        The column-scale line is read once, before the first row; rows go in increasing order.
        """
        rows = f["rows"]
        if not rows:
            return 1
        col_scale = self._lines(f["col_scale"], 1)
        src, dst, rs = f["src"], f["dst"], f["row_scale"]

        def compute(first, n):
            i0 = first - dst
            row_scale = torch.from_numpy(self.acc[rs + i0:rs + i0 + n, :1].copy())
            scale = golden.mul_f32(row_scale, col_scale)
            partial = golden.mul_f32(self._lines(src + i0, n), scale)
            return golden.add(self._lines(dst + i0, n), partial)

        self._rowwise(dst, dst, rows, (src, rs), compute)
        passes = self.cfg.vector_passes      # two reads ahead of the first row's last operand
        return 2 + (rows - 1) * max(3, passes) + passes + VECTOR_FILL

    def _rowwise(self, src_first, dst, rows, read_firsts, compute):
        """Write ``compute(first, n)`` to lines ``dst..dst+rows`` as if row by row in order.

        ``compute(first, n)`` returns rows ``first - src_first + (0..n)`` of the result. When no
        row reads a line that an earlier row writes (``read_firsts`` are the first lines of the
        per-row inputs), all rows are computed at once; otherwise one row at a time.
        """
        cols = self.cfg.cols
        harmful = any(0 < dst - r < rows for r in read_firsts)
        if not harmful:
            self.acc[dst:dst + rows, :cols] = _canonical_nan(compute(src_first, rows)).numpy()
            return
        for i in range(rows):
            self.acc[dst + i:dst + i + 1, :cols] = _canonical_nan(compute(src_first + i, 1)).numpy()


class _Unit:
    """One execution unit: its command queue and timing bookkeeping."""

    def __init__(self, unit):
        self.unit = unit
        self.queue = deque()      # (command fields, opcode, pops, pushes, enqueue time)
        self.enqueued = 0
        self.starts = []          # start time of every command this unit has begun
        self.free = 0             # time the unit can start its next command
        self.drained = 0          # time all results of the unit's commands are written


class _Simulator:
    """Dispatcher, units and token counters around a :class:`_Datapath`."""

    def __init__(self, mem, cfg, prog_addr, prog_len, win_base, win_limit, max_commands):
        self.cfg = cfg
        self.mem = mem
        self.data = _Datapath(mem, cfg)
        self.prog_addr, self.prog_len = prog_addr, prog_len
        self.win_base, self.win_limit = win_base, win_limit
        self.max_commands = max_commands
        self.units = [_Unit(u) for u in Unit]
        self.tokens = [deque() for _ in Token]   # arrival time of each available token
        self.balance = {t: 0 for t in Token}     # program-order balance of each counter (cfg.token_limit)
        self.commands = 0
        self.fetches = 0
        self.t_dispatch = 0       # time the dispatcher fetches the next command
        self.stall = 0
        self.error, self.error_addr, self.done = ErrorCode.NONE, 0, False

    # ---- dispatcher --------------------------------------------------------------------------
    def _fetch(self, pc):
        """Fetch, decode and validate command ``pc``: (command, address, fetched time, error)."""
        addr = self.prog_addr + pc * COMMAND_BYTES
        cmd = isa.decode(self.mem[addr:addr + COMMAND_BYTES].tobytes())
        self.fetches += 1
        fetched = self.t_dispatch + -(-COMMAND_BYTES // self.cfg.bus_bytes)
        error = isa.validate(cmd, self.cfg, self.win_base, self.win_limit)
        if error == ErrorCode.NONE:
            error = isa.token_check(cmd, self.balance, self.cfg.token_limit)
        return cmd, addr, fetched, error

    def _enqueue(self, cmd, fetched):
        """Put a valid command into its unit's queue at the time the queue has room."""
        unit = self.units[cmd.unit]
        flags = _TOKEN_OF_FLAG[cmd.unit]
        pops = tuple(t for t, on in zip(flags[:2], (cmd.pop_prev, cmd.pop_next)) if on)
        pushes = tuple(t for t, on in zip(flags[2:], (cmd.push_prev, cmd.push_next)) if on)
        capacity = self.cfg.queue_depth + 1
        room = unit.starts[unit.enqueued - capacity] if unit.enqueued >= capacity else 0
        when = max(fetched, room)
        unit.queue.append((cmd.fields, cmd.opcode, pops, pushes, when))
        unit.enqueued += 1
        self.t_dispatch = when

    def _idle(self):
        return not any(u.queue for u in self.units)

    # ---- units -------------------------------------------------------------------------------
    def _step(self):
        """Run the head command of the first unit that can start one; False if none can."""
        for unit in self.units:
            if unit.queue and all(self.tokens[t] for t in unit.queue[0][2]):
                self._execute(unit)
                return True
        return False

    def _execute(self, unit):
        fields, opcode, pops, pushes, when = unit.queue.popleft()
        start = max([when, unit.free] + [self.tokens[t].popleft() for t in pops])
        if opcode in (Opcode.EPILOGUE, Opcode.BLOCKSCALE):
            start = max(start, unit.drained)     # vector commands wait for the array to drain
        if unit.unit == Unit.COMPUTE:
            self.stall += start - unit.free
        unit.starts.append(start)
        timing = self.data.execute[opcode](fields)
        busy, ready = timing if isinstance(timing, tuple) else (timing, timing)
        unit.free = start + busy
        unit.drained = max(unit.drained, start + ready)
        for t in pushes:
            self.tokens[t].append(max(start + ready, unit.drained))

    def _stop(self, error, addr):
        self.error, self.error_addr = error, addr

    # ---- main loop ---------------------------------------------------------------------------
    def run(self):
        prog_end = self.prog_addr + self.prog_len * COMMAND_BYTES
        if (self.prog_addr % COMMAND_BYTES or self.prog_addr < self.win_base or prog_end > self.win_limit
                or self.win_limit > self.cfg.address_space):
            self._stop(ErrorCode.FETCH_WINDOW, self.prog_addr)
            return self._result()
        pc, pending, state = 0, None, "blocked"
        while state == "blocked":
            pc, pending, state = self._dispatch_all(pc, pending)
            if state == "blocked" and not self._step():
                # the dispatcher waits on a full queue or at END, and no unit can move: nothing will change
                self._stop(ErrorCode.DEADLOCK, pending[1])
                break
        if state == "stopped":            # max_commands reached: let the units finish what they can
            while self._step():
                pass
        return self._result()

    def _dispatch_all(self, pc, pending):
        """Dispatch until blocked or finished. Returns (pc, pending command, state) where state is
        "blocked" (run a unit, then retry), "done", "error" or "stopped" (max_commands)."""
        while True:
            if pending is None:
                if pc == self.prog_len:
                    self._stop(ErrorCode.NO_END, self.prog_addr + pc * COMMAND_BYTES)
                    return pc, None, "error"
                if self.max_commands is not None and self.commands >= self.max_commands:
                    return pc, None, "stopped"
                cmd, addr, fetched, err = self._fetch(pc)
                if err != ErrorCode.NONE:
                    self._stop(err, addr)
                    self.t_dispatch = fetched
                    return pc, None, "error"
                pending = (cmd, addr, fetched)
            cmd, addr, fetched = pending
            if cmd.opcode == Opcode.END:
                if not self._idle():
                    return pc, pending, "blocked"
                self.t_dispatch = max([fetched] + [max(u.free, u.drained) for u in self.units])
                self.commands += 1
                self.done = True
                return pc + 1, None, "done"
            # a unit holds its head command (waiting for tokens) besides queue_depth queued ones
            if len(self.units[cmd.unit].queue) >= self.cfg.queue_depth + 1:
                return pc, pending, "blocked"
            self._enqueue(cmd, fetched)
            self.commands += 1
            pc, pending = pc + 1, None

    def _result(self):
        cycles = max([self.t_dispatch] + [max(u.free, u.drained) for u in self.units])
        return Result(
            dram=bytes(self.mem), error=self.error, error_addr=self.error_addr, done=self.done,
            commands=self.commands, cycles=int(cycles), mac_ops=self.data.mac_ops,
            dma_bytes=self.data.dma_bytes + self.fetches * COMMAND_BYTES, stall_cycles=int(self.stall),
            tokens={t: len(q) for t, q in zip(Token, self.tokens)}, cfg=self.cfg, sp=self.data.sp, acc=self.data.acc,
            prog_addr=self.prog_addr, prog_len=self.prog_len, win_base=self.win_base, win_limit=self.win_limit)


def run(program, dram, cfg, prog_addr=0, win_base=0, win_limit=None, max_commands=None, *, prog_len=None):
    """Run a program on the functional simulator and return a :class:`Result`.

    ``program`` (bytes, a whole number of 32-byte commands) is first written into a copy of
    ``dram`` at ``prog_addr``, as the host would; pass ``program=None`` when the program is
    already in ``dram`` and give ``prog_len`` (in commands). ``prog_addr``, ``prog_len``,
    ``win_base`` and ``win_limit`` (default: the end of ``dram``) are the values of the
    registers of the same names. ``max_commands`` stops dispatching after that many commands
    (the units then finish what they can, and ``done`` stays False). ``dram`` is not modified.
    """
    golden.check_environment()
    mem = np.frombuffer(bytearray(dram), np.uint8)
    if program is not None:
        program = bytes(program)
        if len(program) % COMMAND_BYTES:
            raise ValueError(f"a program is a whole number of {COMMAND_BYTES}-byte commands, "
                             f"not {len(program)} bytes")
        if not 0 <= prog_addr <= len(mem) - len(program):
            raise ValueError(f"the program ({len(program)} bytes at 0x{prog_addr:x}) does not fit in "
                             f"the {len(mem)}-byte DRAM image")
        mem[prog_addr:prog_addr + len(program)] = np.frombuffer(program, np.uint8)
        prog_len = len(program) // COMMAND_BYTES if prog_len is None else prog_len
    elif prog_len is None:
        raise ValueError("prog_len is required when the program is already in DRAM (program=None)")
    win_limit = len(mem) if win_limit is None else win_limit
    problem = isa.launch_problem(len(mem), prog_addr, prog_len, win_base, win_limit, cfg.address_space)
    if problem:
        raise ValueError(problem)
    return _Simulator(mem, cfg, prog_addr, prog_len, win_base, win_limit, max_commands).run()
