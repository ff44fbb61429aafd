"""The MAC array: R x C FP8 multipliers with FP32 accumulation, weight-stationary.

Dataflow. The array holds an R x C weight tile ``W[kk][j]`` (K x N). Each cycle one row of A
(R FP8 values ``a[0..R-1]``) and the row's starting accumulators (C FP32 values) may enter.
Partial sums move *down* the array: stage ``kk`` adds ``a[kk] * W[kk][j]`` to column j's
partial sum with one FP32 round-to-nearest-even addition and registers it. ``a[kk]`` is
delayed by ``kk`` cycles so it meets its row's partial sum at stage ``kk``, and is broadcast
across the C columns. So every output is exactly
``acc = fp32(...fp32(fp32(acc0 + a[0]W[0][j]) + a[1]W[1][j])... )`` in k order, as the
numerics contract requires, whatever the array size. Stages ``kk >= k`` (a row's ``k`` input)
pass the partial sum through unchanged, so padded K positions add nothing.

Weights are double-buffered: ``w_we`` writes one row of the shadow tile per cycle while rows
stream; a row entering with ``in_swap`` set makes each stage copy its shadow row into its
active row as that row reaches it (stage ``kk`` at ``kk`` cycles later). Shadow row ``kk`` may
be rewritten from ``kk + 1`` cycles after the swapping row entered.

Latency R cycles from ``in_valid`` to ``out_valid``; throughput one row (R x C MACs) per cycle.

Members
-------
in_valid : In(1)
in_a : In(8 * R)          A row, element kk in bits [8kk, 8kk+8)
in_acc : In(32 * C)       starting accumulators
in_k : In(range(R + 1))   reduction length of this row (stages >= k pass through)
in_fmt_a, in_fmt_b : In(1)
in_addr : In(addr_bits)   accumulator line tag, returned with the result (16 bits unless given)
in_swap : In(1)           this row uses the shadow weights (first row of a new tile)
w_we : In(1), w_row : In(range(R)), w_data : In(8 * C)
out_valid : Out(1), out_addr : Out(addr_bits), out_acc : Out(32 * C)
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .blockpe import PRODUCTS, BlockPE, BlockRound, FP8Decode, block_numbers, column_width, decoded_fields
from .fpadd import STAGE_REGS, fp32_add
from .fpmul import FP8Multiplier

__all__ = ["MACArray", "BlockArray", "partial_width"]


class MACArray(wiring.Component):
    def __init__(self, rows, cols, addr_bits=16):
        self.rows, self.cols = rows, cols
        self.latency = rows
        super().__init__({
            "in_valid": In(1), "in_a": In(8 * rows), "in_acc": In(32 * cols), "in_k": In(range(rows + 1)),
            "in_fmt_a": In(1), "in_fmt_b": In(1), "in_addr": In(addr_bits), "in_swap": In(1),
            "w_we": In(1), "w_row": In(range(max(rows, 2))), "w_data": In(8 * cols),
            "out_valid": Out(1), "out_addr": Out(addr_bits), "out_acc": Out(32 * cols),
        })

    def elaborate(self, platform):
        m = Module()
        R, C = self.rows, self.cols
        shadow = [Signal(8 * C, name=f"shadow{kk}") for kk in range(R)]
        with m.If(self.w_we):
            for kk in range(R):
                with m.If(self.w_row == kk):
                    m.d.sync += shadow[kk].eq(self.w_data)

        # A operand delay lines: a[kk] is used by stage kk, kk cycles after entry.
        a_at = []
        for kk in range(R):
            v = self.in_a[8 * kk:8 * kk + 8]
            for d in range(kk):
                r = Signal(8, name=f"a{kk}_d{d + 1}")
                m.d.sync += r.eq(v)
                v = r
            a_at.append(v)

        # Stage inputs (stage 0 from the ports) and registered outputs.
        valid, k, fa, fb, addr, swap = (self.in_valid, self.in_k, self.in_fmt_a, self.in_fmt_b,
                                        self.in_addr, self.in_swap)
        psum = [self.in_acc[32 * j:32 * j + 32] for j in range(C)]
        for kk in range(R):
            active = Signal(8 * C, name=f"w{kk}")
            with m.If(valid & swap):
                m.d.sync += active.eq(shadow[kk])
            # the row at this stage uses the shadow row when it carries the swap flag
            weights = Mux(swap, shadow[kk], active)
            nxt = []
            for j in range(C):
                mul = FP8Multiplier(stages=0)
                m.submodules[f"mul_{kk}_{j}"] = mul
                m.d.comb += [mul.a.eq(a_at[kk]), mul.b.eq(weights[8 * j:8 * j + 8]),
                             mul.fmt_a.eq(fa), mul.fmt_b.eq(fb)]
                total = fp32_add(m, psum[j], mul.product, prefix=f"pe{kk}_{j}_")
                r = Signal(32, name=f"psum{kk}_{j}")
                m.d.sync += r.eq(Mux(k > kk, total, psum[j]))
                nxt.append(r)
            psum = nxt
            regs = [Signal.like(x, name=f"s{kk + 1}_{n}") for x, n in
                    ((valid, "valid"), (k, "k"), (fa, "fa"), (fb, "fb"), (addr, "addr"), (swap, "swap"))]
            m.d.sync += [r.eq(x) for r, x in zip(regs, (valid, k, fa, fb, addr, swap))]
            valid, k, fa, fb, addr, swap = regs

        m.d.comb += [self.out_valid.eq(valid), self.out_addr.eq(addr)]
        for j in range(C):
            m.d.comb += self.out_acc[32 * j:32 * j + 32].eq(psum[j])
        return m


def partial_width(rows, acc_block, formats=("e4m3",)):
    """Bits of one column's exact block partial (two's complement, units of
    :class:`~.blockpe.BlockNumbers` ``frac``): a block has at most ``acc_block`` products, a
    K tile at most ``rows``."""
    nums = block_numbers(formats)
    return max(column_width(rows, formats), nums.product_bits + max(1, (acc_block - 1).bit_length()) + 1)


class BlockArray(wiring.Component):
    """The MAC array in block accumulation (docs/numerics.md section 3), the FP8 formats of
    ``formats`` (E4M3, E5M2 or both; with E5M2 the products are formed in LUTs).

    Same dataflow and weight double-buffering as :class:`MACArray`: an R x C weight tile is
    stationary, one A row enters per cycle, ``a[kk]`` meets its row at stage ``kk``, partial
    sums move down the columns. But the processing elements (:class:`~.blockpe.BlockPE`) add
    *exact* products into a fixed-point column sum; there is no floating-point adder in the
    array. Below each column:

    1. ``P = (accumulate ? PART : exact 0) + column sum``, exactly (the one's-complement
       corrections the PEs counted are added here). ``P`` is written back to the line's partial
       (``out_part`` at ``part_wr_addr`` with ``part_we``, the cycle after it is summed, not
       carried down to the row's output) whatever the flags.
    2. With ``commit``: ``s = round32(P)`` (:class:`~.blockpe.BlockRound`, ``round_stages``
       registers), then ``ACC = fp32((fresh ? +0 : ACC) + s)`` (one binary32 RNE addition,
       ``add_stages`` registers) and ``out_commit`` asks for the accumulator line to be written.

    The array reads the two lines it needs itself, when the row reaches them, through
    ``part_rd_*`` (one cycle before the sum needs it) and ``acc_rd_*`` (two cycles before the
    addition; the line is registered on the way): both are synchronous-read memory ports, the
    data coming back on ``part_data`` / ``acc_data`` the next cycle. A row that reads a line must not enter while an earlier row
    that writes it is inside the array (the compute unit checks that at issue).

    Weights are decoded once when written to the shadow tile (``w_we``) and copied into the
    PEs of stage ``kk`` by the swapping row ``kk`` cycles after it entered, as in
    :class:`MACArray`; shadow row ``kk`` may be rewritten from ``kk + 1`` cycles after the
    swapping row entered.

    A partial line holds, per column, ``pw`` = :func:`partial_width` bits of ``P`` then its
    NaN flag, its negative-zero flag (every product -0) and, with E5M2, its +inf and -inf
    flags (:attr:`part_bits` bits per column); an all-zero line is the exact +0 of an empty
    block.

    Formats: a weight is decoded by ``w_fmt`` as it is written, an activation row by its
    ``in_fmt`` (0 E4M3, 1 E5M2, as the MATMUL's ``fmt_b``/``fmt_a``; ignored with one format).

    ``rounders``: how many of those rounding-and-addition pipelines are built (0: one per
    column). With fewer than C, a commit row's C sums take ``passes`` = ceil(C / rounders)
    cycles through them (pass ``p`` handles columns ``p * rounders ...``); the first pass's
    columns come straight from the sums, later ones from a register holding the row's sums, and
    each pass's results wait in a register until the last is done. Every row then takes
    ``passes - 1`` cycles more, and commit rows must enter at least ``passes`` cycles apart
    (the compute unit spaces them); other rows enter every cycle.

    ``product`` chooses how the PEs form their products (:data:`~.blockpe.PRODUCTS`: on
    multipliers or in LUTs), for the whole array or as one form per column (a tuple: an array
    larger than the FPGA's multiplier count puts some columns on multipliers, the rest in LUTs).

    ``pe_stages`` (1..3, default :attr:`~.blockpe.BlockPE.LATENCY`) is each PE's latency.

    Latency :attr:`latency` = R + 1 + ``pe_stages`` + ``round_stages`` +
    ``add_stages`` + ``passes`` - 1 cycles from ``in_valid`` to ``out_valid``; throughput one
    row (R x C MACs) per cycle, a commit row one per ``passes`` cycles.

    Members
    -------
    in_valid, in_swap : In(1)
    in_a : In(8 * R), in_fmt : In(1), in_k : In(range(R + 1)), in_addr : In(addr_bits)   (16 unless given)
    in_accum, in_commit, in_fresh : In(1)       the MATMUL's accumulate, commit, fresh
    w_we : In(1), w_fmt : In(1), w_row : In(range(R)), w_data : In(8 * C)
    part_rd_en : Out(1), part_rd_addr : Out(addr_bits), part_data : In(C * part_bits)
    acc_rd_en : Out(1), acc_rd_addr : Out(addr_bits), acc_data : In(32 * C)
    out_valid, out_commit : Out(1), out_addr : Out(addr_bits), out_acc : Out(32 * C)
    part_we : Out(1), part_wr_addr : Out(addr_bits), out_part : Out(C * part_bits)   the new partial line,
              R + 1 + pe_stages cycles after ``in_valid``
    """

    def __init__(self, rows, cols, acc_block=128, round_stages=4, add_stages=5, product="dsp", formats=("e4m3",),
                 addr_bits=16, rounders=0, pe_stages=BlockPE.LATENCY):
        if add_stages not in (1, 2, 3, 4, 5):
            raise ValueError(f"add_stages must be 1 to 5, not {add_stages!r}")
        if not (isinstance(rounders, int) and 0 <= rounders <= cols):
            raise ValueError(f"rounders must be 0 (one per column) to {cols}, not {rounders!r}")
        self.rounders = rounders or cols
        self.passes = -(-cols // self.rounders)
        self.rows, self.cols = rows, cols
        self.formats = formats = tuple(formats)
        self.numbers = nums = block_numbers(formats)
        self.pw = pw = partial_width(rows, acc_block, formats)
        #: the partial's flags, in their order after the pw bits of the sum
        self.part_flags = ("nan", "neg_zero") + (("pos_inf", "neg_inf") if nums.e5m2 else ())
        self.part_bits = pb = pw + len(self.part_flags)
        self.round_stages, self.add_stages = round_stages, add_stages
        if pe_stages not in (1, 2, 3):
            raise ValueError(f"pe_stages must be 1, 2 or 3, not {pe_stages!r}")
        self.pe_stages = pe_stages
        products = (product,) * cols if isinstance(product, str) else tuple(product)
        if len(products) != cols or any(p not in PRODUCTS for p in products):
            raise ValueError(f"product must be one of {', '.join(PRODUCTS)} or one of them per column "
                             f"({cols}), not {product!r}")
        if nums.e5m2 and "dsp" in products:
            raise ValueError("with E5M2 the products are formed in LUTs: product must be 'lut', not "
                             f"{product!r}")
        self.product = product
        self.products = products
        self.latency = rows + 1 + pe_stages + round_stages + add_stages + self.passes - 1
        super().__init__({
            "in_valid": In(1), "in_a": In(8 * rows), "in_fmt": In(1), "in_k": In(range(rows + 1)),
            "in_addr": In(addr_bits), "in_swap": In(1), "in_accum": In(1), "in_commit": In(1), "in_fresh": In(1),
            "w_we": In(1), "w_fmt": In(1), "w_row": In(range(max(rows, 2))), "w_data": In(8 * cols),
            "part_rd_en": Out(1), "part_rd_addr": Out(addr_bits), "part_data": In(cols * pb),
            "acc_rd_en": Out(1), "acc_rd_addr": Out(addr_bits), "acc_data": In(32 * cols),
            "out_valid": Out(1), "out_commit": Out(1), "out_addr": Out(addr_bits), "out_acc": Out(32 * cols),
            "part_we": Out(1), "part_wr_addr": Out(addr_bits), "out_part": Out(cols * pb),
        })

    def elaborate(self, platform):
        m = Module()
        R, C, pw, pb, formats = self.rows, self.cols, self.pw, self.part_bits, self.formats
        # a weight is kept decoded in the fields its column's PEs take; an activation, broadcast
        # along its row, in the fields of every product form the row has
        col_fields = [decoded_fields(p, formats) for p in self.products]
        a_fields = tuple(dict.fromkeys(f for fields in col_fields for f in fields))
        col_at = [0]
        for fields in col_fields:
            col_at.append(col_at[-1] + sum(bits for _, bits in fields))
        dw = sum(bits for _, bits in a_fields)

        def decode(code, fmt, name, fields):
            m.submodules[name] = dec = FP8Decode(formats)
            m.d.comb += [dec.code.eq(code), dec.fmt.eq(fmt)]
            return Cat(*(getattr(dec, field) for field, _ in fields))

        def connect(pe, prefix, value, fields, wanted):
            """Drive a PE's ``prefix``-fields (``wanted``) from a decoded code laid out as ``fields``."""
            at = 0
            for field, bits in fields:
                if (field, bits) in wanted:
                    m.d.comb += getattr(pe, f"{prefix}_{field}").eq(value[at:at + bits])
                at += bits

        # shadow tile, decoded as it is written
        w_dec = [decode(self.w_data[8 * j:8 * j + 8], self.w_fmt, f"wdec{j}", col_fields[j]) for j in range(C)]
        shadow = [Signal(col_at[-1], name=f"shadow{kk}") for kk in range(R)]
        with m.If(self.w_we):
            for kk in range(R):
                with m.If(self.w_row == kk):
                    m.d.sync += shadow[kk].eq(Cat(*w_dec))

        # control pipeline: stage s holds the row that entered s cycles ago
        names = ("valid", "swap", "k", "addr", "accum", "commit", "fresh", "fmt")
        ctrl = [{"valid": self.in_valid, "swap": self.in_swap, "k": self.in_k, "addr": self.in_addr,
                 "accum": self.in_accum, "commit": self.in_commit, "fresh": self.in_fresh, "fmt": self.in_fmt}]
        for s in range(self.latency):
            regs = {n: Signal.like(ctrl[-1][n], name=f"c{s + 1}_{n}") for n in names}
            m.d.sync += [regs[n].eq(ctrl[-1][n]) for n in names]
            ctrl.append(regs)

        # activations: a[kk] reaches stage kk's PEs kk + 1 cycles after entry, decoded (the
        # last of those registers holds it decoded), and is broadcast along its row; stage kk's
        # PEs load the shadow row kk cycles after entry
        width = column_width(R, formats)
        above = None
        for kk in range(R):
            v = self.in_a[8 * kk:8 * kk + 8]
            for d in range(kk):
                r = Signal(8, name=f"a{kk}_d{d + 1}")
                m.d.sync += r.eq(v)
                v = r
            a = Signal(dw, name=f"a{kk}_dec")
            m.d.sync += a.eq(decode(v, ctrl[kk]["fmt"], f"adec{kk}", a_fields))
            at = ctrl[kk + 1]
            load = ctrl[kk]["valid"] & ctrl[kk]["swap"]
            row = []
            for j in range(C):
                pe = BlockPE(width, self.products[j], formats, self.pe_stages)
                m.submodules[f"pe_{kk}_{j}"] = pe
                connect(pe, "w", shadow[kk][col_at[j]:col_at[j + 1]], col_fields[j], col_fields[j])
                connect(pe, "a", a, a_fields, col_fields[j])
                m.d.comb += [pe.w_load.eq(load), pe.a_valid.eq(at["valid"] & (at["k"] > kk))]
                if above is None:
                    m.d.comb += pe.neg_zero_in.eq(1)
                else:
                    up = above[j]
                    m.d.comb += [pe.psum_in.eq(up.psum_out), pe.negs_in.eq(up.negs_out)]
                    m.d.comb += [getattr(pe, f"{f}_in").eq(getattr(up, f"{f}_out")) for f in self.part_flags]
                row.append(pe)
            above = row

        # below the columns. Stage R + PE latency: the column sums; the partial line read a cycle before.
        bottom = R + self.pe_stages
        m.d.comb += [self.part_rd_en.eq(ctrl[bottom - 1]["valid"] & ctrl[bottom - 1]["accum"]),
                     self.part_rd_addr.eq(ctrl[bottom - 1]["addr"])]
        at = ctrl[bottom]
        m.d.comb += [self.part_we.eq(ctrl[bottom + 1]["valid"]), self.part_wr_addr.eq(ctrl[bottom + 1]["addr"])]
        rs = self.round_stages
        sum_at = bottom + 1 + rs                 # stage of the binary32 addition's inputs
        # the accumulator line is read two cycles ahead and registered (a block RAM's output
        # is slow: it does not go straight into the adder)
        ahead = ctrl[sum_at - 2]
        m.d.comb += [self.acc_rd_en.eq(ahead["valid"] & ahead["commit"] & ~ahead["fresh"]),
                     self.acc_rd_addr.eq(ahead["addr"])]
        # ... with +0 for a fresh line folded into that register (not a multiplexer in front of
        # the adder's operand ordering)
        acc_q = Signal(32 * C, name="acc_q")
        acc_next = Mux(ctrl[sum_at - 1]["fresh"], 0, self.acc_data)
        if self.passes == 1:
            m.d.sync += acc_q.eq(acc_next)
        else:                       # kept while the row's passes use it
            with m.If(ctrl[sum_at - 1]["valid"] & ctrl[sum_at - 1]["commit"]):
                m.d.sync += acc_q.eq(acc_next)
        out = ctrl[self.latency]
        m.d.comb += [self.out_valid.eq(out["valid"]), self.out_commit.eq(out["valid"] & out["commit"]),
                     self.out_addr.eq(out["addr"])]
        sums = []
        for j in range(C):
            pe = above[j]
            old = self.part_data[pb * j:pb * (j + 1)]
            old_total = Signal(signed(pw), name=f"part_in{j}")
            m.d.comb += old_total.eq(old[0:pw])
            total = Signal(signed(pw), name=f"part{j}")
            flags = {}
            m.d.sync += total.eq(pe.psum_out + pe.negs_out + Mux(at["accum"], old_total, 0))
            for i, f in enumerate(self.part_flags):
                flags[f] = flag = Signal(name=f"part_{f}{j}")
                old_flag = old[pw + i]
                if f == "neg_zero":         # every product -0: this tile's and (accumulating) the line's
                    m.d.sync += flag.eq(pe.neg_zero_out & (~at["accum"] | old_flag))
                else:
                    m.d.sync += flag.eq(getattr(pe, f"{f}_out") | (at["accum"] & old_flag))
            # stage bottom + 1: the new partial, written back at once
            m.d.comb += self.out_part[pb * j:pb * (j + 1)].eq(Cat(total, *flags.values()))
            sums.append(Cat(total, *flags.values()))
        self._round_and_add(m, sums, acc_q, ctrl[bottom + 1])
        return m

    def _round_and_add(self, m, sums, acc_q, first):
        """Below the columns: each new partial (``sums``, registered at stage bottom + 1 where
        ``first`` is its row's control) rounded once and added to its accumulator value
        (``acc_q``, at stage bottom + 1 + round_stages), on :attr:`rounders` pipelines in
        :attr:`passes` passes; the results go to ``out_acc`` at stage :attr:`latency`."""
        C, Rn, P, pw = self.cols, self.rounders, self.passes, self.pw
        rs, ad = self.round_stages, self.add_stages
        # the pass whose columns enter the rounders in this cycle: 0 with the commit row itself,
        # then 1 .. P - 1 from the held sums (commit rows are at least P cycles apart)
        cur = Signal(range(P), name="round_pass")
        held = sums
        if P > 1:
            count = Signal(range(P), name="round_pass_next")
            start = first["valid"] & first["commit"]
            m.d.comb += cur.eq(Mux(start, 0, count))
            with m.If(start):
                m.d.sync += count.eq(1)
            with m.Elif(count != 0):
                m.d.sync += count.eq(Mux(count == P - 1, 0, count + 1))
            held = [Signal(len(v), name=f"round_held{c}") for c, v in enumerate(sums)]
            with m.If(start):
                m.d.sync += [h.eq(v) for h, v in zip(held[Rn:], sums[Rn:])]
        # the pass number travels beside the values: to the adders' inputs, then to their outputs
        at_add, at_out = cur, cur
        for n in range(rs + ad if P > 1 else 0):
            r = Signal(range(P), name=f"round_pass_s{n + 1}")
            m.d.sync += r.eq(at_out)
            at_out = r
            if n + 1 == rs:
                at_add = r
        results = {}
        for i in range(Rn):
            cols = list(range(i, C, Rn))            # pass p takes column i + p * Rn
            rnd = BlockRound(pw, rs, self.numbers.frac, self.numbers.e5m2)
            m.submodules[f"round{i}"] = rnd
            value = Signal(len(sums[i]), name=f"round_in{i}")
            acc = Signal(32, name=f"add_in{i}")
            if len(cols) == 1:
                m.d.comb += [value.eq(sums[i]), acc.eq(acc_q[32 * i:32 * i + 32])]
            else:
                with m.Switch(cur):
                    for p, c in enumerate(cols):
                        with m.Case(p):
                            m.d.comb += value.eq(sums[c] if p == 0 else held[c])
                with m.Switch(at_add):
                    for p, c in enumerate(cols):
                        with m.Case(p):
                            m.d.comb += acc.eq(acc_q[32 * c:32 * c + 32])
            m.d.comb += rnd.total.eq(value[0:pw])
            m.d.comb += [getattr(rnd, f).eq(value[pw + n]) for n, f in enumerate(self.part_flags)]
            out = fp32_add(m, acc, rnd.result, STAGE_REGS[ad], prefix=f"col{i}_")
            for p, c in enumerate(cols):
                if p == P - 1:                      # the last pass: straight to the output
                    results[c] = out
                else:                               # earlier passes wait for it
                    r = results[c] = Signal(32, name=f"add_out{c}")
                    with m.If(at_out == p):
                        m.d.sync += r.eq(out)
        for c in range(C):
            m.d.comb += self.out_acc[32 * c:32 * c + 32].eq(results[c])
