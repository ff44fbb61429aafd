"""NPU units as Components of their own, the interfaces they share, and the command payloads
they take.

:func:`command_layout` gives an opcode's command as a ``data.FlexibleLayout`` built from the
ISA tables (:data:`fp8npu.hdl.isa.FIELDS`): a unit reads ``cmd.rows``, ``cmd.src``, ... from a
``data.View`` of the 256-bit command, never a hand-written bit slice.

Every unit of the chain (:data:`fp8npu.hdl.isa.UNIT_CHAIN`: :class:`~.dma.LoadUnit`,
:class:`~.compute.ComputeUnit`, :class:`~.dma.StoreUnit`) has the members of
:func:`unit_members`: a command stream from its queue (:func:`queue_entry` payloads), a token
port (:data:`TOKEN_PORT`) that the core wires to the counters of
:data:`fp8npu.hdl.isa.TOKEN_OF_FLAG`, and the run control and status the core's dispatcher
and deadlock detector need. A fourth unit joins by having these members and taking its place
in the ISA's unit chain.

:class:`VectorUnit` runs EPILOGUE and BLOCKSCALE on accumulator lines; :class:`Requantizer`
turns accumulator lines into scaled FP8 rows for STORE.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from . import isa
from .fpadd import STAGE_REGS as ADD_REGS
from .fpadd import fp32_add
from .fpconv import FP32ToFP8
from .fpmul32 import STAGE_REGS as MUL_REGS
from .fpmul32 import fp32_mul

__all__ = ["command_layout", "pack_fields", "unpack_fields", "queue_entry", "TOKEN_PORT", "unit_members", "take_command", "tokens_ready",
           "burst_len", "ceil_div_pow2", "pick_slice", "VectorUnit", "Requantizer"]


def command_layout(opcode):
    """The command of ``opcode`` as a layout over its :data:`~fp8npu.hdl.isa.COMMAND_BITS` bits:
    the common fields and the opcode's own, at their ISA positions."""
    fields = isa.COMMON_FIELDS + isa.FIELDS[isa.Opcode(opcode)]
    return data.FlexibleLayout(isa.COMMAND_BITS, {f.name: data.Field(unsigned(f.width), f.lsb) for f in fields})


def pack_fields(cmd, ranges):
    """The bits of ``cmd`` (a command's :data:`~fp8npu.hdl.isa.COMMAND_BITS` bits) in ``ranges``
    (:func:`fp8npu.hdl.isa.field_ranges`), side by side: what a queue stores."""
    return Cat(*(cmd[lsb:lsb + width] for lsb, width in ranges))


def unpack_fields(packed, ranges):
    """The command :func:`pack_fields` packed, back at its ISA bit positions (0 elsewhere)."""
    parts, at, pos = [], 0, 0
    for lsb, width in ranges:
        if lsb > at:
            parts.append(Const(0, lsb - at))
        parts.append(packed[pos:pos + width])
        at, pos = lsb + width, pos + width
    if at < isa.COMMAND_BITS:
        parts.append(Const(0, isa.COMMAND_BITS - at))
    return Cat(*parts)


def queue_entry(addr_bits):
    """An entry of a unit's command queue: the command and the address it was fetched from (the
    address an error of the command is reported at), ``addr_bits`` wide
    (``NPUConfig.axi_addr_bits``)."""
    return data.StructLayout({"cmd": unsigned(isa.COMMAND_BITS), "addr": unsigned(addr_bits)})


#: A unit's side of the token counters. ``have_prev``/``have_next``: the counter its
#: ``pop_prev``/``pop_next`` flag takes from is not zero. ``pop_*`` take one token (one cycle),
#: ``push_*`` give one; the core maps them to counters with :data:`fp8npu.hdl.isa.TOKEN_OF_FLAG`.
TOKEN_PORT = wiring.Signature({
    "have_prev": In(1), "have_next": In(1),
    "pop_prev": Out(1), "pop_next": Out(1), "push_prev": Out(1), "push_next": Out(1),
})


def unit_members(addr_bits):
    """The members every unit of the chain has (``addr_bits``: ``NPUConfig.axi_addr_bits``).

    commands : In(stream of :func:`queue_entry`)   its queue; ready when the unit is free and
                  active, whether or not an entry is valid
    tokens : Out(:data:`TOKEN_PORT`)
    active : In(1)        the core runs (no error, not done): a unit starts nothing otherwise
    stopped : In(1)       the core stopped on an error: a unit drops its command
    idle : Out(1)         nothing held and nothing in flight
    waiting : Out(1)      blocked on a token (the deadlock detector's input)
    cmd_addr : Out(addr_bits)   where the command the unit holds was fetched from
    """
    return {"commands": In(stream.Signature(queue_entry(addr_bits))), "tokens": Out(TOKEN_PORT),
            "active": In(1), "stopped": In(1), "idle": Out(1), "waiting": Out(1), "cmd_addr": Out(addr_bits)}


def take_command(m, unit, prefix):
    """A unit's held command: when the unit is not busy, take the next entry of its command
    stream. Returns (the command's bits, busy); the unit clears busy when it is done, and
    ``unit.cmd_addr`` holds the command's address. The stream's ready does not wait for its
    valid (a core without queues hands commands straight to the units)."""
    cur = Signal(isa.COMMAND_BITS, name=f"{prefix}_cmd")
    busy = Signal(name=f"{prefix}_busy")
    m.d.comb += unit.commands.ready.eq(~busy & unit.active)
    with m.If(~busy & unit.commands.valid & unit.active):
        m.d.sync += [cur.eq(unit.commands.payload.cmd), unit.cmd_addr.eq(unit.commands.payload.addr), busy.eq(1)]
    return cur, busy


def tokens_ready(cmd, tokens):
    """The tokens ``cmd`` pops (its common fields: pop_prev, pop_next) are there."""
    return (~cmd.pop_prev | tokens.have_prev) & (~cmd.pop_next | tokens.have_next)


def ceil_div_pow2(x, d):
    """ceil(x / d) for a power-of-two constant d."""
    sh = d.bit_length() - 1
    return (x + (d - 1)) >> sh


def burst_len(left, addr, bus_bytes, max_burst):
    """Beats in the next AXI INCR burst from ``addr`` with ``left`` beats to go: at most
    ``max_burst``, and never across a 4 KB boundary (AXI4 rule)."""
    to_4k = (4096 - (addr & 4095)) >> (bus_bytes.bit_length() - 1)
    capped = Mux(left < max_burst, left, max_burst)
    return Mux(to_4k < capped, to_4k, capped)


_ONE = 0x3F800000
_NAN = 0x7FC00000


def _slices(value, width, count):
    """``value`` cut into ``count`` slices of ``width`` bits (zero past its end)."""
    padded = Cat(value, Const(0, max(0, width * count - len(value))))
    return [padded[width * k:width * (k + 1)] for k in range(count)]


def pick_slice(m, value, width, count, index, name):
    """Slice ``index`` of ``value`` cut into ``count`` slices of ``width`` bits."""
    parts = _slices(value, width, count)
    if count == 1:
        return parts[0]
    out = Signal(width, name=name)
    with m.Switch(index):
        for k, part in enumerate(parts):
            with m.Case(k):
                m.d.comb += out.eq(part)
    return out


class VectorUnit(wiring.Component):
    """EPILOGUE and BLOCKSCALE on accumulator lines (docs/isa.md), pipelined, one read port.

    ``start`` (one cycle, with ``cmd`` held unchanged until ``done``) begins a command. The unit
    first reads the scale line (EPILOGUE: ``scale_addr``, BLOCKSCALE: ``col_scale``) and the bias
    line, then issues the reads of each row in order: EPILOGUE one (``src + i``), BLOCKSCALE
    three (``row_scale + i``, ``src + i``, ``dst + i``). A row's last operand line goes into a
    row buffer, from which the row enters the lane pipeline in :attr:`passes` = ceil(cols /
    lanes) passes of ``lanes`` columns each (per lane: binary32 product, product, sum: EPILOGUE
    ``x * scale`` then ``+ bias``, BLOCKSCALE ``row scale * col scale``, ``src * that``, then
    ``dst +``); a pass leaves the pipeline :attr:`latency` cycles later as a write of its
    columns of line ``dst + i`` (``wr_lanes``). Rows behave as if done one after the other in
    increasing order, each read before it is written: a command whose reads can meet an
    earlier row's write (it reads 1 to ``latency + 8`` lines, and fewer than ``rows``, below
    where it writes) runs one row at a time, waiting for the pipeline to empty before each
    read. NaN results are written as the
    canonical NaN. ``done`` pulses once the last row is written.

    ``en`` low freezes the sequencer (a stopped core); the buffer and the pipeline drain.

    ``rd_addr`` is driven from registers in every state (a line is read each cycle; ``rd_en``
    says whether the unit uses what comes back), so a parent can select the shared read port
    with ``busy`` rather than ``rd_en``.

    Throughput: EPILOGUE one row per ``passes`` cycles, BLOCKSCALE one row per max(3,
    ``passes``) cycles; plus :attr:`fill` cycles (start, scale and bias reads, the row buffer,
    the pipeline, finishing); :meth:`command_cycles` gives the total.

    Members
    -------
    start, en : In(1)
    cmd : In(COMMAND_BITS)                           the EPILOGUE or BLOCKSCALE command
    busy, done : Out(1)
    rd_en : Out(1), rd_addr : Out(16), rd_data : In(32 * cols)      synchronous read port
    wr_en : Out(1), wr_addr : Out(16), wr_data : Out(32 * cols), wr_lanes : Out(cols)
        a write of the columns whose ``wr_lanes`` bit is set
    """

    def __init__(self, cols, lanes=None, mul_stages=6, add_stages=5):
        lanes = cols if not lanes else lanes
        if not 1 <= lanes <= cols:
            raise ValueError(f"a vector unit of {cols} columns takes 1 to {cols} lanes, not {lanes}")
        self.cols, self.lanes = cols, lanes
        self.passes = -(-cols // lanes)
        self.mul_stages, self.add_stages = mul_stages, add_stages
        self.latency = 2 * mul_stages + add_stages
        if self.latency < 1:
            raise ValueError("the vector unit needs at least one pipeline register")
        #: cycles of a command beyond its rows' cycles: start, scale and bias reads, the last
        #: row's read and buffer cycle, its passes after the first, the pipeline, done
        self.fill = self.latency + 7
        super().__init__({
            "start": In(1), "en": In(1), "cmd": In(isa.COMMAND_BITS), "busy": Out(1), "done": Out(1),
            "rd_en": Out(1), "rd_addr": Out(16), "rd_data": In(32 * cols),
            "wr_en": Out(1), "wr_addr": Out(16), "wr_data": Out(32 * cols), "wr_lanes": Out(cols),
        })

    def command_cycles(self, opcode, rows):
        """Cycles from ``start`` to ``done``, both included, for a command of ``rows`` rows
        without hazard stalls (what the functional simulator charges). BLOCKSCALE reads two
        lines before each row's last operand, and the next row's reads overlap the passes."""
        if opcode == isa.Opcode.EPILOGUE:
            return rows * self.passes + self.fill
        return 2 + (rows - 1) * max(3, self.passes) + self.passes + self.fill

    def elaborate(self, platform):
        m = Module()
        C, L, P, T = self.cols, self.lanes, self.passes, self.latency
        ep = data.View(command_layout(isa.Opcode.EPILOGUE), self.cmd)
        bs = data.View(command_layout(isa.Opcode.BLOCKSCALE), self.cmd)
        is_ep = ep.opcode == isa.Opcode.EPILOGUE
        rows = ep.rows                        # the same field in both commands
        src0, dst0 = ep.src, ep.dst
        GOT_NONE, GOT_RS, GOT_SRC, GOT_LAST = 0, 1, 2, 3
        got = Signal(2)                       # what the read issued last cycle returns now
        got_addr = Signal(16)                 # ... and the line its row writes

        # ---- row buffer: the row whose last operand arrived, fired in P passes ----
        buf_last = Signal(32 * C)             # EPILOGUE: x; BLOCKSCALE: dst
        buf_src = Signal(32 * C)
        buf_rs = Signal(32)
        buf_dst = Signal(16)
        left = Signal(range(P + 1))           # passes still to fire, this cycle's included
        idx = Signal(range(P))                # the pass fired this cycle

        # ---- write pipeline: the pass fired now (stage 0) and the T stages after it ----
        valid = [Signal(name=f"vu_v{k}") for k in range(T + 1)]
        addr = [Signal(16, name=f"vu_a{k}") for k in range(T + 1)]
        sel = [Signal(range(P), name=f"vu_p{k}") for k in range(T + 1)]
        m.d.comb += [valid[0].eq(left != 0), addr[0].eq(buf_dst), sel[0].eq(idx)]
        for k in range(1, T + 1):
            m.d.sync += [valid[k].eq(valid[k - 1]), addr[k].eq(addr[k - 1]), sel[k].eq(sel[k - 1])]
        in_flight = Cat(*valid).any() | (got != GOT_NONE)
        with m.If(left != 0):
            m.d.sync += [left.eq(left - 1), idx.eq(idx + 1)]

        # A read may meet a line an earlier row still has to write only when the command reads
        # a little below where it writes: 0 < dst - (src or row_scale) <= CHAIN lines (more
        # rows than that are never in flight) and fewer lines than it has rows. Such a command
        # is run one row at a time; any other needs no check, which keeps line comparisons off
        # the read path.
        CHAIN = T + 8
        chained = Signal()
        in_flight_any = in_flight | (left != 0)

        # ---- sequencer ----
        # The read address comes from registers only (``rs_line``, ``src_line``, ``dst_line``,
        # chosen by the state and ``step``), so the port's address does not wait for the
        # hazard check: the line is read every cycle and the check decides whether the data is
        # used (``got``). A BRAM read that nobody uses is harmless.
        i = Signal(16)
        step = Signal(2)                      # BLOCKSCALE: 0 row scale, 1 src, 2 dst
        rs_line, src_line, dst_line = Signal(16), Signal(16), Signal(16)
        line_a = Signal(32 * C)               # column scales
        line_b = Signal(32 * C)               # biases
        rs = Signal(32)                       # this row's row scale
        src_v = Signal(32 * C)                # this row's src line (BLOCKSCALE)
        m.d.sync += got.eq(GOT_NONE)
        line = Signal(16)
        kind = Signal(2)
        with m.If(is_ep):
            m.d.comb += [line.eq(src_line), kind.eq(GOT_LAST)]
        with m.Else():
            with m.Switch(step):
                with m.Case(0):
                    m.d.comb += [line.eq(rs_line), kind.eq(GOT_RS)]
                with m.Case(1):
                    m.d.comb += [line.eq(src_line), kind.eq(GOT_SRC)]
                with m.Default():
                    m.d.comb += [line.eq(dst_line), kind.eq(GOT_LAST)]
        # a last operand may be read if the buffer is free when it arrives
        buffer_free = Signal()
        m.d.comb += buffer_free.eq(Mux(got == GOT_LAST, P == 1, left <= 2))

        with m.FSM(name="vu_state") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.rd_addr.eq(Mux(is_ep, ep.scale_addr, bs.col_scale))
                with m.If(self.start):
                    gap_src = (dst0 - src0)[:16]
                    gap_rs = (dst0 - bs.row_scale)[:16]
                    m.d.sync += [i.eq(0), rs_line.eq(bs.row_scale), src_line.eq(src0), dst_line.eq(dst0),
                                 chained.eq(((gap_src != 0) & (gap_src <= CHAIN) & (gap_src < rows))
                                            | (~is_ep & (gap_rs != 0) & (gap_rs <= CHAIN) & (gap_rs < rows)))]
                    m.next = "READ_SCALE"
            with m.State("READ_SCALE"):
                m.d.comb += self.rd_addr.eq(Mux(is_ep, ep.scale_addr, bs.col_scale))
                with m.If(self.en):
                    m.d.comb += self.rd_en.eq(1)
                    m.next = "READ_BIAS"
            with m.State("READ_BIAS"):        # the scale line arrives
                m.d.comb += [self.rd_en.eq(1), self.rd_addr.eq(ep.bias_addr)]
                m.d.sync += line_a.eq(self.rd_data)
                m.next = "BIAS"
            with m.State("BIAS"):             # the bias line arrives
                m.d.comb += self.rd_addr.eq(line)
                m.d.sync += [line_b.eq(self.rd_data), step.eq(0)]
                m.next = "ROWS"
            with m.State("ROWS"):
                m.d.comb += self.rd_addr.eq(line)
                with m.If(i == rows):
                    m.next = "DRAIN"
                with m.Elif(self.en & ~(chained & in_flight_any) & ((kind != GOT_LAST) | buffer_free)):
                    m.d.comb += self.rd_en.eq(1)
                    m.d.sync += [got.eq(kind), got_addr.eq(dst_line)]
                    with m.If(kind == GOT_LAST):
                        m.d.sync += [i.eq(i + 1), step.eq(0), rs_line.eq(rs_line + 1), src_line.eq(src_line + 1),
                                     dst_line.eq(dst_line + 1)]
                    with m.Else():
                        m.d.sync += step.eq(step + 1)
            with m.State("DRAIN"):
                with m.If(~in_flight):
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))

        with m.If(got == GOT_RS):
            m.d.sync += rs.eq(self.rd_data[0:32])
        with m.If(got == GOT_SRC):
            m.d.sync += src_v.eq(self.rd_data)
        with m.If(got == GOT_LAST):           # after the pass count above, so it wins
            m.d.sync += [buf_last.eq(self.rd_data), buf_src.eq(src_v), buf_rs.eq(rs), buf_dst.eq(got_addr),
                         left.eq(P), idx.eq(0)]

        # ---- lanes ----
        def delay(value, n, name):
            for k in range(n):
                r = Signal(len(value), name=f"{name}_d{k + 1}")
                m.d.sync += r.eq(value)
                value = r
            return value

        mul_regs, add_regs, lm, la = MUL_REGS[self.mul_stages], ADD_REGS[self.add_stages], self.mul_stages, \
            self.add_stages
        # the datapath's command flags from registers: ``cmd`` is steady from ``start`` to
        # ``done`` and no row reaches the lanes in the cycle after ``start``, so the flags
        # (a compare on the opcode, fanned out to every lane's operand multiplexers) need not
        # be computed in the cycle they are used
        dp_ep, dp_scale, dp_bias = Signal(name="vu_dp_ep"), Signal(name="vu_dp_scale"), Signal(name="vu_dp_bias")
        m.d.sync += [dp_ep.eq(is_ep), dp_scale.eq(ep.use_scale), dp_bias.eq(ep.use_bias)]
        W = 32 * L
        last_p = pick_slice(m, buf_last, W, P, sel[0], "vu_last")
        src_p = pick_slice(m, buf_src, W, P, sel[0], "vu_srcp")
        scale_p = pick_slice(m, line_a, W, P, sel[0], "vu_scale")
        bias_p = pick_slice(m, line_b, W, P, sel[2 * lm], "vu_bias")     # needed at the sum
        results = []
        for j in range(L):
            lane = slice(32 * j, 32 * j + 32)
            last = last_p[lane]               # EPILOGUE: x; BLOCKSCALE: dst
            # product 1 -- EPILOGUE: x * scale; BLOCKSCALE: row scale * column scale
            m1 = fp32_mul(m, Mux(dp_ep, last, buf_rs), scale_p[lane], f"vu{j}_m1_", mul_regs)
            x1 = delay(last, lm, f"vu{j}_x")
            src1 = delay(src_p[lane], lm, f"vu{j}_src")
            # product 2 -- BLOCKSCALE: src * (row scale * column scale); EPILOGUE: x or x * scale, delayed
            m2 = fp32_mul(m, src1, m1, f"vu{j}_m2_", mul_regs)
            p_ep = delay(Mux(dp_scale, m1, x1), lm, f"vu{j}_p")
            dst2 = delay(x1, lm, f"vu{j}_dst")
            # sum -- EPILOGUE: p + bias; BLOCKSCALE: dst + product 2
            total = fp32_add(m, Mux(dp_ep, p_ep, dst2), Mux(dp_ep, bias_p[lane], m2), add_regs, f"vu{j}_a_")
            p_out = delay(p_ep, la, f"vu{j}_pout")
            y = Mux(dp_ep & ~dp_bias, p_out, total)
            is_nan = (y[23:31] == 0xFF) & (y[0:23] != 0)
            results.append(Mux(is_nan, Const(_NAN, 32), y))
        # every pass's columns see the same lane results; wr_lanes picks the pass's columns
        m.d.comb += self.wr_data.eq(Cat(*(results * P))[:32 * C])
        for c in range(C):
            m.d.comb += self.wr_lanes[c].eq(sel[T] == c // L)
        m.d.comb += [self.wr_en.eq(valid[T]), self.wr_addr.eq(addr[T])]
        return m


class Requantizer(wiring.Component):
    """A line of binary32 values scaled and rounded to FP8, for STORE: per lane
    ``fp8(fp32(x * scale))`` (docs/isa.md, STORE), fully pipelined.

    Latency :attr:`LATENCY` cycles (the product behind 6 registers, the FP8 conversion behind
    3); one line per cycle. ``scale``, ``e5m2`` and ``saturate`` must be steady while a line is
    inside.

    Members
    -------
    x : In(32 * lanes)          the binary32 values
    scale : In(32)              binary32 scale
    e5m2, saturate : In(1)      target format (0: E4M3), saturate instead of overflowing
    y : Out(8 * lanes)          the FP8 codes
    """

    LATENCY = 9

    def __init__(self, lanes):
        self.lanes = lanes
        super().__init__({"x": In(32 * lanes), "scale": In(32), "e5m2": In(1), "saturate": In(1),
                          "y": Out(8 * lanes)})

    def elaborate(self, platform):
        m = Module()
        codes = []
        for j in range(self.lanes):
            scaled = fp32_mul(m, self.x[32 * j:32 * j + 32], self.scale, prefix=f"q{j}_", regs=MUL_REGS[6])
            m.submodules[f"conv{j}"] = conv = FP32ToFP8(stages=3)
            m.d.comb += [conv.x.eq(scaled), conv.fmt.eq(self.e5m2), conv.saturate.eq(self.saturate)]
            codes.append(conv.y)
        assert self.LATENCY == 6 + conv.latency
        m.d.comb += self.y.eq(Cat(*codes))
        return m
