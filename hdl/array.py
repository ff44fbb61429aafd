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
in_addr : In(16)          accumulator line tag, returned with the result
in_swap : In(1)           this row uses the shadow weights (first row of a new tile)
w_we : In(1), w_row : In(range(R)), w_data : In(8 * C)
out_valid : Out(1), out_addr : Out(16), out_acc : Out(32 * C)
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .fpadd import fp32_add
from .fpmul import FP8Multiplier

__all__ = ["MACArray"]


class MACArray(wiring.Component):
    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
        self.latency = rows
        super().__init__({
            "in_valid": In(1), "in_a": In(8 * rows), "in_acc": In(32 * cols), "in_k": In(range(rows + 1)),
            "in_fmt_a": In(1), "in_fmt_b": In(1), "in_addr": In(16), "in_swap": In(1),
            "w_we": In(1), "w_row": In(range(max(rows, 2))), "w_data": In(8 * cols),
            "out_valid": Out(1), "out_addr": Out(16), "out_acc": Out(32 * cols),
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
