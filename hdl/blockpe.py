"""The processing element of block accumulation (docs/numerics.md section 3).

Built for E4M3 alone or for E4M3 and E5M2 (``formats``; :func:`block_numbers` gives the
widths). An E4M3 value is an 18-bit unsigned fixed-point integer in units of 2^-9 plus a sign: a
normal code ``(e, m)`` is ``(8 + m) << (e - 1)``, a subnormal ``m``; the largest, 448, is
``0x38000``. So the product of two values is an exact 36-bit integer in units of 2^-18 (one
MULT18X18D on ECP5), and the sum of a column's products is an exact integer too: no
floating-point adder, no rounding inside the array. Normalisation, the one rounding and the
FP32 accumulation happen once per column, below the array.

* :class:`FP8Decode` — code -> (sign, 4-bit significand and shift, NaN, zero; E4M3 alone
  also the 18-bit magnitude, with E5M2 an infinity flag), combinational. Weights are stationary, so a weight is
  decoded once when it is loaded; an activation once where it enters its row, and passed along
  the row already decoded.
* :class:`BlockPE` — one processing element: a stationary decoded weight, and
  ``psum_out = psum_in + (-1)^sign * a * w`` with NaN and negative-zero flags passed down
  the column. Two ways to form the exact product (``product``): ``"dsp"`` multiplies the
  18-bit magnitudes (one MULT18X18D on ECP5); ``"lut"`` multiplies the 4-bit significands
  (8-bit product) and shifts it into place by the sum of the two shifts, in LUTs, for arrays
  larger than the FPGA's multiplier count. With E5M2 built, magnitudes are 2^-16 units and
  products 64 bits in units of 2^-32 (``"lut"`` only), and infinity flags pass down the
  column beside NaN (infinity x 0 is NaN).
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
                      complement, units of 2^-18; 2^-32 with E5M2), ``negs_in`` its count
                      of negative products, ``nan_in`` and ``neg_zero_in`` its flags (with
                      E5M2 also ``pos_inf_in``/``neg_inf_in``)
``psum_out``    out   ``psum_in + product`` (a negative product as its one's complement:
                      the column's exact sum is ``psum_out + negs_out`` at the bottom),
                      ``negs_out``, ``nan_out``, ``neg_zero_out`` (every product so far is
                      -0; the top of a column feeds 1, an idle slot keeps it)
==============  ====  ==================================================================

Latency ``stages`` cycles from the activation (:attr:`BlockPE.LATENCY` = 3 by default: the
product or its parts, the product, the sum; 2 leaves out the first register, 1 both) and 1
cycle from ``psum_in``: the PE below takes its activation one cycle
later, so a column is skewed one cycle per row, like the sequential array. Throughput one
activation per cycle. ``width`` = product bits (36, or 64 with E5M2) + log2 of the column
height + 1 holds any column sum exactly (:func:`column_width`). The weight loaded with
``w_load`` is used by activations from the next cycle on (an activation in the same cycle
still meets the previous weight).
"""

from dataclasses import dataclass

from amaranth.hdl import Cat, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["FP8Decode", "BlockPE", "BlockRound", "BlockNumbers", "block_numbers", "MAG_BITS", "NEG_BITS",
           "PRODUCTS", "column_width", "decoded_fields"]

#: Bits of an E4M3 magnitude in units of 2^-9 (448 = 0x38000).
MAG_BITS = 18
#: Ways a BlockPE forms its product: on a hardware multiplier or in LUTs.
PRODUCTS = ("dsp", "lut")
#: Bits of the count of negative products passed down a column (up to 16 rows).
NEG_BITS = 5


@dataclass(frozen=True)
class BlockNumbers:
    """How the block array represents its numbers for a set of built formats.

    E4M3 alone: magnitudes in units of 2^-9 (``man << exp``, ``exp`` = e - 1, 4 bits), products
    of 36 bits in units of 2^-18. With E5M2: every magnitude in units of 2^-16 (an E4M3 code
    shifted by 7 more; an E5M2 infinity or NaN decodes to 0), ``exp`` of 5 bits (0..29),
    products below 2^64 in units of 2^-32, and infinity flags."""
    formats: tuple
    e5m2: bool
    exp_bits: int           # bits of a decoded shift
    product_bits: int       # bits of an exact product's magnitude
    frac: int               # a product (and a column sum) is an integer in units of 2^-frac


def block_numbers(formats=("e4m3",)):
    """The :class:`BlockNumbers` of the built ``formats`` (a subset of ("e4m3", "e5m2"))."""
    formats = tuple(formats)
    if not formats or any(f not in ("e4m3", "e5m2") for f in formats):
        raise ValueError(f"formats must be a non-empty subset of e4m3, e5m2, not {formats!r}")
    if "e5m2" in formats:
        return BlockNumbers(formats, True, 5, 64, 32)
    return BlockNumbers(formats, False, 4, 2 * MAG_BITS, 18)


def column_width(rows, formats=("e4m3",)):
    """Bits of a column's exact partial sum: ``rows`` exact products and a sign."""
    return block_numbers(formats).product_bits + max(1, (rows - 1).bit_length()) + 1


def decoded_fields(product, formats=("e4m3",)):
    """The fields of a decoded FP8 code a BlockPE of ``product`` takes, in order, with widths."""
    nums = block_numbers(formats)
    if product == "dsp" and nums.e5m2:
        raise ValueError("products on multipliers take E4M3 only (an E5M2 magnitude is wider than 18 bits); "
                         "with E5M2 the products are formed in LUTs (product 'lut')")
    magnitude = (("mag", MAG_BITS),) if product == "dsp" else (("man", 4), ("exp", nums.exp_bits))
    return (("sign", 1),) + magnitude + (("nan", 1), ("zero", 1)) + ((("inf", 1),) if nums.e5m2 else ())


class FP8Decode(wiring.Component):
    """An FP8 code as sign, magnitude ``man << exp``, NaN, zero and (with E5M2) infinity flags
    (combinational); see :class:`BlockNumbers` for the units.

    ``man`` is the 4-bit significand (the hidden bit included for normal codes), ``exp`` the
    shift. E4M3 alone also gives ``mag`` (18 bits, units of 2^-9), what a multiplier takes.
    With both formats built, ``fmt`` chooses (0 E4M3, 1 E5M2, as the ISA's ``fmt_a``/``fmt_b``)."""

    def __init__(self, formats=("e4m3",)):
        self.numbers = nums = block_numbers(formats)
        members = {"code": In(8), "fmt": In(1), "sign": Out(1), "man": Out(4), "exp": Out(nums.exp_bits),
                   "nan": Out(1), "zero": Out(1)}
        if nums.e5m2:
            members["inf"] = Out(1)
        else:
            members["mag"] = Out(MAG_BITS)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        nums, code = self.numbers, self.code
        m.d.comb += [self.sign.eq(code[7]), self.zero.eq(code[0:7] == 0)]
        e4, m4 = code[3:7], code[0:3]
        if not nums.e5m2:
            normal = e4 != 0
            m.d.comb += [
                self.nan.eq((e4 == 0xF) & (m4 == 0x7)),
                self.man.eq(Cat(m4, normal)),
                self.exp.eq(Mux(normal, e4 - 1, 0)),
                self.mag.eq(self.man << self.exp),
            ]
            return m
        # units of 2^-16: E4M3 (8 + m) << (e + 6), subnormal m << 7; E5M2 (4 + m) << (e - 1),
        # subnormal m << 0; an E5M2 infinity or NaN has magnitude 0 (its flags say what it is)
        e5, m5 = code[2:7], code[0:2]
        man4, exp4 = Signal(4), Signal(5)
        man5, exp5 = Signal(4), Signal(5)
        special5 = e5 == 0x1F
        m.d.comb += [
            man4.eq(Cat(m4, e4 != 0)), exp4.eq(Mux(e4 != 0, e4 + 6, 7)),
            man5.eq(Mux(special5, 0, Cat(m5, e5 != 0))), exp5.eq(Mux((e5 != 0) & ~special5, e5 - 1, 0)),
        ]
        nan4, nan5, inf5 = (e4 == 0xF) & (m4 == 0x7), special5 & (m5 != 0), special5 & (m5 == 0)
        use5 = 1 if nums.formats == ("e5m2",) else self.fmt
        m.d.comb += [
            self.man.eq(Mux(use5, man5, man4)), self.exp.eq(Mux(use5, exp5, exp4)),
            self.nan.eq(Mux(use5, nan5, nan4)), self.inf.eq(Mux(use5, inf5, 0)),
        ]
        return m


class BlockPE(wiring.Component):
    """One processing element of the block-accumulation array (see the module docstring)."""

    #: Cycles from an activation to its product in ``psum_out`` (the default ``stages``).
    LATENCY = 3

    def __init__(self, width=None, product="dsp", formats=("e4m3",), stages=LATENCY):
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, not {product!r}")
        if stages not in (1, 2, 3):
            raise ValueError(f"stages must be 1, 2 or 3, not {stages!r}")
        self.numbers = nums = block_numbers(formats)
        self.fields = decoded_fields(product, formats)
        self.width = width = width or column_width(16, formats)
        self.product = product
        #: cycles from an activation to its product in ``psum_out``
        self.latency = stages
        members = {"w_load": In(1), "a_valid": In(1), "a_valid_out": Out(1)}
        for name, bits in self.fields:
            members.update({f"w_{name}": In(bits), f"a_{name}": In(bits), f"a_{name}_out": Out(bits)})
        flags = ("nan", "neg_zero") + (("pos_inf", "neg_inf") if nums.e5m2 else ())
        self.flags = flags
        members.update({"psum_in": In(signed(width)), "negs_in": In(NEG_BITS),
                        "psum_out": Out(signed(width)), "negs_out": Out(NEG_BITS)})
        members.update({f"{f}_in": In(1) for f in flags})
        members.update({f"{f}_out": Out(1) for f in flags})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        nums = self.numbers
        regs = self.latency - 1          # registers between the operands and the adder
        fields = [name for name, _ in self.fields]
        w = {name: Signal.like(getattr(self, f"w_{name}"), name=f"w_{name}_q") for name in fields}
        a = {name: getattr(self, f"a_{name}") for name in fields}
        with m.If(self.w_load):
            m.d.sync += [w[name].eq(getattr(self, f"w_{name}")) for name in fields]
        # pass the activation along the row
        m.d.sync += [self.a_valid_out.eq(self.a_valid)]
        m.d.sync += [getattr(self, f"a_{name}_out").eq(a[name]) for name in fields]
        # (3 stages) stage 1: the product (or its parts) and its flags, registered; stage 2: the
        # product. Fewer stages leave out the first register, then the second.
        valid = self.a_valid
        sign = a["sign"] ^ w["sign"]
        nan_now = a["nan"] | w["nan"]
        # this slot keeps "every product -0" (idle slots too)
        now = {"negative": valid & sign, "neg_zero": ~valid | ((a["zero"] | w["zero"]) & sign)}
        if nums.e5m2:
            inf = a["inf"] | w["inf"]
            nan_now = nan_now | (a["inf"] & w["zero"]) | (w["inf"] & a["zero"])     # inf x 0
            now.update({"pos_inf": valid & inf & ~sign, "neg_inf": valid & inf & sign})
        now["nan"] = valid & nan_now
        late = {}
        for name, value in now.items():
            for n in range(regs):
                r = Signal(name=f"{name}{n + 1}" if n + 1 < regs else name)
                m.d.sync += r.eq(value)
                value = r
            late[name] = value

        def stage(value, name, registered):
            """``value``, behind a register if ``registered``."""
            if not registered:
                return value
            r = Signal.like(value, name=name)
            m.d.sync += r.eq(value)
            return r
        if self.product == "dsp":
            # a MULT18X18D, then up to two registers
            raw = stage(Mux(valid, a["mag"] * w["mag"], 0)[:2 * MAG_BITS], "raw", regs == 2)
            product = stage(raw, "product", regs >= 1)
        else:
            # the 4x4 significand product and the sum of the shifts, then the shift into place
            partial = [Mux(w["man"][i], a["man"] << i, 0) for i in range(4)]   # in LUTs, not on a multiplier
            sig = stage(Mux(valid, partial[0] + partial[1] + partial[2] + partial[3], 0)[:8], "sig", regs == 2)
            shift = stage((a["exp"] + w["exp"])[:nums.exp_bits + 1], "shift", regs == 2)
            product = stage((sig << shift)[:nums.product_bits], "product", regs >= 1)
        # stage 3: one adder, psum_in from the PE above. A negative product is added as its one's
        # complement (~p = -p - 1); the missing +1s are counted down the column in ``negs`` and
        # added once below the array.
        wide = Signal(signed(nums.product_bits + 1))
        m.d.comb += wide.eq(product)
        negative = late["negative"]
        addend = Mux(negative, ~wide, wide)
        m.d.sync += [
            self.psum_out.eq(self.psum_in + addend),
            self.negs_out.eq(self.negs_in + negative),
            self.neg_zero_out.eq(self.neg_zero_in & late["neg_zero"]),
        ]
        m.d.sync += [getattr(self, f"{f}_out").eq(getattr(self, f"{f}_in") | late[f])
                     for f in self.flags if f != "neg_zero"]
        return m


class BlockRound(wiring.Component):
    """Below a column: an exact block sum rounded once to binary32 (docs/numerics.md
    section 3, block accumulation).

    ``total`` is the block's exact sum in units of 2^-``frac`` (``width`` bits, two's
    complement: the column's ``psum_out + negs_out``, summed over the block's K tiles;
    ``frac`` is 18 for E4M3 alone, 32 with E5M2, see :class:`BlockNumbers`), ``nan`` a NaN
    product in the block, ``neg_zero`` every product -0, and with ``infinities`` (E5M2)
    ``pos_inf``/``neg_inf`` an infinite product of that sign. ``result`` is the binary32 bits:
    round to nearest, ties to even (a leading-zero count, a normalising shift, one increment);
    an exact zero is -0 only with ``neg_zero``; NaN (also for infinities of both signs) is the
    canonical 0x7FC00000, an infinity 0x7F800000 or 0xFF800000. The sum is never subnormal:
    it is 0 or at least 2^-``frac``.

    ``stages`` (0..4) pipeline registers: after the magnitude and its leading-zero count (1),
    after the normalising shift (2), after the two's complement magnitude (3), and on the
    result (4). Latency ``stages`` cycles, throughput one sum per cycle.
    """

    def __init__(self, width, stages=0, frac=18, infinities=False):
        if width < 26:
            raise ValueError(f"width must be at least 26 bits, not {width}")
        if stages not in (0, 1, 2, 3, 4):
            raise ValueError(f"stages must be 0 to 4, not {stages!r}")
        self.width, self.stages, self.frac, self.infinities = width, stages, frac, infinities
        members = {"total": In(signed(width)), "nan": In(1), "neg_zero": In(1), "result": Out(32)}
        if infinities:
            members.update({"pos_inf": In(1), "neg_inf": In(1)})
        super().__init__(members)

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

        flags = {"nan": self.nan, "nz": self.neg_zero}
        if self.infinities:
            flags.update({"nan": self.nan | (self.pos_inf & self.neg_inf), "pinf": self.pos_inf,
                          "ninf": self.neg_inf})
        v = stage({"mag": mag_c, "neg": t < 0, **flags}, self.stages >= 3, 0)
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
        m.d.comb += exponent.eq(w - 1 - lz - self.frac + 127 + over)
        frac = Mux(over, rounded[1:24], rounded[0:23])
        result = Signal(32, name="round_result")
        with m.If(nan):
            m.d.comb += result.eq(0x7FC00000)
        if self.infinities:
            with m.Elif(v["pinf"]):
                m.d.comb += result.eq(0x7F800000)
            with m.Elif(v["ninf"]):
                m.d.comb += result.eq(0xFF800000)
        with m.Elif(norm[w - 1] == 0):                 # zero (a normalised non-zero has its top bit set)
            m.d.comb += result.eq(neg_zero << 31)
        with m.Else():
            m.d.comb += result.eq(frac | (exponent[0:8] << 23) | (negative << 31))
        m.d.comb += self.result.eq(pipe(m, result, self.stages >= 4, "round_result_r"))
        return m
