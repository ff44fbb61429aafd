"""Small arithmetic building blocks shared by the floating-point units.

These are functions that add logic to a :class:`~amaranth.hdl.Module` and return the
resulting signals; the components in :mod:`.fpmul`, :mod:`.fpadd`, :mod:`.fpconv` and
:mod:`.mac` are built from them.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, signed
from amaranth.lib import wiring

from .formats import Format

__all__ = ["check_stages", "pipe", "leading_zeros", "unpack_fp8", "Registered", "SerialPorts", "SlicedMemory"]


def check_stages(stages, allowed, block, component=None):
    """Validate a ``stages`` parameter; one sentence naming the allowed values otherwise.

    ``component`` is the half-constructed component: it is marked as deliberately unused, so
    that a rejected parameter does not also produce an ``UnusedElaboratable`` warning.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages not in allowed:
        if component is not None:
            component._MustUse__silence = True
        choices = ", ".join(str(s) for s in allowed)
        raise ValueError(f"{block} stages must be one of {choices}, not {stages!r}")
    return stages


def pipe(m, value, registered, name):
    """Return a signal carrying ``value``: through a register (``sync``) or a wire (``comb``)."""
    sig = Signal(value.shape(), name=name)
    if registered:
        m.d.sync += sig.eq(value)
    else:
        m.d.comb += sig.eq(value)
    return sig


def leading_zeros(m, value, name):
    """Count of leading zeros of ``value`` (its width when ``value`` is zero), as a priority mux."""
    width = len(value)
    count = Signal(range(width + 1), name=name)
    m.d.comb += count.eq(width)
    # Later assignments win: scanning from the LSB up leaves the most significant one in charge.
    for i in range(width):
        with m.If(value[i]):
            m.d.comb += count.eq(width - 1 - i)
    return count


class UnpackedFP8:
    """An FP8 operand decoded for arithmetic (see :func:`unpack_fp8`)."""

    def __init__(self, sign, exp, sig, zero, inf, nan):
        self.sign, self.exp, self.sig = sign, exp, sig
        self.zero, self.inf, self.nan = zero, inf, nan


def unpack_fp8(m, code, fmt, name):
    """Decode an 8-bit FP8 ``code`` whose format is chosen at run time by ``fmt``.

    The value is ``(-1)**sign * sig / 8 * 2**exp`` with ``sig`` a 4-bit significand with three
    fraction bits (E5M2 mantissas are padded with a zero) and ``exp`` the signed, unbiased
    exponent (subnormals use the minimum exponent and a leading zero). ``zero``, ``inf`` and
    ``nan`` classify the code.
    """
    e4, f3 = code[3:7], code[0:3]
    e5, f2 = code[2:7], code[0:2]
    is_e5 = fmt == Format.E5M2
    sign = Signal(name=f"{name}_sign")
    exp = Signal(signed(6), name=f"{name}_exp")
    sig = Signal(4, name=f"{name}_sig")
    zero = Signal(name=f"{name}_zero")
    inf = Signal(name=f"{name}_inf")
    nan = Signal(name=f"{name}_nan")
    m.d.comb += [
        sign.eq(code[7]),
        zero.eq(code[0:7] == 0),
        sig.eq(Mux(is_e5, Cat(Const(0, 1), f2, e5 != 0), Cat(f3, e4 != 0))),
        exp.eq(Mux(is_e5, Mux(e5 == 0, 1, e5) - 15, Mux(e4 == 0, 1, e4) - 7)),
        inf.eq(is_e5 & (e5 == 31) & (f2 == 0)),
        nan.eq(Mux(is_e5, (e5 == 31) & (f2 != 0), (e4 == 15) & (f3 == 7))),
    ]
    return UnpackedFP8(sign, exp, sig, zero, inf, nan)




class Registered(wiring.Component):
    """``inner`` with a register on every input and every output (same port names), so that every
    timing path runs from a flip-flop to a flip-flop: how a block is timed out of context."""

    def __init__(self, inner):
        self.inner = inner
        super().__init__({name: (wiring.In(member.shape) if member.flow == wiring.In else wiring.Out(member.shape))
                          for name, member in inner.signature.members.items()})

    def elaborate(self, platform):
        m = Module()
        m.submodules.inner = inner = self.inner
        for name, member in inner.signature.members.items():
            if member.flow == wiring.In:
                m.d.sync += getattr(inner, name).eq(getattr(self, name))
            else:
                m.d.sync += getattr(self, name).eq(getattr(inner, name))
        return m


class SerialPorts(wiring.Component):
    """``inner`` behind two pins, for placing and routing a design with more ports than the
    package has pins (the whole NPU has hundreds): every input comes from a shift register fed by
    ``si``, every output goes into a signature register (each bit the XOR of its output bit and
    its neighbour's previous value) whose last bit is ``so``. Nothing can be optimized away (any
    input value can occur, every output reaches the pin), and every timing path of ``inner``
    starts and ends at a flip-flop. Costs one flip-flop per port bit and one LUT per output bit.
    """

    si: wiring.In(1)
    so: wiring.Out(1)

    def __init__(self, inner):
        self.inner = inner
        ports = list(inner.signature.flatten(inner))
        self._ins = [value for _, member, value in ports if member.flow == wiring.In]
        self._outs = [value for _, member, value in ports if member.flow == wiring.Out]
        self.input_bits = sum(Shape.cast(v.shape()).width for v in self._ins)
        self.output_bits = sum(Shape.cast(v.shape()).width for v in self._outs)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.inner = self.inner
        ins, outs = self._ins, self._outs
        if ins:
            chain = Signal(self.input_bits, name="si_chain")
            m.d.sync += chain.eq(Cat(self.si, chain[:-1]))
            m.d.comb += Cat(*ins).eq(chain)
        if outs:
            sig = Signal(self.output_bits, name="so_signature")
            m.d.sync += sig.eq(Cat(Const(0, 1), sig[:-1]) ^ Cat(*outs))
            m.d.comb += self.so.eq(sig[-1])
        return m


#: Data width of an ECP5 DP16KD block RAM at each depth (16K x 1 up to 512 x 36).
_BRAM_WIDTH = {16384: 1, 8192: 2, 4096: 4, 2048: 9, 1024: 18, 512: 36}


class SlicedMemory(wiring.Component):
    """A memory with one write port and ``read_ports`` read ports (synchronous, as
    :class:`amaranth.lib.memory.Memory`'s), built from side-by-side slices, each as wide as one
    block RAM is at this depth (16,384 lines: 1 bit; 2,048: 9 bits; see :data:`_BRAM_WIDTH`).
    Synthesis then maps each slice to block RAMs of its full depth, so no read passes a
    multiplexer chain over block RAMs cascaded in depth (which is what a wide, deep memory
    otherwise gets). Depths past 16,384 lines still cascade.

    Members
    -------
    write : Out(WritePort.Signature)        the write port (one line per write)
    read0 .. read{read_ports - 1} : Out(ReadPort.Signature)   read ports, data one cycle after addr
    """

    def __init__(self, width, depth, read_ports):
        from amaranth.lib.memory import ReadPort, WritePort
        self.width, self.depth, self.read_ports = width, depth, read_ports
        self.slice = _BRAM_WIDTH.get(depth, 1 if depth > 16384 else 36)
        abits = max(1, (depth - 1).bit_length())
        members = {"write": wiring.Out(WritePort.Signature(addr_width=abits, shape=width))}
        for i in range(read_ports):
            members[f"read{i}"] = wiring.Out(ReadPort.Signature(addr_width=abits, shape=width))
        super().__init__(members)

    def elaborate(self, platform):
        from amaranth.lib.memory import Memory
        m = Module()
        reads = [getattr(self, f"read{i}") for i in range(self.read_ports)]
        for lo in range(0, self.width, self.slice):
            w = min(self.slice, self.width - lo)
            m.submodules[f"bits{lo}"] = mem = Memory(shape=w, depth=self.depth, init=[])
            wp = mem.write_port()
            m.d.comb += [wp.addr.eq(self.write.addr), wp.en.eq(self.write.en), wp.data.eq(self.write.data[lo:lo + w])]
            for port in reads:
                rp = mem.read_port()
                m.d.comb += [rp.addr.eq(port.addr), rp.en.eq(port.en), port.data[lo:lo + w].eq(rp.data)]
        return m
