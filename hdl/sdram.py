"""An SDR SDRAM controller: the NPU's DRAM on boards with an SDRAM chip (the ULX3S's 32 MB).

:class:`SDRAMController` is an AXI4 slave with the same behaviour as
:class:`~fp8npu.hdl.board.BoardMemory` (INCR bursts of full-width beats, byte strobes, bytes at
and above the memory's end read as zero with SLVERR and are not written) and the same host
bridge port, in front of one x16 SDR SDRAM chip (:class:`SDRAMChip`).

How it works
------------
* Mode register: burst length 1, CAS latency 2 (3 above 100 MHz). Column commands issue one
  word each, one per cycle, so a run of reads or writes inside a row streams at one 16-bit
  word per clock (a 64-bit beat every 4 clocks).
* Closed-row policy: a job (an AXI burst or a bridge word) activates its row, streams columns
  until the row ends, the job ends or a refresh is due, and precharges. There is no open-row
  tracking, so a refresh never has to close anything.
* Refresh: one AUTO REFRESH per ``t_refi`` (64 ms / 8192 rows), never postponed: a run stops
  early when a refresh is due.
* Initialization after reset: ``t_init`` (200 us) of no commands with CKE high, PRECHARGE ALL,
  two AUTO REFRESH, LOAD MODE.
* Read data returns through a small beat FIFO; a beat's words are only read from the chip when
  the FIFO has room for it, so R backpressure never loses data.

Pins (all outputs registered; the idle command is DESELECT, CS# high)::

    sd_cke, sd_cs_n, sd_ras_n, sd_cas_n, sd_we_n : Out(1)
    sd_ba : Out(bank_bits)    sd_a : Out(row_bits)    sd_dqm : Out(2)
    sd_dq_o : Out(16)    sd_dq_oe : Out(1)    sd_dq_i : In(16)

Board timing: the chip's clock is the controller's clock inverted (the chip samples a command
half a cycle after the controller puts it out), and ``sd_dq_i`` is registered inside the
controller. A READ put out at clock edge k is sampled by the chip at the falling edge in cycle
k; its word is on the pins from the falling edge CL - 1 cycles later (plus the chip's access
time) until the next, and is captured at rising edge k + CL. :mod:`fp8npu.sim.sdram_model`
models exactly this, and checks every timing rule of the datasheet against the clock.

Throughput: reads and writes stream one word per clock inside a row (W = bus bytes / 2 words
per beat); each job adds ACTIVATE-to-READ (t_rcd), the CAS latency (reads), write recovery
(writes) and a precharge (t_rp), about 8 clocks at 50 MHz; refresh takes t_rc every t_refi
(under 1 %).
"""

import math
from dataclasses import dataclass

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .axi import ID_BITS, axi4_master_members, bridge_port_members, flip

__all__ = ["SDRAMChip", "CHIPS", "SDRAMController", "Command", "sdram_pin_members"]


@dataclass(frozen=True)
class SDRAMChip:
    """An x16 SDR SDRAM chip: geometry and the datasheet timings this controller obeys (ns)."""
    name: str
    bank_bits: int = 2
    row_bits: int = 13
    col_bits: int = 9
    t_rp: float = 21.0        # PRECHARGE to ACTIVATE
    t_rcd: float = 21.0       # ACTIVATE to READ/WRITE
    t_ras: float = 44.0       # ACTIVATE to PRECHARGE, at least
    t_rc: float = 66.0        # ACTIVATE to ACTIVATE; AUTO REFRESH to any command (t_rfc)
    t_wr: float = 15.0        # last write data to PRECHARGE
    t_mrd_clocks: int = 2     # LOAD MODE to any command
    t_refi: float = 7812.5    # average refresh interval (64 ms / 8192)
    t_init: float = 200_000.0  # power-up wait before the first command
    max_cl2_hz: float = 100e6  # fastest clock at CAS latency 2

    @property
    def data_bits(self):
        return 16

    @property
    def word_bits(self):
        return self.bank_bits + self.row_bits + self.col_bits

    @property
    def bytes(self):
        return 2 << self.word_bits


#: Chips on the boards fp8npu knows. The ULX3S comes with a 32 MB MT48LC16M16A2 (or an
#: IS42S16160G) or a 64 MB AS4C32M16SB; the 32 MB layout works on all of them (the larger chip
#: is then used with 512 of its 1024 columns). Timings: the slowest of the -7/-75 speed grades.
CHIPS = {
    "MT48LC16M16A2": SDRAMChip("MT48LC16M16A2"),
    "AS4C32M16SB": SDRAMChip("AS4C32M16SB", col_bits=10, t_rc=63.0, t_ras=42.0),
}


class Command:
    """(CS#, RAS#, CAS#, WE#) of each command."""
    DESELECT = 0b1111
    ACTIVE = 0b0011
    READ = 0b0101
    WRITE = 0b0100
    PRECHARGE = 0b0010
    REFRESH = 0b0001
    MODE = 0b0000


def sdram_pin_members(chip):
    """The controller's pin members (a signature fragment), as :class:`SDRAMController` has
    them and :class:`~fp8npu.hdl.board.BoardSoC` passes them out."""
    return {"sd_cke": Out(1, init=1), "sd_cs_n": Out(1, init=1), "sd_ras_n": Out(1, init=1),
            "sd_cas_n": Out(1, init=1), "sd_we_n": Out(1, init=1), "sd_ba": Out(chip.bank_bits),
            "sd_a": Out(chip.row_bits), "sd_dqm": Out(2), "sd_dq_o": Out(16), "sd_dq_oe": Out(1),
            "sd_dq_i": In(16)}


class SDRAMController(wiring.Component):
    """AXI4 slave + host bridge port over one SDR SDRAM chip (see the module docstring).

    Parameters: ``chip`` (:class:`SDRAMChip` or a key of :data:`CHIPS`), ``clock_hz`` (the
    timings are whole clocks of it), ``data_bits`` the AXI data width (32 to 256),
    ``read_fifo`` beats of read buffering.

    Members: ``s_*`` AXI4 slave; the bridge port ``b_valid, b_write, b_addr (bus word),
    b_wen, b_wdata`` in, ``b_done, b_rdata`` out (``b_done`` pulses when the request is done,
    with the word on ``b_rdata`` for a read; the request must be held until then); ``ready``
    Out(1) high once the chip is initialized; the pins of :func:`sdram_pin_members`.

    Latency: a read burst's first beat comes about t_rcd + CL + W + 3 clocks after its address;
    a bridge word about the same.
    """

    def __init__(self, chip, clock_hz, data_bits=64, read_fifo=8):
        self.chip = CHIPS[chip] if isinstance(chip, str) else chip
        if data_bits not in (32, 64, 128, 256):
            raise ValueError(f"the SDRAM controller takes an AXI data width of 32, 64, 128 or 256 bits, not {data_bits}")
        self.clock_hz, self.data_bits, self.read_fifo = clock_hz, data_bits, read_fifo
        self.cas_latency = 2 if clock_hz <= self.chip.max_cl2_hz else 3
        self.timing = self.cycles(self.chip, clock_hz)
        t = self.timing
        # a refresh is never late: from the moment it is due, a job in progress needs at most
        # this long to issue one more word, close its row and let the bank recover
        self.refresh_slack = t["rcd"] + t["ras"] + t["wr"] + t["rp"] + t["rc"] + 8
        if t["refi"] <= self.refresh_slack + t["rc"] + 16:
            raise ValueError(f"a {clock_hz / 1e6:g} MHz clock is too slow for the SDRAM's refresh interval")
        self.bytes = self.chip.bytes
        self.words = self.bytes // (data_bits // 8)
        self.bridge_bits = max(1, (self.words - 1).bit_length())
        members = flip(axi4_master_members("s", data_bits))
        members.update(bridge_port_members(self.bridge_bits, data_bits))
        members["ready"] = Out(1)
        members.update(sdram_pin_members(self.chip))
        super().__init__(members)

    @staticmethod
    def cycles(chip, clock_hz):
        """The chip's timings in whole clocks of ``clock_hz`` (rounded up; at least 1)."""
        period = 1e9 / clock_hz

        def c(ns):
            return max(1, math.ceil(ns / period - 1e-9))
        return {"rp": c(chip.t_rp), "rcd": c(chip.t_rcd), "ras": c(chip.t_ras), "rc": c(chip.t_rc),
                "wr": max(2, c(chip.t_wr)), "mrd": chip.t_mrd_clocks, "refi": int(chip.t_refi / period),
                "init": c(chip.t_init)}

    def elaborate(self, platform):
        m = Module()
        chip, t = self.chip, self.timing
        D = self.data_bits
        B = D // 8
        W = D // 16                              # SDRAM words per beat
        wsh = W.bit_length() - 1                 # log2 W
        bsh = B.bit_length() - 1                 # log2 B
        CL = self.cas_latency
        g = lambda n: getattr(self, f"s_{n}")  # noqa: E731
        size = self.bytes

        # ---- the pins: registered ----
        cmd_next = Signal(4, init=Command.DESELECT)
        a_next = Signal(chip.row_bits)
        ba_next = Signal(chip.bank_bits)
        dqm_next = Signal(2)
        dq_next = Signal(16)
        oe_next = Signal()
        cmd = Signal(4, init=Command.DESELECT)
        m.d.sync += [cmd.eq(cmd_next), self.sd_a.eq(a_next), self.sd_ba.eq(ba_next), self.sd_dqm.eq(dqm_next),
                     self.sd_dq_o.eq(dq_next), self.sd_dq_oe.eq(oe_next)]
        m.d.comb += [Cat(self.sd_we_n, self.sd_cas_n, self.sd_ras_n, self.sd_cs_n).eq(cmd), self.sd_cke.eq(1)]
        dq_in = Signal(16)
        m.d.sync += dq_in.eq(self.sd_dq_i)

        # ---- timers ----
        wait = Signal(range(max(t.values()) + 1))      # the FSM's own wait
        ras_left = Signal(range(t["ras"] + 1))
        rc_left = Signal(range(t["rc"] + 1))
        wr_left = Signal(range(t["wr"] + 1))
        for timer in (wait, ras_left, rc_left, wr_left):
            with m.If(timer != 0):
                m.d.sync += timer.eq(timer - 1)
        refi = Signal(range(t["refi"] + 1))
        refresh_due = Signal()
        refreshed = Signal()
        with m.If(refreshed):
            m.d.sync += refi.eq(0)
        with m.Elif(refi != t["refi"]):
            m.d.sync += refi.eq(refi + 1)
        m.d.comb += refresh_due.eq(refi >= t["refi"] - self.refresh_slack)

        # ---- AXI read channel: one burst at a time ----
        r_open, r_pending = Signal(), Signal()       # a burst is being answered / not yet scheduled
        r_id = Signal(ID_BITS)
        r_addr = Signal(32)
        r_beats, r_inside, r_sent = Signal(9), Signal(9), Signal(9)
        room = Signal(33)
        ar_aligned = Cat(Const(0, bsh), g("araddr")[bsh:])     # a beat's bytes start at a multiple of B
        m.d.comb += room.eq(Mux(ar_aligned >= size, 0, (size - ar_aligned) >> bsh))
        m.d.comb += g("arready").eq(~r_open & self.ready)
        with m.If(g("arvalid") & g("arready")):
            beats = g("arlen") + 1
            inside = Mux(room < beats, room, beats)
            m.d.sync += [r_open.eq(1), r_pending.eq(inside != 0), r_id.eq(g("arid")), r_addr.eq(g("araddr")),
                         r_beats.eq(beats), r_inside.eq(inside), r_sent.eq(0)]
        m.submodules.rfifo = rfifo = SyncFIFOBuffered(width=D, depth=self.read_fifo)
        from_fifo = r_sent < r_inside
        m.d.comb += [g("rvalid").eq(r_open & (~from_fifo | rfifo.r_rdy)), g("rid").eq(r_id),
                     g("rdata").eq(Mux(from_fifo, rfifo.r_data, 0)), g("rresp").eq(Mux(from_fifo, 0, 2)),
                     g("rlast").eq(r_sent + 1 == r_beats)]
        with m.If(g("rvalid") & g("rready")):
            m.d.comb += rfifo.r_en.eq(from_fifo)
            m.d.sync += r_sent.eq(r_sent + 1)
            with m.If(r_sent + 1 == r_beats):
                m.d.sync += r_open.eq(0)

        # ---- AXI write channel ----
        w_open, w_pending, w_resp = Signal(), Signal(), Signal()
        w_id = Signal(ID_BITS)
        w_addr = Signal(32)
        w_beats, w_inside, w_taken = Signal(9), Signal(9), Signal(9)
        w_sdram_done = Signal()                     # every inside beat has been written
        wroom = Signal(33)
        aw_aligned = Cat(Const(0, bsh), g("awaddr")[bsh:])
        m.d.comb += wroom.eq(Mux(aw_aligned >= size, 0, (size - aw_aligned) >> bsh))
        m.d.comb += g("awready").eq(~w_open & ~w_resp & self.ready)
        with m.If(g("awvalid") & g("awready")):
            beats = g("awlen") + 1
            inside = Mux(wroom < beats, wroom, beats)
            m.d.sync += [w_open.eq(1), w_pending.eq(inside != 0), w_id.eq(g("awid")), w_addr.eq(g("awaddr")),
                         w_beats.eq(beats), w_inside.eq(inside), w_taken.eq(0), w_sdram_done.eq(inside == 0)]
        wbuf = Signal(D)
        wstrb = Signal(B)
        w_full = Signal()
        w_last_word = Signal()                      # the buffered beat's last word goes out this cycle
        take_w = g("wvalid") & g("wready")
        m.d.comb += g("wready").eq(w_open & (w_taken != w_beats) & (~w_full | w_last_word))
        with m.If(take_w):
            m.d.sync += w_taken.eq(w_taken + 1)
            with m.If(w_taken < w_inside):
                m.d.sync += [wbuf.eq(g("wdata")), wstrb.eq(g("wstrb")), w_full.eq(1)]
        with m.Elif(w_last_word):
            m.d.sync += w_full.eq(0)
        with m.If(w_open & (w_taken == w_beats) & w_sdram_done):
            m.d.sync += [w_open.eq(0), w_resp.eq(1)]
        m.d.comb += [g("bvalid").eq(w_resp), g("bid").eq(w_id), g("bresp").eq(Mux(w_inside != w_beats, 2, 0))]
        with m.If(w_resp & g("bready")):
            m.d.sync += w_resp.eq(0)

        # ---- the current job ----
        j_write, j_bridge = Signal(), Signal()
        j_word = Signal(chip.word_bits)              # next SDRAM word
        j_left = Signal(chip.word_bits + 1)          # words still to issue
        col = j_word[:chip.col_bits]
        bank = j_word[chip.col_bits:chip.col_bits + chip.bank_bits]
        row = j_word[chip.col_bits + chip.bank_bits:]
        idx = j_word[:wsh]                           # word within the beat
        open_bank = Signal(chip.bank_bits)           # j_word moves on past the row's end
        b_busy = Signal()
        last_read = Signal()                         # fairness between AXI reads and writes

        # read return: a tag per READ, CL + 1 clocks to the captured word
        tag_valid = Signal(CL + 1)
        tag_bridge = Signal(CL + 1)
        tag_last = Signal(CL + 1)
        new_valid, new_bridge, new_last = Signal(), Signal(), Signal()
        m.d.sync += [tag_valid.eq(Cat(new_valid, tag_valid[:-1])), tag_bridge.eq(Cat(new_bridge, tag_bridge[:-1])),
                     tag_last.eq(Cat(new_last, tag_last[:-1]))]
        assemble = Signal(D)
        word_in = tag_valid[CL]
        beat = Cat(assemble[16:], dq_in) if W > 1 else dq_in
        with m.If(word_in):
            m.d.sync += assemble.eq(beat)
            with m.If(tag_last[CL]):
                with m.If(tag_bridge[CL]):
                    m.d.sync += self.b_rdata.eq(beat)
                with m.Else():
                    m.d.comb += [rfifo.w_en.eq(1), rfifo.w_data.eq(beat)]
        # beats of AXI reads issued and not yet in the FIFO
        in_flight = Signal(range(self.read_fifo + 2))
        beat_issued = Signal()
        beat_landed = word_in & tag_last[CL] & ~tag_bridge[CL]
        m.d.sync += in_flight.eq(in_flight + beat_issued - beat_landed)
        read_room = (rfifo.level + in_flight) < self.read_fifo
        # a bridge read finishes when its word lands; a bridge write when its last word goes out
        bridge_read_done = Signal()
        m.d.sync += bridge_read_done.eq(word_in & tag_last[CL] & tag_bridge[CL])

        def command(c, a=None, ba=None):
            m.d.comb += cmd_next.eq(c)
            if a is not None:
                m.d.comb += a_next.eq(a)
            if ba is not None:
                m.d.comb += ba_next.eq(ba)

        bridge_word = Cat(Const(0, wsh), self.b_addr) if wsh else self.b_addr
        mode = Cat(Const(0, 3), Const(0, 1), Const(CL, 3), Const(0, 2), Const(0, 1))   # BL 1, sequential, CL
        init_refreshes = Signal(2)

        with m.FSM(name="sdram"):
            with m.State("POWER_UP"):
                m.d.sync += wait.eq(t["init"])
                m.next = "INIT_WAIT"
            with m.State("INIT_WAIT"):
                with m.If(wait == 0):
                    command(Command.PRECHARGE, a=1 << 10)            # all banks
                    m.d.sync += wait.eq(t["rp"] - 1)
                    m.next = "INIT_REFRESH"
            with m.State("INIT_REFRESH"):
                with m.If(wait == 0):
                    command(Command.REFRESH)
                    m.d.sync += [wait.eq(t["rc"] - 1), init_refreshes.eq(init_refreshes + 1)]
                    with m.If(init_refreshes == 1):
                        m.next = "INIT_MODE"
            with m.State("INIT_MODE"):
                with m.If(wait == 0):
                    command(Command.MODE, a=mode, ba=0)
                    m.d.sync += wait.eq(t["mrd"] - 1)
                    m.next = "IDLE"
            with m.State("IDLE"):
                m.d.sync += self.ready.eq(1)
                take_read = r_pending & (~w_pending | ~w_full | ~last_read)
                take_write = w_pending & w_full & ~take_read
                with m.If(wait != 0):
                    pass
                with m.Elif(refresh_due):
                    m.next = "REFRESH"
                with m.Elif(take_read):
                    m.d.sync += [j_write.eq(0), j_bridge.eq(0), j_word.eq(r_addr[bsh:] << wsh), j_left.eq(r_inside << wsh),
                                 r_pending.eq(0), last_read.eq(1)]
                    m.next = "ACTIVATE"
                with m.Elif(take_write):
                    m.d.sync += [j_write.eq(1), j_bridge.eq(0), j_word.eq(w_addr[bsh:] << wsh), j_left.eq(w_inside << wsh),
                                 w_pending.eq(0), last_read.eq(0)]
                    m.next = "ACTIVATE"
                with m.Elif(self.b_valid & ~b_busy & ~r_pending & ~w_pending):
                    m.d.sync += [j_write.eq(self.b_write), j_bridge.eq(1), j_word.eq(bridge_word), j_left.eq(W),
                                 b_busy.eq(1)]
                    m.next = "ACTIVATE"
            with m.State("REFRESH"):
                with m.If((wait == 0) & (rc_left == 0)):
                    command(Command.REFRESH)
                    m.d.comb += refreshed.eq(1)
                    m.d.sync += [wait.eq(t["rc"] - 1), rc_left.eq(t["rc"])]
                    with m.If(j_left != 0):
                        m.next = "ACTIVATE"
                    with m.Else():
                        m.next = "IDLE"
            with m.State("ACTIVATE"):
                with m.If((wait == 0) & (rc_left == 0)):
                    command(Command.ACTIVE, a=row, ba=bank)
                    m.d.sync += [open_bank.eq(bank), wait.eq(t["rcd"] - 1), ras_left.eq(t["ras"] - 1), rc_left.eq(t["rc"] - 1)]
                    m.next = "ACCESS"
            with m.State("ACCESS"):
                last = j_left == 1
                row_end = col == (1 << chip.col_bits) - 1
                if W > 1:
                    beat_end = idx == W - 1
                    beat_start = idx == 0
                else:
                    beat_end = beat_start = Const(1)
                can = Signal()
                with m.If(j_bridge):
                    m.d.comb += can.eq(1)
                with m.Elif(j_write):
                    m.d.comb += can.eq(w_full)
                with m.Else():
                    m.d.comb += can.eq(~beat_start | read_room)
                data = Mux(j_bridge, self.b_wdata, wbuf).word_select(idx, 16) if W > 1 else \
                    Mux(j_bridge, self.b_wdata, wbuf)
                strobes = Mux(j_bridge, self.b_wen, wstrb).word_select(idx, 2) if W > 1 else \
                    Mux(j_bridge, self.b_wen, wstrb)
                with m.If(wait != 0):
                    pass
                with m.Elif(can):
                    with m.If(j_write):
                        command(Command.WRITE, a=col, ba=bank)
                        m.d.comb += [dq_next.eq(data), oe_next.eq(1), dqm_next.eq(~strobes)]
                        m.d.sync += wr_left.eq(t["wr"])
                        with m.If(~j_bridge & beat_end):
                            m.d.comb += w_last_word.eq(1)
                    with m.Else():
                        command(Command.READ, a=col, ba=bank)
                        m.d.comb += [new_valid.eq(1), new_bridge.eq(j_bridge), new_last.eq(beat_end),
                                     beat_issued.eq(~j_bridge & beat_start)]
                    m.d.sync += [j_word.eq(j_word + 1), j_left.eq(j_left - 1)]
                    with m.If(last | row_end | refresh_due):
                        m.next = "PRECHARGE"
                with m.Elif(refresh_due):
                    m.next = "PRECHARGE"
            with m.State("PRECHARGE"):
                with m.If((ras_left == 0) & (wr_left == 0)):
                    command(Command.PRECHARGE, a=0, ba=open_bank)
                    m.d.sync += wait.eq(t["rp"] - 1)
                    with m.If(j_left == 0):
                        with m.If(j_bridge & j_write):
                            m.d.comb += self.b_done.eq(1)
                            m.d.sync += b_busy.eq(0)
                        with m.If(~j_bridge & j_write):
                            m.d.sync += w_sdram_done.eq(1)
                        m.next = "IDLE"
                    with m.Elif(refresh_due):
                        m.next = "REFRESH"
                    with m.Else():
                        m.next = "ACTIVATE"
        with m.If(bridge_read_done):
            m.d.comb += self.b_done.eq(1)
            m.d.sync += b_busy.eq(0)
        return m
