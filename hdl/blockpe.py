"""The processing element of block accumulation (docs/numerics.md section 3), E4M3 operands.

An E4M3 value is an 18-bit unsigned fixed-point integer in units of 2^-9 plus a sign: a
normal code ``(e, m)`` is ``(8 + m) << (e - 1)``, a subnormal ``m``; the largest, 448, is
``0x38000``. So the product of two values is an exact 36-bit integer in units of 2^-18 (one
MULT18X18D on ECP5), and the sum of a column's products is an exact integer too: no
floating-point adder, no rounding inside the array. Normalisation, the one rounding and the
FP32 accumulation happen once per column, below the array.

* :class:`E4M3Decode` — code -> (sign, 18-bit magnitude, NaN, zero; and the magnitude as a
  4-bit significand and a shift), combinational. Weights are stationary, so a weight is
  decoded once when it is loaded; an activation once where it enters its row, and passed along
  the row already decoded.
* :class:`BlockPE` — one processing element: a stationary decoded weight, and
  ``psum_out = psum_in + (-1)^sign * a * w`` with NaN and negative-zero flags passed down
  the column. Two ways to form the exact product (``product``): ``"dsp"`` multiplies the
  18-bit magnitudes (one MULT18X18D on ECP5); ``"lut"`` multiplies the 4-bit significands
  (8-bit product) and shifts it into place by the sum of the two shifts, in LUTs, for arrays
  larger than the FPGA's multiplier count.
* :class:`BlockRound` — below a column: the exact block sum rounded once to binary32.

BlockPE ports
-------------
==============  ====  ==================================================================
``w_load``      in    load the stationary weight from ``w_sign``/``w_mag``/``w_nan``/``w_zero``
                      (``product="lut"``: ``w_man``/``w_exp`` instead of ``w_mag``)
``a_sign/mag``  in    the activation (decoded), ``a_nan``/``a_zero`` its flags, ``a_valid``
                      (``product="lut"``: ``a_man``/``a_exp`` instead of ``a_mag``)
``a_*_out``     out   the same, one cycle later (to the next column of the row)
``psum_in``     in    the column's partial sum from the PE above (``width`` bits, two's
                      complement, units of 2^-18), ``negs_in`` its count of negative
                      products, ``nan_in`` and ``neg_zero_in`` its flags
``psum_out``    out   ``psum_in + product`` (a negative product as its one's complement:
                      the column's exact sum is ``psum_out + negs_out`` at the bottom),
                      ``negs_out``, ``nan_out``, ``neg_zero_out`` (every product so far is
                      -0; the top of a column feeds 1, an idle slot keeps it)
==============  ====  ==================================================================

Latency :attr:`BlockPE.LATENCY` = 3 cycles from the activation (the product or its parts, the
product, the sum) and 1 cycle from ``psum_in``: the PE below takes its activation one cycle
later, so a column is skewed one cycle per row, like the sequential array. Throughput one activation per cycle. ``width`` =
36 + log2 of the column height + 1 holds any column sum exactly. The weight loaded with
``w_load`` is used by activations from the next cycle on (an activation in the same cycle
still meets the previous weight).
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["E4M3Decode", "BlockPE", "BlockRound", "MAG_BITS", "NEG_BITS", "PRODUCTS", "column_width",
           "decoded_fields"]

#: Bits of an E4M3 magnitude in units of 2^-9 (448 = 0x38000).
MAG_BITS = 18
#: Ways a BlockPE forms its product: on a hardware multiplier or in LUTs.
PRODUCTS = ("dsp", "lut")
#: Bits of the count of negative products passed down a column (up to 16 rows).
NEG_BITS = 5


def column_width(rows):
    """Bits of a column's exact partial sum: 36-bit products, ``rows`` of them, and a sign."""
    return 2 * MAG_BITS + max(1, (rows - 1).bit_length()) + 1


def decoded_fields(product):
    """The fields of a decoded E4M3 code a BlockPE of ``product`` takes, in order, with widths."""
    magnitude = (("mag", MAG_BITS),) if product == "dsp" else (("man", 4), ("exp", 4))
    return (("sign", 1),) + magnitude + (("nan", 1), ("zero", 1))


class E4M3Decode(wiring.Component):
    """An E4M3 code as sign, 18-bit magnitude (units of 2^-9), NaN and zero flags (combinational).

    The magnitude is also given as ``man << exp``: ``man`` the 4-bit significand (the hidden
    bit included for normal codes), ``exp`` the shift (``e - 1`` for normal codes, 0 for
    subnormal ones)."""

    code: In(8)
    sign: Out(1)
    mag: Out(MAG_BITS)
    man: Out(4)
    exp: Out(4)
    nan: Out(1)
    zero: Out(1)

    def elaborate(self, platform):
        m = Module()
        e = self.code[3:7]
        normal = e != 0
        m.d.comb += [
            self.sign.eq(self.code[7]),
            self.zero.eq(self.code[0:7] == 0),
            self.nan.eq((e == 0xF) & (self.code[0:3] == 0x7)),
            self.man.eq(Cat(self.code[0:3], normal)),
            self.exp.eq(Mux(normal, e - 1, 0)),
            self.mag.eq(self.man << self.exp),
        ]
        return m


class BlockPE(wiring.Component):
    """One processing element of the block-accumulation array (see the module docstring)."""

    #: Cycles from an activation to its product in ``psum_out``.
    LATENCY = 3

    def __init__(self, width=None, product="dsp"):
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, not {product!r}")
        self.width = width = width or column_width(16)
        self.product = product
        members = {"w_load": In(1), "a_valid": In(1), "a_valid_out": Out(1)}
        for name, bits in decoded_fields(product):
            members.update({f"w_{name}": In(bits), f"a_{name}": In(bits), f"a_{name}_out": Out(bits)})
        members.update({
            "psum_in": In(signed(width)), "negs_in": In(NEG_BITS), "nan_in": In(1), "neg_zero_in": In(1),
            "psum_out": Out(signed(width)), "negs_out": Out(NEG_BITS), "nan_out": Out(1), "neg_zero_out": Out(1),
        })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        fields = [name for name, _ in decoded_fields(self.product)]
        w = {name: Signal.like(getattr(self, f"w_{name}"), name=f"w_{name}_q") for name in fields}
        with m.If(self.w_load):
            m.d.sync += [w[name].eq(getattr(self, f"w_{name}")) for name in fields]
        # pass the activation along the row
        m.d.sync += [self.a_valid_out.eq(self.a_valid)]
        m.d.sync += [getattr(self, f"a_{name}_out").eq(getattr(self, f"a_{name}")) for name in fields]
        # stage 1: the product (or its parts), registered; stage 2: the product, registered
        flags = [Signal(name=n) for n in ("negative1", "nan1", "neg_zero1", "negative", "nan", "neg_zero")]
        negative1, nan1, neg_zero1, negative, nan, neg_zero = flags
        m.d.sync += [
            negative1.eq(self.a_valid & (self.a_sign ^ w["sign"])),
            nan1.eq(self.a_valid & (self.a_nan | w["nan"])),
            # this slot keeps "every product -0" (idle slots too)
            neg_zero1.eq(~self.a_valid | ((self.a_zero | w["zero"]) & (self.a_sign ^ w["sign"]))),
            negative.eq(negative1), nan.eq(nan1), neg_zero.eq(neg_zero1),
        ]
        product = Signal(2 * MAG_BITS)
        if self.product == "dsp":
            raw = Signal(2 * MAG_BITS)                   # a MULT18X18D, then two registers
            m.d.sync += [raw.eq(Mux(self.a_valid, self.a_mag * w["mag"], 0)), product.eq(raw)]
        else:
            # the 4x4 significand product and the sum of the shifts, then the shift into place
            sig = Signal(8)
            shift = Signal(5)
            partial = [Mux(w["man"][i], self.a_man << i, 0) for i in range(4)]   # in LUTs, not on a multiplier
            m.d.sync += [sig.eq(Mux(self.a_valid, partial[0] + partial[1] + partial[2] + partial[3], 0)),
                         shift.eq(self.a_exp + w["exp"]), product.eq(sig << shift)]
        # stage 3: one adder, psum_in from the PE above. A negative product is added as its one's
        # complement (~p = -p - 1); the missing +1s are counted down the column in ``negs`` and
        # added once below the array.
        wide = Signal(signed(2 * MAG_BITS + 1))
        m.d.comb += wide.eq(product)
        addend = Mux(negative, ~wide, wide)
        m.d.sync += [
            self.psum_out.eq(self.psum_in + addend),
            self.negs_out.eq(self.negs_in + negative),
            self.nan_out.eq(self.nan_in | nan),
            self.neg_zero_out.eq(self.neg_zero_in & neg_zero),
        ]
        return m


class BlockRound(wiring.Component):
    """Below a column: an exact E4M3 block sum rounded once to binary32 (docs/numerics.md
    section 3, block accumulation).

    ``total`` is the block's exact sum in units of 2^-18 (``width`` bits, two's complement: the
    column's ``psum_out + negs_out``, summed over the block's K tiles), ``nan`` a NaN product
    in the block, ``neg_zero`` every product -0. ``result`` is the binary32 bits: round to
    nearest, ties to even (a leading-zero count, a normalising shift, one increment); an
    exact zero is -0 only with ``neg_zero``; NaN is the canonical 0x7FC00000. The sum is never
    subnormal: it is 0 or at least 2^-18.

    ``stages`` (0..4) pipeline registers: after the magnitude and its leading-zero count (1),
    after the normalising shift (2), after the two's complement magnitude (3), and on the
    result (4). Latency ``stages`` cycles, throughput one sum per cycle.
    """

    def __init__(self, width, stages=0):
        if width < 26:
            raise ValueError(f"width must be at least 26 bits, not {width}")
        if stages not in (0, 1, 2, 3, 4):
            raise ValueError(f"stages must be 0 to 4, not {stages!r}")
        self.width, self.stages = width, stages
        super().__init__({"total": In(signed(width)), "nan": In(1), "neg_zero": In(1), "result": Out(32)})

    def elaborate(self, platform):
        from .arith import leading_zeros, pipe
        m = Module()
        w = self.width
        t = self.total
        # section 1: sign, magnitude, leading zeros
        mag_c = Signal(w)
        m.d.comb += mag_c.eq(Mux(t < 0, -t, t))
        def stage(values, registered, n):
            return {k: pipe(m, v, registered, f"round_{k}{n}") for k, v in values.items()}

        v = stage({"mag": mag_c, "neg": t < 0, "nan": self.nan, "nz": self.neg_zero}, self.stages >= 3, 0)
        v = stage(dict(v, lz=leading_zeros(m, v["mag"], "round_lz")), self.stages >= 1, 1)
        # section 2: normalise
        norm0 = Signal(w)
        m.d.comb += norm0.eq(v.pop("mag") << v["lz"])
        v = stage(dict(v, norm=norm0), self.stages >= 2, 2)
        norm, lz, negative, nan, neg_zero = v["norm"], v["lz"], v["neg"], v["nan"], v["nz"]
        # section 3: round to nearest even and pack
        mant = norm[w - 24:w]
        round_bit = norm[w - 25]
        sticky = norm[0:w - 25].any()
        rounded = Signal(25)
        m.d.comb += rounded.eq(mant + (round_bit & (sticky | mant[0])))
        over = rounded[24]
        exponent = Signal(10)
        m.d.comb += exponent.eq(w - 1 - lz - 18 + 127 + over)
        frac = Mux(over, rounded[1:24], rounded[0:23])
        result = Signal(32, name="round_result")
        with m.If(nan):
            m.d.comb += result.eq(0x7FC00000)
        with m.Elif(norm[w - 1] == 0):                 # zero (a normalised non-zero has its top bit set)
            m.d.comb += result.eq(neg_zero << 31)
        with m.Else():
            m.d.comb += result.eq(frac | (exponent[0:8] << 23) | (negative << 31))
        m.d.comb += self.result.eq(pipe(m, result, self.stages >= 4, "round_result_r"))
        return m
