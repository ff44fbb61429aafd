"""Simulation-only DRAM: an AXI4 slave backed by an Amaranth memory, and the NPU wrapped with it.

cocotbext-axi's ``AxiSlave`` is the reference bus model, but it runs Python on every clock
edge, which limits a simulation to some ten thousand cycles per second. For long runs
(benchmarks, large GEMMs) :class:`NPUWithDRAM` puts the DRAM inside the simulated design:
cocotb then only hands the image over (as a file the simulator loads), writes
the registers, waits, and has the image dumped back, so the simulator runs at full speed between
those transaction boundaries. Both paths must give identical results (tests check it).

:class:`SimDRAM` serves INCR bursts: reads one beat per cycle after a one-cycle address phase,
several read bursts queued; writes with byte strobes, one response per burst. Optional
backpressure: when ``stall_threshold`` is non-zero, each channel's ready/valid is withheld on
cycles where an LFSR byte is below the threshold.
"""

from amaranth.hdl import Cat, ClockSignal, Instance, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from fp8npu.hdl.axi import ID_BITS, axi4_master_members, axil_slave_members
from fp8npu.hdl.npu import NPU

__all__ = ["SimDRAM", "NPUWithDRAM", "SIM_MEMORY_VERILOG"]

#: The DRAM array itself, as plain behavioural Verilog (simulation only). Amaranth memories
#: of many megabytes take the Verilog backend minutes; this module costs nothing. The image
#: goes in and out as hex files ($readmemh at time 0, $writememh on ``dump``), so no signal
#: inside the design needs to be visible to cocotb (models are built with only top-level
#: ports visible, see :mod:`.rtl`).
SIM_MEMORY_VERILOG = """
module fp8npu_simmem #(parameter WORDS = 1024, parameter WIDTH = 64, parameter AW = 10) (
    input wire clk,
    input wire [AW-1:0] raddr,
    output wire [WIDTH-1:0] rdata,
    input wire [AW-1:0] waddr,
    input wire [WIDTH/8-1:0] wen,
    input wire [WIDTH-1:0] wdata,
    input wire dump,
    input wire load,
    input wire [31:0] first,
    input wire [31:0] last
);
    reg [WIDTH-1:0] words [0:WORDS-1];
    assign rdata = words[raddr];
    integer i;
    always @(posedge clk) begin
        for (i = 0; i < WIDTH/8; i = i + 1)
            if (wen[i]) words[waddr][i*8 +: 8] <= wdata[i*8 +: 8];
    end
    // Bulk load and dump by file (hex, one word per line), named by plusargs, so that a
    // testbench moves megabytes without touching each word from Python: the image at time 0,
    // words [first, last] on a rising ``dump``, and a file of "@address" runs on a rising
    // ``load`` (a host writing part of the memory between launches).
    reg [8*4096-1:0] file_in, file_out, file_load;
    initial begin
        if ($value$plusargs("fp8npu_dram_in=%s", file_in)) $readmemh(file_in, words);
    end
    reg dump_q = 0, load_q = 0;
    always @(posedge clk) begin
        dump_q <= dump;
        load_q <= load;
        if (dump && !dump_q && $value$plusargs("fp8npu_dram_out=%s", file_out))
            $writememh(file_out, words, first, last);
        if (load && !load_q && $value$plusargs("fp8npu_dram_load=%s", file_load))
            $readmemh(file_load, words);
    end
endmodule
"""


def _flip(members):
    return {k: (In(v.shape) if v.flow == Out else Out(v.shape)) for k, v in members.items()}


class SimDRAM(wiring.Component):
    """AXI4 slave over ``words`` words of ``data_bits`` bits.

    Only bytes below ``limit`` (and below the memory's size) exist: a read beat from at or
    above it returns zero with SLVERR, a write beat there is dropped and its burst answered
    SLVERR. Addresses never wrap around. A rising ``dump`` writes the memory to the file named
    by the ``fp8npu_dram_out`` plusarg, words ``dump_first`` to ``dump_last``; a rising
    ``load`` reads the file named by ``fp8npu_dram_load`` (see :data:`SIM_MEMORY_VERILOG`).
    """

    def __init__(self, data_bits, words):
        self.data_bits = data_bits
        self.words = words
        members = _flip(axi4_master_members("s", data_bits))
        members["stall_threshold"] = In(8)
        members["limit"] = In(32)
        members["dump"] = In(1)
        members["load"] = In(1)
        members["dump_first"] = In(32)
        members["dump_last"] = In(32)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        D = self.data_bits
        B = D // 8
        shift = B.bit_length() - 1
        g = lambda n: getattr(self, f"s_{n}")  # noqa: E731
        addr_bits = max(1, (self.words - 1).bit_length())
        rport_addr, rport_data = Signal(addr_bits), Signal(D)
        wport_addr, wport_en, wport_data = Signal(addr_bits), Signal(B), Signal(D)
        m.submodules.store = Instance(
            "fp8npu_simmem", p_WORDS=self.words, p_WIDTH=D, p_AW=addr_bits, i_clk=ClockSignal(),
            i_raddr=rport_addr, o_rdata=rport_data, i_waddr=wport_addr, i_wen=wport_en, i_wdata=wport_data,
            i_dump=self.dump, i_load=self.load, i_first=self.dump_first, i_last=self.dump_last)
        size = self.words * B
        limit = Signal(33)
        m.d.comb += limit.eq(Mux(self.limit < size, self.limit, size))

        # LFSR for backpressure
        lfsr = Signal(16, init=0xACE1)
        m.d.sync += lfsr.eq(Cat(lfsr[1:], lfsr[0] ^ lfsr[2] ^ lfsr[3] ^ lfsr[5]))
        thr = self.stall_threshold

        def go(bits):
            return (thr == 0) | (lfsr[bits[0]:bits[0] + 8] >= thr)

        # ---- reads: queue of (id, addr, len) ----
        m.submodules.arq = arq = SyncFIFOBuffered(width=ID_BITS + 32 + 8, depth=8)
        m.d.comb += [
            arq.w_data.eq(Cat(g("arid"), g("araddr"), g("arlen"))),
            arq.w_en.eq(g("arvalid") & go((0,))),
            g("arready").eq(arq.w_rdy & go((0,))),
        ]
        r_busy = Signal()
        r_id = Signal(ID_BITS)
        r_addr = Signal(32)
        r_left = Signal(9)
        with m.If(~r_busy & arq.r_rdy):
            m.d.comb += arq.r_en.eq(1)
            m.d.sync += [r_busy.eq(1), r_id.eq(arq.r_data[0:ID_BITS]),
                         r_addr.eq(arq.r_data[ID_BITS:ID_BITS + 32]),
                         r_left.eq(arq.r_data[ID_BITS + 32:ID_BITS + 40] + 1)]
        r_show = r_busy & go((3,))
        r_out = r_addr >= limit
        m.d.comb += [
            rport_addr.eq((r_addr >> shift)[0:addr_bits]),
            g("rvalid").eq(r_show), g("rdata").eq(Mux(r_out, 0, rport_data)), g("rid").eq(r_id),
            g("rlast").eq(r_left == 1), g("rresp").eq(Mux(r_out, 2, 0)),
        ]
        with m.If(r_show & g("rready")):
            m.d.sync += [r_addr.eq(r_addr + B), r_left.eq(r_left - 1)]
            with m.If(r_left == 1):
                m.d.sync += r_busy.eq(0)

        # ---- writes ----
        w_busy = Signal()
        w_id = Signal(ID_BITS)
        w_addr = Signal(32)
        w_bad = Signal()              # a beat of this burst lay outside the memory
        m.submodules.bq = bq = SyncFIFOBuffered(width=ID_BITS + 1, depth=8)
        take_aw = ~w_busy & g("awvalid") & go((5,)) & bq.w_rdy
        m.d.comb += g("awready").eq(take_aw)
        with m.If(take_aw):
            m.d.sync += [w_busy.eq(1), w_id.eq(g("awid")), w_addr.eq(g("awaddr")), w_bad.eq(0)]
        w_take = w_busy & go((7,))
        m.d.comb += [
            g("wready").eq(w_take),
            wport_addr.eq((w_addr >> shift)[0:addr_bits]),
            wport_data.eq(g("wdata")),
        ]
        w_out = w_addr >= limit
        with m.If(w_take & g("wvalid")):
            m.d.comb += wport_en.eq(Mux(w_out, 0, g("wstrb")))
            m.d.sync += [w_addr.eq(w_addr + B), w_bad.eq(w_bad | w_out)]
            with m.If(g("wlast")):
                m.d.sync += w_busy.eq(0)
                m.d.comb += [bq.w_en.eq(1), bq.w_data.eq(Cat(w_id, w_bad | w_out))]
        b_show = bq.r_rdy & go((8,))
        m.d.comb += [g("bvalid").eq(b_show), g("bid").eq(bq.r_data[:ID_BITS]),
                     g("bresp").eq(Mux(bq.r_data[ID_BITS], 2, 0)), bq.r_en.eq(b_show & g("bready"))]
        return m


class NPUWithDRAM(wiring.Component):
    """The NPU with a :class:`SimDRAM` of ``dram_bytes`` on its AXI4 port; the AXI4-Lite
    port, ``stall_threshold``, ``dram_limit`` (bytes that exist), ``dram_dump``,
    ``dram_load``, ``dram_first`` and ``dram_last`` (the words a dump writes) are the only
    inputs, ``irq`` the NPU's interrupt (simulation only)."""

    def __init__(self, cfg, dram_bytes):
        self.cfg = cfg
        self.words = max(1, dram_bytes // cfg.bus_bytes)
        members = axil_slave_members("s_axil")
        members["stall_threshold"] = In(8)
        members["dram_limit"] = In(32)
        members["dram_dump"] = In(1)
        members["dram_load"] = In(1)
        members["dram_first"] = In(32)
        members["dram_last"] = In(32)
        members["irq"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.npu = npu = NPU(self.cfg)
        m.submodules.dram = dram = SimDRAM(self.cfg.axi_data_bits, self.words)
        m.d.comb += [dram.stall_threshold.eq(self.stall_threshold), dram.limit.eq(self.dram_limit),
                     dram.dump.eq(self.dram_dump), dram.load.eq(self.dram_load),
                     dram.dump_first.eq(self.dram_first), dram.dump_last.eq(self.dram_last), self.irq.eq(npu.irq)]
        for name, member in npu.signature.members.items():
            if name.startswith("m_axi_"):
                other = getattr(dram, "s_" + name[len("m_axi_"):])
                if member.flow == Out:
                    m.d.comb += other.eq(getattr(npu, name))
                else:
                    m.d.comb += getattr(npu, name).eq(other)
            elif name.startswith("s_axil_"):
                if member.flow == In:
                    m.d.comb += getattr(npu, name).eq(getattr(self, name))
                else:
                    m.d.comb += getattr(self, name).eq(getattr(npu, name))
        return m


def write_hex(path, data, bus_bytes):
    """Write a DRAM image as ``$readmemh`` text: one ``bus_bytes`` word a line, lowest
    address first, each word's bytes little-endian (the last word zero-padded)."""
    import numpy as np
    data = bytes(data) + bytes(-len(data) % bus_bytes)
    words = np.frombuffer(data, np.uint8).reshape(-1, bus_bytes)[:, ::-1]
    text = np.ascontiguousarray(words).tobytes().hex().encode()
    lines = np.frombuffer(text, dtype=f"S{2 * bus_bytes}")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines.tolist()) + b"\n")


def write_hex_at(path, first_word, data, bus_bytes):
    """Write ``data`` (a whole number of words) as ``$readmemh`` text placed at word
    ``first_word`` (an ``@`` address line, then one word a line)."""
    with open(path, "wb") as f:
        f.write(f"@{first_word:x}\n".encode())
    import numpy as np
    words = np.frombuffer(bytes(data), np.uint8).reshape(-1, bus_bytes)[:, ::-1]
    text = np.ascontiguousarray(words).tobytes().hex().encode()
    lines = np.frombuffer(text, dtype=f"S{2 * bus_bytes}")
    with open(path, "ab") as f:
        f.write(b"\n".join(lines.tolist()) + b"\n")


def read_hex(path, bus_bytes, length):
    """The first ``length`` bytes of a ``$writememh`` dump written by :data:`SIM_MEMORY_VERILOG`."""
    import numpy as np
    with open(path, "rb") as f:
        lines = [ln for ln in f.read().split() if not ln.startswith((b"//", b"@"))]
    # undefined bits (x/z) cannot occur in a two-state simulator; treat anything odd as an error
    words = np.frombuffer(bytes.fromhex(b"".join(ln.rjust(2 * bus_bytes, b"0") for ln in lines).decode()),
                          np.uint8).reshape(-1, bus_bytes)[:, ::-1]
    out = np.ascontiguousarray(words).tobytes()
    if len(out) < length:
        raise ValueError(f"the DRAM dump {path} holds {len(out)} bytes, not {length}")
    return out[:length]
