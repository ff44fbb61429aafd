"""The fp8npu core: command processor, DMA, SRAMs, MAC array and epilogue, behind AXI.

Block diagram::

            AXI4-Lite (s_axil)                        AXI4 master (m_axi)
                  |                                  AR/R          AW/W/B
            +-----v------+     +---------+      +------+---+     +-------+
            | registers  |---->|  fetch  |<-----| read arb |     | store |
            +------------+     +----+----+      +--+---+---+     +---^---+
                                    | commands     |   |             |
                               +----v-------+      |   |             |
                               | dispatcher |  validate (isa rules)  |
                               +-+----+---+-+      |   |             |
                   load queue   |    |   |  store queue              |
                          +-----v-+  |   +-------------------------->|
                          | load  |--+ compute queue                 |
                          +---+---+  |                               |
              scratchpad <----+      v                               |
              accumulator <---- compute: weight loader -> row streamer -> MAC array
                   ^  ^                  epilogue (scale, bias, block scale)
                   |  +------------------------------------------------+ (store reads)

* **Fetch** reads the program (``PROG_ADDR``, ``PROG_LEN`` commands of 32 bytes) with AXI
  ID 0 into a 4-entry buffer.
* **Dispatcher** checks each command with the rules of :func:`fp8npu.hdl.isa.validate`
  (opcode, reserved bits and field ranges, formats, SRAM ranges, alignment, DMA window: the
  same order), then queues it for its unit, or stops with the error code and the command's
  address. ``END`` waits for every unit to go idle. If the dispatcher is blocked and no unit
  can make progress (every unit idle or waiting for a token), it stops with ``DEADLOCK``.
* **Load unit** copies strided DRAM rows into scratchpad or accumulator lines (AXI ID 1,
  several bursts in flight), zero-padding the last line of each row.
* **Compute unit**: a weight loader fills the array's shadow weights for the next MATMUL
  while the row streamer feeds the current one, one A row per cycle; rows that read an
  accumulator line still being computed wait. In block accumulation the array is a
  :class:`~.array.BlockArray` with a partial line beside each accumulator line. EPILOGUE and
  BLOCKSCALE run in the :class:`~.units.VectorUnit` after the array has drained, one line per
  1 or 3 cycles.
* **Store unit** reads accumulator lines, converts them (FP32, or FP8 through
  ``fp32(x * scale)`` and the converter) and writes them with AXI bursts and byte strobes.
* **Tokens**: four counters (load->compute, compute->load, compute->store, store->compute).
  A command waits until the tokens it pops are there; its pushes take effect after its
  effects are complete (compute pushes leave after the array has written the last row).

Latency of one MATMUL row: 1 (SRAM read) + R (array) cycles; throughput one row per cycle.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from . import isa
from .array import BlockArray, MACArray
from .axi import AxiLiteRegs, axi4_master_members
from .config import NPUConfig
from .units import Requantizer, VectorUnit, pick_slice

__all__ = ["NPU", "NPUCore", "hardware_problem"]

CMD = isa.COMMAND_BITS
_COMMON = {f.name: f for f in isa.COMMON_FIELDS}


def fld(cmd, opcode, name):
    """Slice of a command signal holding field ``name`` of ``opcode`` (from the ISA tables)."""
    for f in isa.FIELDS[opcode] + isa.COMMON_FIELDS:
        if f.name == name:
            return cmd[f.lsb:f.lsb + f.width]
    raise KeyError(name)


def common(cmd, name):
    f = _COMMON[name]
    return cmd[f.lsb:f.lsb + f.width]


def hardware_problem(cfg):
    """None if the hardware can be built for ``cfg``, else one sentence saying why not and
    what is allowed (the functional simulator runs every configuration)."""
    if cfg.accumulation == "block" and cfg.formats != ("e4m3",):
        return (f"block accumulation hardware takes E4M3 operands only: set formats to [\"e4m3\"], not "
                f"{list(cfg.formats)} (E5M2 in block mode runs on the functional simulator)")
    return None


def _check_buildable(cfg, component):
    """Refuse, in one sentence, a configuration this hardware does not build (the refused
    ``component`` is marked used, so Amaranth does not warn about it)."""
    problem = hardware_problem(cfg)
    if problem:
        component._MustUse__used = True
        raise ValueError(problem)


def _reserved_mask(opcode):
    used = 0
    for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]:
        used |= ((1 << f.width) - 1) << f.lsb
    return ((1 << CMD) - 1) & ~used


def _ceil_div_pow2(x, d):
    """ceil(x / d) for a power-of-two constant d."""
    sh = d.bit_length() - 1
    return (x + (d - 1)) >> sh


class NPUCore(wiring.Component):
    """The NPU without its register block (see the module docstring).

    Members
    -------
    m_axi_* : AXI4 master
    start : In(1)             begin fetching (the whole core is reset by the parent on start)
    prog_addr, prog_len, win_base, win_limit : In(32)
    busy, done, error_valid : Out(1)
    error_code : Out(8), error_addr : Out(32)
    cycles, mac_ops, dma_bytes, stalls, commands : Out(32)   performance counters
    """

    #: Cycles a STORE to FP8 spends converting each row (:class:`~.units.Requantizer`).
    STORE_CONVERT = 8

    def __init__(self, cfg=None):
        self.cfg = cfg = cfg or NPUConfig()
        _check_buildable(cfg, self)
        members = axi4_master_members("m_axi", cfg.axi_data_bits, cfg.axi_addr_bits)
        members.update({
            "start": In(1), "prog_addr": In(32), "prog_len": In(32), "win_base": In(32), "win_limit": In(32),
            "busy": Out(1), "done": Out(1), "error_valid": Out(1), "error_code": Out(8), "error_addr": Out(32),
            "cycles": Out(32), "mac_ops": Out(32), "dma_bytes": Out(32), "stalls": Out(32), "commands": Out(32),
        })
        super().__init__(members)

    def ax(self, name):
        return getattr(self, f"m_axi_{name}")

    # ------------------------------------------------------------------------------------
    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()

        B = cfg.bus_bytes
        D = cfg.axi_data_bits
        size_code = B.bit_length() - 1
        ax = self.ax

        # ---------------- run state and errors -------------------------------------------
        running = Signal()
        done = Signal()
        err = Signal()
        err_code = Signal(8)
        err_addr = Signal(32)
        raise_err = Signal()
        raise_code = Signal(8)
        raise_addr = Signal(32)
        with m.If(self.start):
            m.d.sync += running.eq(1)
        with m.If(raise_err & ~err & ~done):
            m.d.sync += [err.eq(1), err_code.eq(raise_code), err_addr.eq(raise_addr)]
        stopped = err | done
        active = running & ~stopped

        # outstanding AXI work (a stopped core still drains it before it reports idle)
        rd_out = Signal(16)       # read beats requested and not yet received
        wr_out = Signal(16)       # write bursts without a response yet
        w_busy = Signal()         # a write burst's data beats are being sent
        drained = (rd_out == 0) & (wr_out == 0) & ~w_busy
        m.d.comb += [
            self.busy.eq(running & ~(stopped & drained)),
            self.done.eq(done & drained), self.error_valid.eq(err & drained),
            self.error_code.eq(err_code), self.error_addr.eq(err_addr),
        ]
        with m.If(running & ~(stopped & drained)):
            m.d.sync += self.cycles.eq(self.cycles + 1)

        # ---------------- memories --------------------------------------------------------
        Lsp = cfg.line_bytes
        AV = cfg.acc_line_values
        m.submodules.sp = sp = Memory(shape=8 * Lsp, depth=cfg.sp_lines, init=[])
        sp_w = sp.write_port()
        sp_ra = sp.read_port()
        sp_rb = sp.read_port()
        m.submodules.acc = acc = Memory(shape=32 * AV, depth=cfg.acc_lines, init=[])
        # per-value write enables when the vector unit writes a row in several passes
        acc_w = acc.write_port(granularity=32 if cfg.vector_passes > 1 else None)
        acc_rc = acc.read_port()
        acc_rs = acc.read_port()

        # ---------------- tokens -----------------------------------------------------------
        # index: 0 load->compute, 1 compute->load, 2 compute->store, 3 store->compute
        # A counter never exceeds its program-order balance (at most isa.TOKEN_LIMIT, checked by
        # the dispatcher) plus the pops dispatched but not yet taken (at most queue_depth + 1),
        # so these widths never wrap.
        tok_bits = (isa.TOKEN_LIMIT + cfg.queue_depth + 1).bit_length()
        tok = [Signal(tok_bits, name=f"tok{i}") for i in range(4)]
        tok_push = [Signal(name=f"tok_push{i}") for i in range(4)]
        tok_pop = [Signal(name=f"tok_pop{i}") for i in range(4)]
        for i in range(4):
            m.d.sync += tok[i].eq(tok[i] + tok_push[i] - tok_pop[i])

        # ---------------- AXI read arbitration (ID 0 fetch, ID 1 load) --------------------
        f_ar_valid, f_ar_addr, f_ar_len, f_ar_ready = Signal(), Signal(32), Signal(8), Signal()
        l_ar_valid, l_ar_addr, l_ar_len, l_ar_ready = Signal(), Signal(32), Signal(8), Signal()
        pick_fetch = f_ar_valid
        m.d.comb += [
            ax("arvalid").eq((f_ar_valid | l_ar_valid) & active),
            ax("araddr").eq(Mux(pick_fetch, f_ar_addr, l_ar_addr)),
            ax("arlen").eq(Mux(pick_fetch, f_ar_len, l_ar_len)),
            ax("arid").eq(Mux(pick_fetch, 0, 1)),
            ax("arsize").eq(size_code), ax("arburst").eq(1),
            f_ar_ready.eq(ax("arready") & active & pick_fetch),
            l_ar_ready.eq(ax("arready") & active & ~pick_fetch),
        ]
        ar_fire = ax("arvalid") & ax("arready")
        r_fire = ax("rvalid") & ax("rready")
        m.d.sync += rd_out.eq(rd_out + Mux(ar_fire, ax("arlen") + 1, 0) - r_fire)
        r_fetch = ax("rvalid") & (ax("rid") == 0)
        r_load = ax("rvalid") & (ax("rid") == 1)
        f_r_ready, l_r_ready = Signal(), Signal()
        m.d.comb += ax("rready").eq(Mux(ax("rid") == 0, f_r_ready, l_r_ready) | stopped)
        r_refused = r_fire & (ax("rresp") != 0)     # SLVERR or DECERR
        dma_rd = Signal(32)
        dma_wr = Signal(32)
        with m.If(r_fire):
            m.d.sync += dma_rd.eq(dma_rd + B)
        m.d.comb += self.dma_bytes.eq(dma_rd + dma_wr)

        # ---------------- fetch ------------------------------------------------------------
        # entries: command, its address, and whether the bus refused any of its beats (that is
        # reported as BUS_ERROR when the command reaches the dispatcher, in program order)
        # Fetched commands pass the checks (VALIDATE_STAGES cycles) on their way into the queue;
        # an entry holds the command, its verdict, its address and whether the bus refused a beat.
        m.submodules.fetch_q = fq = SyncFIFOBuffered(width=CMD + 8 + 33, depth=4)
        beats_per_cmd = max(CMD // D, 1)
        f_issued = Signal(32)        # commands requested
        f_inflight = Signal(4)       # commands requested, not yet in the buffer
        f_started = Signal()
        prog_end = Signal(38)        # PROG_ADDR + 32 x PROG_LEN, never truncated
        m.d.comb += prog_end.eq(self.prog_addr + (self.prog_len << 5))
        fetch_ok = ((self.prog_addr & 31) == 0) & ((self.prog_addr & (B - 1)) == 0) \
            & (self.prog_addr >= self.win_base) & (prog_end <= self.win_limit)
        with m.If(running & ~f_started):
            m.d.sync += f_started.eq(1)
            with m.If(~fetch_ok):
                m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.FETCH_WINDOW), raise_addr.eq(self.prog_addr)]
        room = (fq.w_level + f_inflight) < 4
        m.d.comb += [
            f_ar_valid.eq(f_started & fetch_ok & (f_issued < self.prog_len) & room & active),
            f_ar_addr.eq(self.prog_addr + (f_issued << 5)),
            f_ar_len.eq(beats_per_cmd - 1),
        ]
        f_got = Signal()
        with m.If(f_ar_valid & f_ar_ready):
            m.d.sync += f_issued.eq(f_issued + 1)
        m.d.sync += f_inflight.eq(f_inflight + (f_ar_valid & f_ar_ready) - f_got)
        # assemble beats into commands (v_in: one is complete)
        v_in, v_cmd, v_info = Signal(), Signal(CMD), Signal(33)
        f_buf = Signal(CMD)
        f_beat = Signal(range(beats_per_cmd + 1))
        f_recv = Signal(32)          # commands fetched so far
        f_bad = Signal()             # a beat of the command being assembled was refused
        f_addr = (self.prog_addr + (f_recv << 5))[:32]
        m.d.comb += f_r_ready.eq(1)
        with m.If(r_fetch & ~stopped):
            if beats_per_cmd == 1:
                m.d.comb += [v_in.eq(1), v_cmd.eq(ax("rdata")[0:CMD]), v_info.eq(Cat(f_addr, r_refused))]
                m.d.sync += f_recv.eq(f_recv + 1)
            else:
                new = Signal(CMD)
                m.d.comb += new.eq(Cat(f_buf[D:], ax("rdata")))
                m.d.sync += [f_buf.eq(new), f_beat.eq(f_beat + 1)]
                with m.If(f_beat == beats_per_cmd - 1):
                    m.d.comb += [v_in.eq(1), v_cmd.eq(new), v_info.eq(Cat(f_addr, f_bad | r_refused))]
                    m.d.sync += [f_beat.eq(0), f_recv.eq(f_recv + 1), f_bad.eq(0)]
                with m.Else():
                    m.d.sync += f_bad.eq(f_bad | r_refused)

        verdict, v_out_cmd = self._validate(m, v_cmd)
        v_valid, v_carry = v_in, v_info
        for stage in range(self.VALIDATE_STAGES):
            valid_q, carry_q = Signal(name=f"v_valid{stage + 1}"), Signal(33, name=f"v_info{stage + 1}")
            m.d.sync += [valid_q.eq(v_valid & ~stopped), carry_q.eq(v_carry)]
            v_valid, v_carry = valid_q, carry_q
        m.d.comb += [fq.w_en.eq(v_valid & ~stopped), fq.w_data.eq(Cat(v_out_cmd, verdict, v_carry)), f_got.eq(v_valid)]

        # ---------------- unit queues ---------------------------------------------------------
        queues = []
        for name in ("load", "compute", "store"):
            # load and store entries carry the command's address too (for bus-error reports)
            q = SyncFIFOBuffered(width=CMD if name == "compute" else CMD + 32, depth=cfg.queue_depth)
            m.submodules[f"{name}_q"] = q
            queues.append(q)
        lq, cq, sq = queues

        # ---------------- dispatcher --------------------------------------------------------
        cmd = fq.r_data[0:CMD]
        verdict = fq.r_data[CMD:CMD + 8]
        cmd_addr = fq.r_data[CMD + 8:CMD + 40]
        fetch_refused = fq.r_data[CMD + 40]
        op = cmd[0:8]
        sync_unit = fld(cmd, isa.Opcode.SYNC, "unit")
        target = Signal(2)
        with m.Switch(op):
            with m.Case(isa.Opcode.LOAD):
                m.d.comb += target.eq(0)
            with m.Case(isa.Opcode.STORE):
                m.d.comb += target.eq(2)
            with m.Case(isa.Opcode.SYNC):
                m.d.comb += target.eq(sync_unit)
            with m.Default():
                m.d.comb += target.eq(1)
        dispatched = Signal(32)
        m.d.comb += self.commands.eq(dispatched)
        at_end = Signal()
        units_idle = Signal()
        head = fq.r_rdy & active & ~at_end
        q_ready = Array([lq.w_rdy, cq.w_rdy, sq.w_rdy])[target]
        blocked_on_queue = Signal()
        m.d.comb += [lq.w_data.eq(Cat(cmd, cmd_addr)), cq.w_data.eq(cmd), sq.w_data.eq(Cat(cmd, cmd_addr))]
        # program-order token balances (isa.token_check): pushes minus pops of dispatched commands
        bal_bits = (isa.TOKEN_LIMIT + 1).bit_length() + (cfg.queue_depth + 2).bit_length() + 1
        balance = [Signal(range(-(1 << (bal_bits - 1)), 1 << (bal_bits - 1)), name=f"tok_balance{i}")
                   for i in range(4)]
        deltas = self._token_deltas(m, cmd, target)
        over_limit = Signal()
        m.d.comb += over_limit.eq(Cat(*[(d > 0) & (b == isa.TOKEN_LIMIT) for b, d in zip(balance, deltas)]).any())
        with m.If(head):
            with m.If(fetch_refused):
                m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.BUS_ERROR), raise_addr.eq(cmd_addr)]
            with m.Elif(verdict != 0):
                m.d.comb += [raise_err.eq(1), raise_code.eq(verdict), raise_addr.eq(cmd_addr)]
            with m.Elif(over_limit & (op != isa.Opcode.END)):
                m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.TOKEN_LIMIT), raise_addr.eq(cmd_addr)]
            with m.Elif(op == isa.Opcode.END):
                m.d.comb += fq.r_en.eq(1)
                m.d.sync += [at_end.eq(1), dispatched.eq(dispatched + 1)]
            with m.Elif(q_ready):
                m.d.comb += fq.r_en.eq(1)
                m.d.comb += Array([lq.w_en, cq.w_en, sq.w_en])[target].eq(1)
                m.d.sync += dispatched.eq(dispatched + 1)
                m.d.sync += [b.eq(b + d) for b, d in zip(balance, deltas)]
            with m.Else():
                m.d.comb += blocked_on_queue.eq(1)
        blocked_addr = Signal(32)
        with m.If(head):
            m.d.sync += blocked_addr.eq(cmd_addr)
        # a program that runs out without END
        with m.If(active & ~at_end & (dispatched == self.prog_len) & f_started & fetch_ok):
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.NO_END),
                         raise_addr.eq(self.prog_addr + (self.prog_len << 5))]
        with m.If(at_end & units_idle & ~lq.r_rdy & ~cq.r_rdy & ~sq.r_rdy & active):
            m.d.sync += done.eq(1)

        # ---------------- the units --------------------------------------------------------
        acc_w_taken = Signal()    # the compute unit writes the accumulator this cycle: loads wait
        l_idle, l_wait, ld_addr = self._load_unit(m, lq, tok, tok_push, tok_pop, l_ar_valid, l_ar_addr, l_ar_len,
                                                  l_ar_ready, r_load, l_r_ready, sp_w, acc_w, acc_w_taken,
                                                  active, stopped)
        c_idle, c_wait, compute_writes = self._compute_unit(m, cq, tok, tok_push, tok_pop, sp_ra, sp_rb, acc_rc,
                                                            acc_w, active)
        m.d.comb += acc_w_taken.eq(compute_writes)
        s_idle, s_wait, st_addr = self._store_unit(m, sq, tok, tok_push, tok_pop, acc_rs, wr_out, w_busy, dma_wr,
                                                   active, stopped)
        m.d.comb += units_idle.eq(l_idle & c_idle & s_idle)

        # ---------------- deadlock ------------------------------------------------------------
        def stuck(idle, wait, q):
            return (idle & ~q.r_rdy) | wait
        no_progress = (stuck(l_idle, l_wait, lq) & stuck(c_idle, c_wait, cq) & stuck(s_idle, s_wait, sq)
                       & (blocked_on_queue | at_end) & ~(at_end & units_idle) & active)
        dl_count = Signal(3)
        with m.If(no_progress):
            m.d.sync += dl_count.eq(Mux(dl_count == 7, 7, dl_count + 1))
        with m.Else():
            m.d.sync += dl_count.eq(0)
        with m.If(dl_count == 4):
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.DEADLOCK),
                         raise_addr.eq(Mux(at_end, blocked_addr, cmd_addr))]

        # ---------------- bus errors of LOAD and STORE transfers ----------------------------
        # Each unit holds its command until all its data (LOAD) or write responses (STORE) are
        # in, so the refused transfer is that command's. Last here: in a cycle with another
        # error too, the bus error is the one reported.
        with m.If(r_refused & (ax("rid") == 1) & active):
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.BUS_ERROR), raise_addr.eq(ld_addr)]
        with m.If(ax("bvalid") & ax("bready") & (ax("bresp") != 0) & active):
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.BUS_ERROR), raise_addr.eq(st_addr)]
        return m

    # ------------------------------------------------------------------------------------
    #: Cycles from a fetched command to its verdict (:meth:`_validate`).
    VALIDATE_STAGES = 2

    def _validate(self, m, cmd0):
        """Pipelined mirror of :func:`fp8npu.hdl.isa.validate` (same rules, same order): the
        multiplications of the range checks in the first cycle, the comparisons in the second.
        Returns (verdict, command) for the command that entered :attr:`VALIDATE_STAGES` cycles
        before; one command per cycle."""
        cfg = self.cfg
        Op, E = isa.Opcode, isa.ErrorCode
        # stage A: the command and the products of its range checks
        for name in ("rows", "dram_addr", "dram_stride"):
            assert fld(cmd0, Op.LOAD, name).start == fld(cmd0, Op.STORE, name).start, name
        cmd = Signal(CMD, name="v_cmd")
        m.d.sync += cmd.eq(cmd0)
        dram_span = Signal(48, name="v_dram_span")       # (rows - 1) * dram_stride, LOAD and STORE
        load_lines = Signal(33, name="v_load_lines")     # rows * SRAM lines per row, LOAD
        a_span = Signal(32, name="v_a_span")             # (m - 1) * a_stride, MATMUL
        rb0 = fld(cmd0, Op.LOAD, "row_bytes")
        lines0 = Mux(fld(cmd0, Op.LOAD, "dst"), _ceil_div_pow2(rb0, cfg.acc_line_bytes),
                     _ceil_div_pow2(rb0, cfg.line_bytes))
        m.d.sync += [
            dram_span.eq((fld(cmd0, Op.LOAD, "rows") - 1) * fld(cmd0, Op.LOAD, "dram_stride")),
            load_lines.eq(fld(cmd0, Op.LOAD, "rows") * lines0),
            a_span.eq((fld(cmd0, Op.MATMUL, "m") - 1) * fld(cmd0, Op.MATMUL, "a_stride")),
        ]
        # stage B: the checks, registered
        op = cmd[0:8]
        pp, pn, up, un = (common(cmd, n) for n in ("pop_prev", "pop_next", "push_prev", "push_next"))
        code = Signal(8, name="verdict")
        known = Signal()
        reserved = Signal()
        with m.Switch(op):
            for o in Op:
                with m.Case(o):
                    m.d.comb += [known.eq(1), reserved.eq((cmd & _reserved_mask(o)) != 0)]

        def f(o, name):
            return fld(cmd, o, name)

        bad_field = Signal()
        bad_format = Signal()
        sram = Signal()
        misaligned = Signal()
        window = Signal()
        sup = {name: int(cfg.supports(name)) for name in ("e4m3", "e5m2")}
        fmt_ok = Array([Const(sup["e4m3"], 1), Const(sup["e5m2"], 1)])
        wb, wl = self.win_base, self.win_limit

        def dram_check(o, row_bytes):
            rows, addr, stride = f(o, "rows"), f(o, "dram_addr"), f(o, "dram_stride")
            end = Signal(64, name=f"end_{o.name.lower()}")
            m.d.comb += end.eq(addr + dram_span + row_bytes)     # rows >= 1: no wrap in dram_span
            m.d.comb += misaligned.eq(((addr | stride) & (cfg.bus_bytes - 1)) != 0)
            m.d.comb += window.eq((rows != 0) & (row_bytes != 0) & ((addr < wb) | (end > wl)))

        with m.Switch(op):
            with m.Case(Op.END):
                m.d.comb += bad_field.eq(pp | pn | up | un)
            with m.Case(Op.LOAD):
                dst, rows, rb, sa = f(Op.LOAD, "dst"), f(Op.LOAD, "rows"), f(Op.LOAD, "row_bytes"), f(Op.LOAD, "sram_addr")
                m.d.comb += bad_field.eq(pp | up | (dst & (rb[0:2] != 0)))
                span = Signal(40)
                m.d.comb += span.eq(sa + load_lines)
                m.d.comb += sram.eq((rows != 0) & (rb != 0) & (span > Mux(dst, cfg.acc_lines, cfg.sp_lines)))
                dram_check(Op.LOAD, rb)
            with m.Case(Op.STORE):
                fmt, cols, rows = f(Op.STORE, "fmt"), f(Op.STORE, "cols"), f(Op.STORE, "rows")
                m.d.comb += bad_field.eq(pn | un | (fmt == 3) | (cols == 0) | (cols > cfg.cols))
                m.d.comb += bad_format.eq(((fmt == 1) & ~sup["e4m3"]) | ((fmt == 2) & ~sup["e5m2"]))
                m.d.comb += sram.eq((rows != 0) & (f(Op.STORE, "acc_addr") + rows > cfg.acc_lines))
                dram_check(Op.STORE, Mux(fmt == 0, cols << 2, cols))
            with m.Case(Op.MATMUL):
                k, mm = f(Op.MATMUL, "k"), f(Op.MATMUL, "m")
                commit, fresh = f(Op.MATMUL, "commit"), f(Op.MATMUL, "fresh")
                block_ok = Const(int(cfg.accumulation == "block"), 1)
                m.d.comb += bad_field.eq((k == 0) | (k > cfg.rows) | (fresh & ~commit)
                                         | (~block_ok & (commit | fresh)))
                m.d.comb += bad_format.eq(~fmt_ok[f(Op.MATMUL, "fmt_a")] | ~fmt_ok[f(Op.MATMUL, "fmt_b")])
                last_a = Signal(40)
                m.d.comb += last_a.eq(f(Op.MATMUL, "a_addr") + a_span)     # m >= 1: no wrap in a_span
                m.d.comb += sram.eq((f(Op.MATMUL, "b_addr") + k > cfg.sp_lines)
                                    | ((mm != 0) & ((last_a >= cfg.sp_lines)
                                                    | (f(Op.MATMUL, "acc_addr") + mm > cfg.acc_lines))))
            with m.Case(Op.EPILOGUE):
                rows = f(Op.EPILOGUE, "rows")
                m.d.comb += sram.eq(((rows != 0) & ((f(Op.EPILOGUE, "src") + rows > cfg.acc_lines)
                                                    | (f(Op.EPILOGUE, "dst") + rows > cfg.acc_lines)))
                                    | (f(Op.EPILOGUE, "scale_addr") >= cfg.acc_lines)
                                    | (f(Op.EPILOGUE, "bias_addr") >= cfg.acc_lines))
            with m.Case(Op.BLOCKSCALE):
                rows = f(Op.BLOCKSCALE, "rows")
                m.d.comb += sram.eq(((rows != 0) & ((f(Op.BLOCKSCALE, "src") + rows > cfg.acc_lines)
                                                    | (f(Op.BLOCKSCALE, "dst") + rows > cfg.acc_lines)
                                                    | (f(Op.BLOCKSCALE, "row_scale") + rows > cfg.acc_lines)))
                                    | (f(Op.BLOCKSCALE, "col_scale") >= cfg.acc_lines))
            with m.Case(Op.SYNC):
                u = f(Op.SYNC, "unit")
                m.d.comb += bad_field.eq((u == 3) | ((u == 0) & (pp | up)) | ((u == 2) & (pn | un)))
        # output: the first failed check, in isa.validate's order, from the registered checks
        checks = (~known, reserved | bad_field, bad_format, sram, misaligned, window)
        failed = [Signal(name=f"v_fail_{e.name.lower()}") for e in (E.BAD_OPCODE, E.BAD_FIELD, E.BAD_FORMAT,
                                                                     E.SRAM_RANGE, E.MISALIGNED, E.DRAM_WINDOW)]
        m.d.sync += [q.eq(c) for q, c in zip(failed, checks)]
        cmd_out = Signal(CMD, name="v_cmd_out")
        m.d.sync += cmd_out.eq(cmd)
        with m.If(failed[0]):
            m.d.comb += code.eq(E.BAD_OPCODE)
        with m.Elif(failed[1]):
            m.d.comb += code.eq(E.BAD_FIELD)
        with m.Elif(failed[2]):
            m.d.comb += code.eq(E.BAD_FORMAT)
        with m.Elif(failed[3]):
            m.d.comb += code.eq(E.SRAM_RANGE)
        with m.Elif(failed[4]):
            m.d.comb += code.eq(E.MISALIGNED)
        with m.Elif(failed[5]):
            m.d.comb += code.eq(E.DRAM_WINDOW)
        with m.Else():
            m.d.comb += code.eq(E.NONE)
        return code, cmd_out

    @staticmethod
    def _token_deltas(m, cmd, target):
        """Per token counter, +1 / -1 / 0: how dispatching ``cmd`` (for unit ``target``) changes
        its program-order balance (the mirror of :func:`fp8npu.hdl.isa.token_deltas`)."""
        flags = [common(cmd, n) for n in ("pop_prev", "pop_next", "push_prev", "push_next")]
        deltas = [Signal(range(-1, 2), name=f"tok_delta{t}") for t in range(4)]
        with m.Switch(target):
            for unit, tokens in isa.TOKEN_OF_FLAG.items():
                with m.Case(unit):
                    for flag, token, sign in zip(flags, tokens, (-1, -1, 1, 1)):
                        if token is not None:
                            m.d.comb += deltas[token].eq(Mux(flag, sign, 0))
        return deltas

    # ------------------------------------------------------------------------------------
    def _burst_len(self, left, addr):
        """Beats in the next INCR burst from ``addr`` with ``left`` beats to go: at most
        ``max_burst``, and never across a 4 KB boundary (AXI4 rule)."""
        to_4k = (4096 - (addr & 4095)) >> (self.cfg.bus_bytes.bit_length() - 1)
        capped = Mux(left < self.cfg.max_burst, left, self.cfg.max_burst)
        return Mux(to_4k < capped, to_4k, capped)

    def _tokens_ready(self, cmd, tok, prev_idx, next_idx):
        pp, pn = common(cmd, "pop_prev"), common(cmd, "pop_next")
        ok = Const(1, 1)
        if prev_idx is not None:
            ok = ok & (~pp | (tok[prev_idx] != 0))
        if next_idx is not None:
            ok = ok & (~pn | (tok[next_idx] != 0))
        return ok

    @staticmethod
    def _take_command(m, q, active, prefix):
        """A unit's held command: when the unit is idle, take the next (command, address) entry
        of its queue ``q``. Returns (command, its address, busy); the unit clears busy when done."""
        cur = Signal(CMD, name=f"{prefix}_cmd")
        cmd_addr = Signal(32, name=f"{prefix}_cmd_addr")
        busy = Signal(name=f"{prefix}_busy")
        with m.If(~busy & q.r_rdy & active):
            m.d.comb += q.r_en.eq(1)
            m.d.sync += [cur.eq(q.r_data[:CMD]), cmd_addr.eq(q.r_data[CMD:]), busy.eq(1)]
        return cur, cmd_addr, busy

    def _load_unit(self, m, q, tok, tok_push, tok_pop, ar_valid, ar_addr, ar_len, ar_ready, r_valid, r_ready,
                   sp_w, acc_w, acc_w_taken, active, stopped):
        """LOAD: strided DRAM rows -> SRAM lines.
        Returns (idle, waiting-for-token, address of the command held)."""
        cfg = self.cfg
        B = cfg.bus_bytes
        Op = isa.Opcode
        cur, cmd_addr, busy = self._take_command(m, q, active, "ld")
        wait = Signal(name="ld_wait")
        is_load = cur[0:8] == Op.LOAD
        dst = fld(cur, Op.LOAD, "dst")
        rows = fld(cur, Op.LOAD, "rows")
        rb = fld(cur, Op.LOAD, "row_bytes")
        addr0 = fld(cur, Op.LOAD, "dram_addr")
        stride = fld(cur, Op.LOAD, "dram_stride")
        beats_row = Signal(17, name="ld_beats_row")        # registered when the command starts

        phase = Signal(2, name="ld_phase")   # 0 tokens, 1 transfer, 2 finish
        ready_tok = self._tokens_ready(cur, tok, None, 1)
        with m.If(busy & (phase == 0)):
            with m.If(ready_tok & active):
                m.d.comb += tok_pop[1].eq(common(cur, "pop_next"))
                m.d.sync += [phase.eq(Mux(is_load & (rows != 0) & (rb != 0), 1, 2)),
                             beats_row.eq(_ceil_div_pow2(rb, B))]
            with m.Else():
                m.d.comb += wait.eq(1)

        # issue side: walk rows and bursts
        i_row = Signal(16, name="ld_i_row")
        i_beat = Signal(17, name="ld_i_beat")
        i_addr = Signal(32, name="ld_i_addr")
        row_base = Signal(32, name="ld_row_base")
        issued_all = Signal(name="ld_issued_all")
        outstanding = Signal(10, name="ld_outstanding")
        blen = Signal(9, name="ld_blen")
        left = Signal(17, name="ld_left")
        m.d.comb += [left.eq(beats_row - i_beat), blen.eq(self._burst_len(left, i_addr))]
        start_xfer = busy & (phase == 1)
        first = Signal(name="ld_first")
        with m.If(busy & (phase == 0) & ready_tok & active):
            m.d.sync += [i_row.eq(0), i_beat.eq(0), i_addr.eq(addr0), row_base.eq(addr0), issued_all.eq(0),
                         first.eq(1)]
        # room for a longest burst (not this one's length: that keeps the burst arithmetic off
        # the AR handshake)
        can_issue = start_xfer & ~issued_all & (outstanding <= 3 * cfg.max_burst) & active
        m.d.comb += [ar_valid.eq(can_issue), ar_addr.eq(i_addr), ar_len.eq(blen - 1)]
        got_beat = Signal(name="ld_got_beat")
        m.d.sync += outstanding.eq(outstanding + Mux(ar_valid & ar_ready, blen, 0) - got_beat)
        with m.If(ar_valid & ar_ready):
            with m.If(blen == left):
                m.d.sync += [i_beat.eq(0), i_row.eq(i_row + 1), i_addr.eq(row_base + stride),
                             row_base.eq(row_base + stride)]
                with m.If(i_row + 1 == rows):
                    m.d.sync += issued_all.eq(1)
            with m.Else():
                m.d.sync += [i_beat.eq(i_beat + blen), i_addr.eq(i_addr + (blen << (B.bit_length() - 1)))]

        # receive side: chunks of U = min(line, bus) bytes
        recv_done = Signal(name="ld_recv_done")
        self._line_assembler(m, "sp", cfg.line_bytes, sp_w, dst == 0, cur, start_xfer, r_valid, r_ready,
                             got_beat, recv_done, first, Const(0, 1))
        self._line_assembler(m, "acc", cfg.acc_line_bytes, acc_w, dst == 1, cur, start_xfer, r_valid, r_ready,
                             got_beat, recv_done, first, acc_w_taken)
        with m.If(first):
            m.d.sync += first.eq(0)
        with m.If(start_xfer & recv_done & ~first):
            m.d.sync += phase.eq(2)
        with m.If(busy & (phase == 2)):
            m.d.comb += tok_push[0].eq(common(cur, "push_next"))
            m.d.sync += [busy.eq(0), phase.eq(0)]
        with m.If(stopped):
            m.d.sync += [busy.eq(0), phase.eq(0)]
        return ~busy, wait, cmd_addr

    def _line_assembler(self, m, name, L, wport, selected, cur, xfer, r_valid, r_ready, got_beat, recv_done, first,
                        port_taken):
        """Turn incoming R beats into SRAM lines of ``L`` bytes for the LOAD in ``cur``."""
        cfg = self.cfg
        B = cfg.bus_bytes
        U = min(L, B)
        Op = isa.Opcode
        rows = fld(cur, Op.LOAD, "rows")
        rb = fld(cur, Op.LOAD, "row_bytes")
        sram0 = fld(cur, Op.LOAD, "sram_addr")
        chunks_row = Signal(17, name=f"{name}_chunks_row")
        m.d.comb += chunks_row.eq(_ceil_div_pow2(rb, U))
        c_row = Signal(16, name=f"{name}_c_row")       # row being received
        c_idx = Signal(17, name=f"{name}_c_idx")       # chunk within row
        c_beat = Signal(range(B // U + 1), name=f"{name}_c_beat")   # chunk within beat
        c_line = Signal(range(L // U + 1), name=f"{name}_c_line")   # chunk within line
        line_addr = Signal(16, name=f"{name}_line_addr")
        line = Signal(8 * L, name=f"{name}_line")
        with m.If(first & selected):
            m.d.sync += [c_row.eq(0), c_idx.eq(0), c_beat.eq(0), c_line.eq(0), line_addr.eq(sram0), line.eq(0)]
        active_here = xfer & selected & ~first & (c_row < rows)
        # the chunk of the current beat, masked to the bytes inside the row
        beat = r_valid  # only beats for the load unit reach here
        rdata = self.ax("rdata")
        chunk = Signal(8 * U, name=f"{name}_chunk")
        m.d.comb += chunk.eq(Array([rdata[8 * U * i:8 * U * (i + 1)] for i in range(B // U)])[c_beat])
        remaining = Signal(32, name=f"{name}_remaining")
        m.d.comb += remaining.eq(rb - (c_idx * U))
        masked = Signal(8 * U, name=f"{name}_masked")
        for byte in range(U):
            m.d.comb += masked[8 * byte:8 * byte + 8].eq(Mux(remaining > byte, chunk[8 * byte:8 * byte + 8], 0))
        last_of_row = c_idx + 1 == chunks_row
        last_of_line = c_line == (L // U) - 1
        last_of_beat = c_beat == (B // U) - 1
        new_line = Signal(8 * L, name=f"{name}_new_line")
        m.d.comb += new_line.eq(line)
        for pos in range(L // U):
            with m.If(c_line == pos):
                m.d.comb += new_line[8 * U * pos:8 * U * (pos + 1)].eq(masked)
        with m.If(active_here & beat & ~port_taken):
            consume = last_of_beat | last_of_row
            m.d.comb += [r_ready.eq(consume), got_beat.eq(consume)]
            m.d.sync += c_beat.eq(Mux(consume, 0, c_beat + 1))
            with m.If(last_of_line | last_of_row):
                m.d.comb += [wport.en.eq(-1), wport.addr.eq(line_addr), wport.data.eq(new_line)]
                m.d.sync += [line.eq(0), c_line.eq(0), line_addr.eq(line_addr + 1)]
            with m.Else():
                m.d.sync += [line.eq(new_line), c_line.eq(c_line + 1)]
            with m.If(last_of_row):
                m.d.sync += [c_idx.eq(0), c_row.eq(c_row + 1)]
            with m.Else():
                m.d.sync += c_idx.eq(c_idx + 1)
        with m.If(xfer & selected & ~first & (c_row == rows)):
            m.d.comb += recv_done.eq(1)

    # ------------------------------------------------------------------------------------
    def _compute_unit(self, m, q, tok, tok_push, tok_pop, sp_ra, sp_rb, acc_r, acc_w, active):
        """MATMUL through the array; EPILOGUE and BLOCKSCALE on accumulator lines."""
        cfg = self.cfg
        R, C = cfg.rows, cfg.cols
        Op = isa.Opcode
        block = cfg.accumulation == "block"
        if block:
            # exact partial sums beside the accumulator lines; the array reads and writes them
            m.submodules.array = arr = BlockArray(R, C, cfg.acc_block, product=cfg.multipliers)
            m.submodules.part = part = Memory(shape=len(arr.out_part), depth=cfg.acc_lines, init=[])
            part_w, part_r = part.write_port(), part.read_port()
            m.d.comb += [part_r.addr.eq(arr.part_rd_addr), arr.part_data.eq(part_r.data), arr.acc_data.eq(acc_r.data),
                         part_w.en.eq(arr.out_valid), part_w.addr.eq(arr.out_addr), part_w.data.eq(arr.out_part)]
            with m.If(arr.acc_rd_en):
                m.d.comb += acc_r.addr.eq(arr.acc_rd_addr)
        else:
            m.submodules.array = arr = MACArray(R, C)

        # ---- stage 1: weight loader (takes commands from the queue, pops tokens) ----
        wl_cmd = Signal(CMD, name="wl_cmd")
        wl_busy = Signal(name="wl_busy")
        wl_phase = Signal(2, name="wl_phase")   # 0 tokens, 1 load weights, 2 hand over
        wl_wait = Signal(name="wl_wait")
        shadow_full = Signal(name="shadow_full")
        st_next = Signal(CMD, name="st_next")
        st_next_valid = Signal(name="st_next_valid")
        with m.If(~wl_busy & q.r_rdy & active):
            m.d.comb += q.r_en.eq(1)
            m.d.sync += [wl_cmd.eq(q.r_data), wl_busy.eq(1), wl_phase.eq(0)]
        wl_is_mm = wl_cmd[0:8] == Op.MATMUL
        ready_tok = self._tokens_ready(wl_cmd, tok, 0, 3)
        wl_row = Signal(range(R + 2), name="wl_row")
        wl_k = fld(wl_cmd, Op.MATMUL, "k")
        wl_b = fld(wl_cmd, Op.MATMUL, "b_addr")
        with m.If(wl_busy & (wl_phase == 0)):
            with m.If(ready_tok & active):
                m.d.comb += [tok_pop[0].eq(common(wl_cmd, "pop_prev")), tok_pop[3].eq(common(wl_cmd, "pop_next"))]
                m.d.sync += [wl_phase.eq(Mux(wl_is_mm, 1, 2)), wl_row.eq(0)]
            with m.Else():
                m.d.comb += wl_wait.eq(1)
        # read one weight line per cycle; write the shadow row a cycle later
        w_pending = Signal(name="w_pending")
        w_row_q = Signal(range(R + 1), name="w_row_q")
        m.d.sync += w_pending.eq(0)
        with m.If(wl_busy & (wl_phase == 1) & ~shadow_full & active):
            with m.If(wl_row < wl_k):
                m.d.comb += sp_rb.addr.eq(wl_b + wl_row)
                m.d.sync += [w_pending.eq(1), w_row_q.eq(wl_row), wl_row.eq(wl_row + 1)]
            with m.Else():
                m.d.sync += [wl_phase.eq(2), shadow_full.eq(1)]
        m.d.comb += [arr.w_we.eq(w_pending), arr.w_row.eq(w_row_q), arr.w_data.eq(sp_rb.data[0:8 * C])]
        with m.If(wl_busy & (wl_phase == 2) & ~st_next_valid):
            m.d.sync += [st_next.eq(wl_cmd), st_next_valid.eq(1), wl_busy.eq(0), wl_phase.eq(0)]

        # ---- stage 2: row streamer / epilogue ----
        st_cmd = Signal(CMD, name="st_cmd")
        st_busy = Signal(name="st_busy")
        st_i = Signal(16, name="st_i")
        st_is_mm = st_cmd[0:8] == Op.MATMUL
        mm = {n: fld(st_cmd, Op.MATMUL, n) for n in ("m", "k", "a_addr", "a_stride", "acc_addr", "accumulate",
                                                      "fmt_a", "fmt_b", "commit", "fresh")}
        a_line = Signal(16, name="st_a_line")
        # in-flight accumulator writes: issue stage + the array + the write cycle
        depth = arr.latency + 2
        fl_valid = [Signal(name=f"fl_v{i}") for i in range(depth)]
        fl_addr = [Signal(16, name=f"fl_a{i}") for i in range(depth)]
        issue = Signal(name="st_issue")
        issue_addr = Signal(16, name="st_issue_addr")
        m.d.sync += [fl_valid[0].eq(issue), fl_addr[0].eq(issue_addr)]
        for i in range(1, depth):
            m.d.sync += [fl_valid[i].eq(fl_valid[i - 1]), fl_addr[i].eq(fl_addr[i - 1])]
        hazard = Signal(name="st_hazard")
        m.d.comb += hazard.eq(0)
        # A row that reads a line waits while a row that writes it is in flight: until the write
        # (sequential: the line is read at issue), or until the write is visible where the
        # block array reads the line, at its partial read stage R + 1.
        window = depth - 1 if not block else arr.latency - (R + 1)
        for i in range(window):
            with m.If(fl_valid[i] & (fl_addr[i] == issue_addr)):
                m.d.comb += hazard.eq(1)
        array_empty = Signal(name="array_empty")
        m.d.comb += array_empty.eq(~Cat(*fl_valid).any())

        # delayed token pushes (leave when the command's last row has been written)
        push_delay = [Signal(2, name=f"push_d{i}") for i in range(depth)]
        push_now = Signal(2, name="push_now")
        m.d.sync += push_delay[0].eq(push_now)
        for i in range(1, depth):
            m.d.sync += push_delay[i].eq(push_delay[i - 1])
        m.d.comb += [tok_push[1].eq(push_delay[-1][0]), tok_push[2].eq(push_delay[-1][1])]
        pushes_pending = Cat(*push_delay).any()

        # MATMUL rows: read A line and accumulator line now, enter the array next cycle
        row_go = st_busy & st_is_mm & (st_i < mm["m"]) & active
        m.d.comb += issue_addr.eq(mm["acc_addr"] + st_i)
        reads = mm["accumulate"] | (mm["commit"] & ~mm["fresh"]) if block else mm["accumulate"]
        row_ok = row_go & ~(hazard & reads)
        with m.If(row_ok):
            m.d.comb += [issue.eq(1), sp_ra.addr.eq(a_line)]
            if not block:
                m.d.comb += acc_r.addr.eq(issue_addr)
            m.d.sync += [st_i.eq(st_i + 1), a_line.eq(a_line + mm["a_stride"])]
            with m.If(st_i == 0):
                m.d.sync += shadow_full.eq(0)
        stalls = self.stalls
        with m.If(active & ~row_ok & ~(st_busy & ~st_is_mm)):
            m.d.sync += stalls.eq(stalls + 1)
        in_valid = Signal(name="arr_in_valid")
        in_first = Signal(name="arr_in_first")
        in_accum = Signal(name="arr_in_accum")
        in_k = Signal(range(R + 1), name="arr_in_k")
        in_fa, in_fb = Signal(name="arr_in_fa"), Signal(name="arr_in_fb")
        in_addr = Signal(16, name="arr_in_addr")
        m.d.sync += [in_valid.eq(row_ok), in_first.eq(st_i == 0), in_accum.eq(mm["accumulate"]), in_k.eq(mm["k"]),
                     in_fa.eq(mm["fmt_a"]), in_fb.eq(mm["fmt_b"]), in_addr.eq(issue_addr)]
        m.d.comb += [arr.in_valid.eq(in_valid), arr.in_swap.eq(in_first), arr.in_k.eq(in_k),
                     arr.in_addr.eq(in_addr), arr.in_a.eq(sp_ra.data[0:8 * R])]
        if block:
            in_commit, in_fresh = Signal(name="arr_in_commit"), Signal(name="arr_in_fresh")
            m.d.sync += [in_commit.eq(mm["commit"]), in_fresh.eq(mm["fresh"])]
            m.d.comb += [arr.in_accum.eq(in_accum), arr.in_commit.eq(in_commit), arr.in_fresh.eq(in_fresh)]
        else:
            m.d.comb += [arr.in_fmt_a.eq(in_fa), arr.in_fmt_b.eq(in_fb),
                         arr.in_acc.eq(Mux(in_accum, acc_r.data[0:32 * C], 0))]
        with m.If(in_valid):
            m.d.sync += self.mac_ops.eq(self.mac_ops + in_k * C)
        # A MATMUL finishes in the cycle its last row issues (or at once when m = 0: the loaded
        # weights are then discarded); the next command is taken in that same cycle, so
        # back-to-back MATMULs stream without a bubble.
        last_row = row_ok & (st_i + 1 == mm["m"])
        mm_finish = (st_busy & st_is_mm & (st_i == mm["m"])) | last_row
        with m.If(mm_finish):
            with m.If(mm["m"] == 0):
                m.d.sync += shadow_full.eq(0)
            m.d.comb += push_now.eq(Cat(common(st_cmd, "push_prev"), common(st_cmd, "push_next")))
            m.d.sync += st_busy.eq(0)
        # take the next command (after the statements above, so it wins)
        with m.If((~st_busy | mm_finish) & st_next_valid & active):
            m.d.sync += [st_cmd.eq(st_next), st_busy.eq(1), st_next_valid.eq(0), st_i.eq(0),
                         a_line.eq(fld(st_next, Op.MATMUL, "a_addr"))]

        # ---- EPILOGUE and BLOCKSCALE in the vector unit; compute-side SYNC ----
        m.submodules.vector = vu = VectorUnit(C, cfg.vector_lanes_built)
        other = st_busy & ~st_is_mm
        is_vector = (st_cmd[0:8] == Op.EPILOGUE) | (st_cmd[0:8] == Op.BLOCKSCALE)
        vu_started = Signal(name="vu_started")
        m.d.comb += [vu.cmd.eq(st_cmd), vu.en.eq(active), vu.rd_data.eq(acc_r.data[0:32 * C])]
        with m.If(vu.busy):                                 # the array is empty while it runs
            m.d.comb += acc_r.addr.eq(vu.rd_addr)
        with m.If(other & active & array_empty & ~vu_started):
            with m.If(is_vector):
                m.d.comb += vu.start.eq(1)
                m.d.sync += vu_started.eq(1)
            with m.Else():                                  # SYNC
                m.d.comb += push_now.eq(Cat(common(st_cmd, "push_prev"), common(st_cmd, "push_next")))
                m.d.sync += st_busy.eq(0)
        with m.If(vu.done):
            m.d.comb += push_now.eq(Cat(common(st_cmd, "push_prev"), common(st_cmd, "push_next")))
            m.d.sync += [st_busy.eq(0), vu_started.eq(0)]

        # accumulator write port: array results, vector unit rows, else the load unit
        arr_wr = arr.out_commit if block else arr.out_valid
        with m.If(arr_wr):
            m.d.comb += [acc_w.en.eq(-1), acc_w.addr.eq(arr.out_addr), acc_w.data.eq(arr.out_acc)]
        with m.Elif(vu.wr_en):
            m.d.comb += [acc_w.addr.eq(vu.wr_addr), acc_w.data.eq(vu.wr_data),
                         acc_w.en.eq(vu.wr_lanes if cfg.vector_passes > 1 else 1)]
        compute_writing = arr_wr | vu.wr_en

        c_idle = ~wl_busy & ~st_next_valid & ~st_busy & array_empty & ~pushes_pending
        c_wait = wl_busy & wl_wait & ~st_next_valid & ~st_busy & array_empty & ~pushes_pending
        return c_idle, c_wait, compute_writing

    # ------------------------------------------------------------------------------------
    def _store_unit(self, m, q, tok, tok_push, tok_pop, acc_r, wr_out, w_busy, dma_wr, active, stopped):
        """STORE: accumulator lines -> DRAM rows (FP32, or scaled and requantized to FP8).
        Returns (idle, waiting-for-token, address of the command held)."""
        cfg = self.cfg
        B = cfg.bus_bytes
        C = cfg.cols
        Op = isa.Opcode
        ax = self.ax
        cur, cmd_addr, busy = self._take_command(m, q, active, "st")
        wait = Signal(name="s_wait")
        # phase (0 when idle: set back at finish and on stop): 0 tokens, 1 read line,
        # 2 line arrives, 3 AW, 4 W, 5 wait B, 6 finish
        phase = Signal(3, name="s_phase")
        is_store = cur[0:8] == Op.STORE
        f = {n: fld(cur, Op.STORE, n) for n in ("fmt", "saturate", "acc_addr", "rows", "cols", "dram_addr",
                                                "dram_stride", "scale")}
        ready_tok = self._tokens_ready(cur, tok, 2, None)
        row = Signal(16, name="s_row")
        row_addr = Signal(32, name="s_row_addr")
        row_bytes = Signal(8, name="s_row_bytes")
        m.d.comb += row_bytes.eq(Mux(f["fmt"] == 0, f["cols"] << 2, f["cols"]))
        beats_row = Signal(8, name="s_beats_row")
        m.d.comb += beats_row.eq(_ceil_div_pow2(row_bytes, B))
        RB = 4 * C
        nbeats_max = max(1, -(-RB // B))
        buf = Signal(8 * nbeats_max * B, name="s_buf")
        beat = Signal(8, name="s_beat")
        blen = Signal(9, name="s_blen")
        burst_left = Signal(9, name="s_burst_left")
        w_addr = Signal(32, name="s_w_addr")
        with m.If(busy & (phase == 0)):
            with m.If(ready_tok & active):
                m.d.comb += tok_pop[2].eq(common(cur, "pop_prev"))
                m.d.sync += [phase.eq(Mux(is_store & (f["rows"] != 0), 1, 6)), row.eq(0),
                             row_addr.eq(f["dram_addr"])]
            with m.Else():
                m.d.comb += wait.eq(1)
        with m.If(busy & (phase == 1) & active):
            m.d.comb += acc_r.addr.eq(f["acc_addr"] + row)
            m.d.sync += phase.eq(2)
        # convert the line that arrives: FP32 rows are taken as they are; FP8 rows go through
        # the requantizer in S passes of Q columns (STORE_CONVERT + S - 1 cycles): the first
        # pass straight from the read port, the others from the line kept in ``buf``
        Q, S = cfg.store_lanes_built, cfg.store_passes
        m.submodules.requantizer = rq = Requantizer(Q)
        assert self.STORE_CONVERT == Requantizer.LATENCY
        conv_wait = Signal(range(self.STORE_CONVERT + S), name="s_conv_wait")
        first_pass = acc_r.data[0:32 * Q]
        if S == 1:
            m.d.comb += rq.x.eq(first_pass)
        else:
            later = pick_slice(m, buf[:32 * C], 32 * Q, S, conv_wait, "s_pass")
            m.d.comb += rq.x.eq(Mux(conv_wait == 0, first_pass, later))
        m.d.comb += [rq.scale.eq(f["scale"]), rq.e5m2.eq(f["fmt"] == 2), rq.saturate.eq(f["saturate"])]
        codes = rq.y
        if S > 1:                           # earlier passes' codes, the oldest at the bottom
            done_codes = Signal(8 * Q * (S - 1), name="s_codes")
            m.d.sync += done_codes.eq(Cat(done_codes[8 * Q:], rq.y))
            codes = Cat(done_codes, rq.y)
        with m.If(busy & (phase == 2)):
            with m.If(f["fmt"] == 0):
                m.d.sync += [buf.eq(acc_r.data[0:32 * C]), beat.eq(0), phase.eq(3), w_addr.eq(row_addr)]
            with m.Elif(conv_wait == self.STORE_CONVERT + S - 1):
                m.d.sync += [buf.eq(codes[:8 * C]), beat.eq(0), phase.eq(3), w_addr.eq(row_addr), conv_wait.eq(0)]
            with m.Else():
                m.d.sync += conv_wait.eq(conv_wait + 1)
                if S > 1:
                    with m.If(conv_wait == 0):
                        m.d.sync += buf.eq(acc_r.data[0:32 * C])
        # AW: one burst at a time (rows are bus aligned; split at max_burst and 4 KB)
        m.d.comb += blen.eq(self._burst_len(beats_row - beat, w_addr))
        aw_go = busy & (phase == 3) & active
        m.d.comb += [ax("awvalid").eq(aw_go), ax("awaddr").eq(w_addr), ax("awlen").eq(blen - 1),
                     ax("awsize").eq(B.bit_length() - 1), ax("awburst").eq(1), ax("awid").eq(2)]
        aw_fire = ax("awvalid") & ax("awready")
        b_fire = ax("bvalid") & ax("bready")
        m.d.comb += ax("bready").eq(1)
        m.d.sync += wr_out.eq(wr_out + aw_fire - b_fire)
        with m.If(aw_fire):
            m.d.sync += [phase.eq(4), burst_left.eq(blen), w_addr.eq(w_addr + (blen << (B.bit_length() - 1)))]
        # W beats (completed even after an error: the burst was promised)
        in_w = busy & (phase == 4)
        m.d.comb += w_busy.eq(in_w)
        beat_data = Array([buf[8 * B * i:8 * B * (i + 1)] for i in range(nbeats_max)])[beat]
        strb = Signal(B, name="s_strb")
        for byte in range(B):
            m.d.comb += strb[byte].eq((beat * B + byte) < row_bytes)
        m.d.comb += [ax("wvalid").eq(in_w), ax("wdata").eq(beat_data), ax("wstrb").eq(strb),
                     ax("wlast").eq(burst_left == 1)]
        w_fire = ax("wvalid") & ax("wready")
        with m.If(w_fire):
            m.d.sync += [dma_wr.eq(dma_wr + B), beat.eq(beat + 1), burst_left.eq(burst_left - 1)]
            with m.If(burst_left == 1):
                with m.If(beat + 1 == beats_row):
                    m.d.sync += row.eq(row + 1)
                    with m.If(row + 1 == f["rows"]):
                        m.d.sync += phase.eq(5)
                    with m.Else():
                        m.d.sync += [phase.eq(1), row_addr.eq(row_addr + f["dram_stride"])]
                with m.Else():
                    m.d.sync += phase.eq(3)
        with m.If(busy & (phase == 5) & (wr_out == 0)):
            m.d.sync += phase.eq(6)
        with m.If(busy & (phase == 6) & active):
            m.d.comb += tok_push[3].eq(common(cur, "push_prev"))
            m.d.sync += [busy.eq(0), phase.eq(0)]
        with m.If(stopped & ~in_w):
            m.d.sync += [busy.eq(0), phase.eq(0)]
        return ~busy, wait, cmd_addr


class NPU(wiring.Component):
    """The complete NPU: :class:`NPUCore` plus the AXI4-Lite register block of
    :class:`fp8npu.hdl.isa.Register`. Writing CTRL bit 0 while idle resets the core and
    starts the program.

    Members
    -------
    m_axi_* : AXI4 master (DRAM)
    s_axil_* : AXI4-Lite slave (control and status)
    irq : Out(1)
        Interrupt, level: high from the cycle STATUS shows done or error until the next start.
    status : Out(3)
        STATUS bits 0..2 (busy, done, error), for LEDs.
    """

    def __init__(self, cfg=None):
        self.cfg = cfg or NPUConfig()
        _check_buildable(self.cfg, self)
        from .axi import axil_slave_members
        members = axi4_master_members("m_axi", self.cfg.axi_data_bits, self.cfg.axi_addr_bits)
        members.update(axil_slave_members("s_axil"))
        members["irq"] = Out(1)
        members["status"] = Out(3)
        super().__init__(members)

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        core = NPUCore(cfg)
        start = Signal()
        m.submodules.core = ResetInserter({"sync": start})(core)
        Rg = isa.Register
        prog_addr, prog_len, win_base, win_limit = (Signal(32, name=n) for n in
                                                    ("r_prog_addr", "r_prog_len", "r_win_base", "r_win_limit"))
        status = Signal(32)
        m.d.comb += [status.eq(Cat(core.busy, core.done, core.error_valid)), self.status.eq(status[:3]),
                     self.irq.eq(~core.busy & (core.done | core.error_valid))]
        config_word = isa.config_word(cfg)
        regs = {
            Rg.STATUS: (status, False), Rg.ERROR: (core.error_code, False), Rg.ERROR_ADDR: (core.error_addr, False),
            Rg.PROG_ADDR: (prog_addr, True), Rg.PROG_LEN: (prog_len, True), Rg.WIN_BASE: (win_base, True),
            Rg.WIN_LIMIT: (win_limit, True), Rg.CYCLES: (core.cycles, False), Rg.MAC_BUSY: (core.mac_ops, False),
            Rg.DMA_BYTES: (core.dma_bytes, False), Rg.STALL: (core.stalls, False),
            Rg.CONFIG: (Const(config_word, 32), False), Rg.COMMANDS: (core.commands, False),
        }
        m.submodules.regs = regs_block = AxiLiteRegs(regs, Rg.CTRL)
        for name in regs_block.signature.members:
            if name.startswith("s_axil_"):
                port = getattr(self, name)
                inner = getattr(regs_block, name)
                if regs_block.signature.members[name].flow == wiring.In:
                    m.d.comb += inner.eq(port)
                else:
                    m.d.comb += port.eq(inner)
        # CTRL.start resets the core this cycle and starts it the next
        m.d.comb += start.eq(regs_block.strobe & regs_block.strobe_data[0] & ~core.busy)
        start_q = Signal()
        m.d.sync += start_q.eq(start)
        m.d.comb += [core.start.eq(start_q), core.prog_addr.eq(prog_addr), core.prog_len.eq(prog_len),
                     core.win_base.eq(win_base), core.win_limit.eq(win_limit)]
        for name, member in core.signature.members.items():
            if name.startswith("m_axi_"):
                if member.flow == wiring.In:
                    m.d.comb += getattr(core, name).eq(getattr(self, name))
                else:
                    m.d.comb += getattr(self, name).eq(getattr(core, name))
        return m
