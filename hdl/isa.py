"""The fp8npu instruction set: one module for the command decoder, the assembler, the compiler
and the functional simulator.

A program is a sequence of 256-bit (32-byte) commands in DRAM, little-endian. Bit ``i`` of a
command is bit ``i % 8`` of byte ``i // 8``. Every command starts with the same 12 bits::

    [0:8]   opcode
    [8]     pop_prev    wait for (and consume) a token from the previous unit
    [9]     pop_next    wait for (and consume) a token from the next unit
    [10]    push_prev   after executing, give a token to the previous unit
    [11]    push_next   after executing, give a token to the next unit

Units form a chain ``load -> compute -> store``: the load unit has no previous unit and the
store unit no next one. Commands enter their unit's queue in program order; each unit runs its
queue in order, waiting for the tokens its command pops. Tokens let DMA overlap compute (double
buffering) while keeping every read after the write it depends on.

Every bit not named by a command's fields is reserved and must be zero. The full field
tables, with bit diagrams, are in docs/isa.md (generated from :data:`FIELDS`).
"""

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "COMMAND_BITS", "COMMAND_BYTES", "Opcode", "Unit", "UNIT_CHAIN", "Token", "TOKEN_EDGES", "TOKEN_OF_FLAG", "TOKEN_LIMIT", "StoreFormat", "field_bits", "opcode_built",
    "ErrorCode", "Field", "FIELDS", "COMMON_FIELDS", "OPCODE_UNIT", "Command", "encode", "decode",
    "encode_program", "decode_program", "validate", "token_deltas", "token_check", "Register", "REGISTER_DOC",
    "ADDRESS_SPACE", "launch_problem", "memory_problem", "launch_writes", "CONFIG_FIELDS", "BLOCK_FIELDS", "config_word", "config_fields", "describe_config_word", "config_mismatch",
    "DecodeError", "ERROR_TEXT", "field_ranges", "unit_opcodes",
]

COMMAND_BITS = 256
COMMAND_BYTES = COMMAND_BITS // 8


class Opcode(enum.IntEnum):
    LOAD = 1
    STORE = 2
    MATMUL = 3
    EPILOGUE = 4
    BLOCKSCALE = 5
    SYNC = 6
    END = 7


class Unit(enum.IntEnum):
    LOAD = 0
    COMPUTE = 1
    STORE = 2


#: The units in chain order. Tokens pass between neighbours only: each adjacent pair (a, b)
#: has a counter a -> b and one b -> a. A unit joins the NPU by taking its place here (and in
#: :data:`OPCODE_UNIT`); the token counters, the flag table and the hardware's dispatcher,
#: queues and token wiring follow from this table.
UNIT_CHAIN = (Unit.LOAD, Unit.COMPUTE, Unit.STORE)


def _token_edges(chain):
    """``(name, producer, consumer)`` of every token counter: per adjacent pair, forward then back."""
    edges = []
    for a, b in zip(chain, chain[1:]):
        edges += [(f"{a.name}_TO_{b.name}", a, b), (f"{b.name}_TO_{a.name}", b, a)]
    return tuple(edges)


#: The token counters, named producer -> consumer, numbered in :data:`UNIT_CHAIN` order
#: (LOAD_TO_COMPUTE 0, COMPUTE_TO_LOAD 1, COMPUTE_TO_STORE 2, STORE_TO_COMPUTE 3).
Token = enum.IntEnum("Token", [(name, i) for i, (name, _, _) in enumerate(_token_edges(UNIT_CHAIN))],
                     module=__name__)
Token.__doc__ = "The token counters, named producer -> consumer."

#: ``{Token: (producer, consumer)}``.
TOKEN_EDGES = {Token[name]: (a, b) for name, a, b in _token_edges(UNIT_CHAIN)}


def _token_of_flag(chain, tokens=None):
    """``{unit: (pop_prev, pop_next, push_prev, push_next)}`` counters of ``tokens`` for ``chain``."""
    tokens = tokens or Token

    def edge(a, b):
        return None if a is None or b is None else tokens[f"{a.name}_TO_{b.name}"]
    table = {}
    for i, u in enumerate(chain):
        prev = chain[i - 1] if i > 0 else None
        nxt = chain[i + 1] if i + 1 < len(chain) else None
        table[u] = (edge(prev, u), edge(nxt, u), edge(u, prev), edge(u, nxt))
    return table


#: The counter each token flag of each unit uses: (pop_prev, pop_next, push_prev, push_next).
#: None where the unit has no such neighbour (:func:`validate` refuses those flags).
TOKEN_OF_FLAG = _token_of_flag(UNIT_CHAIN)

#: Largest program-order balance of a token counter (the default and the largest
#: ``NPUConfig.token_limit``): over any first part of a program, the
#: commands' pushes to one counter minus their pops from it. A command that would take a balance
#: past it stops the NPU with TOKEN_LIMIT when it reaches the command decoder. The balance is a
#: property of the program alone (not of timing), so every implementation stops at the same
#: command; the hardware's counters are sized so they can never wrap below this limit.
TOKEN_LIMIT = 65535


class StoreFormat(enum.IntEnum):
    FP32 = 0
    E4M3 = 1
    E5M2 = 2


class ErrorCode(enum.IntEnum):
    """Value of the ERROR register; the first error stops the NPU."""

    NONE = 0
    BAD_OPCODE = 1       # opcode not in Opcode, or its unit not built (EPILOGUE, BLOCKSCALE without a vector unit)
    BAD_FIELD = 2        # reserved bit set, field value out of its range, or a token flag the unit lacks
    BAD_FORMAT = 3       # an FP8 format this configuration does not support (STORE: or no FP8 stores built)
    SRAM_RANGE = 4       # scratchpad or accumulator lines beyond the SRAM
    MISALIGNED = 5       # DRAM address or stride not a multiple of the AXI bus width in bytes
    DRAM_WINDOW = 6      # a DRAM byte outside [WIN_BASE, WIN_LIMIT)
    DEADLOCK = 7         # every unit waits for a token that no command can give
    FETCH_WINDOW = 8     # the program itself is misaligned or outside the DMA window
    BUS_ERROR = 9        # an AXI read or write answered SLVERR or DECERR
    NO_END = 10          # the program ended (PROG_LEN reached) without an END command
    TOKEN_LIMIT = 11     # a token counter's program-order balance would exceed TOKEN_LIMIT


ERROR_TEXT = {
    ErrorCode.NONE: "no error",
    ErrorCode.BAD_OPCODE: "unknown opcode, or one this NPU configuration does not build",
    ErrorCode.BAD_FIELD: "a reserved bit is set or a field is out of range",
    ErrorCode.BAD_FORMAT: "FP8 format not supported by this NPU configuration",
    ErrorCode.SRAM_RANGE: "SRAM lines out of range",
    ErrorCode.MISALIGNED: "DRAM address or stride not aligned to the bus width",
    ErrorCode.DRAM_WINDOW: "DRAM access outside the DMA window",
    ErrorCode.DEADLOCK: "deadlock: every unit waits for a token nothing will give",
    ErrorCode.FETCH_WINDOW: "program misaligned or outside the DMA window",
    ErrorCode.BUS_ERROR: "AXI bus error response",
    ErrorCode.NO_END: "program ended without END",
    ErrorCode.TOKEN_LIMIT: "more tokens pushed than popped than a token counter holds",
}


@dataclass(frozen=True)
class Field:
    name: str
    lsb: int
    width: int
    doc: str

    @property
    def msb(self):
        return self.lsb + self.width - 1


COMMON_FIELDS = (
    Field("opcode", 0, 8, "operation (see Opcode)"),
    Field("pop_prev", 8, 1, "wait for a token from the previous unit"),
    Field("pop_next", 9, 1, "wait for a token from the next unit"),
    Field("push_prev", 10, 1, "give a token to the previous unit when done"),
    Field("push_next", 11, 1, "give a token to the next unit when done"),
)

#: Per-opcode fields (after the common ones).
FIELDS = {
    Opcode.LOAD: (
        Field("dst", 12, 1, "0: scratchpad, 1: accumulator"),
        Field("sram_addr", 32, 16, "first SRAM line written"),
        Field("rows", 48, 16, "DRAM rows to copy (0: no transfer)"),
        Field("row_bytes", 64, 16, "bytes per DRAM row (accumulator: a multiple of 4)"),
        Field("dram_addr", 96, 32, "byte address of row 0 (a multiple of the bus width)"),
        Field("dram_stride", 128, 32, "bytes from one row to the next (a multiple of the bus width)"),
    ),
    Opcode.STORE: (
        Field("fmt", 12, 2, "0: FP32, 1: E4M3, 2: E5M2 (see StoreFormat)"),
        Field("saturate", 14, 1, "FP8 overflow: 1 saturates to max, 0 gives inf (E5M2) or NaN (E4M3)"),
        Field("acc_addr", 32, 16, "first accumulator line read"),
        Field("rows", 48, 16, "lines to store (0: no transfer)"),
        Field("cols", 64, 16, "values stored from each line (1..cols)"),
        Field("dram_addr", 96, 32, "byte address of row 0 (a multiple of the bus width)"),
        Field("dram_stride", 128, 32, "bytes from one row to the next (a multiple of the bus width)"),
        Field("scale", 160, 32, "FP32 scale applied before FP8 conversion"),
    ),
    Opcode.MATMUL: (
        Field("fmt_a", 12, 1, "format of A: 0 E4M3, 1 E5M2"),
        Field("fmt_b", 13, 1, "format of B: 0 E4M3, 1 E5M2"),
        Field("accumulate", 14, 1, "1: start from the accumulator (block mode: the block's partial), 0: from +0"),
        Field("commit", 15, 1, "block mode: round the block's exact partial once and add it to the accumulator"),
        Field("fresh", 16, 1, "block mode, with commit: add the rounded partial to +0 instead of the accumulator"),
        Field("a_addr", 32, 16, "scratchpad line of A row 0"),
        Field("a_stride", 48, 16, "scratchpad lines from one A row to the next"),
        Field("b_addr", 64, 16, "scratchpad line of B row 0 (k = 0)"),
        Field("acc_addr", 80, 16, "accumulator line of output row 0"),
        Field("m", 96, 16, "rows of A (0: no computation)"),
        Field("k", 112, 16, "reduction length, 1..rows"),
    ),
    Opcode.EPILOGUE: (
        Field("use_scale", 12, 1, "multiply by the per-column scale line"),
        Field("use_bias", 13, 1, "add the per-column bias line"),
        Field("src", 32, 16, "first accumulator line read"),
        Field("dst", 48, 16, "first accumulator line written"),
        Field("rows", 64, 16, "lines processed"),
        Field("scale_addr", 80, 16, "accumulator line holding the column scales"),
        Field("bias_addr", 96, 16, "accumulator line holding the column biases"),
    ),
    Opcode.BLOCKSCALE: (
        Field("src", 32, 16, "first accumulator line of the K-block partial sums"),
        Field("dst", 48, 16, "first accumulator line of the output accumulators"),
        Field("rows", 64, 16, "lines processed"),
        Field("row_scale", 80, 16, "first accumulator line of the row scales (value in lane 0)"),
        Field("col_scale", 96, 16, "accumulator line holding the column scales"),
    ),
    Opcode.SYNC: (
        Field("unit", 12, 2, "unit that moves the tokens: 0 load, 1 compute, 2 store"),
    ),
    Opcode.END: (),
}

#: MATMUL fields that only block accumulation uses (0 in a sequential configuration; the
#: disassembler shows them only when set).
BLOCK_FIELDS = frozenset({"commit", "fresh"})

OPCODE_UNIT = {
    Opcode.LOAD: Unit.LOAD,
    Opcode.STORE: Unit.STORE,
    Opcode.MATMUL: Unit.COMPUTE,
    Opcode.EPILOGUE: Unit.COMPUTE,
    Opcode.BLOCKSCALE: Unit.COMPUTE,
}

#: Short semantics of each opcode (docs/isa.md renders these).
SEMANTICS = {
    Opcode.LOAD: (
        "Copy `rows` DRAM rows of `row_bytes` bytes (row r at `dram_addr + r*dram_stride`) into "
        "consecutive SRAM lines from `sram_addr`. A row fills `ceil(row_bytes / line)` lines "
        "(line = scratchpad line bytes, or 4 x accumulator values); the last line of a row is "
        "zero-padded."),
    Opcode.STORE: (
        "For each of `rows` accumulator lines from `acc_addr`, write its first `cols` values to "
        "DRAM at `dram_addr + r*dram_stride`: as FP32 (4 bytes each), or as FP8 "
        "`convert(fp32(value * scale), fmt, saturate)` (1 byte each). Bytes outside the values "
        "are not written."),
    Opcode.MATMUL: (
        "With `W[kk][j]` = byte j of scratchpad line `b_addr + kk` and `A[i][kk]` = byte kk of "
        "line `a_addr + i*a_stride`: for every row i < m and column j < cols, "
        "`acc = (accumulate ? ACC[acc_addr+i][j] : +0)`, then for kk = 0..k-1 in order "
        "`acc = fp32(acc + A[i][kk] * W[kk][j])` (exact products), then "
        "`ACC[acc_addr+i][j] = acc`. Block accumulation (a block-mode configuration): "
        "`P = (accumulate ? PART[acc_addr+i][j] : exact 0) + sum of the k exact products`, "
        "`PART[acc_addr+i][j] = P` (an exact partial sum beside each accumulator value); with "
        "`commit`, `s = round32(P)` and `ACC[acc_addr+i][j] = fp32((fresh ? +0 : ACC[acc_addr+i][j]) + s)`. "
        "`commit` and `fresh` are refused (BAD_FIELD) in a sequential configuration, `fresh` "
        "without `commit` always."),
    Opcode.EPILOGUE: (
        "For i < rows, j < cols: `x = ACC[src+i][j]`; if use_scale `x = fp32(x * ACC[scale_addr][j])`; "
        "if use_bias `x = fp32(x + ACC[bias_addr][j])`; `ACC[dst+i][j] = x`. Two roundings, no FMA. "
        "The scale and bias lines are read once before the first row; rows go in increasing i, each "
        "read before it is written."),
    Opcode.BLOCKSCALE: (
        "Fine-grained (per K-block) scaling. For i < rows, j < cols: "
        "`s = fp32(ACC[row_scale+i][0] * ACC[col_scale][j])`, "
        "`ACC[dst+i][j] = fp32(ACC[dst+i][j] + fp32(ACC[src+i][j] * s))`. Three roundings, no FMA; "
        "all exact for power-of-two scales barring overflow and underflow. The column-scale line is "
        "read once before the first row; rows go in increasing i."),
    Opcode.SYNC: "No operation in `unit`; only its token flags act.",
    Opcode.END: "Wait until every unit has finished, then stop with DONE set.",
}


class DecodeError(ValueError):
    """A command or program that cannot be encoded or decoded; the message says why."""


@dataclass
class Command:
    """A decoded command: opcode, token flags and the opcode's fields (missing fields are 0)."""

    opcode: int
    fields: dict
    pop_prev: int = 0
    pop_next: int = 0
    push_prev: int = 0
    push_next: int = 0

    def __getattr__(self, name):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def unit(self):
        if self.opcode == Opcode.SYNC:
            u = self.fields.get("unit", 0)
            return Unit(u) if u in UNIT_CHAIN else None
        return OPCODE_UNIT.get(self.opcode)


def _all_fields(opcode):
    return COMMON_FIELDS + FIELDS.get(opcode, ())


def _index_bits(n):
    """Bits of a value below ``n``."""
    return max(1, (n - 1).bit_length())


#: Fields the checks bound, with the bits a command that passed them needs: ``cfg -> bits``.
#: Each bound holds for every command :func:`validate` passes that its unit does something
#: with; a command its unit does nothing with (a LOAD of no rows or no bytes, a STORE, MATMUL,
#: EPILOGUE or BLOCKSCALE of no rows) may have more bits set there, and a stride more bits
#: with a single row: its unit never reads them. tests/test_hdl_units.py checks each bound on
#: the largest legal value and on random commands.
_FIELD_BOUNDS = {
    # LOAD (rows >= 1, row_bytes >= 1): sram_addr + rows * lines <= the SRAM's lines, the DMA
    # span inside the window, which lies inside the address space
    (Opcode.LOAD, "sram_addr"): lambda c: _index_bits(max(c.sp_lines, c.acc_lines)),
    (Opcode.LOAD, "rows"): lambda c: max(c.sp_lines, c.acc_lines).bit_length(),
    (Opcode.LOAD, "row_bytes"): lambda c: max(c.sp_lines * c.line_bytes, c.acc_lines * c.acc_line_bytes).bit_length(),
    (Opcode.LOAD, "dram_addr"): lambda c: c.axi_addr_bits,
    (Opcode.LOAD, "dram_stride"): lambda c: c.axi_addr_bits,      # read with two rows or more
    # STORE (rows >= 1; cols is 1..cols always)
    (Opcode.STORE, "acc_addr"): lambda c: _index_bits(c.acc_lines),
    (Opcode.STORE, "rows"): lambda c: c.acc_lines.bit_length(),
    (Opcode.STORE, "cols"): lambda c: c.cols.bit_length(),
    (Opcode.STORE, "dram_addr"): lambda c: c.axi_addr_bits,
    (Opcode.STORE, "dram_stride"): lambda c: c.axi_addr_bits,
    # MATMUL (k is 1..rows always; b_addr + k <= sp_lines always; with m >= 1 the A lines and
    # the accumulator lines inside their SRAMs, so a_stride < sp_lines from two rows on)
    (Opcode.MATMUL, "k"): lambda c: c.rows.bit_length(),
    (Opcode.MATMUL, "b_addr"): lambda c: _index_bits(c.sp_lines),
    (Opcode.MATMUL, "m"): lambda c: c.acc_lines.bit_length(),
    (Opcode.MATMUL, "a_addr"): lambda c: _index_bits(c.sp_lines),
    (Opcode.MATMUL, "a_stride"): lambda c: _index_bits(c.sp_lines),
    (Opcode.MATMUL, "acc_addr"): lambda c: _index_bits(c.acc_lines),
    # EPILOGUE and BLOCKSCALE (rows >= 1: the lines read and written inside the accumulator;
    # the scale and bias lines always)
    **{(op, name): (lambda c: c.acc_lines.bit_length()) if name == "rows" else (lambda c: _index_bits(c.acc_lines))
       for op, names in ((Opcode.EPILOGUE, ("src", "dst", "rows", "scale_addr", "bias_addr")),
                         (Opcode.BLOCKSCALE, ("src", "dst", "rows", "row_scale", "col_scale")))
       for name in names},
}


def field_bits(cfg, opcode, name):
    """The low bits of field ``name`` of ``opcode`` that a command the checks passed for ``cfg``
    can need where its unit reads the field (:data:`_FIELD_BOUNDS`; the field's width where
    the checks do not bound it). The hardware's queues and units keep only these."""
    field = next(f for f in _all_fields(Opcode(opcode)) if f.name == name)
    bound = _FIELD_BOUNDS.get((Opcode(opcode), name))
    return field.width if bound is None else min(field.width, bound(cfg))


def field_ranges(opcodes, cfg=None):
    """The command bits that the common fields and the fields of ``opcodes`` occupy, as merged
    ``(lsb, width)`` ranges in increasing order: what a queue of those commands must keep
    once the checks (which read every bit) have passed. With ``cfg``, only the low
    :func:`field_bits` of each field the checks bound for that configuration."""
    spans = sorted((f.lsb, f.lsb + (f.width if cfg is None else field_bits(cfg, op, f.name)))
                   for op in opcodes for f in _all_fields(Opcode(op)))
    merged = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi - lo) for lo, hi in merged)


def opcode_built(opcode, cfg):
    """Whether ``cfg`` builds ``opcode`` (EPILOGUE and BLOCKSCALE need the vector unit): the
    checks refuse the others with BAD_OPCODE."""
    return cfg.vector_unit or Opcode(opcode) not in (Opcode.EPILOGUE, Opcode.BLOCKSCALE)


def unit_opcodes(unit, cfg=None):
    """The opcodes a unit of the chain executes (besides SYNC, which only moves its tokens);
    with ``cfg``, those that configuration builds (no EPILOGUE or BLOCKSCALE without a vector
    unit: the checks refuse them)."""
    return tuple(op for op, u in OPCODE_UNIT.items()
                 if u == unit and (cfg is None or opcode_built(op, cfg)))


def encode(opcode, pop_prev=0, pop_next=0, push_prev=0, push_next=0, **values):
    """Encode one command to 32 bytes. Unknown field names or values too wide raise DecodeError."""
    table = _ENCODE_TABLES.get(opcode)
    if table is None:
        try:
            op = Opcode(opcode)
        except ValueError:
            raise DecodeError(f"unknown opcode {opcode!r}; allowed: {', '.join(o.name for o in Opcode)}") from None
        table = _ENCODE_TABLES[opcode] = (op, {f.name: (f.lsb, 1 << f.width) for f in _all_fields(op)})
    op, known = table
    word = int(op)
    for name, value in (("pop_prev", pop_prev), ("pop_next", pop_next), ("push_prev", push_prev),
                        ("push_next", push_next), *values.items()):
        spec = known.get(name)
        if spec is None:
            raise DecodeError(f"{op.name} has no field {name!r}; fields: "
                              f"{', '.join(f.name for f in FIELDS[op]) or 'none'}")
        value = int(value)
        if not 0 <= value < spec[1]:
            raise DecodeError(f"{op.name} field {name} must be from 0 to {spec[1] - 1}, not {value}")
        word |= value << spec[0]
    return word.to_bytes(COMMAND_BYTES, "little")


_ENCODE_TABLES = {}


def decode(data):
    """Decode 32 bytes to a :class:`Command` (no validation: see :func:`validate`).

    Unknown opcodes decode with no fields; reserved bits are kept in ``fields['_reserved']``.
    """
    if len(data) != COMMAND_BYTES:
        raise DecodeError(f"a command is {COMMAND_BYTES} bytes, not {len(data)}")
    word = int.from_bytes(bytes(data), "little")
    opcode = word & 0xFF
    fields_of, used = _decode_table(opcode)
    fields = {name: (word >> lsb) & mask for name, lsb, mask in fields_of}
    fields["_reserved"] = word & ~used & ((1 << COMMAND_BITS) - 1)
    return Command(opcode, fields, (word >> 8) & 1, (word >> 9) & 1, (word >> 10) & 1, (word >> 11) & 1)


_DECODE_TABLES = {}


def _decode_table(opcode):
    """(opcode fields as (name, lsb, mask), mask of every used bit), cached per opcode value."""
    table = _DECODE_TABLES.get(opcode)
    if table is None:
        used = 0
        for f in _all_fields(opcode):
            used |= ((1 << f.width) - 1) << f.lsb
        own = tuple((f.name, f.lsb, (1 << f.width) - 1) for f in FIELDS.get(opcode, ()))
        table = _DECODE_TABLES[opcode] = (own, used)
    return table


def encode_program(commands):
    """Concatenate encoded commands (bytes, or (opcode, kwargs) pairs) into a program image."""
    out = bytearray()
    for c in commands:
        out += c if isinstance(c, (bytes, bytearray)) else encode(c[0], **c[1])
    return bytes(out)


def decode_program(data):
    if len(data) % COMMAND_BYTES:
        raise DecodeError(f"a program is a whole number of {COMMAND_BYTES}-byte commands; "
                          f"{len(data)} bytes is not")
    return [decode(data[i:i + COMMAND_BYTES]) for i in range(0, len(data), COMMAND_BYTES)]


def _ceil_div(a, b):
    return -(-a // b)


def validate(cmd, cfg, win_base, win_limit):
    """Static checks the command decoder makes before a command is queued, in this order:
    opcode, fields, format, SRAM ranges, alignment, DMA window. Returns an :class:`ErrorCode`.

    Hardware and functional simulator both apply exactly these rules (tests check it).
    """
    try:
        op = Opcode(cmd.opcode)
    except ValueError:
        return ErrorCode.BAD_OPCODE
    if not opcode_built(op, cfg):
        return ErrorCode.BAD_OPCODE
    f = cmd.fields
    if f.get("_reserved", 0):
        return ErrorCode.BAD_FIELD
    unit = cmd.unit
    if op == Opcode.END:
        if cmd.pop_prev or cmd.pop_next or cmd.push_prev or cmd.push_next:
            return ErrorCode.BAD_FIELD
        return ErrorCode.NONE
    if unit is None:
        return ErrorCode.BAD_FIELD
    pop_prev, pop_next, push_prev, push_next = TOKEN_OF_FLAG[unit]
    if (pop_prev is None and cmd.pop_prev) or (push_prev is None and cmd.push_prev):
        return ErrorCode.BAD_FIELD       # the first unit of the chain has no previous unit
    if (pop_next is None and cmd.pop_next) or (push_next is None and cmd.push_next):
        return ErrorCode.BAD_FIELD       # the last has no next one
    if op == Opcode.LOAD and f["dst"] == 1 and f["row_bytes"] % 4:
        return ErrorCode.BAD_FIELD
    if op == Opcode.STORE and (f["fmt"] > 2 or not 1 <= f["cols"] <= cfg.cols):
        return ErrorCode.BAD_FIELD
    if op == Opcode.MATMUL and not 1 <= f["k"] <= cfg.rows:
        return ErrorCode.BAD_FIELD
    if op == Opcode.MATMUL and ((f["fresh"] and not f["commit"])
                                or (cfg.accumulation != "block" and (f["commit"] or f["fresh"]))):
        return ErrorCode.BAD_FIELD
    # formats
    if op == Opcode.MATMUL:
        names = ("e4m3", "e5m2")
        if not cfg.supports(names[f["fmt_a"]]) or not cfg.supports(names[f["fmt_b"]]):
            return ErrorCode.BAD_FORMAT
    if op == Opcode.STORE and f["fmt"] in (1, 2) and (not cfg.fp8_store
                                                      or not cfg.supports(("e4m3", "e5m2")[f["fmt"] - 1])):
        return ErrorCode.BAD_FORMAT
    # SRAM ranges
    sp, acc = cfg.sp_lines, cfg.acc_lines
    if op == Opcode.LOAD and f["rows"] and f["row_bytes"]:
        line = cfg.acc_line_bytes if f["dst"] else cfg.line_bytes
        depth = acc if f["dst"] else sp
        if f["sram_addr"] + f["rows"] * _ceil_div(f["row_bytes"], line) > depth:
            return ErrorCode.SRAM_RANGE
    if op == Opcode.STORE and f["rows"] and f["acc_addr"] + f["rows"] > acc:
        return ErrorCode.SRAM_RANGE
    if op == Opcode.MATMUL:
        if f["b_addr"] + f["k"] > sp:
            return ErrorCode.SRAM_RANGE
        if f["m"] and (f["a_addr"] + (f["m"] - 1) * f["a_stride"] >= sp or f["acc_addr"] + f["m"] > acc):
            return ErrorCode.SRAM_RANGE
    if op == Opcode.EPILOGUE:
        if f["rows"] and (f["src"] + f["rows"] > acc or f["dst"] + f["rows"] > acc):
            return ErrorCode.SRAM_RANGE
        if f["scale_addr"] >= acc or f["bias_addr"] >= acc:
            return ErrorCode.SRAM_RANGE
    if op == Opcode.BLOCKSCALE:
        if f["rows"] and (f["src"] + f["rows"] > acc or f["dst"] + f["rows"] > acc
                          or f["row_scale"] + f["rows"] > acc):
            return ErrorCode.SRAM_RANGE
        if f["col_scale"] >= acc:
            return ErrorCode.SRAM_RANGE
    # alignment and DMA window
    if op in (Opcode.LOAD, Opcode.STORE):
        if f["dram_addr"] % cfg.bus_bytes or f["dram_stride"] % cfg.bus_bytes:
            return ErrorCode.MISALIGNED
        row_bytes = f["row_bytes"] if op == Opcode.LOAD else f["cols"] * (4 if f["fmt"] == 0 else 1)
        if f["rows"] and row_bytes:
            first = f["dram_addr"]
            end = first + (f["rows"] - 1) * f["dram_stride"] + row_bytes
            if first < win_base or end > win_limit:
                return ErrorCode.DRAM_WINDOW
    return ErrorCode.NONE


def token_deltas(cmd):
    """``{Token: +1 or -1}``: how a valid command changes the token balances (pushes +1, pops -1)."""
    unit = cmd.unit
    if unit is None or cmd.opcode == Opcode.END:
        return {}
    pop_prev, pop_next, push_prev, push_next = TOKEN_OF_FLAG[unit]
    deltas = {}
    for token, on, delta in ((pop_prev, cmd.pop_prev, -1), (pop_next, cmd.pop_next, -1),
                             (push_prev, cmd.push_prev, 1), (push_next, cmd.push_next, 1)):
        if on and token is not None:
            deltas[token] = deltas.get(token, 0) + delta
    return deltas


def token_check(cmd, balance, limit=TOKEN_LIMIT):
    """TOKEN_LIMIT if dispatching ``cmd`` would take a balance (``balance[token]``, updated in
    place when it does not) past ``limit`` (``NPUConfig.token_limit``; :data:`TOKEN_LIMIT` by
    default), else NONE."""
    deltas = token_deltas(cmd)
    if any(balance[t] + d > limit for t, d in deltas.items()):
        return ErrorCode.TOKEN_LIMIT
    for t, d in deltas.items():
        balance[t] += d
    return ErrorCode.NONE


class Register(enum.IntEnum):
    """AXI4-Lite control and status registers (byte offsets, 32-bit each)."""

    CTRL = 0x00          # W: bit 0 start (ignored while busy)
    STATUS = 0x04        # R: bit 0 busy, bit 1 done, bit 2 error
    ERROR = 0x08         # R: ErrorCode of the first error
    ERROR_ADDR = 0x0C    # R: DRAM address of the faulting command
    PROG_ADDR = 0x10     # RW: DRAM byte address of the program (a multiple of 32)
    PROG_LEN = 0x14      # RW: program length in commands
    WIN_BASE = 0x18      # RW: lowest DRAM byte the NPU may touch
    WIN_LIMIT = 0x1C     # RW: one past the highest DRAM byte the NPU may touch
    CYCLES = 0x20        # R: cycles busy in the last run
    MAC_BUSY = 0x24      # R: MAC operations performed (a streamed row adds k x cols)
    DMA_BYTES = 0x28     # R: bytes moved by DMA (program fetch included)
    STALL = 0x2C         # R: cycles the compute unit waited for a token or a queue
    CONFIG = 0x30        # R: the configuration built (see config_word)
    COMMANDS = 0x34      # R: commands dispatched in the last run


REGISTER_DOC = {
    Register.CTRL: "W: bit 0 starts the program (ignored while busy)",
    Register.STATUS: "R: bit 0 busy, bit 1 done, bit 2 error",
    Register.ERROR: "R: ErrorCode of the first error (0: none)",
    Register.ERROR_ADDR: "R: DRAM address of the command that caused the error",
    Register.PROG_ADDR: "RW: DRAM byte address of the program (a multiple of 32 and of the bus width)",
    Register.PROG_LEN: "RW: program length in commands",
    Register.WIN_BASE: "RW: lowest DRAM byte address the NPU may read or write",
    Register.WIN_LIMIT: "RW: one past the highest DRAM byte address the NPU may read or write",
    Register.CYCLES: "R: clock cycles of the last run",
    Register.MAC_BUSY: "R: MAC operations performed (each streamed A row adds k x cols); utilization = MAC_BUSY / (CYCLES x rows x cols)",
    Register.DMA_BYTES: "R: bytes moved by the DMA engine, program fetch included",
    Register.STALL: "R: cycles the compute unit waited for a token or for input",
    Register.CONFIG: None,     # from CONFIG_FIELDS below
    Register.COMMANDS: "R: commands dispatched in the last run",
}


ADDRESS_SPACE = 1 << 32

def launch_writes(prog_addr, prog_len, win_base, win_limit):
    """The host's register writes that start a program, in order: the four run registers,
    then CTRL bit 0 (check them first with :func:`launch_problem`)."""
    return [(Register.PROG_ADDR, prog_addr), (Register.PROG_LEN, prog_len), (Register.WIN_BASE, win_base),
            (Register.WIN_LIMIT, win_limit), (Register.CTRL, 1)]


#: Fields of the CONFIG register: (name, lsb, width, what it holds).
CONFIG_FIELDS = (
    ("rows", 0, 5, "rows"), ("cols", 5, 5, "cols"), ("bus", 10, 3, "log2 bus bytes"),
    ("sp", 13, 5, "log2 scratchpad lines"), ("acc", 18, 5, "log2 accumulator lines"),
    ("e4m3", 23, 1, "E4M3 supported"), ("e5m2", 24, 1, "E5M2 supported"),
    ("block", 25, 1, "block accumulation"), ("acc_block", 26, 3, "log2 acc_block (block accumulation)"),
    ("no_vector", 29, 1, "no vector unit (EPILOGUE, BLOCKSCALE refused)"),
    ("no_fp8_store", 30, 1, "no FP8 stores (STORE to E4M3/E5M2 refused)"),
)
REGISTER_DOC[Register.CONFIG] = "R: the configuration built: " + ", ".join(
    f"{what} in [{lsb + width - 1}:{lsb}]" if width > 1 else f"{what} in [{lsb}]"
    for _, lsb, width, what in CONFIG_FIELDS)


def config_word(cfg):
    """The CONFIG register's value for an :class:`~fp8npu.hdl.config.NPUConfig`: what a program
    compiled for that configuration needs the hardware to be."""
    values = {"rows": cfg.rows, "cols": cfg.cols, "bus": cfg.bus_bytes.bit_length() - 1,
              "sp": cfg.sp_lines.bit_length() - 1, "acc": cfg.acc_lines.bit_length() - 1,
              "e4m3": int(cfg.supports("e4m3")), "e5m2": int(cfg.supports("e5m2")),
              "block": int(cfg.accumulation == "block"),
              "acc_block": cfg.acc_block.bit_length() - 1 if cfg.accumulation == "block" else 0,
              "no_vector": int(not cfg.vector_unit), "no_fp8_store": int(not cfg.fp8_store)}
    return sum(values[name] << lsb for name, lsb, _, _ in CONFIG_FIELDS)


def config_fields(word):
    """A CONFIG value's fields by name (:data:`CONFIG_FIELDS`)."""
    return {name: (word >> lsb) & ((1 << width) - 1) for name, lsb, width, _ in CONFIG_FIELDS}


def describe_config_word(word):
    """A short description of a CONFIG value (``8x8, 64-bit bus, ...``)."""
    v = config_fields(word)
    formats = "+".join(f for f in ("e4m3", "e5m2") if v[f]) or "no formats"
    accumulation = f"block accumulation of {1 << v['acc_block']}" if v["block"] else "sequential accumulation"
    missing = "".join(text for name, text in (("no_vector", ", no vector unit"), ("no_fp8_store", ", no FP8 stores"))
                      if v[name])
    return (f"{v['rows']}x{v['cols']} array, {8 << v['bus']}-bit bus, {1 << v['sp']} scratchpad lines, "
            f"{1 << v['acc']} accumulator lines, {formats}, {accumulation}{missing}")


def config_mismatch(word, cfg):
    """None if the hardware's CONFIG ``word`` is ``cfg``'s, else one sentence saying both."""
    want = config_word(cfg)
    if word == want:
        return None
    return (f"the NPU is a {describe_config_word(word)}, but the program was built for a "
            f"{describe_config_word(want)}")


def _show_int(value):
    """An integer for a message: hex, shortened when huge (decimal conversion of huge numbers is
    refused by Python)."""
    if not isinstance(value, int):
        return type(value).__name__
    text = hex(value)
    return text if len(text) <= 20 else f"{text[:12]}... ({value.bit_length()} bits)"


def launch_problem(memory_bytes, prog_addr, prog_len, win_base, win_limit, address_space=ADDRESS_SPACE):
    """Why the host must not start the NPU with these register values on a memory of
    ``memory_bytes`` (one sentence), or None. Every engine and host path applies this one rule:
    registers are 32-bit, memory fits the NPU's address space (``address_space`` bytes:
    ``NPUConfig.address_space``), and the DMA window lies inside the memory, so no access can
    reach past it."""
    for name, value in (("PROG_ADDR", prog_addr), ("PROG_LEN", prog_len), ("WIN_BASE", win_base),
                        ("WIN_LIMIT", win_limit)):
        if not isinstance(value, int) or not 0 <= value < ADDRESS_SPACE:
            return f"{name} must be a 32-bit register value (0 to 0xffffffff), not {_show_int(value)}"
    problem = memory_problem(memory_bytes, address_space)
    if problem:
        return problem
    if not win_base <= win_limit <= memory_bytes:
        return (f"the DMA window [{_show_int(win_base)}, {_show_int(win_limit)}) must lie inside the "
                f"{memory_bytes}-byte DRAM image")
    return None


def memory_problem(memory_bytes, address_space=ADDRESS_SPACE):
    """None if a DRAM of ``memory_bytes`` fits an NPU's address space of ``address_space``
    bytes (``NPUConfig.address_space``), else one sentence saying why not."""
    if memory_bytes > address_space:
        bits = address_space.bit_length() - 1
        return (f"a DRAM of {_show_int(memory_bytes)} bytes does not fit the NPU's {bits}-bit address space "
                f"(at most {address_space:#x} bytes; axi_addr_bits sets it)")
    return None


def pack_f32(x):
    """FP32 bits of a Python float (for scale fields)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]
