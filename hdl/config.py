"""The one NPU configuration shared by the hardware generator, the compiler and the simulators.

:class:`NPUConfig` is frozen and JSON-serializable::

    cfg = NPUConfig(rows=8, cols=8)
    text = cfg.to_json()
    assert NPUConfig.from_json(text) == cfg

Every invalid value raises ``ValueError`` with one sentence naming the field and what is allowed.
"""

import json
from dataclasses import asdict, dataclass, fields

__all__ = ["NPUConfig", "load_config", "ACCUMULATIONS", "MULTIPLIERS"]


def _short(value):
    """``repr`` of a bad value, cut to 60 characters for an error message."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, 40, 40, 40
    try:
        text = r.repr(value)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _pow2(n):
    p = 1
    while p < n:
        p *= 2
    return p


#: Accumulation modes (docs/numerics.md section 3).
ACCUMULATIONS = ("sequential", "block")
#: Ways block-mode processing elements form products (hdl.blockpe.PRODUCTS, or a mix by column).
MULTIPLIERS = ("dsp", "lut", "mixed")


@dataclass(frozen=True)
class NPUConfig:
    """Hardware parameters of one NPU instance.

    Attributes
    ----------
    rows, cols : int
        MAC array size R x C (1..16 each). The array is weight-stationary: it holds an R x C
        weight tile (K x N); activation rows stream through, one output row per cycle.
    formats : tuple of str
        FP8 operand formats the hardware accepts (subset of ``("e4m3", "e5m2")``).
    sp_lines : int
        Scratchpad depth in lines; a line holds :attr:`line_bytes` FP8 values.
    acc_lines : int
        Accumulator depth in lines; a line holds :attr:`cols` FP32 values.
    axi_data_bits : int
        AXI4 data bus width (32, 64, 128 or 256).
    axi_addr_bits : int
        AXI4 address width, 12 to 32: the NPU reaches the first ``2**axi_addr_bits`` bytes of
        DRAM (:attr:`address_space`), and its address registers and arithmetic are that wide.
        Narrower addresses are for small FPGAs whose memory is on chip (the iCEBreaker's 16 KB
        need 14 bits); a run whose DMA window reaches past the address space stops as it starts
        (FETCH_WINDOW), and the hosts refuse a DRAM larger than it.
    queue_depth : int
        Depth of each unit's command queue (load, compute, store): 0 or a power of two up to
        64; a unit holds one command waiting for its tokens besides (and the compute unit the
        ones whose tokens it has taken). 0 and 1 are for the smallest FPGAs: with 1 each queue
        is one register, with 0 there are no queues (the dispatcher hands a command to its
        unit when the unit has room for it).
    max_burst : int
        Longest AXI4 INCR burst the DMA issues, in beats (1..256, a power of two).
    accumulation : str
        ``"sequential"``: one FP32 addition per product, in K order. ``"block"``: the products
        of each block of ``acc_block`` K positions summed exactly, rounded once, added in FP32
        (docs/numerics.md section 3). Hardware, functional simulator, compiler and golden
        model run both modes with both formats; block mode with E5M2 needs ``multipliers="lut"``.
    acc_block : int
        K positions per exact block in block mode (a power of two, 1..128).
    multipliers : str
        How block-mode processing elements form their exact products: ``"dsp"`` on the FPGA's
        hardware multipliers (one per PE), ``"lut"`` in logic (a 4x4 significand product and a
        shift), for arrays larger than the FPGA's multiplier count; ``"mixed"``: the first
        :attr:`dsp_columns` columns on multipliers, the others in logic, so an array uses every
        multiplier the FPGA has and logic for the rest. Results are the same. Sequential mode
        takes ``"dsp"`` only.
    dsp_columns : int
        With ``multipliers: "mixed"``, the columns whose PEs use hardware multipliers (1 to
        cols - 1); 0 otherwise.
    vector_lanes : int
        binary32 lanes of the vector unit (EPILOGUE, BLOCKSCALE): 1..16, at most :attr:`cols`,
        or 0 for one per column. With fewer lanes than columns a row takes ceil(cols / lanes)
        passes; each lane is two binary32 multipliers and an adder, the largest block of logic
        after the array, so small FPGAs build one or two.
    store_lanes : int
        binary32-to-FP8 lanes of the store unit's requantizer, as :attr:`vector_lanes`: a row
        stored to FP8 takes ceil(cols / lanes) extra cycles instead of one.
    vector_unit : bool
        Build the vector unit. Without it (for small FPGAs) EPILOGUE and BLOCKSCALE are refused
        with BAD_OPCODE, and :attr:`vector_lanes` must be 0.
    fp8_store : bool
        Build the store unit's requantizer. Without it a STORE to E4M3 or E5M2 is refused with
        BAD_FORMAT (results leave as FP32), and :attr:`store_lanes` must be 0.
    token_limit : int
        Largest program-order balance of a token counter (docs/isa.md), 1..65535 (default
        ``isa.TOKEN_LIMIT``, 65535): a command that would take a balance past it stops the NPU
        with TOKEN_LIMIT, on every engine; the compiler never makes such a program. The token
        counters and the dispatcher's balances are sized by it (17 and 20 bits by default, 9 and
        12 at 255 for a small FPGA).
    perf_counters : bool
        Build the MAC_BUSY, DMA_BYTES and STALL counters (default true). Without them (for
        small FPGAs) those registers read 0; CYCLES and COMMANDS are always built (the host's
        watchdog and progress use them).
    check_stages : int
        Cycles of the command checker after the command's register, 1..2 (default 2): the
        range checks' multiplications, then the comparisons. 1 makes both in one cycle (no
        registers between them, for a slowly clocked FPGA); a command's verdict is then a
        cycle earlier, its checks the same.
    pe_stages : int
        Block mode: cycles of each processing element, 1..3 (default 3): the product formed
        and registered in two steps, then added to the column's sum. 2 forms the product in
        one step, 1 adds it to the column's sum in the cycle it is formed (no product
        registers: for a slowly clocked iCE40, where each register is a logic cell). Results
        are the same; the array's latency is ``rows + block_fill``.
    round_stages, add_stages : int
        Block mode: pipeline registers below each column, in the rounding of the exact block
        sum (0..4) and in the binary32 accumulation (1..5). The defaults (4 and 5) are for the
        fastest clock; a board clocked slowly (an iCE40 at 12-24 MHz) builds fewer, which saves
        flip-flops in every column and shortens the compute unit's hazard window. Results are the
        same; a MATMUL's results and token pushes are ready ``rows + MATMUL_FILL +``
        :attr:`block_fill` cycles after its last row. Sequential mode takes the defaults.
    rounders : int
        Block mode: rounding-and-accumulation pipelines below the array (a BlockRound and a
        binary32 adder each), 1..cols, or 0 for one per column. With fewer than cols a
        committing MATMUL row takes ceil(cols / rounders) cycles instead of one (other rows
        still one); the largest block of logic after the processing elements, so small FPGAs
        build one. Sequential mode takes 0.
    """

    rows: int = 8
    cols: int = 8
    formats: tuple = ("e4m3", "e5m2")
    sp_lines: int = 16384
    acc_lines: int = 1024
    axi_data_bits: int = 64
    axi_addr_bits: int = 32
    queue_depth: int = 8
    max_burst: int = 16
    accumulation: str = "sequential"
    acc_block: int = 128
    multipliers: str = "dsp"
    dsp_columns: int = 0
    vector_lanes: int = 0
    store_lanes: int = 0
    vector_unit: bool = True
    fp8_store: bool = True
    token_limit: int = 65535
    perf_counters: bool = True
    check_stages: int = 2
    pe_stages: int = 3
    round_stages: int = 4
    add_stages: int = 5
    rounders: int = 0

    def __post_init__(self):
        def integer(name, lo, hi, pow2=False):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
            if ok and pow2 and v & (v - 1):
                ok = False
            if not ok:
                kind = "a power of two" if pow2 else "an integer"
                raise ValueError(f"{name} must be {kind} from {lo} to {hi}, not {_short(v)}")

        integer("rows", 1, 16)
        integer("cols", 1, 16)
        integer("sp_lines", 16, 65536, pow2=True)
        integer("acc_lines", 16, 65536, pow2=True)
        if self.axi_data_bits not in (32, 64, 128, 256) or type(self.axi_data_bits) is not int:
            raise ValueError(f"axi_data_bits must be one of 32, 64, 128, 256, not {_short(self.axi_data_bits)}")
        integer("axi_addr_bits", 12, 32)
        qd = self.queue_depth
        if not (type(qd) is int and 0 <= qd <= 64 and qd & (qd - 1) == 0):     # 0 or a power of two
            raise ValueError(f"queue_depth must be 0 (no queues) or a power of two from 1 to 64, not {_short(qd)}")
        integer("max_burst", 1, 256, pow2=True)
        if self.accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {', '.join(ACCUMULATIONS)}, not {_short(self.accumulation)}")
        integer("acc_block", 1, 128, pow2=True)
        if self.multipliers not in MULTIPLIERS:
            raise ValueError(f"multipliers must be one of {', '.join(MULTIPLIERS)}, not {_short(self.multipliers)}")
        if self.multipliers != "dsp" and self.accumulation != "block":
            raise ValueError(f"multipliers {self.multipliers!r} needs accumulation 'block'; sequential mode "
                             f"takes 'dsp'")
        if self.multipliers == "mixed":
            if self.cols < 2:
                raise ValueError("multipliers 'mixed' needs at least 2 columns; a 1-column array takes 'dsp' or 'lut'")
            integer("dsp_columns", 1, self.cols - 1)
        elif self.dsp_columns != 0:
            raise ValueError(f"dsp_columns applies to multipliers 'mixed' only; with {self.multipliers!r} it "
                             f"must be 0, not {_short(self.dsp_columns)}")
        for name in ("vector_lanes", "store_lanes"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= self.cols):
                raise ValueError(f"{name} must be an integer from 0 (one per column) to cols ({self.cols}), "
                                 f"not {_short(v)}")
        for name, lanes in (("vector_unit", "vector_lanes"), ("fp8_store", "store_lanes")):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, not {_short(v)}")
            if not v and getattr(self, lanes):
                raise ValueError(f"{lanes} applies to a built {'vector unit' if lanes == 'vector_lanes' else 'requantizer'}; "
                                 f"with {name} false it must be 0, not {_short(getattr(self, lanes))}")
        integer("token_limit", 1, 65535)
        if not isinstance(self.perf_counters, bool):
            raise ValueError(f"perf_counters must be true or false, not {_short(self.perf_counters)}")
        integer("check_stages", 1, 2)
        integer("pe_stages", 1, 3)
        integer("round_stages", 0, 4)
        integer("add_stages", 1, 5)
        if self.accumulation != "block" and (self.round_stages, self.add_stages) != (4, 5):
            raise ValueError(f"round_stages and add_stages apply to accumulation 'block'; sequential mode "
                             f"takes 4 and 5, not {self.round_stages} and {self.add_stages}")
        if self.accumulation != "block" and self.pe_stages != 3:
            raise ValueError(f"pe_stages applies to accumulation 'block'; sequential mode takes 3, not "
                             f"{self.pe_stages}")
        v = self.rounders
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= self.cols):
            raise ValueError(f"rounders must be an integer from 0 (one per column) to cols ({self.cols}), not {_short(v)}")
        if self.accumulation != "block" and v:
            raise ValueError(f"rounders applies to accumulation 'block'; sequential mode takes 0, not {_short(v)}")
        formats = self.formats
        if isinstance(formats, list):
            object.__setattr__(self, "formats", tuple(formats))
            formats = self.formats
        if (not isinstance(formats, tuple) or not formats or not all(isinstance(f, str) for f in formats)
                or len(set(formats)) != len(formats) or any(f not in ("e4m3", "e5m2") for f in formats)):
            shown = repr(formats)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"formats must be a non-empty list of distinct names from e4m3, e5m2, not {shown}")

    # ---- derived geometry ------------------------------------------------------------
    @property
    def line_bytes(self):
        """Bytes per scratchpad line: the next power of two >= max(rows, cols)."""
        return _pow2(max(self.rows, self.cols))

    @property
    def acc_line_values(self):
        """FP32 values per accumulator line (power of two >= cols; lanes past cols read as 0)."""
        return _pow2(self.cols)

    @property
    def acc_line_bytes(self):
        return 4 * self.acc_line_values

    @property
    def bus_bytes(self):
        return self.axi_data_bits // 8

    @property
    def address_space(self):
        """Bytes of DRAM the NPU can address: ``2**axi_addr_bits``."""
        return 1 << self.axi_addr_bits

    @property
    def sp_addr_bits(self):
        return (self.sp_lines - 1).bit_length()

    @property
    def acc_addr_bits(self):
        return (self.acc_lines - 1).bit_length()

    @property
    def vector_lanes_built(self):
        """Lanes of the vector unit as built (:attr:`vector_lanes`, 0 meaning :attr:`cols`)."""
        return self.vector_lanes or self.cols

    @property
    def store_lanes_built(self):
        """Lanes of the store unit's requantizer as built (:attr:`store_lanes`, 0 meaning :attr:`cols`)."""
        return self.store_lanes or self.cols

    @property
    def vector_passes(self):
        """Passes of a row through the vector unit."""
        return -(-self.cols // self.vector_lanes_built)

    @property
    def store_passes(self):
        """Passes of a row through the requantizer."""
        return -(-self.cols // self.store_lanes_built)

    @property
    def block_fill(self):
        """Block mode: cycles the array takes beyond ``rows`` (hdl.array.BlockArray.latency -
        rows): the column's partial read, the PEs, the rounding and the binary32 addition."""
        return 1 + self.pe_stages + self.round_stages + self.add_stages + self.round_passes - 1

    @property
    def round_passes(self):
        """Block mode: cycles a committing MATMUL row takes through the rounders."""
        return -(-self.cols // (self.rounders or self.cols))

    @property
    def column_products(self):
        """How each column's block-mode PEs form their products: ``"dsp"`` or ``"lut"`` per column."""
        if self.multipliers == "mixed":
            return ("dsp",) * self.dsp_columns + ("lut",) * (self.cols - self.dsp_columns)
        return (self.multipliers,) * self.cols

    def supports(self, fmt_name):
        return fmt_name in self.formats

    # ---- serialization -----------------------------------------------------------------
    def to_dict(self):
        d = asdict(self)
        d["formats"] = list(self.formats)
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ValueError(f"an NPU config must be a JSON object, not {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown config key {_short(unknown[0])}; allowed keys: {', '.join(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text):
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            raise ValueError("config is nested too deeply to be an NPU config") from None
        except ValueError as exc:
            if "given twice" in str(exc):
                raise ValueError(str(exc)) from None
            # an integer literal of thousands of digits
            raise ValueError("config is not valid JSON: it holds a number with too many digits") from None
        return cls.from_dict(data)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValueError(f"config key {_short(k)} is given twice")
    return dict(pairs)


def load_config(path):
    """Read an :class:`NPUConfig` from a JSON file (``None``: the default configuration)."""
    if path is None:
        return NPUConfig()
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    return NPUConfig.from_json(text)
