"""AXI4 master and AXI4-Lite slave port definitions, and the NPU's AXI4-Lite register block.

Ports are flat signals named as the AXI specification names them behind a prefix
(``m_axi_araddr``, ``s_axil_wdata``, ...), so bus models such as cocotbext-axi's
``AxiBus.from_prefix(dut, "m_axi")`` bind to the generated Verilog directly.
"""

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["axi4_master_members", "axil_slave_members", "AxiLiteRegs", "ID_BITS"]

ID_BITS = 4


def axi4_master_members(prefix, data_bits, addr_bits=32):
    """Signature members of an AXI4 master (INCR bursts; no lock/cache/prot/qos signals)."""
    o, i = Out, In
    return {
        f"{prefix}_awid": o(ID_BITS), f"{prefix}_awaddr": o(addr_bits), f"{prefix}_awlen": o(8),
        f"{prefix}_awsize": o(3), f"{prefix}_awburst": o(2), f"{prefix}_awvalid": o(1), f"{prefix}_awready": i(1),
        f"{prefix}_wdata": o(data_bits), f"{prefix}_wstrb": o(data_bits // 8), f"{prefix}_wlast": o(1),
        f"{prefix}_wvalid": o(1), f"{prefix}_wready": i(1),
        f"{prefix}_bid": i(ID_BITS), f"{prefix}_bresp": i(2), f"{prefix}_bvalid": i(1), f"{prefix}_bready": o(1),
        f"{prefix}_arid": o(ID_BITS), f"{prefix}_araddr": o(addr_bits), f"{prefix}_arlen": o(8),
        f"{prefix}_arsize": o(3), f"{prefix}_arburst": o(2), f"{prefix}_arvalid": o(1), f"{prefix}_arready": i(1),
        f"{prefix}_rid": i(ID_BITS), f"{prefix}_rdata": i(data_bits), f"{prefix}_rresp": i(2),
        f"{prefix}_rlast": i(1), f"{prefix}_rvalid": i(1), f"{prefix}_rready": o(1),
    }


def flip(members):
    """The other side of a members dict: In for Out and Out for In."""
    return {k: (In(v.shape) if v.flow == Out else Out(v.shape)) for k, v in members.items()}


def bridge_port_members(addr_bits, data_bits):
    """A board memory's port for the host bridge, memory side (:class:`fp8npu.hdl.board.BoardMemory`,
    :class:`fp8npu.hdl.sdram.SDRAMController`): a request is ``b_valid`` with ``b_write``, the
    bus word ``b_addr`` and, for a write, ``b_wen``/``b_wdata``, held until ``b_done`` pulses;
    a read's word is on ``b_rdata`` in that cycle."""
    return {"b_valid": In(1), "b_write": In(1), "b_addr": In(addr_bits), "b_wen": In(data_bits // 8),
            "b_wdata": In(data_bits), "b_done": Out(1), "b_rdata": Out(data_bits)}


def axil_slave_members(prefix, addr_bits=8):
    """Signature members of a 32-bit AXI4-Lite slave."""
    o, i = Out, In
    return {
        f"{prefix}_awaddr": i(addr_bits), f"{prefix}_awvalid": i(1), f"{prefix}_awready": o(1),
        f"{prefix}_wdata": i(32), f"{prefix}_wstrb": i(4), f"{prefix}_wvalid": i(1), f"{prefix}_wready": o(1),
        f"{prefix}_bresp": o(2), f"{prefix}_bvalid": o(1), f"{prefix}_bready": i(1),
        f"{prefix}_araddr": i(addr_bits), f"{prefix}_arvalid": i(1), f"{prefix}_arready": o(1),
        f"{prefix}_rdata": o(32), f"{prefix}_rresp": o(2), f"{prefix}_rvalid": o(1), f"{prefix}_rready": i(1),
    }


class AxiLiteRegs(wiring.Component):
    """A 32-bit AXI4-Lite slave over a register file.

    One write at a time (address and data accepted together), one read at a time; both answer
    OKAY. ``regs`` maps byte offsets to ``(signal, writable)``; a write to a writable register
    stores ``wdata`` (all strobes) unless ``locked`` is high (the write is answered and
    dropped), a write to offset ``strobe_offset`` pulses ``strobe`` with the written data on
    ``strobe_data``. Reads of unmapped offsets return 0.

    Latency: write response 1 cycle after the handshake; read data 1 cycle after ``arvalid``.
    """

    def __init__(self, regs, strobe_offset, prefix="s_axil"):
        self.regs = regs
        self.strobe_offset = strobe_offset
        self.prefix = prefix
        super().__init__({**axil_slave_members(prefix), "strobe": Out(1), "strobe_data": Out(32), "locked": In(1)})

    def p(self, name):
        return getattr(self, f"{self.prefix}_{name}")

    def elaborate(self, platform):
        m = Module()
        p = self.p
        take_w = p("awvalid") & p("wvalid") & ~p("bvalid")
        m.d.comb += [p("awready").eq(take_w), p("wready").eq(take_w), p("bresp").eq(0), p("rresp").eq(0)]
        with m.If(take_w):
            m.d.sync += p("bvalid").eq(1)
            for offset, (sig, writable) in self.regs.items():
                if writable:
                    with m.If((p("awaddr") == offset) & ~self.locked):
                        m.d.sync += sig.eq(p("wdata"))
        with m.Elif(p("bvalid") & p("bready")):
            m.d.sync += p("bvalid").eq(0)
        m.d.comb += [self.strobe.eq(take_w & (p("awaddr") == self.strobe_offset)), self.strobe_data.eq(p("wdata"))]

        take_r = p("arvalid") & ~p("rvalid")
        m.d.comb += p("arready").eq(take_r)
        with m.If(take_r):
            m.d.sync += [p("rvalid").eq(1), p("rdata").eq(0)]
            for offset, (sig, _) in self.regs.items():
                with m.If(p("araddr") == offset):
                    m.d.sync += p("rdata").eq(sig)
        with m.Elif(p("rvalid") & p("rready")):
            m.d.sync += p("rvalid").eq(0)
        return m

