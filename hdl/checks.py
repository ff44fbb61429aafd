"""The command checker: the rules of :func:`fp8npu.hdl.isa.validate` in hardware, pipelined.

Every fetched command enters it as it is assembled; its verdict (an
:class:`~fp8npu.hdl.isa.ErrorCode`, NONE for a good command) follows the command, which the
fetch buffers meanwhile, into a buffer of its own, and the dispatcher stops the NPU on the
first command with a bad verdict, in program order.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from . import isa
from .units import ceil_div_pow2, command_layout, pack_fields, unpack_fields

__all__ = ["CommandChecker", "reserved_set"]

CMD = isa.COMMAND_BITS


def _reserved_mask(opcode):
    used = 0
    for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]:
        used |= ((1 << f.width) - 1) << f.lsb
    return ((1 << CMD) - 1) & ~used


def reserved_set(word, opcode, beat=0):
    """Whether ``word`` sets a bit reserved for ``opcode`` (a signal): ``word`` is beat ``beat``
    (an int or a signal) of a command that arrives in beats of ``len(word)`` bits. Only the
    opcode's low bits that tell the ISA's opcodes apart are looked at: an opcode that is not
    one of them is refused as unknown before its reserved bits matter. The fetch ORs this over
    the beats of a command as they arrive, so no register holds a reserved bit."""
    width = len(word)
    beats = isa.COMMAND_BITS // width
    ob = max(isa.Opcode).bit_length()
    masks = {o.value: _reserved_mask(o) for o in isa.Opcode}
    table = Array([Const((masks.get(o, 0) >> (i * width)) & ((1 << width) - 1), width)
                   for i in range(beats) for o in range(1 << ob)])
    if beats == 1:
        return (word & table[opcode[0:ob]]) != 0
    beat = Const(beat, (beats - 1).bit_length()) if isinstance(beat, int) else beat[:(beats - 1).bit_length()]
    return (word & table[Cat(opcode[0:ob], beat)]) != 0


def fld(cmd, opcode, name):
    """Slice of a command signal holding field ``name`` of ``opcode`` (from the ISA tables)."""
    field = command_layout(opcode)[name]
    return cmd[field.offset:field.offset + field.width]


class CommandChecker(wiring.Component):
    """Pipelined mirror of :func:`fp8npu.hdl.isa.validate`: the same rules in the same order
    (opcode, reserved bits and field ranges, formats, SRAM ranges, alignment, DMA window), for
    the configuration it is built for. The command is registered as it enters; the
    multiplications of the range checks happen in the second cycle (with the DRAM address plus
    the bytes of a row), the comparisons in the third (both in the second with ``stages`` 1).

    Whether the command sets a reserved bit comes with it (``reserved``, from
    :func:`reserved_set`, which the fetch evaluates beat by beat as a command arrives; it
    matters only for a known opcode), so the checker's registers keep only the bits of the
    ISA's fields. The command itself does not come out: the fetch buffers it as it enters, and
    its verdict follows it into a buffer of its own.

    Members
    -------
    valid : In(1)                      a command enters (at most one per ``spacing`` cycles)
    cmd : In(COMMAND_BITS)             the command
    reserved : In(1)                   it sets a bit reserved for its opcode
    win_base, win_limit : In(axi_addr_bits + 1)   the DMA window, inside the address space (held
                                       while commands pass)
    verdict : Out(8)                   the ErrorCode of the command that entered LATENCY cycles ago

    ``spacing``: the fewest cycles between two commands (1: one per cycle). From 2 on, the
    command stays in its first register until its checks are done, and the checker keeps no
    second copy of it (an NPU whose commands come in two or more bus beats).

    ``held``: the command (and ``reserved``) come from a register that holds them for the
    cycle ``valid`` is high and the next (the fetch assembles commands of several beats in
    one); the checker registers nothing of the command and its latency is one cycle shorter.
    ``spacing`` must then be at least 2.

    ``stages``: 2 (the default) as above; 1 makes the multiplications and comparisons in one
    cycle, without the registers between them (for a slowly clocked FPGA: ``cfg.check_stages``).

    Latency :attr:`latency` cycles (:attr:`LATENCY` with 2 stages, one less with 1 stage, one
    less when ``held``); throughput one command per ``spacing`` cycles.
    """

    #: Cycles from a command to its verdict (not held, 2 stages).
    LATENCY = 3

    def __init__(self, cfg, spacing=1, held=False, stages=2):
        if held and spacing < 2:
            raise ValueError("a held command needs commands at least 2 cycles apart")
        if stages not in (1, 2):
            raise ValueError(f"stages must be 1 or 2, not {stages!r}")
        self.cfg = cfg
        self.spacing = spacing
        self.held = held
        self.stages = stages
        self.latency = self.LATENCY - (2 - stages) - (1 if held else 0)
        super().__init__({"valid": In(1), "cmd": In(CMD), "reserved": In(1), "win_base": In(cfg.axi_addr_bits + 1),
                          "win_limit": In(cfg.axi_addr_bits + 1),
                          "verdict": Out(8)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        Op, E = isa.Opcode, isa.ErrorCode
        # stage 0: the command's field bits (isa.field_ranges) and its reserved flag, registered
        ranges = isa.field_ranges(list(Op))
        if self.held:               # the caller's register is the first
            cmd0, reserved0 = self.cmd, self.reserved
        else:
            cmd0 = Signal(CMD, name="v_cmd0")
            reserved0 = Signal(name="v_reserved0")
            with m.If(self.valid):
                m.d.sync += [cmd0.eq(unpack_fields(pack_fields(self.cmd, ranges), ranges)),
                             reserved0.eq(self.reserved)]
        # stage A: the command and the products of its range checks
        for name in ("rows", "dram_addr", "dram_stride"):
            assert command_layout(Op.LOAD)[name].offset == command_layout(Op.STORE)[name].offset, name
        if self.spacing >= 2 or self.stages == 1:    # the next command enters no earlier than the checks below
            cmd, reserved = cmd0, reserved0
        else:
            cmd = Signal(CMD, name="v_cmd")
            reserved = Signal(name="v_reserved")
            m.d.sync += [cmd.eq(cmd0), reserved.eq(reserved0)]
        # (rows - 1) * dram_stride, LOAD and STORE, as two products by the stride's halves (not
        # summed: beyond 2**32 only whether the span is that large matters)
        span_lo = Signal(32, name="v_span_lo")
        span_hi = Signal(32, name="v_span_hi")
        load_lines = Signal(33, name="v_load_lines")     # rows * SRAM lines per row, LOAD
        a_span = Signal(32, name="v_a_span")             # (m - 1) * a_stride, MATMUL
        dram_tail = Signal(33, name="v_dram_tail")       # dram_addr + the bytes of a row, LOAD and STORE
        rb0 = fld(cmd0, Op.LOAD, "row_bytes")
        lines0 = Mux(fld(cmd0, Op.LOAD, "dst"), ceil_div_pow2(rb0, cfg.acc_line_bytes),
                     ceil_div_pow2(rb0, cfg.line_bytes))
        st_fmt0, st_cols0 = fld(cmd0, Op.STORE, "fmt"), fld(cmd0, Op.STORE, "cols")
        rows_less0 = (fld(cmd0, Op.LOAD, "rows") - 1)[0:16]      # rows - 1, 16 bits (rows 0 checks no window)
        row_bytes0 = Mux(cmd0[0:8] == Op.LOAD, rb0, Mux(st_fmt0 == 0, st_cols0 << 2, st_cols0))
        stage_a = m.d.sync if self.stages == 2 else m.d.comb
        stage_a += [
            span_lo.eq(rows_less0 * fld(cmd0, Op.LOAD, "dram_stride")[0:16]),
            span_hi.eq(rows_less0 * fld(cmd0, Op.LOAD, "dram_stride")[16:32]),
            dram_tail.eq(fld(cmd0, Op.LOAD, "dram_addr") + row_bytes0),
            load_lines.eq(fld(cmd0, Op.LOAD, "rows") * lines0),
            a_span.eq((fld(cmd0, Op.MATMUL, "m") - 1)[0:16] * fld(cmd0, Op.MATMUL, "a_stride")),   # m 0: no A
        ]
        # stage B: the checks, registered
        op = cmd[0:8]
        pp, pn, up, un = (fld(cmd, Op.SYNC, n) for n in ("pop_prev", "pop_next", "push_prev", "push_next"))
        code = self.verdict
        known = Signal()
        with m.Switch(op):
            for o in Op:
                if not isa.opcode_built(o, cfg):
                    continue                  # not built: refused as an unknown opcode
                with m.Case(o):
                    m.d.comb += known.eq(1)

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
            end = Signal(34, name=f"end_{o.name.lower()}")
            # rows >= 1: no wrap in the span. A span of 2**32 or more ends past any window
            # (win_limit <= 2**axi_addr_bits); below that the last row's end is exact in 34 bits
            m.d.comb += end.eq(dram_tail + span_lo + (span_hi[0:16] << 16))
            far = span_hi[16:32] != 0
            m.d.comb += misaligned.eq(((addr | stride) & (cfg.bus_bytes - 1)) != 0)
            m.d.comb += window.eq((rows != 0) & (row_bytes != 0) & ((addr < wb) | far | (end > wl)))

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
                fp8 = int(cfg.fp8_store)
                m.d.comb += bad_format.eq(((fmt == 1) & ~(sup["e4m3"] & fp8)) | ((fmt == 2) & ~(sup["e5m2"] & fp8)))
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
            if cfg.vector_unit:             # else they are refused as unknown opcodes, first
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
                # a unit outside the chain, or a token flag the unit has no counter for
                with m.Switch(f(Op.SYNC, "unit")):
                    for unit, tokens in isa.TOKEN_OF_FLAG.items():
                        with m.Case(unit):
                            m.d.comb += bad_field.eq(Cat(*[flag for flag, token in zip((pp, pn, up, un), tokens)
                                                           if token is None]).any())
                    with m.Default():
                        m.d.comb += bad_field.eq(1)
        # output: the first failed check, in isa.validate's order, from the registered checks
        checks = (~known, reserved | bad_field, bad_format, sram, misaligned, window)
        failed = [Signal(name=f"v_fail_{e.name.lower()}") for e in (E.BAD_OPCODE, E.BAD_FIELD, E.BAD_FORMAT,
                                                                     E.SRAM_RANGE, E.MISALIGNED, E.DRAM_WINDOW)]
        m.d.sync += [q.eq(c) for q, c in zip(failed, checks)]
        # the first failed check wins: later statements override earlier ones, so go backwards
        m.d.comb += code.eq(E.NONE)
        for fail, error in reversed(list(zip(failed, (E.BAD_OPCODE, E.BAD_FIELD, E.BAD_FORMAT, E.SRAM_RANGE,
                                                       E.MISALIGNED, E.DRAM_WINDOW)))):
            with m.If(fail):
                m.d.comb += code.eq(error)
        return m
