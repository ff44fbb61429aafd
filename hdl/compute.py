"""The NPU's compute unit: MATMUL through the MAC array, EPILOGUE and BLOCKSCALE in the vector unit.

Two stages, so weights for the next MATMUL load while the current one streams:

* **Weight loader** takes the unit's commands, waits for the tokens a command pops, and for a
  MATMUL reads its ``k`` weight lines (one per cycle, port ``sp_b``) into the array's shadow
  weights; then hands the command to the row streamer.
* **Row streamer** swaps the weights in with a MATMUL's first row and feeds one A row per cycle
  (port ``sp_a``; sequential mode also reads the accumulator line the row adds to). A row that
  reads an accumulator line still being written waits. EPILOGUE and BLOCKSCALE wait for the
  array to drain and run in the :class:`~.units.VectorUnit`. A command's token pushes leave
  once its last row is written.

In block accumulation the array is a :class:`~.array.BlockArray` with the exact partial sums
in a memory beside the accumulator (inside this unit); otherwise a :class:`~.array.MACArray`.

Latency of one MATMUL row: 1 (SRAM read) + the array's latency; throughput one row per cycle,
back-to-back MATMULs without a bubble.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, wiring
from amaranth.lib.memory import Memory, ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from . import isa
from .array import BlockArray, MACArray
from .units import VectorUnit, command_layout, tokens_ready, unit_members

__all__ = ["ComputeUnit", "WeightState"]

CMD = isa.COMMAND_BITS


class WeightState(enum.Enum, shape=2):
    """The weight loader's command."""
    TOKENS = 0        # waiting for the tokens it pops
    WEIGHTS = 1       # MATMUL: weight lines into the shadow weights
    HAND_OVER = 2     # waiting for the row streamer to take the command


class ComputeUnit(wiring.Component):
    """MATMUL, EPILOGUE and BLOCKSCALE (docs/isa.md); see the module docstring.

    Members (besides :func:`~.units.unit_members`)
    ------------------------------------------------
    sp_a, sp_b : read ports of the scratchpad (A rows; weight lines)
    acc_read : read port of the accumulator
    acc_write : write port of the accumulator (per-value enables when the vector unit writes a
        row in several passes)
    writing : Out(1)            this unit writes the accumulator this cycle
    mac_ops, stalls : Out(32)   performance counters (MACs issued; cycles the row streamer
        could not issue a row while it held no vector command)
    """

    def __init__(self, cfg):
        self.cfg = cfg
        sp = ReadPort.Signature(addr_width=cfg.sp_addr_bits, shape=8 * cfg.line_bytes)
        super().__init__({
            **unit_members(cfg.axi_addr_bits),
            "sp_a": In(sp), "sp_b": In(sp),
            "acc_read": In(ReadPort.Signature(addr_width=cfg.acc_addr_bits, shape=8 * cfg.acc_line_bytes)),
            "acc_write": In(WritePort.Signature(addr_width=cfg.acc_addr_bits, shape=8 * cfg.acc_line_bytes,
                                                granularity=32 if cfg.vector_passes > 1 else None)),
            "writing": Out(1), "mac_ops": Out(32), "stalls": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        sp_ra, sp_rb, acc_r, acc_w, active = self.sp_a, self.sp_b, self.acc_read, self.acc_write, self.active
        cfg = self.cfg
        R, C = cfg.rows, cfg.cols
        Op = isa.Opcode
        block = cfg.accumulation == "block"
        aw = cfg.acc_addr_bits          # accumulator line addresses (the checker keeps rows in range)
        if block:
            # exact partial sums beside the accumulator lines; the array reads and writes them
            m.submodules.array = arr = BlockArray(R, C, cfg.acc_block, cfg.round_stages, cfg.add_stages,
                                                 product=cfg.column_products, formats=cfg.formats, addr_bits=aw,
                                                 rounders=cfg.rounders, pe_stages=cfg.pe_stages)
            m.submodules.part = part = Memory(shape=len(arr.out_part), depth=cfg.acc_lines, init=[])
            part_w, part_r = part.write_port(), part.read_port()
            m.d.comb += [part_r.addr.eq(arr.part_rd_addr), arr.part_data.eq(part_r.data), arr.acc_data.eq(acc_r.data),
                         part_w.en.eq(arr.part_we), part_w.addr.eq(arr.part_wr_addr), part_w.data.eq(arr.out_part)]
            with m.If(arr.acc_rd_en):
                m.d.comb += acc_r.addr.eq(arr.acc_rd_addr)
        else:
            m.submodules.array = arr = MACArray(R, C, aw)

        # ---- stage 1: weight loader (takes commands from the queue, pops tokens) ----
        wl_cmd = Signal(CMD, name="wl_cmd")
        wl_busy = Signal(name="wl_busy")
        wl_state = Signal(WeightState, name="wl_state")
        wl_wait = Signal(name="wl_wait")
        shadow_full = Signal(name="shadow_full")
        st_next = Signal(CMD, name="st_next")
        st_next_valid = Signal(name="st_next_valid")
        m.d.comb += self.commands.ready.eq(~wl_busy & active)
        with m.If(~wl_busy & self.commands.valid & active):
            m.d.sync += [wl_cmd.eq(self.commands.payload.cmd), self.cmd_addr.eq(self.commands.payload.addr),
                         wl_busy.eq(1), wl_state.eq(WeightState.TOKENS)]
        wl = data.View(command_layout(Op.MATMUL), wl_cmd)
        wl_is_mm = wl.opcode == Op.MATMUL
        ready_tok = tokens_ready(wl, self.tokens)
        wl_row = Signal(range(R + 2), name="wl_row")
        with m.If(wl_busy & (wl_state == WeightState.TOKENS)):
            with m.If(ready_tok & active):
                m.d.comb += [self.tokens.pop_prev.eq(wl.pop_prev), self.tokens.pop_next.eq(wl.pop_next)]
                m.d.sync += wl_row.eq(0)
                with m.If(wl_is_mm):
                    m.d.sync += wl_state.eq(WeightState.WEIGHTS)
                with m.Else():
                    m.d.sync += wl_state.eq(WeightState.HAND_OVER)
            with m.Else():
                m.d.comb += wl_wait.eq(1)
        # read one weight line per cycle; write the shadow row a cycle later
        w_pending = Signal(name="w_pending")
        w_row_q = Signal(range(R + 1), name="w_row_q")
        m.d.sync += w_pending.eq(0)
        # the port reads the next weight line in every cycle (the address never waits for the
        # control logic); a read counts when w_pending follows it
        m.d.comb += sp_rb.addr.eq(wl.b_addr + wl_row)
        with m.If(wl_busy & (wl_state == WeightState.WEIGHTS) & ~shadow_full & active):
            with m.If(wl_row < wl.k):
                m.d.sync += [w_pending.eq(1), w_row_q.eq(wl_row), wl_row.eq(wl_row + 1)]
            with m.Else():
                m.d.sync += [wl_state.eq(WeightState.HAND_OVER), shadow_full.eq(1)]
        # the line read is registered before the array decodes it (the scratchpad's block RAM
        # outputs, cascaded over its depth, never meet the decoder in one cycle); the write to
        # the shadow weights is one cycle later, long before the next MATMUL swaps them in
        w_we, w_row, w_data = Signal(name="w_we"), Signal(range(R + 1), name="w_row"), Signal(8 * C, name="w_data")
        m.d.sync += [w_we.eq(w_pending), w_row.eq(w_row_q), w_data.eq(sp_rb.data[0:8 * C])]
        m.d.comb += [arr.w_we.eq(w_we), arr.w_row.eq(w_row), arr.w_data.eq(w_data)]
        if block:                                   # the weights' format (B), decoded as they are written
            w_fmt_q, w_fmt = Signal(name="w_fmt_q"), Signal(name="w_fmt")
            m.d.sync += [w_fmt_q.eq(wl.fmt_b), w_fmt.eq(w_fmt_q)]
            m.d.comb += arr.w_fmt.eq(w_fmt)
        with m.If(wl_busy & (wl_state == WeightState.HAND_OVER) & ~st_next_valid):
            m.d.sync += [st_next.eq(wl_cmd), st_next_valid.eq(1), wl_busy.eq(0), wl_state.eq(WeightState.TOKENS)]

        # ---- stage 2: row streamer / epilogue ----
        st_cmd = Signal(CMD, name="st_cmd")
        st_busy = Signal(name="st_busy")
        st_i = Signal(16, name="st_i")
        mm = data.View(command_layout(Op.MATMUL), st_cmd)
        st_is_mm = mm.opcode == Op.MATMUL
        a_line = Signal(16, name="st_a_line")
        # in-flight accumulator writes: issue stage + the array + the write cycle
        depth = arr.latency + 2
        fl_valid = [Signal(name=f"fl_v{i}") for i in range(depth)]
        fl_addr = [Signal(aw, name=f"fl_a{i}") for i in range(depth)]
        issue = Signal(name="st_issue")
        issue_addr = Signal(aw, name="st_issue_addr")      # acc_addr + st_i, kept in a register
        m.d.sync += [fl_valid[0].eq(issue), fl_addr[0].eq(issue_addr)]
        for i in range(1, depth):
            m.d.sync += [fl_valid[i].eq(fl_valid[i - 1]), fl_addr[i].eq(fl_addr[i - 1])]
        # A row that reads a line waits while a row that writes it is in flight: until the write
        # (sequential: the line is read at issue), or (block) until the accumulator write at the
        # array's output is visible where the array reads lines, from its partial read stage
        # R + 1 on (the partial line itself is written back earlier). That is, the row at
        # issue_addr waits while fl_valid[i] & fl_addr[i] == issue_addr for some i < window.
        # The test is made a cycle ahead and registered (``hazard``): for each address the next
        # cycle's issue_addr can have (the same, the next, the next command's first), against
        # the in-flight rows as they will have moved; the issue decision then only selects.
        window = depth - 1 if not block else arr.latency - (R + 1)
        hazard = Signal(name="st_hazard")
        nxt_acc = data.View(command_layout(Op.MATMUL), st_next).acc_addr[:aw]

        def in_flight_next(addr):
            """A row in flight in the next cycle, in the window, writes ``addr`` (rows older than
            the one issued in this cycle; that one is tested by the caller)."""
            hit = Const(0)
            for i in range(window - 1):
                hit = hit | (fl_valid[i] & (fl_addr[i] == addr))
            return hit

        h_same, h_next, h_new, new_eq = (Signal(name=f"st_hazard_{n}") for n in ("same", "next", "new", "new_eq"))
        m.d.comb += [h_same.eq(in_flight_next(issue_addr)), h_next.eq(in_flight_next((issue_addr + 1)[:aw])),
                     h_new.eq(in_flight_next(nxt_acc)), new_eq.eq((issue_addr == nxt_acc) if window > 0 else 0)]
        array_empty = Signal(name="array_empty")
        m.d.comb += array_empty.eq(~Cat(*fl_valid).any())

        # delayed token pushes (leave when the command's last row has been written)
        push_delay = [Signal(2, name=f"push_d{i}") for i in range(depth)]
        push_now = Signal(2, name="push_now")
        m.d.sync += push_delay[0].eq(push_now)
        for i in range(1, depth):
            m.d.sync += push_delay[i].eq(push_delay[i - 1])
        m.d.comb += [self.tokens.push_prev.eq(push_delay[-1][0]), self.tokens.push_next.eq(push_delay[-1][1])]
        pushes_pending = Cat(*push_delay).any()

        # MATMUL rows: read A line and accumulator line now, enter the array next cycle
        # (the addresses come from registers: the A line and, sequential, the accumulator line
        # of the next row are read in every cycle, and used when the row issues)
        row_go = st_busy & st_is_mm & (st_i < mm.m) & active
        reads = mm.accumulate | (mm.commit & ~mm.fresh) if block else mm.accumulate
        row_ok = row_go & ~(hazard & reads)
        if block and arr.passes > 1:
            # a committing row takes the rounders for arr.passes cycles: the next waits that long
            gap = Signal(range(arr.passes), name="st_commit_gap")
            row_ok = row_go & ~(hazard & reads) & ~(mm.commit & (gap != 0))
            with m.If(row_ok & mm.commit):
                m.d.sync += gap.eq(arr.passes - 1)
            with m.Elif(gap != 0):
                m.d.sync += gap.eq(gap - 1)
        m.d.comb += sp_ra.addr.eq(a_line)
        if not block:
            m.d.comb += acc_r.addr.eq(issue_addr)
        with m.If(row_ok):
            m.d.comb += issue.eq(1)
            m.d.sync += [st_i.eq(st_i + 1), a_line.eq(a_line + mm.a_stride), issue_addr.eq(issue_addr + 1)]
            with m.If(st_i == 0):
                m.d.sync += shadow_full.eq(0)
        if cfg.perf_counters:
            with m.If(active & ~row_ok & ~(st_busy & ~st_is_mm)):
                m.d.sync += self.stalls.eq(self.stalls + 1)
        in_valid = Signal(name="arr_in_valid")
        in_first = Signal(name="arr_in_first")
        in_accum = Signal(name="arr_in_accum")
        in_k = Signal(range(R + 1), name="arr_in_k")
        in_fa, in_fb = Signal(name="arr_in_fa"), Signal(name="arr_in_fb")
        in_addr = Signal(aw, name="arr_in_addr")
        m.d.sync += [in_valid.eq(row_ok), in_first.eq(st_i == 0), in_accum.eq(mm.accumulate), in_k.eq(mm.k),
                     in_fa.eq(mm.fmt_a), in_fb.eq(mm.fmt_b), in_addr.eq(issue_addr)]
        m.d.comb += [arr.in_valid.eq(in_valid), arr.in_swap.eq(in_first), arr.in_k.eq(in_k),
                     arr.in_addr.eq(in_addr), arr.in_a.eq(sp_ra.data[0:8 * R])]
        if block:
            in_commit, in_fresh = Signal(name="arr_in_commit"), Signal(name="arr_in_fresh")
            m.d.sync += [in_commit.eq(mm.commit), in_fresh.eq(mm.fresh)]
            m.d.comb += [arr.in_accum.eq(in_accum), arr.in_commit.eq(in_commit), arr.in_fresh.eq(in_fresh),
                         arr.in_fmt.eq(in_fa)]
        else:
            m.d.comb += [arr.in_fmt_a.eq(in_fa), arr.in_fmt_b.eq(in_fb),
                         arr.in_acc.eq(Mux(in_accum, acc_r.data[0:32 * C], 0))]
        if cfg.perf_counters:
            with m.If(in_valid):
                m.d.sync += self.mac_ops.eq(self.mac_ops + in_k * C)
        # A MATMUL finishes in the cycle its last row issues (or at once when m = 0: the loaded
        # weights are then discarded); the next command is taken in that same cycle, so
        # back-to-back MATMULs stream without a bubble.
        last_row = row_ok & (st_i + 1 == mm.m)
        mm_finish = (st_busy & st_is_mm & (st_i == mm.m)) | last_row
        with m.If(mm_finish):
            with m.If(mm.m == 0):
                m.d.sync += shadow_full.eq(0)
            m.d.comb += push_now.eq(Cat(mm.push_prev, mm.push_next))
            m.d.sync += st_busy.eq(0)
        # take the next command (after the statements above, so it wins)
        take = Signal(name="st_take")
        m.d.comb += take.eq((~st_busy | mm_finish) & st_next_valid & active)
        # the row issued now is in flight next cycle too: it writes issue_addr, which the next
        # row (issue_addr + 1) never is, and the next command's first row may be
        m.d.sync += hazard.eq(Mux(take, h_new | (issue & new_eq), Mux(issue, h_next, h_same)))
        with m.If(take):
            nxt = data.View(command_layout(Op.MATMUL), st_next)
            m.d.sync += [st_cmd.eq(st_next), st_busy.eq(1), st_next_valid.eq(0), st_i.eq(0),
                         a_line.eq(nxt.a_addr), issue_addr.eq(nxt.acc_addr)]

        # ---- EPILOGUE and BLOCKSCALE in the vector unit (if built); compute-side SYNC ----
        other = st_busy & ~st_is_mm
        vu_started = Signal(name="vu_started")
        if cfg.vector_unit:
            m.submodules.vector = vu = VectorUnit(C, cfg.vector_lanes_built)
            is_vector = (mm.opcode == Op.EPILOGUE) | (mm.opcode == Op.BLOCKSCALE)
            m.d.comb += [vu.cmd.eq(st_cmd), vu.en.eq(active), vu.rd_data.eq(acc_r.data[0:32 * C])]
            with m.If(vu.busy):                                 # the array is empty while it runs
                m.d.comb += acc_r.addr.eq(vu.rd_addr)

        def finish_sync():
            m.d.comb += push_now.eq(Cat(mm.push_prev, mm.push_next))
            m.d.sync += st_busy.eq(0)

        with m.If(other & active & array_empty & ~vu_started):
            if cfg.vector_unit:
                with m.If(is_vector):
                    m.d.comb += vu.start.eq(1)
                    m.d.sync += vu_started.eq(1)
                with m.Else():                              # SYNC
                    finish_sync()
            else:                       # SYNC: the checker refuses EPILOGUE and BLOCKSCALE
                finish_sync()
        if cfg.vector_unit:
            with m.If(vu.done):
                m.d.comb += push_now.eq(Cat(mm.push_prev, mm.push_next))
                m.d.sync += [st_busy.eq(0), vu_started.eq(0)]

        # accumulator write port: array results, vector unit rows, else the load unit
        arr_wr = arr.out_commit if block else arr.out_valid
        with m.If(arr_wr):
            m.d.comb += [acc_w.en.eq(-1), acc_w.addr.eq(arr.out_addr), acc_w.data.eq(arr.out_acc)]
        compute_writing = arr_wr
        if cfg.vector_unit:
            with m.Elif(vu.wr_en):
                m.d.comb += [acc_w.addr.eq(vu.wr_addr), acc_w.data.eq(vu.wr_data),
                             acc_w.en.eq(vu.wr_lanes if cfg.vector_passes > 1 else 1)]
            compute_writing = arr_wr | vu.wr_en

        m.d.comb += [
            self.idle.eq(~wl_busy & ~st_next_valid & ~st_busy & array_empty & ~pushes_pending),
            self.waiting.eq(wl_busy & wl_wait & ~st_next_valid & ~st_busy & array_empty & ~pushes_pending),
            self.writing.eq(compute_writing),
        ]
        return m

