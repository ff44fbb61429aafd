"""Text assembler and disassembler for the fp8npu command set (:mod:`fp8npu.hdl.isa`).

Every table comes from the ISA module: opcodes from :class:`~fp8npu.hdl.isa.Opcode`, fields and
their widths from :data:`~fp8npu.hdl.isa.FIELDS` and :data:`~fp8npu.hdl.isa.COMMON_FIELDS`.

Syntax
------
One command per line; ``#`` starts a comment; blank lines are ignored::

    # copy 8 rows of 8 bytes into scratchpad line 0, then tell the compute unit
    LOAD dst=sp sram_addr=0 rows=8 row_bytes=8 dram_addr=0x10000 dram_stride=8 push_next
    MATMUL a_addr=0 a_stride=1 b_addr=8 m=8 k=8 pop_prev push_next
    STORE fmt=e4m3 saturate=1 rows=8 cols=8 dram_addr=0x20000 dram_stride=8 scale=0.5 pop_prev
    END

* A line starts with an opcode name (any case), followed by ``field=value`` pairs and token
  flags (``pop_prev``, ``pop_next``, ``push_prev``, ``push_next``, bare words) in any order.
  A field or flag may be given once; fields not given are 0. Field names, flags and symbolic
  values are case-insensitive.
* A value is a decimal integer (``12``) or ``0x`` hexadecimal (``0x1f``). Some fields also take
  names (:data:`SYMBOLS`): LOAD ``dst=sp|acc``, STORE ``fmt=fp32|e4m3|e5m2``, MATMUL
  ``fmt_a``/``fmt_b=e4m3|e5m2``, SYNC ``unit=load|compute|store``.
* FP32 fields (:data:`FLOAT_FIELDS`: STORE ``scale``) take a float literal with a point or an
  exponent (``0.5``, ``2.0``, ``1e-3``, ``-inf``), packed with :func:`~fp8npu.hdl.isa.pack_f32`,
  or raw FP32 bits in ``0x`` hexadecimal. A plain decimal integer is refused there, because
  ``scale=2`` would silently mean the bit pattern 2 (a tiny subnormal).
* ``.word256 0x<1 to 64 hex digits>`` emits one raw command: the 256-bit value whose bit ``i``
  is command bit ``i`` (byte ``i // 8``, bit ``i % 8``; the same numbering as the field tables).

The assembler encodes; it does not validate against an NPU configuration (use
:func:`fp8npu.hdl.isa.validate` for that).

Disassembly
-----------
:func:`disassemble` prints the canonical form: the opcode in upper case, then every field of the
opcode in :data:`~fp8npu.hdl.isa.FIELDS` order, then the set token flags in
:data:`~fp8npu.hdl.isa.COMMON_FIELDS` order, separated by single spaces. Values print as

* the name, for a field with :data:`SYMBOLS` whose value has a name;
* a float literal, for an FP32 field, when the shortest such literal packs back to the same
  bits (every value except NaNs); otherwise ``0x`` and 8 hex digits;
* ``0x`` and 8 hex digits, for the other 32-bit fields (DRAM addresses and strides);
* decimal, for everything else.

A command with an unknown opcode or a reserved bit set prints as a ``.word256`` line with a
comment saying why. So ``assemble(disassemble(b)) == b`` for every whole number of commands,
and ``disassemble(assemble(text))`` is a fixed point of ``disassemble(assemble(...))``.

Errors raise :class:`AsmError` (a :class:`~fp8npu.hdl.isa.DecodeError`) with one sentence that
starts with the line number, e.g. ``line 3: unknown opcode 'MATMU'; allowed: LOAD, ...``.
"""

import re
import struct

from fp8npu.hdl import isa

__all__ = ["AsmError", "SYMBOLS", "FLOAT_FIELDS", "FLAGS", "RAW_DIRECTIVE", "assemble", "disassemble",
           "format_command"]


class AsmError(isa.DecodeError):
    """Assembly source or a program image that cannot be translated; the message says why.

    Attributes
    ----------
    line : int or None
        1-based source line of the error (None for errors not tied to a line).
    """

    def __init__(self, message, line=None):
        # a hostile source can put a megabyte on one line: quote at most a little of it
        message = re.sub(r"'([^']{60})[^']{21,}'", r"'\1...'", message)
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


def _names(enum_cls):
    return tuple(member.name.lower() for member in enum_cls)


#: Names a field value may be written as: (opcode, field) -> names of the values 0, 1, ...
SYMBOLS = {
    (isa.Opcode.LOAD, "dst"): ("sp", "acc"),
    (isa.Opcode.STORE, "fmt"): _names(isa.StoreFormat),
    (isa.Opcode.MATMUL, "fmt_a"): ("e4m3", "e5m2"),
    (isa.Opcode.MATMUL, "fmt_b"): ("e4m3", "e5m2"),
    (isa.Opcode.SYNC, "unit"): _names(isa.Unit),
}

#: Fields that hold FP32 bit patterns (written as float literals or 0x bits).
FLOAT_FIELDS = frozenset({(isa.Opcode.STORE, "scale")})

#: The raw-command directive.
RAW_DIRECTIVE = ".word256"

#: The token flags, in encoding order (the 1-bit common fields after the opcode).
FLAGS = tuple(f.name for f in isa.COMMON_FIELDS if f.name != "opcode")

_DEC = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_FLOAT = re.compile(r"[+-]?(([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+|inf|infinity)",
                    re.IGNORECASE)
_OPCODES = frozenset(int(o) for o in isa.Opcode)


def _field_map(opcode):
    """The opcode's own fields (not the common ones) by name."""
    return {f.name: f for f in isa.FIELDS[opcode]}


# ----------------------------------------------------------------------------------------------
# Assembler
# ----------------------------------------------------------------------------------------------

def _parse_int(text):
    """Decimal or 0x hex integer (a minus sign is read, so range errors show it), else None."""
    if _HEX.fullmatch(text.removeprefix("-")):
        return int(text, 16)
    if _DEC.fullmatch(text.removeprefix("-")):
        return int(text, 10)
    return None


def _parse_float_bits(name, text, lineno):
    """FP32 bits of a float literal, or None if ``text`` is not one."""
    if not _FLOAT.fullmatch(text):
        return None
    bits = _pack_f32_or_none(float(text))
    if bits is None:
        raise AsmError(f"bad value {text!r} for field {name}: beyond the FP32 range", lineno)
    return bits


#: Longest value literal read: every field is at most 32 bits (a float needs no more either).
MAX_LITERAL = 80


def _parse_value(opcode, name, text, lineno):
    """Integer value of ``name=text`` (range checks are left to :func:`fp8npu.hdl.isa.encode`)."""
    if len(text) > MAX_LITERAL:
        raise AsmError(f"bad value {text[:20]}... for field {name}: {len(text)} characters, "
                       f"at most {MAX_LITERAL} are read", lineno)
    symbols = SYMBOLS.get((opcode, name), ())
    if text.lower() in symbols:
        return symbols.index(text.lower())
    if (opcode, name) in FLOAT_FIELDS:
        bits = _parse_float_bits(name, text, lineno)
        if bits is not None:
            return bits
        if _HEX.fullmatch(text):
            return int(text, 16)
        hint = f"write {text}.0 for the number" if _parse_int(text) is not None else "expected a float like 0.5"
        raise AsmError(f"bad value {text!r} for field {name}: {hint} or 0x hex for the FP32 bits", lineno)
    value = _parse_int(text)
    if value is None:
        expected = ", ".join(symbols) + " or an integer" if symbols else "an integer"
        raise AsmError(f"bad value {text!r} for field {name}: expected {expected}", lineno)
    return value


def _parse_flag(word, flags, lineno):
    """Record a bare token flag in ``flags``."""
    flag = word.lower()
    if flag not in FLAGS:
        raise AsmError(f"unknown flag {word!r}; flags: {', '.join(FLAGS)}", lineno)
    if flag in flags:
        raise AsmError(f"flag {flag} given twice", lineno)
    flags[flag] = 1


def _parse_field(opcode, token, values, lineno):
    """Record a ``field=value`` token in ``values``."""
    name, _, text = token.partition("=")
    name = name.lower()
    if name in FLAGS:
        raise AsmError(f"flag {name} takes no value; write {name} alone", lineno)
    if name not in _field_map(opcode):
        fields = ", ".join(f.name for f in isa.FIELDS[opcode]) or "none"
        raise AsmError(f"{opcode.name} has no field {name!r}; fields: {fields}", lineno)
    if name in values:
        raise AsmError(f"field {name} given twice", lineno)
    values[name] = _parse_value(opcode, name, text, lineno)


def _parse_opcode(word, lineno):
    """The :class:`~fp8npu.hdl.isa.Opcode` named ``word`` (any case)."""
    try:
        return isa.Opcode[word.upper()]
    except KeyError:
        allowed = ", ".join(o.name for o in isa.Opcode)
        raise AsmError(f"unknown opcode {word!r}; allowed: {allowed}", lineno) from None


def _assemble_command(tokens, lineno):
    """32 bytes of one ``OPCODE field=value ... flags`` line (``tokens`` already split)."""
    opcode = _parse_opcode(tokens[0], lineno)
    values, flags = {}, {}
    for token in tokens[1:]:
        if "=" in token:
            _parse_field(opcode, token, values, lineno)
        elif token.lower() in _field_map(opcode):
            raise AsmError(f"field {token.lower()} needs a value: write {token.lower()}=VALUE", lineno)
        else:
            _parse_flag(token, flags, lineno)
    try:
        return isa.encode(opcode, **flags, **values)
    except isa.DecodeError as exc:
        raise AsmError(str(exc), lineno) from None


def _assemble_raw(tokens, lineno):
    """32 bytes of one ``.word256 0x...`` line."""
    if len(tokens) != 2:
        raise AsmError(f"{RAW_DIRECTIVE} takes one value, 0x and up to 64 hex digits", lineno)
    text = tokens[1]
    if not _HEX.fullmatch(text) or len(text) - 2 > isa.COMMAND_BITS // 4:
        raise AsmError(f"bad value {text!r} for {RAW_DIRECTIVE}: expected 0x and up to 64 hex digits", lineno)
    return int(text, 16).to_bytes(isa.COMMAND_BYTES, "little")


def _assemble_line(line, lineno):
    """32 bytes for a source line, or b"" for a blank or comment line."""
    tokens = line.split("#", 1)[0].split()
    if not tokens:
        return b""
    if tokens[0].startswith("."):
        if tokens[0].lower() != RAW_DIRECTIVE:
            raise AsmError(f"unknown directive {tokens[0]!r}; allowed: {RAW_DIRECTIVE}", lineno)
        return _assemble_raw(tokens, lineno)
    return _assemble_command(tokens, lineno)


def assemble(text):
    """Assemble source text into a program image.

    Parameters
    ----------
    text : str
        Assembly source, one command per line (see the module docstring).

    Returns
    -------
    bytes
        The commands, 32 bytes each, in source order.

    Raises
    ------
    AsmError
        On the first bad line; the message starts with ``line N:``.
    """
    # split on "\n" only, so line numbers agree with editors (form feeds and the like are blanks)
    return b"".join(_assemble_line(line, n) for n, line in enumerate(text.split("\n"), 1))


# ----------------------------------------------------------------------------------------------
# Disassembler
# ----------------------------------------------------------------------------------------------

def _pack_f32_or_none(x):
    """FP32 bits of ``x``, or None if it rounds beyond the FP32 range."""
    try:
        return isa.pack_f32(x)
    except OverflowError:
        return None


def _f32_literal(bits):
    """Shortest float literal that packs back to ``bits``, or None for NaNs."""
    (x,) = struct.unpack("<f", bits.to_bytes(4, "little"))
    if x != x:
        return None
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    for digits in range(1, 10):
        shortest = float(f"{x:.{digits}g}")
        if _pack_f32_or_none(shortest) == bits:
            return repr(shortest)
    raise AssertionError(f"no float literal for FP32 bits 0x{bits:08x}")  # 9 digits always suffice


def _format_value(opcode, field, value):
    """Canonical text of one field value (see the module docstring)."""
    symbols = SYMBOLS.get((opcode, field.name), ())
    if value < len(symbols):
        return symbols[value]
    if (opcode, field.name) in FLOAT_FIELDS:
        literal = _f32_literal(value)
        if literal is not None:
            return literal
    if field.width == 32:
        return f"0x{value:08x}"
    return str(value)


def _raw_line(chunk, why):
    word = int.from_bytes(chunk, "little")
    return f"{RAW_DIRECTIVE} 0x{word:0{isa.COMMAND_BITS // 4}x}  # {why}"


def format_command(chunk):
    """Canonical assembly text of one 32-byte command (no newline).

    Parameters
    ----------
    chunk : bytes
        Exactly :data:`~fp8npu.hdl.isa.COMMAND_BYTES` bytes.

    Returns
    -------
    str
        ``OPCODE field=value ... flags``, or a ``.word256`` line for an unknown opcode or
        reserved bits set.
    """
    cmd = isa.decode(chunk)
    if cmd.opcode not in _OPCODES:
        return _raw_line(chunk, f"unknown opcode {cmd.opcode}")
    opcode = isa.Opcode(cmd.opcode)
    if cmd.fields["_reserved"]:
        return _raw_line(chunk, f"{opcode.name} with reserved bits set")
    parts = [opcode.name]
    parts += [f"{f.name}={_format_value(opcode, f, cmd.fields[f.name])}" for f in isa.FIELDS[opcode]
              if f.name not in isa.BLOCK_FIELDS or cmd.fields[f.name]]      # block-mode fields only when set
    parts += [flag for flag in FLAGS if getattr(cmd, flag)]
    return " ".join(parts)


def disassemble(data):
    """Disassemble a program image into canonical source text.

    Parameters
    ----------
    data : bytes
        A whole number of 32-byte commands.

    Returns
    -------
    str
        One line per command, each ending in a newline (empty for empty input).

    Raises
    ------
    AsmError
        If the length is not a multiple of 32 bytes.
    """
    data = bytes(data)
    if len(data) % isa.COMMAND_BYTES:
        raise AsmError(f"a program is a whole number of {isa.COMMAND_BYTES}-byte commands; "
                       f"{len(data)} bytes is not")
    chunks = (data[i:i + isa.COMMAND_BYTES] for i in range(0, len(data), isa.COMMAND_BYTES))
    return "".join(format_command(chunk) + "\n" for chunk in chunks)
