"""The NPU's DMA units: LOAD (DRAM rows into SRAM lines) and STORE (accumulator lines to DRAM).

Both are units of the chain (:func:`fp8npu.hdl.units.unit_members`): they take commands from
their queue, wait for the tokens a command pops, run it, and push its tokens when its effects
are complete. SYNC commands for the unit only move tokens.

:class:`LoadUnit` issues AXI4 read bursts (``ar`` stream; several in flight, at most
``max_burst`` beats, never across 4 KB) and turns the beats that come back (``r`` stream) into
scratchpad or accumulator lines, zero-padding the last line of each row. One line write per
beat at most; a beat is taken when the accumulator's write port is free (``acc_busy`` low).

:class:`StoreUnit` reads one accumulator line per row, converts it (FP32 as it is, or FP8
through a register and the :class:`~.units.Requantizer`: ``STORE_CONVERT + passes - 1``
cycles) and writes
the row with one AXI4 write burst per ``max_burst`` beats and byte strobes for the bytes
inside the row, then waits for every write response before it pushes its token.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from . import isa
from .axi import axi4_master_members
from .units import (
    Requantizer,
    burst_len,
    ceil_div_pow2,
    command_layout,
    pick_slice,
    take_command,
    tokens_ready,
    unit_members,
)

__all__ = ["LoadUnit", "StoreUnit", "LoadState", "StoreState", "axi_write_members"]

CMD = isa.COMMAND_BITS

def read_request(addr_bits):
    """An AXI4 read request of the load unit: start address (``addr_bits`` wide) and AxLEN
    (beats - 1)."""
    return data.StructLayout({"addr": addr_bits, "len": 8})


class LoadState(enum.Enum, shape=2):
    """The load unit's command, from taking it to pushing its token."""
    TOKENS = 0        # waiting for the tokens it pops
    TRANSFER = 1      # bursts issued, beats written into lines
    FINISH = 2        # push tokens, free the unit


class StoreState(enum.Enum, shape=3):
    """The store unit's command: per row READ -> ARRIVE (-> CONVERT) -> (ADDRESS -> DATA) per burst."""
    TOKENS = 0        # waiting for the tokens it pops
    READ = 1          # read the row's accumulator line
    ARRIVE = 2        # the line arrives and is registered
    CONVERT = 3       # FP8 rows: the registered line passes the requantizer
    ADDRESS = 4       # AW of the next burst
    DATA = 5          # W beats of the burst (completed even after an error)
    RESPONSES = 6     # every row written: wait for the outstanding write responses
    FINISH = 7        # push tokens, free the unit


def axi_write_members(prefix, data_bits, addr_bits=32):
    """The write channels (AW, W, B) of :func:`~.axi.axi4_master_members`."""
    return {k: v for k, v in axi4_master_members(prefix, data_bits, addr_bits).items()
            if k[len(prefix) + 1] in "wb" or k.startswith(f"{prefix}_aw")}


class LoadUnit(wiring.Component):
    """LOAD: strided DRAM rows -> scratchpad or accumulator lines (docs/isa.md).

    Members (besides :func:`~.units.unit_members`)
    ------------------------------------------------
    ar : Out(stream of read_request(axi_addr_bits))   AXI4 read requests (the core adds ID, size, burst)
    r : In(stream of axi_data_bits)       the read data of this unit's requests, in order
    sp_write : write port of the scratchpad (a line per write)
    acc_write : write port of the accumulator (a line per write)
    acc_busy : In(1)                      another unit writes the accumulator this cycle

    Throughput: one bus beat per cycle while the bus delivers, in the row's lines.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        super().__init__({
            **unit_members(cfg.axi_addr_bits),
            "ar": Out(stream.Signature(read_request(cfg.axi_addr_bits))),
            "r": In(stream.Signature(cfg.axi_data_bits)),
            "sp_write": In(WritePort.Signature(addr_width=cfg.sp_addr_bits, shape=8 * cfg.line_bytes)),
            "acc_write": In(WritePort.Signature(addr_width=cfg.acc_addr_bits, shape=8 * cfg.acc_line_bytes)),
            "acc_busy": In(1),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        B = cfg.bus_bytes
        m = Module()
        cur_bits, busy = take_command(m, self, "ld")
        cur = data.View(command_layout(isa.Opcode.LOAD), cur_bits)
        active = self.active
        state = Signal(LoadState, name="ld_state")
        beats_row = Signal(17, name="ld_beats_row")        # registered when the command starts
        is_load = cur.opcode == isa.Opcode.LOAD
        ready_tok = tokens_ready(cur, self.tokens)
        start = busy & (state == LoadState.TOKENS) & ready_tok & active
        with m.If(busy & (state == LoadState.TOKENS)):
            with m.If(ready_tok & active):
                m.d.comb += self.tokens.pop_next.eq(cur.pop_next)
                m.d.sync += beats_row.eq(ceil_div_pow2(cur.row_bytes, B))
                with m.If(is_load & (cur.rows != 0) & (cur.row_bytes != 0)):
                    m.d.sync += state.eq(LoadState.TRANSFER)
                with m.Else():
                    m.d.sync += state.eq(LoadState.FINISH)
            with m.Else():
                m.d.comb += self.waiting.eq(1)

        # issue side: walk rows and bursts. ``left`` (beats still to request in this row) is a
        # register, and whether this burst ends the row is decided beside its length, not from
        # it: the burst arithmetic stays one comparison deep.
        i_row = Signal(16, name="ld_i_row")
        left = Signal(17, name="ld_left")
        i_addr = Signal(cfg.axi_addr_bits, name="ld_i_addr")
        row_base = Signal(cfg.axi_addr_bits, name="ld_row_base")
        issued_all = Signal(name="ld_issued_all")
        outstanding = Signal(10, name="ld_outstanding")
        blen = Signal(9, name="ld_blen")
        to_4k = Signal(13, name="ld_to_4k")
        row_end = Signal(name="ld_row_end")
        m.d.comb += [
            to_4k.eq((4096 - (i_addr & 4095)) >> (B.bit_length() - 1)),
            blen.eq(burst_len(left, i_addr, B, cfg.max_burst)),
            row_end.eq((left <= cfg.max_burst) & (left <= to_4k)),
        ]
        xfer = busy & (state == LoadState.TRANSFER)
        first = Signal(name="ld_first")
        with m.If(start):
            m.d.sync += [i_row.eq(0), left.eq(ceil_div_pow2(cur.row_bytes, B)), i_addr.eq(cur.dram_addr),
                         row_base.eq(cur.dram_addr), issued_all.eq(0), first.eq(1)]
        # room for a longest burst (not this one's length: that keeps the burst arithmetic off
        # the AR handshake)
        ar = self.ar
        m.d.comb += [ar.valid.eq(xfer & ~issued_all & (outstanding <= 3 * cfg.max_burst) & active),
                     ar.payload.addr.eq(i_addr), ar.payload.len.eq(blen - 1)]
        got_beat = Signal(name="ld_got_beat")
        m.d.sync += outstanding.eq(outstanding + Mux(ar.valid & ar.ready, blen, 0) - got_beat)
        with m.If(ar.valid & ar.ready):
            with m.If(row_end):
                m.d.sync += [left.eq(beats_row), i_row.eq(i_row + 1), i_addr.eq(row_base + cur.dram_stride),
                             row_base.eq(row_base + cur.dram_stride)]
                with m.If(i_row + 1 == cur.rows):
                    m.d.sync += issued_all.eq(1)
            with m.Else():
                m.d.sync += [left.eq(left - blen), i_addr.eq(i_addr + (blen << (B.bit_length() - 1)))]

        # receive side: chunks of U = min(line, bus) bytes, into scratchpad or accumulator lines;
        # the row being received, the bytes of it not yet received (a register: the row's end is
        # one comparison of it) and the line address are counted once for both
        recv_done = Signal(name="ld_recv_done")
        count = {"c_row": Signal(16, name="ld_c_row"), "rem": Signal(16, name="ld_rem"),
                 "line_addr": Signal(16, name="ld_line_addr")}
        with m.If(first):
            m.d.sync += [count["c_row"].eq(0), count["rem"].eq(cur.row_bytes), count["line_addr"].eq(cur.sram_addr)]
        self._line_assembler(m, "sp", cfg.line_bytes, self.sp_write, cur.dst == 0, cur, xfer, got_beat,
                             recv_done, first, Const(0, 1), count)
        self._line_assembler(m, "acc", cfg.acc_line_bytes, self.acc_write, cur.dst == 1, cur, xfer, got_beat,
                             recv_done, first, self.acc_busy, count)
        with m.If(first):
            m.d.sync += first.eq(0)
        with m.If(xfer & recv_done & ~first):
            m.d.sync += state.eq(LoadState.FINISH)
        with m.If(busy & (state == LoadState.FINISH)):
            m.d.comb += self.tokens.push_next.eq(cur.push_next)
            m.d.sync += [busy.eq(0), state.eq(LoadState.TOKENS)]
        with m.If(self.stopped):
            m.d.sync += [busy.eq(0), state.eq(LoadState.TOKENS)]
        m.d.comb += self.idle.eq(~busy)
        return m

    def _line_assembler(self, m, name, L, wport, selected, cur, xfer, got_beat, recv_done, first, port_taken,
                        count):
        """Turn incoming R beats into SRAM lines of ``L`` bytes for the LOAD in ``cur`` (when
        ``selected``), with the row, remainder and line counters of ``count``."""
        B = self.cfg.bus_bytes
        U = min(L, B)
        c_row, rem, line_addr = count["c_row"], count["rem"], count["line_addr"]
        c_beat = Signal(range(B // U + 1), name=f"{name}_c_beat")   # chunk within beat
        c_line = Signal(range(L // U + 1), name=f"{name}_c_line")   # chunk within line
        line = Signal(8 * L, name=f"{name}_line")
        with m.If(first & selected):
            m.d.sync += [c_beat.eq(0), c_line.eq(0), line.eq(0)]
        active_here = xfer & selected & ~first & (c_row < cur.rows)
        # the chunk of the current beat, masked to the bytes inside the row
        rdata = self.r.payload
        chunk = Signal(8 * U, name=f"{name}_chunk")
        m.d.comb += chunk.eq(Array([rdata[8 * U * i:8 * U * (i + 1)] for i in range(B // U)])[c_beat])
        masked = Signal(8 * U, name=f"{name}_masked")
        for byte in range(U):
            m.d.comb += masked[8 * byte:8 * byte + 8].eq(Mux(rem > byte, chunk[8 * byte:8 * byte + 8], 0))
        last_of_row = rem <= U
        last_of_line = c_line == (L // U) - 1
        last_of_beat = c_beat == (B // U) - 1
        new_line = Signal(8 * L, name=f"{name}_new_line")
        m.d.comb += new_line.eq(line)
        for pos in range(L // U):
            with m.If(c_line == pos):
                m.d.comb += new_line[8 * U * pos:8 * U * (pos + 1)].eq(masked)
        with m.If(active_here & self.r.valid & ~port_taken):
            consume = last_of_beat | last_of_row
            m.d.comb += [self.r.ready.eq(consume), got_beat.eq(consume)]
            m.d.sync += c_beat.eq(Mux(consume, 0, c_beat + 1))
            with m.If(last_of_line | last_of_row):
                m.d.comb += [wport.en.eq(1), wport.addr.eq(line_addr), wport.data.eq(new_line)]
                m.d.sync += [line.eq(0), c_line.eq(0), line_addr.eq(line_addr + 1)]
            with m.Else():
                m.d.sync += [line.eq(new_line), c_line.eq(c_line + 1)]
            with m.If(last_of_row):
                m.d.sync += [rem.eq(cur.row_bytes), c_row.eq(c_row + 1)]
            with m.Else():
                m.d.sync += rem.eq(rem - U)
        with m.If(xfer & selected & ~first & (c_row == cur.rows)):
            m.d.comb += recv_done.eq(1)


class StoreUnit(wiring.Component):
    """STORE: accumulator lines -> DRAM rows, FP32 or scaled and requantized to FP8 (docs/isa.md).

    Members (besides :func:`~.units.unit_members`)
    ------------------------------------------------
    acc_read : read port of the accumulator (synchronous, a line per read)
    m_axi_aw*, m_axi_w*, m_axi_b* : the AXI4 write channels (ID 2)
    writes_pending : Out(1)     write bursts without a response, or a burst's beats being sent

    Per row: 1 cycle to read the line, 1 for it to arrive (FP8: ``STORE_CONVERT + passes - 1``
    more), then per burst one AW cycle and one W beat per cycle.
    """

    #: Cycles a STORE to FP8 spends converting each row: the line's register and the
    #: :class:`~.units.Requantizer`.
    STORE_CONVERT = Requantizer.LATENCY + 1

    def __init__(self, cfg):
        self.cfg = cfg
        super().__init__({
            **unit_members(cfg.axi_addr_bits),
            "acc_read": In(ReadPort.Signature(addr_width=cfg.acc_addr_bits, shape=8 * cfg.acc_line_bytes)),
            **axi_write_members("m_axi", cfg.axi_data_bits, cfg.axi_addr_bits),
            "writes_pending": Out(1),
        })

    def ax(self, name):
        return getattr(self, f"m_axi_{name}")

    def elaborate(self, platform):
        cfg = self.cfg
        B = cfg.bus_bytes
        C = cfg.cols
        ax = self.ax
        m = Module()
        cur_bits, busy = take_command(m, self, "st")
        cur = data.View(command_layout(isa.Opcode.STORE), cur_bits)
        active = self.active
        S_ = StoreState
        state = Signal(StoreState, name="st_state")     # TOKENS when idle: set back at finish and on stop
        is_store = cur.opcode == isa.Opcode.STORE
        ready_tok = tokens_ready(cur, self.tokens)
        row = Signal(16, name="s_row")
        row_addr = Signal(cfg.axi_addr_bits, name="s_row_addr")
        row_bytes = Signal(8, name="s_row_bytes")
        m.d.comb += row_bytes.eq(Mux(cur.fmt == 0, cur.cols << 2, cur.cols) if cfg.fp8_store else cur.cols << 2)
        beats_row = Signal(8, name="s_beats_row")        # registered when the command starts
        left = Signal(8, name="s_left")                  # beats of the row not yet in a burst
        nbeats_max = max(1, -(-4 * C // B))
        buf = Signal(8 * nbeats_max * B, name="s_buf")
        beat = Signal(8, name="s_beat")
        blen = Signal(9, name="s_blen")
        burst_left = Signal(9, name="s_burst_left")
        w_addr = Signal(cfg.axi_addr_bits, name="s_w_addr")
        with m.If(busy & (state == S_.TOKENS)):
            with m.If(ready_tok & active):
                m.d.comb += self.tokens.pop_prev.eq(cur.pop_prev)
                m.d.sync += [row.eq(0), row_addr.eq(cur.dram_addr), beats_row.eq(ceil_div_pow2(row_bytes, B))]
                with m.If(is_store & (cur.rows != 0)):
                    m.d.sync += state.eq(S_.READ)
                with m.Else():
                    m.d.sync += state.eq(S_.FINISH)
            with m.Else():
                m.d.comb += self.waiting.eq(1)
        with m.If(busy & (state == S_.READ) & active):
            m.d.comb += self.acc_read.addr.eq(cur.acc_addr + row)
            m.d.sync += state.eq(S_.ARRIVE)
        # the line that arrives is registered in ``buf``: FP32 rows are written from there as they
        # are; FP8 rows pass the requantizer from there (the block RAM's output never meets the
        # conversion logic in one cycle) in S passes of Q columns, and the codes replace the line
        line = self.acc_read.data
        if cfg.fp8_store:
            Q, S = cfg.store_lanes_built, cfg.store_passes
            m.submodules.requantizer = rq = Requantizer(Q)
            conv_wait = Signal(range(Requantizer.LATENCY + S), name="s_conv_wait")
            m.d.comb += rq.x.eq(pick_slice(m, buf[:32 * C], 32 * Q, S, conv_wait, "s_pass"))
            # the command's conversion settings, registered (steady from the second cycle of a
            # command, long before its first line reaches the requantizer)
            rq_scale, rq_e5m2, rq_sat = Signal(32, name="s_rq_scale"), Signal(name="s_rq_e5m2"), Signal(name="s_rq_sat")
            m.d.sync += [rq_scale.eq(cur.scale), rq_e5m2.eq(cur.fmt == 2), rq_sat.eq(cur.saturate)]
            m.d.comb += [rq.scale.eq(rq_scale), rq.e5m2.eq(rq_e5m2), rq.saturate.eq(rq_sat)]
            codes = rq.y
            if S > 1:                           # earlier passes' codes, the oldest at the bottom
                done_codes = Signal(8 * Q * (S - 1), name="s_codes")
                m.d.sync += done_codes.eq(Cat(done_codes[8 * Q:], rq.y))
                codes = Cat(done_codes, rq.y)
        with m.If(busy & (state == S_.ARRIVE)):
            m.d.sync += [buf.eq(line[0:32 * C]), beat.eq(0), left.eq(beats_row), w_addr.eq(row_addr)]
            if cfg.fp8_store:
                m.d.sync += conv_wait.eq(0)
                with m.If(cur.fmt == 0):
                    m.d.sync += state.eq(S_.ADDRESS)
                with m.Else():
                    m.d.sync += state.eq(S_.CONVERT)
            else:                               # the checker refuses FP8 stores
                m.d.sync += state.eq(S_.ADDRESS)
        if cfg.fp8_store:
            with m.If(busy & (state == S_.CONVERT)):
                with m.If(conv_wait == Requantizer.LATENCY + S - 1):
                    m.d.sync += [buf.eq(codes[:8 * C]), state.eq(S_.ADDRESS)]
                with m.Else():
                    m.d.sync += conv_wait.eq(conv_wait + 1)
        # AW: one burst at a time (rows are bus aligned; split at max_burst and 4 KB)
        m.d.comb += blen.eq(burst_len(left, w_addr, B, cfg.max_burst))
        aw_go = busy & (state == S_.ADDRESS) & active
        m.d.comb += [ax("awvalid").eq(aw_go), ax("awaddr").eq(w_addr), ax("awlen").eq(blen - 1),
                     ax("awsize").eq(B.bit_length() - 1), ax("awburst").eq(1), ax("awid").eq(2)]
        aw_fire = ax("awvalid") & ax("awready")
        b_fire = ax("bvalid") & ax("bready")
        m.d.comb += ax("bready").eq(1)
        wr_out = Signal(16, name="s_wr_out")          # write bursts without a response yet
        m.d.sync += wr_out.eq(wr_out + aw_fire - b_fire)
        with m.If(aw_fire):
            m.d.sync += [state.eq(S_.DATA), burst_left.eq(blen), left.eq(left - blen),
                         w_addr.eq(w_addr + (blen << (B.bit_length() - 1)))]
        # W beats (completed even after an error: the burst was promised)
        in_w = busy & (state == S_.DATA)
        m.d.comb += self.writes_pending.eq((wr_out != 0) | in_w)
        beat_data = Array([buf[8 * B * i:8 * B * (i + 1)] for i in range(nbeats_max)])[beat]
        strb = Signal(B, name="s_strb")
        for byte in range(B):
            m.d.comb += strb[byte].eq((beat * B + byte) < row_bytes)
        m.d.comb += [ax("wvalid").eq(in_w), ax("wdata").eq(beat_data), ax("wstrb").eq(strb),
                     ax("wlast").eq(burst_left == 1)]
        w_fire = ax("wvalid") & ax("wready")
        with m.If(w_fire):
            m.d.sync += [beat.eq(beat + 1), burst_left.eq(burst_left - 1)]
            with m.If(burst_left == 1):
                with m.If(beat + 1 == beats_row):
                    m.d.sync += row.eq(row + 1)
                    with m.If(row + 1 == cur.rows):
                        m.d.sync += state.eq(S_.RESPONSES)
                    with m.Else():
                        m.d.sync += [state.eq(S_.READ), row_addr.eq(row_addr + cur.dram_stride)]
                with m.Else():
                    m.d.sync += state.eq(S_.ADDRESS)
        with m.If(busy & (state == S_.RESPONSES) & (wr_out == 0)):
            m.d.sync += state.eq(S_.FINISH)
        with m.If(busy & (state == S_.FINISH) & active):
            m.d.comb += self.tokens.push_prev.eq(cur.push_prev)
            m.d.sync += [busy.eq(0), state.eq(S_.TOKENS)]
        with m.If(self.stopped & ~in_w):
            m.d.sync += [busy.eq(0), state.eq(S_.TOKENS)]
        m.d.comb += self.idle.eq(~busy)
        return m
