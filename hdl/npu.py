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
  ID 0 into a buffer of ``queue_depth`` entries, at least 2 and at most 4 (at least 3 on a
  256-bit bus, where a command is one beat; none at ``queue_depth`` 0 when a command is
  several beats: the dispatcher takes it from the register it was assembled in, and the next
  command is requested after that).
* **Dispatcher** takes each command with the verdict of the :class:`~.checks.CommandChecker`
  (the rules of :func:`fp8npu.hdl.isa.validate` in the same order, on the way from fetch to the
  dispatcher), then queues it for its unit, or stops with the error code and the command's
  address. ``END`` waits for every unit to go idle. If the dispatcher is blocked and no unit
  can make progress (every unit idle or waiting for a token), it stops with ``DEADLOCK``.
* **Units**: the ISA's unit chain (:data:`fp8npu.hdl.isa.UNIT_CHAIN`), each a Component of its
  own with the members of :func:`fp8npu.hdl.units.unit_members` (:attr:`NPUCore.UNIT_CLASSES`):
  :class:`~.dma.LoadUnit` copies strided DRAM rows into scratchpad or accumulator lines (AXI
  ID 1, several bursts in flight); :class:`~.compute.ComputeUnit` runs MATMUL through the array
  (weights for the next MATMUL load while the current one streams) and EPILOGUE/BLOCKSCALE in
  the :class:`~.units.VectorUnit`; :class:`~.dma.StoreUnit` converts accumulator lines and
  writes them with AXI bursts and byte strobes (AXI ID 2).
* **Tokens**: one counter per :class:`fp8npu.hdl.isa.Token` (a pair per pair of neighbouring
  units), wired to the units' token ports by :data:`fp8npu.hdl.isa.TOKEN_OF_FLAG`. A command
  waits until the tokens it pops are there; its pushes take effect after its effects are
  complete (compute pushes leave after the array has written the last row).

A unit joins by taking its place in ``UNIT_CHAIN`` and ``OPCODE_UNIT`` (the ISA) and in
``UNIT_CLASSES``; the queues, the dispatcher, the token counters and the deadlock detector
follow from those tables.

Latency of one MATMUL row: 1 (SRAM read) + R (array) cycles; throughput one row per cycle.
"""

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from . import isa
from .arith import SlicedMemory
from .axi import AxiLiteRegs, axi4_master_members
from .checks import CommandChecker, fld, reserved_set
from .compute import ComputeUnit
from .config import NPUConfig
from .dma import LoadUnit, StoreUnit, axi_write_members
from .units import pack_fields, unpack_fields

__all__ = ["NPU", "NPUCore", "hardware_problem"]

CMD = isa.COMMAND_BITS


def hardware_problem(cfg):
    """None if the hardware can be built for ``cfg``, else one sentence saying why not and
    what is allowed (the functional simulator runs every configuration)."""
    if cfg.accumulation == "block" and "e5m2" in cfg.formats and cfg.multipliers != "lut":
        return (f"block accumulation with E5M2 forms its products in LUTs (an E5M2 magnitude is wider than "
                f"the 18-bit multipliers): set multipliers to \"lut\", not \"{cfg.multipliers}\", or formats "
                f"to [\"e4m3\"]")
    return None


def _check_buildable(cfg, component):
    """Refuse, in one sentence, a configuration this hardware does not build (the refused
    ``component`` is marked used, so Amaranth does not warn about it)."""
    problem = hardware_problem(cfg)
    if problem:
        component._MustUse__used = True
        raise ValueError(problem)


class _Handover(Elaboratable):
    """A unit's queue when ``queue_depth`` is 0: none. The dispatcher hands a command straight
    to its unit, in the cycle the unit is free (the ports of a ``SyncFIFOBuffered``; the
    consumer's ``r_en`` is its ready, which does not wait for ``r_rdy``)."""

    def __init__(self, width):
        self.width = width
        self.w_data, self.w_en, self.w_rdy = Signal(width), Signal(), Signal()
        self.r_data, self.r_en, self.r_rdy = Signal(width), Signal(), Signal()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.r_data.eq(self.w_data), self.r_rdy.eq(self.w_en), self.w_rdy.eq(self.r_en)]
        return m


class _FetchSlot(Elaboratable):
    """The fetch buffer when there is none (``queue_depth`` 0 and commands of several beats):
    the ports of a ``SyncFIFOBuffered`` of one entry that is the writer's data itself. The
    fetch holds that data still until the entry is read, as it requests the next command only
    then (``w_level`` counts the entry)."""

    def __init__(self, width):
        self.w_data, self.w_en, self.w_rdy, self.w_level = Signal(width), Signal(), Signal(), Signal(range(2))
        self.r_data, self.r_en, self.r_rdy = Signal(width), Signal(), Signal()

    def elaborate(self, platform):
        m = Module()
        full = Signal()
        with m.If(self.w_en):
            m.d.sync += full.eq(1)
        with m.Elif(self.r_en):
            m.d.sync += full.eq(0)
        m.d.comb += [self.r_data.eq(self.w_data), self.r_rdy.eq(full), self.w_rdy.eq(~full), self.w_level.eq(full)]
        return m


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
    STORE_CONVERT = StoreUnit.STORE_CONVERT

    #: The hardware of each unit of :data:`fp8npu.hdl.isa.UNIT_CHAIN`.
    UNIT_CLASSES = {isa.Unit.LOAD: LoadUnit, isa.Unit.COMPUTE: ComputeUnit, isa.Unit.STORE: StoreUnit}

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
        # addresses inside the run are axi_addr_bits wide: the run starts only if its window lies
        # inside the address space (fetch_ok), so every DRAM address it makes is below 2**A
        A = cfg.axi_addr_bits
        max_commands = cfg.address_space // isa.COMMAND_BYTES      # the longest program that fits
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

        # ---------------- the units of the chain (isa.UNIT_CHAIN) --------------------------
        units = {u: self.UNIT_CLASSES[u](cfg) for u in isa.UNIT_CHAIN}
        for u, unit in units.items():
            m.submodules[f"{u.name.lower()}_unit"] = unit
            m.d.comb += [unit.active.eq(active), unit.stopped.eq(stopped)]
        load, compute, store = units[isa.Unit.LOAD], units[isa.Unit.COMPUTE], units[isa.Unit.STORE]

        # outstanding AXI work (a stopped core still drains it before it reports idle)
        rd_out = Signal(16)       # read bursts requested whose last beat has not arrived
        drained = (rd_out == 0) & ~store.writes_pending
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
        m.submodules.sp = sp = SlicedMemory(8 * Lsp, cfg.sp_lines, read_ports=2)
        sp_w, sp_ra, sp_rb = sp.write, sp.read0, sp.read1
        m.submodules.acc = acc = Memory(shape=32 * AV, depth=cfg.acc_lines, init=[])
        # per-value write enables when the vector unit writes a row in several passes
        acc_w = acc.write_port(granularity=32 if cfg.vector_passes > 1 else None)
        acc_rc = acc.read_port()
        acc_rs = acc.read_port()
        wiring.connect(m, load.sp_write, sp_w)
        wiring.connect(m, compute.sp_a, sp_ra)
        wiring.connect(m, compute.sp_b, sp_rb)
        wiring.connect(m, compute.acc_read, acc_rc)
        wiring.connect(m, store.acc_read, acc_rs)
        # the accumulator's write port: the compute unit's writes, else the load unit's (which
        # waits while the compute unit writes)
        m.d.comb += load.acc_busy.eq(compute.writing)
        with m.If(compute.writing):
            m.d.comb += [acc_w.en.eq(compute.acc_write.en), acc_w.addr.eq(compute.acc_write.addr),
                         acc_w.data.eq(compute.acc_write.data)]
        with m.Elif(load.acc_write.en):
            m.d.comb += [acc_w.en.eq(-1), acc_w.addr.eq(load.acc_write.addr), acc_w.data.eq(load.acc_write.data)]
        m.d.comb += [self.mac_ops.eq(compute.mac_ops), self.stalls.eq(compute.stalls)]

        # ---------------- tokens -----------------------------------------------------------
        # One counter per isa.Token (a pair per pair of neighbours in the chain), wired to the
        # units' token ports by isa.TOKEN_OF_FLAG.
        # A counter never exceeds its program-order balance (at most cfg.token_limit, checked by
        # the dispatcher) plus the pops dispatched but not yet taken (at most queue_depth + 1),
        # so these widths never wrap.
        tok_bits = (cfg.token_limit + cfg.queue_depth + 1).bit_length()
        tok = {t: Signal(tok_bits, name=f"tok_{t.name.lower()}") for t in isa.Token}
        tok_push = {t: [] for t in isa.Token}
        tok_pop = {t: [] for t in isa.Token}
        for u, unit in units.items():
            pop_prev, pop_next, push_prev, push_next = isa.TOKEN_OF_FLAG[u]
            port = unit.tokens
            # a flag without a counter is refused by the checks (BAD_FIELD) before it gets here
            m.d.comb += [port.have_prev.eq(1 if pop_prev is None else tok[pop_prev] != 0),
                         port.have_next.eq(1 if pop_next is None else tok[pop_next] != 0)]
            for token, flag, table in ((pop_prev, port.pop_prev, tok_pop), (pop_next, port.pop_next, tok_pop),
                                       (push_prev, port.push_prev, tok_push), (push_next, port.push_next, tok_push)):
                if token is not None:
                    table[token].append(flag)
        for t in isa.Token:
            m.d.sync += tok[t].eq(tok[t] + Cat(*tok_push[t]).any() - Cat(*tok_pop[t]).any())

        # ---------------- AXI read arbitration (ID 0 fetch, ID 1 load) --------------------
        f_ar_valid, f_ar_addr, f_ar_len, f_ar_ready = Signal(), Signal(A), Signal(8), Signal()
        pick_fetch = f_ar_valid
        m.d.comb += [
            ax("arvalid").eq((f_ar_valid | load.ar.valid) & active),
            ax("araddr").eq(Mux(pick_fetch, f_ar_addr, load.ar.payload.addr)),
            ax("arlen").eq(Mux(pick_fetch, f_ar_len, load.ar.payload.len)),
            ax("arid").eq(Mux(pick_fetch, 0, 1)),
            ax("arsize").eq(size_code), ax("arburst").eq(1),
            f_ar_ready.eq(ax("arready") & active & pick_fetch),
            load.ar.ready.eq(ax("arready") & active & ~pick_fetch),
        ]
        ar_fire = ax("arvalid") & ax("arready")
        r_fire = ax("rvalid") & ax("rready")
        m.d.sync += rd_out.eq(rd_out + ar_fire - (r_fire & ax("rlast")))
        r_fetch = ax("rvalid") & (ax("rid") == 0)
        m.d.comb += [load.r.valid.eq(ax("rvalid") & (ax("rid") == 1)), load.r.payload.eq(ax("rdata"))]
        f_r_ready = Signal()
        m.d.comb += ax("rready").eq(Mux(ax("rid") == 0, f_r_ready, load.r.ready) | stopped)
        # a beat with SLVERR or DECERR. A fetch beat's is noted as the beat is taken (f_r_ready
        # is a register's), and a refused LOAD beat stops the core whether or not the load unit
        # takes it in this cycle: neither depends on the load unit's ready, whose line
        # arithmetic is a long path.
        r_refused = ax("rvalid") & (ax("rresp") != 0)
        # bytes moved: a bus word per read beat (fetch and LOAD) and per write beat (STORE)
        w_fire = ax("wvalid") & ax("wready")
        if cfg.perf_counters:
            m.d.sync += self.dma_bytes.eq(self.dma_bytes + (Cat(r_fire, 0) + w_fire) * B)
        # the store unit has the write channels to itself
        for name, member in axi_write_members("m_axi", cfg.axi_data_bits, cfg.axi_addr_bits).items():
            if member.flow == Out:
                m.d.comb += getattr(self, name).eq(getattr(store, name))
            else:
                m.d.comb += getattr(store, name).eq(getattr(self, name))

        # ---------------- fetch ------------------------------------------------------------
        # A fetched command is buffered when it is complete (the ISA's field bits only: reserved
        # bits are checked as the beats arrive) and enters the checks at the same time; its
        # verdict, its address and whether the bus refused a beat (reported as BUS_ERROR when the
        # command reaches the dispatcher, in program order) follow the checker's latency later
        # into a second buffer.
        fetch_ranges = isa.field_ranges(list(isa.Opcode), cfg)
        fetch_bits = sum(w for _, w in fetch_ranges)
        # as deep as a unit's queue, from 2 (so one command is fetched while another waits) to 4.
        # The buffer is written without a ready test (requests are only made while it has room
        # for their commands), and a SyncFIFOBuffered of depth 2 takes no write in the cycle
        # after one: so when a command is one beat (a 256-bit bus) and commands can arrive back
        # to back, it is at least 3 deep. Without queues (queue_depth 0) and with commands of
        # several beats there is no buffer: the dispatcher takes the command from the fetch's
        # assembly register, and the next command is requested when it has taken it.
        beats_per_cmd = max(CMD // D, 1)
        fetch_depth = max(2, min(4, cfg.queue_depth))
        if beats_per_cmd == 1:
            fetch_depth = max(3, fetch_depth)
        elif cfg.queue_depth == 0:
            fetch_depth = 1
        # two buffers in step: the commands' field bits, written when a command is complete, and
        # (the checker's latency later) each command's verdict, address and refused flag;
        # so no register carries a command through the checker's stages
        if fetch_depth == 1:
            m.submodules.fetch_q = fq = _FetchSlot(fetch_bits)
            m.submodules.verdict_q = vq = _FetchSlot(8 + A + 1)
        else:
            m.submodules.fetch_q = fq = SyncFIFOBuffered(width=fetch_bits, depth=fetch_depth)
            m.submodules.verdict_q = vq = SyncFIFOBuffered(width=8 + A + 1, depth=fetch_depth)
        f_inflight = Signal(4)       # commands requested, not yet in the buffer
        f_started = Signal()
        prog_end = Signal(38)        # PROG_ADDR + 32 x PROG_LEN, never truncated
        m.d.comb += prog_end.eq(self.prog_addr + (self.prog_len << 5))
        fetch_ok = ((self.prog_addr & 31) == 0) & ((self.prog_addr & (B - 1)) == 0) \
            & (self.prog_addr >= self.win_base) & (prog_end <= self.win_limit) \
            & (self.win_limit <= cfg.address_space)
        # The program's window is checked once, as the run starts; from then on the requests
        # come from registers only (the next address, whether commands are left), never from
        # the program registers' arithmetic
        f_go = Signal()              # started, and the program lies inside the window
        f_left = Signal(range(max_commands + 1))     # commands not yet requested
        f_more = Signal()            # f_left != 0
        with m.If(running & ~f_started):
            m.d.sync += [f_started.eq(1), f_go.eq(fetch_ok), f_left.eq(self.prog_len), f_more.eq(self.prog_len != 0),
                         f_ar_addr.eq(self.prog_addr)]
            with m.If(~fetch_ok):
                m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.FETCH_WINDOW), raise_addr.eq(self.prog_addr)]
        room = (vq.w_level + f_inflight) < fetch_depth
        m.d.comb += [
            f_ar_valid.eq(f_go & f_more & room & active),
            f_ar_len.eq(beats_per_cmd - 1),
        ]
        f_got = Signal()
        with m.If(f_ar_valid & f_ar_ready):
            m.d.sync += [f_left.eq(f_left - 1), f_more.eq(f_left != 1), f_ar_addr.eq(f_ar_addr + 32)]
        m.d.sync += f_inflight.eq(f_inflight + (f_ar_valid & f_ar_ready) - f_got)
        # assemble beats into commands (v_in: one is complete). Each beat is written to its own
        # place (no shift register), so only the bits of the ISA's fields are kept; whether a beat
        # sets a bit reserved for the command's opcode (from the first beat) is found as it arrives.
        # A command of one beat (a 256-bit bus) enters the checker as it arrives, and the checker
        # registers it. A command of several beats is assembled in one register that is the
        # checker's input (the checker keeps no copy): v_in, the command's address and its flags
        # are registered with its last beat, and the fetch takes no beat in the cycle after, so
        # the register holds the command for both of the checker's cycles.
        held = beats_per_cmd > 1
        v_in, v_cmd, v_info, v_reserved = Signal(), Signal(CMD), Signal(A + 1), Signal()
        f_beat = Signal(range(beats_per_cmd + 1))
        f_recv = Signal(range(max_commands + 1))     # commands fetched so far
        f_bad = Signal()             # a beat of the command being assembled was refused
        f_addr = (self.prog_addr + (f_recv << 5))[:A]
        rdata = ax("rdata")
        m.d.comb += f_r_ready.eq(~v_in if held else 1)
        if held:
            m.d.sync += v_in.eq(0)
        with m.If(r_fetch & f_r_ready & ~stopped):
            if not held:
                m.d.comb += [v_in.eq(1), v_cmd.eq(rdata[0:CMD]), v_info.eq(Cat(f_addr, r_refused)),
                             v_reserved.eq(reserved_set(rdata[0:CMD], rdata[0:8]))]
                m.d.sync += f_recv.eq(f_recv + 1)
            else:
                f_op = v_cmd[0:8]
                f_resv = Signal()            # an earlier beat set a reserved bit
                beat_resv = reserved_set(rdata, Mux(f_beat == 0, rdata[0:8], f_op), f_beat)
                with m.Switch(f_beat):
                    for i in range(beats_per_cmd):
                        with m.Case(i):
                            m.d.sync += v_cmd[i * D:(i + 1) * D].eq(rdata)
                m.d.sync += f_beat.eq(f_beat + 1)
                with m.If(f_beat == beats_per_cmd - 1):
                    m.d.sync += [v_in.eq(1), v_info.eq(Cat(f_addr, f_bad | r_refused)),
                                 v_reserved.eq(f_resv | beat_resv)]
                    m.d.sync += [f_beat.eq(0), f_recv.eq(f_recv + 1), f_bad.eq(0), f_resv.eq(0)]
                with m.Else():
                    m.d.sync += [f_bad.eq(f_bad | r_refused), f_resv.eq(f_resv | beat_resv)]

        # the checker registers a command of one beat as it enters (the assembly and the range
        # products would be one path otherwise)
        m.submodules.checker = checker = CommandChecker(cfg, spacing=beats_per_cmd, held=held, stages=cfg.check_stages)
        m.d.comb += [checker.valid.eq(v_in), checker.cmd.eq(v_cmd), checker.reserved.eq(v_reserved), checker.win_base.eq(self.win_base[:A + 1]),
                     checker.win_limit.eq(self.win_limit[:A + 1])]
        m.d.comb += [fq.w_en.eq(v_in & ~stopped), fq.w_data.eq(pack_fields(v_cmd, fetch_ranges))]
        # the command's address and refused flag wait beside the checks: in their assembly
        # register (a held command: the next one is complete no earlier than its verdict), else
        # in one register when the next command cannot enter before the verdict is out, else in
        # a register per stage
        v_valid, v_carry = v_in, v_info
        if not held and beats_per_cmd >= checker.latency:
            v_carry = Signal(A + 1, name="v_info")
            with m.If(v_in):
                m.d.sync += v_carry.eq(v_info)
        for stage in range(checker.latency):
            valid_q = Signal(name=f"v_valid{stage + 1}")
            m.d.sync += valid_q.eq(v_valid & ~stopped)
            v_valid = valid_q
            if beats_per_cmd < checker.latency:
                carry_q = Signal(A + 1, name=f"v_info{stage + 1}")
                m.d.sync += carry_q.eq(v_carry)
                v_carry = carry_q
        m.d.comb += [vq.w_en.eq(v_valid & ~stopped), vq.w_data.eq(Cat(checker.verdict, v_carry)), f_got.eq(v_valid)]

        # ---------------- unit queues ---------------------------------------------------------
        # entries: the command and its address (where its errors are reported); a queue keeps the
        # bits of its unit's fields (isa.field_ranges), the unit sees the command at ISA positions
        queues, unit_ranges = {}, {}
        for u, unit in units.items():
            ranges = unit_ranges[u] = isa.field_ranges(isa.unit_opcodes(u, cfg), cfg)
            width = sum(w for _, w in ranges) + A
            q = SyncFIFOBuffered(width=width, depth=cfg.queue_depth) if cfg.queue_depth else _Handover(width)
            m.submodules[f"{u.name.lower()}_q"] = queues[u] = q
            packed = q.r_data[:-A]
            m.d.comb += [unit.commands.payload.cmd.eq(unpack_fields(packed, ranges)),
                         unit.commands.payload.addr.eq(q.r_data[-A:]),
                         unit.commands.valid.eq(q.r_rdy), q.r_en.eq(unit.commands.ready)]

        # ---------------- dispatcher --------------------------------------------------------
        # the verdict buffer's head is the command buffer's head (written the checker's latency earlier)
        cmd = unpack_fields(fq.r_data, fetch_ranges)
        verdict = vq.r_data[0:8]
        cmd_addr = vq.r_data[8:8 + A]
        fetch_refused = vq.r_data[8 + A]
        op = cmd[0:8]
        sync_unit = fld(cmd, isa.Opcode.SYNC, "unit")
        target = Signal(range(len(isa.UNIT_CHAIN)))       # the unit that takes the command
        with m.Switch(op):
            for opcode, u in isa.OPCODE_UNIT.items():
                with m.Case(opcode):
                    m.d.comb += target.eq(u)
            with m.Case(isa.Opcode.SYNC):
                m.d.comb += target.eq(sync_unit)
        dispatched = Signal(range(max_commands + 1))
        m.d.comb += self.commands.eq(dispatched)
        at_end = Signal()
        units_idle = Signal()
        head = vq.r_rdy & active & ~at_end
        q_ready = Signal()
        with m.Switch(target):
            for u, q in queues.items():
                with m.Case(u):
                    m.d.comb += q_ready.eq(q.w_rdy)
        blocked_on_queue = Signal()
        for u, q in queues.items():
            m.d.comb += q.w_data.eq(Cat(pack_fields(cmd, unit_ranges[u]), cmd_addr))
        # program-order token balances (isa.token_check): pushes minus pops of dispatched commands
        bal_bits = (cfg.token_limit + 1).bit_length() + (cfg.queue_depth + 2).bit_length() + 1
        balance = [Signal(range(-(1 << (bal_bits - 1)), 1 << (bal_bits - 1)), name=f"tok_balance{i}")
                   for i in range(len(isa.Token))]
        deltas = self._token_deltas(m, cmd, target)
        over_limit = Signal()
        m.d.comb += over_limit.eq(Cat(*[(d > 0) & (b == cfg.token_limit) for b, d in zip(balance, deltas)]).any())
        with m.If(head):
            with m.If(fetch_refused):
                m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.BUS_ERROR), raise_addr.eq(cmd_addr)]
            with m.Elif(verdict != 0):
                m.d.comb += [raise_err.eq(1), raise_code.eq(verdict), raise_addr.eq(cmd_addr)]
            with m.Elif(over_limit & (op != isa.Opcode.END)):
                m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.TOKEN_LIMIT), raise_addr.eq(cmd_addr)]
            with m.Elif(op == isa.Opcode.END):
                m.d.comb += [fq.r_en.eq(1), vq.r_en.eq(1)]
                m.d.sync += [at_end.eq(1), dispatched.eq(dispatched + 1)]
            with m.Elif(q_ready):
                m.d.comb += [fq.r_en.eq(1), vq.r_en.eq(1)]
                with m.Switch(target):
                    for u, q in queues.items():
                        with m.Case(u):
                            m.d.comb += q.w_en.eq(1)
                m.d.sync += dispatched.eq(dispatched + 1)
                m.d.sync += [b.eq(b + d) for b, d in zip(balance, deltas)]
            with m.Else():
                m.d.comb += blocked_on_queue.eq(1)
        blocked_addr = Signal(A)
        with m.If(head):
            m.d.sync += blocked_addr.eq(cmd_addr)
        # a program that runs out without END
        with m.If(active & ~at_end & (dispatched == self.prog_len) & f_go):
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.NO_END),
                         raise_addr.eq(self.prog_addr + (self.prog_len << 5))]
        queues_empty = Cat(*[~q.r_rdy for q in queues.values()]).all()
        m.d.comb += units_idle.eq(Cat(*[unit.idle for unit in units.values()]).all())
        with m.If(at_end & units_idle & queues_empty & active):
            m.d.sync += done.eq(1)

        # ---------------- deadlock ------------------------------------------------------------
        # every unit idle with an empty queue, or waiting for a token; the dispatcher blocked
        stuck = Cat(*[(unit.idle & ~queues[u].r_rdy) | unit.waiting for u, unit in units.items()]).all()
        no_progress = stuck & (blocked_on_queue | at_end) & ~(at_end & units_idle) & active
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
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.BUS_ERROR), raise_addr.eq(load.cmd_addr)]
        with m.If(ax("bvalid") & ax("bready") & (ax("bresp") != 0) & active):
            m.d.comb += [raise_err.eq(1), raise_code.eq(isa.ErrorCode.BUS_ERROR), raise_addr.eq(store.cmd_addr)]
        return m

    @staticmethod
    def _token_deltas(m, cmd, target):
        """Per token counter, +1 / -1 / 0: how dispatching ``cmd`` (for unit ``target``) changes
        its program-order balance (the mirror of :func:`fp8npu.hdl.isa.token_deltas`)."""
        flags = [fld(cmd, isa.Opcode.SYNC, n) for n in ("pop_prev", "pop_next", "push_prev", "push_next")]
        deltas = [Signal(range(-1, 2), name=f"tok_delta{t}") for t in range(len(isa.Token))]
        with m.Switch(target):
            for unit, tokens in isa.TOKEN_OF_FLAG.items():
                with m.Case(unit):
                    for flag, token, sign in zip(flags, tokens, (-1, -1, 1, 1)):
                        if token is not None:
                            m.d.comb += deltas[token].eq(Mux(flag, sign, 0))
        return deltas


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
        start = Signal()          # CTRL.start accepted
        reset = Signal()          # ... registered: resets the core (a register, so the reset's
        start_q = Signal()        # fan-out to every flip-flop starts at one); then the core starts
        m.submodules.core = ResetInserter({"sync": reset})(core)
        Rg = isa.Register
        prog_addr, prog_len, win_base, win_limit = (Signal(32, name=n) for n in
                                                    ("r_prog_addr", "r_prog_len", "r_win_base", "r_win_limit"))
        status = Signal(32)
        # from the accepted start until the core runs, STATUS shows busy (not the last run's state)
        starting = reset | start_q
        busy, done, error = core.busy | starting, core.done & ~starting, core.error_valid & ~starting
        m.d.comb += [status.eq(Cat(busy, done, error)), self.status.eq(status[:3]),
                     self.irq.eq(~busy & (done | error))]
        config_word = isa.config_word(cfg)
        regs = {
            Rg.STATUS: (status, False), Rg.ERROR: (core.error_code, False), Rg.ERROR_ADDR: (core.error_addr, False),
            Rg.PROG_ADDR: (prog_addr, True), Rg.PROG_LEN: (prog_len, True), Rg.WIN_BASE: (win_base, True),
            Rg.WIN_LIMIT: (win_limit, True), Rg.CYCLES: (core.cycles, False),
            Rg.CONFIG: (Const(config_word, 32), False), Rg.COMMANDS: (core.commands, False),
        }
        # (without perf_counters those registers are not built and read 0)
        if cfg.perf_counters:
            regs.update({Rg.MAC_BUSY: (core.mac_ops, False), Rg.DMA_BYTES: (core.dma_bytes, False),
                         Rg.STALL: (core.stalls, False)})
        m.submodules.regs = regs_block = AxiLiteRegs(regs, Rg.CTRL)
        # the run registers hold still while the NPU is busy (writes then are dropped): a run
        # uses the program and window it started with
        m.d.comb += regs_block.locked.eq(busy)
        for name in regs_block.signature.members:
            if name.startswith("s_axil_"):
                port = getattr(self, name)
                inner = getattr(regs_block, name)
                if regs_block.signature.members[name].flow == wiring.In:
                    m.d.comb += inner.eq(port)
                else:
                    m.d.comb += port.eq(inner)
        # CTRL.start: the core is reset in the next cycle and starts in the one after
        m.d.comb += start.eq(regs_block.strobe & regs_block.strobe_data[0] & ~busy)
        m.d.sync += [reset.eq(start), start_q.eq(reset)]
        m.d.comb += [core.start.eq(start_q), core.prog_addr.eq(prog_addr), core.prog_len.eq(prog_len),
                     core.win_base.eq(win_base), core.win_limit.eq(win_limit)]
        for name, member in core.signature.members.items():
            if name.startswith("m_axi_"):
                if member.flow == wiring.In:
                    m.d.comb += getattr(core, name).eq(getattr(self, name))
                else:
                    m.d.comb += getattr(self, name).eq(getattr(core, name))
        return m
