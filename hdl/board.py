"""What goes around the NPU on an FPGA board: block RAM playing the DRAM, a UART host bridge
speaking a framed protocol, and LEDs.

:class:`BoardSoC` is the whole board design without pins (the unit the simulations test);
``fp8npu.fpga.boards`` puts it on a board's pins. Parts:

* :class:`UARTRx`, :class:`UARTTx`: 8N1 serial, ``divisor`` clocks per bit;
* :class:`BoardMemory`: an AXI4 slave (the NPU's DRAM) over block RAM, with a byte port for
  the bridge that takes the cycles the NPU leaves free;
* :class:`HostBridge`: the framed protocol below, with an AXI4-Lite master to the NPU's
  registers.

Host protocol (all integers little-endian; CRC-16/CCITT-FALSE, polynomial 0x1021, initial
value 0xFFFF, over every byte after the sync byte up to the CRC; :func:`crc16`)::

    request   A5 | seq | op | addr:4 | length:2 | payload | crc:2
    response  5A | seq | status | length:2 | payload | crc:2

``payload`` of a request is ``length`` bytes for WRITE_MEM and WRITE_REG (then 4), none
otherwise; of a response, the bytes read (READ_MEM, READ_REG) or :data:`INFO_BYTES` bytes of
INFO, none otherwise (and none with a status other than OK). A request is acted on only when
its CRC is right, and only as a whole: a WRITE_MEM payload is held in a staging buffer until
the CRC has been checked, and its range is checked before anything is written, so no frame
ever writes outside the memory or writes half. Every complete request is answered, errors
included (:class:`Status`). A request that stops arriving (a dropped byte) is abandoned after
``timeout`` clock cycles of silence and the bridge hunts for the next sync byte, so a host
that waits longer than that before resending always resynchronizes. A WRITE_REG with the
same ``seq`` as the last request acted on is answered without writing again, so a host may
resend a register write whose answer it lost (the start bit of CTRL included).
"""

import enum

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .axi import ID_BITS, axi4_master_members, axil_slave_members, bridge_port_members, flip
from .config import NPUConfig
from .isa import memory_problem
from .npu import NPU

__all__ = ["SYNC_REQUEST", "SYNC_RESPONSE", "MAX_PAYLOAD", "INFO_BYTES", "PROTOCOL_VERSION", "Op", "Status",
           "crc16", "UARTRx", "UARTTx", "BoardMemory", "HostBridge", "BoardSoC"]

SYNC_REQUEST = 0xA5
SYNC_RESPONSE = 0x5A
#: Longest payload of one frame (bytes).
MAX_PAYLOAD = 256
#: Bytes of the INFO answer: memory bytes (4), clock in Hz (4), MAX_PAYLOAD (2), bus bytes (1),
#: protocol version (1).
INFO_BYTES = 12
PROTOCOL_VERSION = 1


class Op(enum.IntEnum):
    WRITE_MEM = 1
    READ_MEM = 2
    WRITE_REG = 3
    READ_REG = 4
    INFO = 5


class Status(enum.IntEnum):
    OK = 0
    BAD_CRC = 1          # the request was damaged on the way: nothing was done
    BAD_OP = 2           # unknown op
    BAD_RANGE = 3        # memory range outside the memory
    BAD_LENGTH = 4       # length above MAX_PAYLOAD, or not 4 for a register
    BUS_ERROR = 5        # the register access was answered with an error


def crc16(data, crc=0xFFFF):
    """CRC-16/CCITT-FALSE of ``data`` (bytes), as the bridge computes it."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def _crc16_next(crc, byte):
    """The CRC after one more byte, as an Amaranth expression (eight bit steps unrolled)."""
    bits = [crc[i] for i in range(16)]
    for k in range(7, -1, -1):
        top = bits[15] ^ byte[k]
        shifted = [Const(0, 1)] + bits[:15]
        bits = [shifted[i] ^ top if i in (0, 5, 12) else shifted[i] for i in range(16)]
    return Cat(*bits)


def _check_divisor(divisor):
    if divisor < 4:
        raise ValueError(f"a UART needs at least 4 clocks per bit, not {divisor}")
    return divisor


class UARTRx(wiring.Component):
    """8N1 receiver. ``rx`` goes through two flip-flops; a start bit is sampled again half a
    bit later, data bits in their middles. ``valid`` pulses one cycle with ``data`` after the
    stop bit; a byte whose stop bit is low is dropped and ``error`` pulses instead.

    Members: rx In(1); data Out(8); valid, error Out(1).
    """

    rx: In(1)
    data: Out(8)
    valid: Out(1)
    error: Out(1)

    def __init__(self, divisor):
        self.divisor = _check_divisor(divisor)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        s1, s2 = Signal(init=1), Signal(init=1)
        m.d.sync += [s1.eq(self.rx), s2.eq(s1)]
        count = Signal(range(d + d // 2 + 1))
        bit = Signal(range(9))
        shift = Signal(8)
        with m.FSM(name="uart_rx"):
            with m.State("IDLE"):
                with m.If(~s2):
                    m.d.sync += count.eq(d // 2)
                    m.next = "START"
            with m.State("START"):
                with m.If(count == 0):
                    with m.If(s2):             # a glitch, not a start bit
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [count.eq(d - 1), bit.eq(0)]
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("DATA"):
                with m.If(count == 0):
                    m.d.sync += [shift.eq(Cat(shift[1:], s2)), count.eq(d - 1), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("STOP"):
                with m.If(count == 0):
                    m.d.comb += [self.valid.eq(s2), self.error.eq(~s2)]
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
        m.d.comb += self.data.eq(shift)
        return m


class UARTTx(wiring.Component):
    """8N1 transmitter: a byte is taken when ``valid`` and ``ready`` are both high.

    Members: tx Out(1); data In(8); valid In(1); ready Out(1).
    """

    tx: Out(1, init=1)
    data: In(8)
    valid: In(1)
    ready: Out(1)

    def __init__(self, divisor):
        self.divisor = _check_divisor(divisor)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        count = Signal(range(d))
        frame = Signal(10, init=0x3FF)
        left = Signal(range(11))
        m.d.comb += [self.ready.eq(left == 0), self.tx.eq(frame[0])]
        with m.If(left == 0):
            with m.If(self.valid):
                m.d.sync += [frame.eq(Cat(Const(0, 1), self.data, Const(1, 1))), left.eq(10), count.eq(d - 1)]
        with m.Elif(count == 0):
            m.d.sync += [frame.eq(Cat(frame[1:], Const(1, 1))), left.eq(left - 1), count.eq(d - 1)]
        with m.Else():
            m.d.sync += count.eq(count - 1)
        return m


class BoardMemory(wiring.Component):
    """The NPU's DRAM on a board: ``words`` words of the bus width in block RAM, as an AXI4
    slave (INCR bursts; a read beat per cycle after one cycle; writes with byte strobes; bytes
    at and above the memory's end read as zero with SLVERR and are not written, bursts
    answered SLVERR), plus a port for the host bridge.

    Bridge port (the same as :class:`~fp8npu.hdl.sdram.SDRAMController`'s): a request is
    ``b_valid`` with ``b_write``, ``b_addr`` (bus word), and for a write ``b_wen`` (byte
    enables) and ``b_wdata``, held until ``b_done`` pulses; a read's word is on ``b_rdata``
    in that cycle. Requests take the cycles the AXI side leaves free (no read burst in progress;
    no write beat this cycle): a write is done in the cycle it gets the port, a read the cycle
    after.
    """

    def __init__(self, data_bits, words):
        self.data_bits, self.words = data_bits, words
        self.addr_bits = max(1, (words - 1).bit_length())
        members = flip(axi4_master_members("s", data_bits))
        members.update(bridge_port_members(self.addr_bits, data_bits))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        D = self.data_bits
        B = D // 8
        shift = B.bit_length() - 1
        size = self.words * B
        g = lambda n: getattr(self, f"s_{n}")  # noqa: E731
        m.submodules.store = store = Memory(shape=D, depth=self.words, init=[])
        wport = store.write_port(granularity=8)
        rport = store.read_port()

        # ---- reads: one burst at a time; rport holds the beat at r_addr once r_have ----
        r_busy, r_have = Signal(), Signal()
        r_id = Signal(ID_BITS)
        r_addr = Signal(32)
        r_left = Signal(9)
        m.d.comb += g("arready").eq(~r_busy)
        with m.If(g("arvalid") & ~r_busy):
            m.d.sync += [r_busy.eq(1), r_have.eq(0), r_id.eq(g("arid")), r_addr.eq(g("araddr")),
                         r_left.eq(g("arlen") + 1)]
        r_out = r_addr >= size
        fire = g("rvalid") & g("rready")
        m.d.comb += [g("rvalid").eq(r_busy & r_have), g("rdata").eq(Mux(r_out, 0, rport.data)), g("rid").eq(r_id),
                     g("rlast").eq(r_left == 1), g("rresp").eq(Mux(r_out, 2, 0))]
        fetch = Mux(fire, r_addr + B, r_addr)
        b_pend = Signal()                   # a bridge read has the port: its word comes next cycle
        m.d.sync += b_pend.eq(0)
        with m.If(r_busy):
            m.d.comb += rport.addr.eq((fetch >> shift)[:self.addr_bits])
            m.d.sync += r_have.eq(1)
        with m.Else():
            m.d.comb += rport.addr.eq(self.b_addr)
            with m.If(self.b_valid & ~self.b_write & ~b_pend):
                m.d.sync += b_pend.eq(1)
        m.d.comb += self.b_rdata.eq(rport.data)
        with m.If(fire):
            m.d.sync += [r_addr.eq(r_addr + B), r_left.eq(r_left - 1)]
            with m.If(r_left == 1):
                m.d.sync += r_busy.eq(0)

        # ---- writes: address, then beats, then the response ----
        w_busy, w_resp, w_bad = Signal(), Signal(), Signal()
        w_id = Signal(ID_BITS)
        w_addr = Signal(32)
        m.d.comb += g("awready").eq(~w_busy & ~w_resp)
        with m.If(g("awvalid") & ~w_busy & ~w_resp):
            m.d.sync += [w_busy.eq(1), w_id.eq(g("awid")), w_addr.eq(g("awaddr")), w_bad.eq(0)]
        m.d.comb += g("wready").eq(w_busy)
        w_out = w_addr >= size
        beat = w_busy & g("wvalid")
        with m.If(beat):
            m.d.comb += [wport.addr.eq((w_addr >> shift)[:self.addr_bits]), wport.data.eq(g("wdata")),
                         wport.en.eq(Mux(w_out, 0, g("wstrb")))]
            m.d.sync += [w_addr.eq(w_addr + B), w_bad.eq(w_bad | w_out)]
            with m.If(g("wlast")):
                m.d.sync += [w_busy.eq(0), w_resp.eq(1)]
        with m.Else():
            m.d.comb += [wport.addr.eq(self.b_addr), wport.data.eq(self.b_wdata)]
            with m.If(self.b_valid & self.b_write):
                m.d.comb += [wport.en.eq(self.b_wen), self.b_done.eq(1)]
        with m.If(b_pend):
            m.d.comb += self.b_done.eq(1)
        m.d.comb += [g("bvalid").eq(w_resp), g("bid").eq(w_id), g("bresp").eq(Mux(w_bad, 2, 0))]
        with m.If(w_resp & g("bready")):
            m.d.sync += w_resp.eq(0)
        return m


class HostBridge(wiring.Component):
    """The host protocol of this module's docstring, on a UART.

    Members
    -------
    rx : In(1), tx : Out(1)                          the serial line
    m_axil_* : AXI4-Lite master                      to the NPU's registers
    b_* : the :class:`BoardMemory` bridge port (flipped)
    activity : Out(1)                                high while a frame is handled

    Parameters: ``memory_bytes`` and ``bus_bytes`` of the memory, ``divisor`` clocks per bit,
    ``timeout`` clock cycles of silence that abandon a frame, ``clock_hz`` (reported by INFO).
    """

    def __init__(self, memory_bytes, bus_bytes, divisor, timeout, clock_hz):
        self.memory_bytes, self.bus_bytes = memory_bytes, bus_bytes
        self.divisor, self.timeout, self.clock_hz = divisor, timeout, clock_hz
        self.word_bits = max(1, (memory_bytes // bus_bytes - 1).bit_length())
        members = {"rx": In(1), "tx": Out(1, init=1), "activity": Out(1)}
        members.update(flip(axil_slave_members("m_axil")))
        members.update(flip(bridge_port_members(self.word_bits, 8 * bus_bytes)))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        B = self.bus_bytes
        lane_bits = (B - 1).bit_length()
        m.submodules.rx = rx = UARTRx(self.divisor)
        m.submodules.tx = tx = UARTTx(self.divisor)
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx)]
        m.submodules.staging = staging = Memory(shape=8, depth=MAX_PAYLOAD, init=[])
        st_w, st_r = staging.write_port(), staging.read_port()
        a = lambda n: getattr(self, f"m_axil_{n}")  # noqa: E731

        seq, op, status = Signal(8), Signal(8), Signal(8)
        addr = Signal(32)
        length = Signal(16)
        header = Signal(64)                 # seq, op, addr, length as they arrive
        count = Signal(17)
        crc = Signal(16, init=0xFFFF)
        crc_got = Signal(16)
        word = Signal(32)                   # the last four payload bytes; register values
        last_seq, last_valid = Signal(8), Signal()
        silence = Signal(range(self.timeout + 1))
        resp_len = Signal(16)
        got = Signal(8 * B)                 # READ_MEM: the memory word being sent
        final = Signal(16)                  # the answer's CRC
        info = Cat(Const(self.memory_bytes, 32), Const(self.clock_hz, 32), Const(MAX_PAYLOAD, 16), Const(B, 8),
                   Const(PROTOCOL_VERSION, 8))
        byte_addr = Signal(32)              # memory byte of the current payload byte
        gather = Signal(8 * B)              # WRITE_MEM: the bus word being put together
        gather_en = Signal(B)               # ... and its byte enables
        m.d.comb += [self.b_addr.eq((byte_addr >> lane_bits)[:self.word_bits])]
        lane = byte_addr[:lane_bits] if lane_bits else Const(0, 1)

        receiving = Signal()
        with m.If(rx.valid | ~receiving):
            m.d.sync += silence.eq(0)
        with m.Elif(silence != self.timeout):
            m.d.sync += silence.eq(silence + 1)
        timed_out = receiving & (silence == self.timeout)

        out_byte = Signal(8)
        send = Signal()                     # offer out_byte to the transmitter (and the CRC)
        m.d.comb += [tx.data.eq(out_byte), tx.valid.eq(send)]
        sent = send & tx.ready
        with m.If(sent):
            m.d.sync += crc.eq(_crc16_next(crc, out_byte))

        def take():
            """Fold the received byte into the CRC."""
            m.d.sync += crc.eq(_crc16_next(crc, rx.data))

        payload_in = Signal(17)
        mem_end = Signal(33)
        m.d.comb += mem_end.eq(addr + length)

        with m.FSM(name="bridge") as fsm:
            with m.State("HUNT"):
                with m.If(rx.valid & (rx.data == SYNC_REQUEST)):
                    m.d.sync += [count.eq(0), crc.eq(0xFFFF)]
                    m.next = "HEADER"
            with m.State("HEADER"):
                m.d.comb += receiving.eq(1)
                with m.If(timed_out):
                    m.next = "HUNT"
                with m.Elif(rx.valid):
                    take()
                    m.d.sync += [header.eq(Cat(header[8:], rx.data)), count.eq(count + 1)]
                    with m.If(count == 7):
                        m.next = "DECODE"
            with m.State("DECODE"):
                m.d.sync += [seq.eq(header[0:8]), op.eq(header[8:16]), addr.eq(header[16:48]),
                             length.eq(header[48:64]), count.eq(0)]
                m.next = "LENGTH"
            with m.State("LENGTH"):
                with m.If((op == Op.WRITE_MEM) | (op == Op.WRITE_REG)):
                    m.d.sync += payload_in.eq(length)
                with m.Else():
                    m.d.sync += payload_in.eq(0)
                m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                m.d.comb += receiving.eq(1)
                with m.If(timed_out):
                    m.next = "HUNT"
                with m.Elif(count == payload_in):
                    m.d.sync += count.eq(0)
                    m.next = "CRC"
                with m.Elif(rx.valid):
                    take()
                    m.d.comb += [st_w.en.eq(count < MAX_PAYLOAD), st_w.addr.eq(count[:8]), st_w.data.eq(rx.data)]
                    m.d.sync += [word.eq(Cat(word[8:], rx.data)), count.eq(count + 1)]
            with m.State("CRC"):
                m.d.comb += receiving.eq(1)
                with m.If(timed_out):
                    m.next = "HUNT"
                with m.Elif(rx.valid):
                    m.d.sync += [crc_got.eq(Cat(crc_got[8:], rx.data)), count.eq(count + 1)]
                    with m.If(count == 1):
                        m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += [resp_len.eq(0), count.eq(0), byte_addr.eq(addr)]
                with m.If(crc_got == crc):           # remembered for a resent register write
                    m.d.sync += [last_seq.eq(seq), last_valid.eq(1)]
                reg_ok = (length == 4) & (addr < 256) & (addr[:2] == 0)
                with m.If(crc_got != crc):
                    m.d.sync += status.eq(Status.BAD_CRC)
                    m.next = "REPLY"
                with m.Elif((op == Op.WRITE_MEM) | (op == Op.READ_MEM)):
                    with m.If(length > MAX_PAYLOAD):
                        m.d.sync += status.eq(Status.BAD_LENGTH)
                        m.next = "REPLY"
                    with m.Elif(mem_end > self.memory_bytes):
                        m.d.sync += status.eq(Status.BAD_RANGE)
                        m.next = "REPLY"
                    with m.Elif(op == Op.WRITE_MEM):
                        m.d.sync += status.eq(Status.OK)
                        m.next = "WRITE_MEM"
                    with m.Else():
                        m.d.sync += [status.eq(Status.OK), resp_len.eq(length)]
                        m.next = "REPLY"
                with m.Elif((op == Op.WRITE_REG) | (op == Op.READ_REG)):
                    with m.If(~reg_ok):
                        m.d.sync += status.eq(Status.BAD_LENGTH)
                        m.next = "REPLY"
                    with m.Elif((op == Op.WRITE_REG) & last_valid & (seq == last_seq)):
                        m.d.sync += status.eq(Status.OK)       # a resent register write: done already
                        m.next = "REPLY"
                    with m.Elif(op == Op.WRITE_REG):
                        m.next = "REG_WRITE"
                    with m.Else():
                        m.next = "REG_READ"
                with m.Elif(op == Op.INFO):
                    m.d.sync += [status.eq(Status.OK), resp_len.eq(INFO_BYTES)]
                    m.next = "REPLY"
                with m.Else():
                    m.d.sync += status.eq(Status.BAD_OP)
                    m.next = "REPLY"
            # ---- WRITE_MEM: staging bytes gathered into bus words, one memory write per word ----
            with m.State("WRITE_MEM"):
                m.d.comb += st_r.addr.eq(count[:8])
                m.d.sync += [gather.eq(0), gather_en.eq(0)]
                m.next = "WRITE_BYTE"
            with m.State("WRITE_BYTE"):           # st_r.data: staging byte `count`
                m.d.comb += st_r.addr.eq(count[:8])
                merged = Signal(8 * B)
                m.d.comb += merged.eq(gather)
                m.d.comb += merged.word_select(lane, 8).eq(st_r.data)
                with m.If(count == length):
                    m.next = "REPLY"
                with m.Elif((lane == B - 1) | (count + 1 == length)):   # the word's last byte
                    m.d.sync += [gather.eq(merged), gather_en.eq(gather_en | (1 << lane))]
                    m.next = "WRITE_WORD"
                with m.Else():
                    m.d.sync += [gather.eq(merged), gather_en.eq(gather_en | (1 << lane)), count.eq(count + 1),
                                 byte_addr.eq(byte_addr + 1)]
                    m.d.comb += st_r.addr.eq(count[:8] + 1)
            with m.State("WRITE_WORD"):
                m.d.comb += [self.b_valid.eq(1), self.b_write.eq(1), self.b_wdata.eq(gather), self.b_wen.eq(gather_en),
                             st_r.addr.eq(count[:8])]
                with m.If(self.b_done):
                    m.d.sync += [count.eq(count + 1), byte_addr.eq(byte_addr + 1), gather.eq(0), gather_en.eq(0)]
                    m.d.comb += st_r.addr.eq(count[:8] + 1)
                    m.next = "WRITE_BYTE"
            # ---- registers over AXI4-Lite ----
            with m.State("REG_WRITE"):
                m.d.comb += [a("awaddr").eq(addr[:8]), a("awvalid").eq(1), a("wdata").eq(word), a("wstrb").eq(0xF),
                             a("wvalid").eq(1)]
                with m.If(a("awready") & a("wready")):
                    m.next = "REG_WRITE_RESP"
            with m.State("REG_WRITE_RESP"):
                m.d.comb += a("bready").eq(1)
                with m.If(a("bvalid")):
                    m.d.sync += status.eq(Mux(a("bresp") == 0, Status.OK, Status.BUS_ERROR))
                    m.next = "REPLY"
            with m.State("REG_READ"):
                m.d.comb += [a("araddr").eq(addr[:8]), a("arvalid").eq(1)]
                with m.If(a("arready")):
                    m.next = "REG_READ_DATA"
            with m.State("REG_READ_DATA"):
                m.d.comb += a("rready").eq(1)
                with m.If(a("rvalid")):
                    ok = a("rresp") == 0
                    m.d.sync += [word.eq(a("rdata")), status.eq(Mux(ok, Status.OK, Status.BUS_ERROR)),
                                 resp_len.eq(Mux(ok, 4, 0))]
                    m.next = "REPLY"
            # ---- the answer ----
            with m.State("REPLY"):
                m.d.comb += [out_byte.eq(SYNC_RESPONSE), send.eq(1)]
                with m.If(sent):
                    m.d.sync += [crc.eq(0xFFFF), count.eq(0)]
                    m.next = "REPLY_HEAD"
            with m.State("REPLY_HEAD"):
                head = Cat(seq, status, resp_len)
                m.d.comb += [out_byte.eq(head.word_select(count[:2], 8)), send.eq(1)]
                with m.If(sent):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == 3):
                        m.d.sync += count.eq(0)
                        with m.If(resp_len == 0):
                            m.next = "REPLY_END"
                        with m.Elif(op == Op.READ_MEM):
                            m.next = "READ_FETCH"
                        with m.Else():
                            m.next = "REPLY_DATA"
            with m.State("REPLY_DATA"):           # READ_REG's word, INFO
                src = Mux(op == Op.INFO, info, Cat(word, Const(0, len(info) - 32)))
                m.d.comb += [out_byte.eq(src.word_select(count[:4], 8)), send.eq(1)]
                with m.If(sent):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count + 1 == resp_len):
                        m.next = "REPLY_END"
            with m.State("READ_FETCH"):           # READ_MEM: the word of the next byte
                m.d.comb += self.b_valid.eq(1)
                with m.If(self.b_done):
                    m.d.sync += got.eq(self.b_rdata)
                    m.next = "READ_SEND"
            with m.State("READ_SEND"):
                m.d.comb += [out_byte.eq(got.word_select(lane, 8)), send.eq(1)]
                with m.If(sent):
                    m.d.sync += [count.eq(count + 1), byte_addr.eq(byte_addr + 1)]
                    with m.If(count + 1 == resp_len):
                        m.next = "REPLY_END"
                    with m.Else():
                        m.next = "READ_FETCH"
            with m.State("REPLY_END"):
                m.d.sync += [final.eq(crc), count.eq(0)]
                m.next = "REPLY_CRC"
            with m.State("REPLY_CRC"):
                m.d.comb += [out_byte.eq(Mux(count[0], final[8:], final[:8])), send.eq(1)]
                with m.If(sent):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == 1):
                        m.next = "HUNT"
        m.d.comb += self.activity.eq(~fsm.ongoing("HUNT"))
        return m


class BoardSoC(wiring.Component):
    """The board design without pins: :class:`~fp8npu.hdl.npu.NPU`, its DRAM, and
    :class:`HostBridge` on the serial line.

    The DRAM is :class:`BoardMemory` (``memory_bytes`` of block RAM), or with ``sdram`` (an
    :class:`~fp8npu.hdl.sdram.SDRAMChip` or the name of one) an
    :class:`~fp8npu.hdl.sdram.SDRAMController` and the whole chip; the design then has the
    controller's ``sd_*`` pins too.

    ``leds``: bit 0 busy, 1 done, 2 error (the STATUS bits), 3 a frame being handled, 4 a
    heartbeat (about 1.5 Hz at ``clock_hz``), 5..7 off.

    Members: rx In(1); tx Out(1); leds Out(8); with SDRAM the ``sd_*`` pins.
    """

    def __init__(self, cfg=None, memory_bytes=65536, clock_hz=25_000_000, baud=1_000_000, timeout_bits=200,
                 sdram=None):
        from .sdram import sdram_pin_members
        self.cfg = cfg or NPUConfig()
        problem = self.problem(self.cfg, memory_bytes, clock_hz, baud, sdram)
        if problem:
            raise ValueError(problem)
        self.sdram = self._chip(sdram)
        if self.sdram is not None:
            memory_bytes = self.sdram.bytes
        divisor = round(clock_hz / baud)
        self.memory_bytes, self.clock_hz, self.baud, self.divisor = memory_bytes, clock_hz, baud, divisor
        self.timeout = timeout_bits * divisor
        members = {"rx": In(1), "tx": Out(1, init=1), "leds": Out(8)}
        if self.sdram is not None:
            members.update(sdram_pin_members(self.sdram))
        super().__init__(members)

    @staticmethod
    def _chip(sdram):
        from .sdram import CHIPS
        return CHIPS[sdram] if isinstance(sdram, str) else sdram

    @classmethod
    def problem(cls, cfg, memory_bytes, clock_hz, baud, sdram=None):
        """None if this board design can be built, else one sentence saying why not: a memory
        that is not a power of two of whole bus words, a memory the NPU cannot address, a baud
        rate the clock cannot make."""
        B = cfg.bus_bytes
        chip = cls._chip(sdram)
        if chip is not None:
            memory_bytes = chip.bytes
        if memory_bytes < B or memory_bytes % B or memory_bytes & (memory_bytes - 1):
            return f"the board memory must be a power of two of at least {B} bytes, not {memory_bytes}"
        problem = memory_problem(memory_bytes, cfg.address_space)
        if problem:                 # the NPU could not reach all of its memory
            return problem
        divisor = round(clock_hz / baud)
        if divisor < 4 or abs(clock_hz / divisor - baud) > 0.02 * baud:
            return (f"a {clock_hz / 1e6:g} MHz clock cannot make {baud:,} baud within 2 % (the UART divides "
                    f"the clock by a whole number of at least 4): choose a baud rate such as "
                    f"{clock_hz // max(4, divisor):,}")
        return None

    def elaborate(self, platform):
        from .sdram import SDRAMController, sdram_pin_members
        m = Module()
        cfg = self.cfg
        m.submodules.npu = npu = NPU(cfg)
        if self.sdram is None:
            mem = BoardMemory(cfg.axi_data_bits, self.memory_bytes // cfg.bus_bytes)
        else:
            mem = SDRAMController(self.sdram, self.clock_hz, cfg.axi_data_bits)
            for name, member in sdram_pin_members(self.sdram).items():
                if member.flow == Out:
                    m.d.comb += getattr(self, name).eq(getattr(mem, name))
                else:
                    m.d.comb += getattr(mem, name).eq(getattr(self, name))
        m.submodules.memory = mem
        m.submodules.bridge = bridge = HostBridge(self.memory_bytes, cfg.bus_bytes, self.divisor, self.timeout,
                                                  self.clock_hz)
        m.d.comb += [bridge.rx.eq(self.rx), self.tx.eq(bridge.tx)]
        for name, member in npu.signature.members.items():
            if name.startswith("m_axi_"):
                other = getattr(mem, "s_" + name[len("m_axi_"):])
            elif name.startswith("s_axil_"):
                other = getattr(bridge, "m_axil_" + name[len("s_axil_"):])
            else:
                continue
            if member.flow == Out:
                m.d.comb += other.eq(getattr(npu, name))
            else:
                m.d.comb += getattr(npu, name).eq(other)
        for name, member in bridge_port_members(1, 8).items():
            if member.flow == In:
                m.d.comb += getattr(mem, name).eq(getattr(bridge, name))
            else:
                m.d.comb += getattr(bridge, name).eq(getattr(mem, name))
        beat = Signal(range(self.clock_hz // 3 + 1))
        blink = Signal()
        with m.If(beat == self.clock_hz // 3):
            m.d.sync += [beat.eq(0), blink.eq(~blink)]
        with m.Else():
            m.d.sync += beat.eq(beat + 1)
        m.d.comb += self.leds.eq(Cat(npu.status, bridge.activity, blink))
        return m
