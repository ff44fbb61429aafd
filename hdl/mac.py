"""FP8 multiply-accumulate unit with an FP32 accumulator."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .arith import check_stages, pipe
from .formats import Format
from .fpadd import fp32_add
from .fpmul import FP8Multiplier

__all__ = ["MAC"]


class MAC(wiring.Component):
    """Multiply-accumulate: ``acc = fp32(acc + a * b)``, products exact, one rounding per add.

    On a cycle with ``valid``, the exact product of ``a`` and ``b`` (formats chosen by
    ``fmt_a``/``fmt_b``) is added to the accumulator with one IEEE binary32
    round-to-nearest-even addition. With ``first`` the addition starts from ``acc_in``
    instead of the accumulator (``acc_in = 0`` for a fresh dot product, a previous partial
    sum to continue one), so a chain of N valid cycles computes exactly the golden
    ``acc = acc_in; for k: acc = fp32(acc + a[k]*b[k])``. Cycles without ``valid`` leave the
    accumulator unchanged.

    The accumulation loop (adder plus accumulator register) is a single cycle, so a new
    product is accepted every cycle and additions happen strictly in order. ``stages``
    adds registers in front of the loop:

    ====== ====================================================== =======
    stages registers                                              latency
    ====== ====================================================== =======
    1      accumulator only                                       1
    2      product, accumulator                                   2
    3      operands, product, accumulator                         3
    ====== ====================================================== =======

    Latency ``stages`` cycles from inputs to ``acc``; throughput one MAC per cycle.

    Members
    -------
    a, b : In(8)
        FP8 operand codes.
    fmt_a, fmt_b : In(Format)
        Operand formats.
    valid : In(1)
        Accumulate this cycle's product.
    first : In(1)
        Start a new chain: add to ``acc_in`` instead of the accumulator.
    acc_in : In(32)
        Starting value (binary32 bits) of a chain, sampled with ``first``.
    acc : Out(32)
        Accumulator (binary32 bits).
    acc_valid : Out(1)
        ``acc`` was updated by a valid input ``stages`` cycles ago.
    """

    a: In(8)
    b: In(8)
    fmt_a: In(Format)
    fmt_b: In(Format)
    valid: In(1)
    first: In(1)
    acc_in: In(32)
    acc: Out(32)
    acc_valid: Out(1)

    def __init__(self, stages=2):
        self.stages = check_stages(stages, (1, 2, 3), "MAC", self)
        self.latency = stages
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        r_in = self.stages >= 3
        r_prod = self.stages >= 2

        m.submodules.mul = mul = FP8Multiplier(stages=0)
        m.d.comb += [
            mul.a.eq(pipe(m, self.a, r_in, "in_a")),
            mul.b.eq(pipe(m, self.b, r_in, "in_b")),
            mul.fmt_a.eq(pipe(m, self.fmt_a.as_value(), r_in, "in_fmt_a")),
            mul.fmt_b.eq(pipe(m, self.fmt_b.as_value(), r_in, "in_fmt_b")),
        ]
        in_valid = pipe(m, self.valid, r_in, "in_valid")
        in_first = pipe(m, self.first, r_in, "in_first")
        in_acc = pipe(m, self.acc_in, r_in, "in_acc")

        product = pipe(m, mul.product, r_prod, "p_product")
        p_valid = pipe(m, in_valid, r_prod, "p_valid")
        p_first = pipe(m, in_first, r_prod, "p_first")
        p_acc = pipe(m, in_acc, r_prod, "p_acc")

        acc = Signal(32)
        total = fp32_add(m, Mux(p_first, p_acc, acc), product, prefix="acc_")
        with m.If(p_valid):
            m.d.sync += acc.eq(total)
        valid_q = Signal()
        m.d.sync += valid_q.eq(p_valid)
        m.d.comb += [self.acc.eq(acc), self.acc_valid.eq(valid_q)]
        return m
