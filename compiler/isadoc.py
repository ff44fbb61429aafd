"""Generate docs/isa.md, the instruction-set reference, from :mod:`fp8npu.hdl.isa`.

Every table in the page (fields, bit diagrams, error codes, registers) and every example
encoding is computed from the ISA module and the assembler, so the page cannot drift from the
code; tests/test_isa_doc.py checks that docs/isa.md equals :func:`render_isa_markdown`.

Rewrite the page after changing the ISA::

    python -m fp8npu.compiler.isadoc            # rewrites docs/isa.md
    python -m fp8npu.compiler.isadoc --check    # exit status 1 if docs/isa.md is stale
"""

import argparse
import sys
from pathlib import Path

from fp8npu.compiler import asm
from fp8npu.hdl import isa

__all__ = ["DOC_PATH", "EXAMPLES", "EXAMPLE_PROGRAM", "render_isa_markdown", "bit_diagram", "main"]

#: Where the generated page lives.
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "isa.md"

#: One example per opcode (legal for the default NPUConfig with the window [0, 0x10000)).
EXAMPLES = {
    isa.Opcode.LOAD: "LOAD dst=sp sram_addr=8 rows=8 row_bytes=8 dram_addr=0x1040 dram_stride=8 push_next",
    isa.Opcode.STORE: ("STORE fmt=e4m3 saturate=1 rows=8 cols=8 dram_addr=0x2000 dram_stride=8 scale=0.5 "
                       "pop_prev"),
    isa.Opcode.MATMUL: "MATMUL a_addr=0 a_stride=1 b_addr=8 acc_addr=0 m=8 k=8 pop_prev push_next",
    isa.Opcode.EPILOGUE: "EPILOGUE use_scale=1 use_bias=1 src=0 dst=0 rows=8 scale_addr=16 bias_addr=17",
    isa.Opcode.BLOCKSCALE: "BLOCKSCALE src=32 dst=0 rows=8 row_scale=64 col_scale=72",
    isa.Opcode.SYNC: "SYNC unit=compute pop_next push_prev",
    isa.Opcode.END: "END",
}

#: A complete program for the default NPUConfig: C = A x W for 8 x 8 E4M3 matrices.
EXAMPLE_PROGRAM = """\
# A (8 rows of 8 E4M3 bytes) into scratchpad lines 0-7
LOAD dst=sp sram_addr=0 rows=8 row_bytes=8 dram_addr=0x1000 dram_stride=8
# W (k = 8 rows of n = 8 bytes) into lines 8-15, then give compute a token
LOAD dst=sp sram_addr=8 rows=8 row_bytes=8 dram_addr=0x1040 dram_stride=8 push_next
# wait for both loads, multiply into accumulator lines 0-7, then give store a token
MATMUL a_addr=0 a_stride=1 b_addr=8 acc_addr=0 m=8 k=8 pop_prev push_next
# wait for the product, write it as E4M3 scaled by 0.5
STORE fmt=e4m3 saturate=1 rows=8 cols=8 dram_addr=0x2000 dram_stride=8 scale=0.5 pop_prev
END
"""

_WORD_BITS = 64


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def _cell(text):
    return str(text).replace("|", "\\|")


def _table(header, rows):
    """A Markdown table (cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bits(msb, lsb):
    return str(msb) if msb == lsb else f"{msb}:{lsb}"


def _segments(opcode, split=isa.COMMAND_BITS):
    """(msb, lsb, field name or None for reserved) runs covering all command bits, from bit 0 up.

    Runs also break at every multiple of ``split`` bits (the diagram rows).
    """
    owner = [None] * isa.COMMAND_BITS
    for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]:
        owner[f.lsb:f.msb + 1] = [f.name] * f.width
    segments, lsb = [], 0
    for bit in range(1, isa.COMMAND_BITS + 1):
        if bit == isa.COMMAND_BITS or bit % split == 0 or owner[bit] != owner[lsb]:
            segments.append((bit - 1, lsb, owner[lsb]))
            lsb = bit
    return segments


def _field_rows(opcode):
    """Field table rows in bit order, reserved runs included."""
    docs = {f.name: f.doc for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]}
    return [[f"`{name}`" if name else "*reserved*", _bits(msb, lsb), msb - lsb + 1,
             docs[name] if name else "must be 0"] for msb, lsb, name in _segments(opcode)]


def bit_diagram(opcode):
    """ASCII diagram of the command: one box row per 64-bit word, most significant bit left.

    Parameters
    ----------
    opcode : Opcode

    Returns
    -------
    str
        Lines without a trailing newline; each box shows the bit range and the field name
        (``reserved`` for bits that must be 0).
    """
    lines = []
    segments = _segments(opcode, _WORD_BITS)
    for word in range(isa.COMMAND_BITS // _WORD_BITS):
        lo = word * _WORD_BITS
        hi = lo + _WORD_BITS - 1
        row = [s for s in reversed(segments) if lo <= s[1] <= hi]
        cells = [(_bits(msb, lsb), name or "reserved") for msb, lsb, name in row]
        widths = [max(len(b), len(n)) + 2 for b, n in cells]
        rule = "+" + "+".join("-" * w for w in widths) + "+"
        lines.append(f"word {word}: bits {hi}:{lo}, bytes {lo // 8}-{hi // 8}")
        lines.append(rule)
        lines.append("|" + "|".join(b.center(w) for (b, _), w in zip(cells, widths)) + "|")
        lines.append("|" + "|".join(n.center(w) for (_, n), w in zip(cells, widths)) + "|")
        lines.append(rule)
    return "\n".join(lines)


def _encoding(line):
    """Canonical assembly of ``line`` and its 32 bytes as 64-bit words and memory-order bytes."""
    data = asm.assemble(line)
    words = []
    for word in range(isa.COMMAND_BYTES // 8):
        chunk = data[word * 8:word * 8 + 8]
        value = int.from_bytes(chunk, "little")
        place = f"bytes {word * 8}-{word * 8 + 7}:"
        words.append(f"word {word} = 0x{value:016x}   {place:<13}{chunk.hex(' ')}")
    return asm.disassemble(data).rstrip("\n"), "\n".join(words)


def _code(text, lang=""):
    return f"```{lang}\n{text.rstrip()}\n```"


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

def _unit_of(opcode):
    if opcode in isa.OPCODE_UNIT:
        return isa.OPCODE_UNIT[opcode].name.lower()
    if opcode == isa.Opcode.SYNC:
        return "the one in its `unit` field"
    return "none (the command decoder waits for every unit)"


def _intro():
    E = isa.ErrorCode
    chain = " -> ".join(u.name.lower() for u in isa.Unit)
    common = _table(["field", "bits", "width", "description"],
                    [[f"`{f.name}`", _bits(f.msb, f.lsb), f.width, f.doc] for f in isa.COMMON_FIELDS])
    units = _table(["opcode", "value", "unit"], [[o.name, int(o), _unit_of(o)] for o in isa.Opcode])
    return f"""\
# fp8npu instruction set

<!-- Generated by `python -m fp8npu.compiler.isadoc` from hdl/isa.py; do not edit by hand.
     tests/test_isa_doc.py checks that this file matches the code. -->

The NPU runs a program of commands that the host places in DRAM. The host writes the program's
address and length to the `PROG_ADDR` and `PROG_LEN` registers and sets bit 0 of `CTRL`; the
NPU fetches the commands by DMA, runs them and sets `STATUS` done (or error, with the reason in
`ERROR` and the command's address in `ERROR_ADDR`); its `irq` output is high from then until the
next start.

## Commands

A command is {isa.COMMAND_BITS} bits ({isa.COMMAND_BYTES} bytes), stored little-endian: bit `i` of a command is
bit `i % 8` of byte `i // 8`, and a program is a whole number of commands. Every command starts
with the same {sum(f.width for f in isa.COMMON_FIELDS)} bits:

{common}

Every bit not named by a command's fields is reserved and must be 0. Field values are unsigned.

## Units and tokens

Three units form a chain, `{chain}`: the load unit copies DRAM into the scratchpad
or the accumulator, the compute unit runs the MAC array on SRAM, the store unit copies
accumulators back to DRAM. The load unit has no previous unit and the store unit no next one.

{units}

Commands enter their unit's queue in program order, and each unit runs its own queue in order.
Between neighbouring units, tokens order the work: a command with `pop_prev` (`pop_next`) waits
until the previous (next) unit has given a token, and consumes it, before it runs; a command
with `push_prev` (`push_next`) gives one token to the previous (next) unit after it has
finished. Tokens let DMA overlap compute (double buffering) while keeping every read after the
write it depends on: a consumer pops what its producer pushed, and a producer can pop a token
that says a buffer is free again. `SYNC` moves tokens without doing work. `END` takes no token
flags; it waits until every unit has finished. If every unit waits for a token that no command
can give, the NPU stops with `{E.DEADLOCK.name}`. Besides commands whose tokens it has taken, a
unit holds one command waiting for its tokens and `queue_depth` more in its queue (none with
`queue_depth` 0); the command decoder waits while the next command's unit has no room. So
whether a program whose pops come before their pushes deadlocks depends on the queue depth; a
program in which every pop has an earlier push, as the compiler makes them, never deadlocks.

Each of the four token counters ({", ".join(f"`{t.name}`" for t in isa.Token)}) has a limit
that does not depend on timing: over every first part of the program, the pushes to one
counter minus the pops from it (its *program-order balance*) may be at most
the configuration's `token_limit` ({isa.TOKEN_LIMIT:,}, `isa.TOKEN_LIMIT`, unless a small FPGA's
configuration sets less). The command decoder keeps the four balances of the
commands it has queued; a command that would take one past the limit stops the NPU with
`{E.TOKEN_LIMIT.name}` at that command, after its static checks. A counter itself can then never
hold more than the limit plus the pops already queued, and never wraps.

An example: C = A x W for 8 x 8 E4M3 matrices on the default configuration (8 x 8 array,
64-bit bus).

{_code(EXAMPLE_PROGRAM, "text")}

## Static checks

Before a command is queued, the command decoder checks it in this order and stops at the first
failure with that error code (`isa.validate`; hardware and simulator apply the same rules):

1. `{E.BAD_OPCODE.name}`: the opcode is not one of the table above, or is `EPILOGUE` or
   `BLOCKSCALE` on a configuration built without the vector unit (`vector_unit` false).
2. `{E.BAD_FIELD.name}`: a reserved bit is set; `END` has a token flag; `SYNC` names no unit
   (`unit` > 2); a token flag points to a neighbour the unit lacks (load: `pop_prev`,
   `push_prev`; store: `pop_next`, `push_next`); `LOAD` into the accumulator with `row_bytes`
   not a multiple of 4; `STORE` with `fmt` > 2 or `cols` outside 1..cols of the array;
   `MATMUL` with `k` outside 1..rows of the array.
3. `{E.BAD_FORMAT.name}`: `MATMUL` `fmt_a` or `fmt_b`, or the FP8 `fmt` of `STORE`, is a format the
   configuration does not support; a `STORE` to E4M3 or E5M2 on a configuration built without
   FP8 stores (`fp8_store` false).
4. `{E.SRAM_RANGE.name}`: a scratchpad or accumulator line touched lies beyond the SRAM.
5. `{E.MISALIGNED.name}`: `LOAD` or `STORE` `dram_addr` or `dram_stride` is not a multiple of the
   bus width in bytes.
6. `{E.DRAM_WINDOW.name}`: a `LOAD` or `STORE` that moves bytes touches DRAM outside
   [`WIN_BASE`, `WIN_LIMIT`).

`{E.DEADLOCK.name}`, `{E.FETCH_WINDOW.name}`, `{E.BUS_ERROR.name}`, `{E.NO_END.name}` and `{E.TOKEN_LIMIT.name}` are found while
the program runs. `{E.FETCH_WINDOW.name}` (at `PROG_ADDR`): `PROG_ADDR` is not a multiple of 32, or
[`PROG_ADDR`, `PROG_ADDR` + 32 x `PROG_LEN`) does not lie inside [`WIN_BASE`, `WIN_LIMIT`)
(for `PROG_LEN` = 0: `PROG_ADDR` < `WIN_BASE` or `PROG_ADDR` > `WIN_LIMIT`); the sum is
computed without truncation. It is also `{E.FETCH_WINDOW.name}` when `WIN_LIMIT` is past the NPU's
address space (2^`axi_addr_bits` bytes, `NPUConfig.address_space`): a run reaches only the
addresses its configuration's AXI address bits can name, and the address registers and
arithmetic inside the NPU are that wide. For `{E.BUS_ERROR.name}` (a read or write answered SLVERR or DECERR), `ERROR_ADDR` is the
`LOAD` or `STORE` whose transfer was refused, or the command whose fetch was refused. A refused
fetch is reported when that command's turn comes, after the commands before it have been
checked (the NPU fetches ahead; a refused fetch past `END` is not an error). A refused
`LOAD` or `STORE` transfer is reported at once, and wins over any other error found in the
same clock cycle. The NPU still completes every burst it has started before it reports the
error, as AXI requires.

The NPU fetches commands ahead of running them, so a program that stores over its own
commands has undefined results.

`PROG_ADDR`, `PROG_LEN`, `WIN_BASE` and `WIN_LIMIT` drop writes while `STATUS` shows busy: a run
keeps the program and the window it started with.

The host (fp8npu's simulators and drivers) never starts the NPU with a DMA window that reaches
past the memory, nor with a memory larger than the NPU's address space: [`WIN_BASE`,
`WIN_LIMIT`) must lie inside the DRAM, and the DRAM inside the address space
(`isa.launch_problem`). The
simulated DRAMs answer SLVERR to any access past their memory and never wrap an address
around. The performance counters (`CYCLES`, `MAC_BUSY`, `DMA_BYTES`, `STALL`, `COMMANDS`) are
32 bits and count modulo 2^32. An NPU built with `perf_counters` false (for small FPGAs) has no
`MAC_BUSY`, `DMA_BYTES` and `STALL` counters: they read 0."""


def _assembly():
    symbols = _table(["opcode", "field", "names (value 0, 1, ...)"],
                     [[o.name, f"`{n}`", ", ".join(f"`{s}`" for s in names)]
                      for (o, n), names in asm.SYMBOLS.items()])
    floats = ", ".join(f"{o.name} `{n}`" for o, n in sorted(asm.FLOAT_FIELDS))
    flags = ", ".join(f"`{f}`" for f in asm.FLAGS)
    return f"""\
## Assembly syntax

`fp8npu asm SOURCE` assembles text into a program and `fp8npu disasm PROGRAM` prints a program
as text (`fp8npu.compiler.asm`). One command per line, `#` starts a comment:

```text
OPCODE field=value field=value ... flags
```

The opcode, field names, flags and names of values are case-insensitive. Values are decimal
(`12`) or `0x` hexadecimal (`0x1f`); fields not given are 0. The token flags are bare words:
{flags}. These fields also take names:

{symbols}

FP32 fields ({floats}) take a float literal with a point or exponent (`0.5`, `2.0`, `1e-3`,
`-inf`) or the raw bits in hexadecimal (`0x3f000000`); a plain decimal integer is refused there.
`{asm.RAW_DIRECTIVE} 0x<1 to 64 hex digits>` emits one raw command, bit `i` of the value being bit
`i` of the command.

The disassembler prints every field in the order of the tables below, then the set flags:
names where a field has them, FP32 fields as the shortest float literal that gives the same
bits (hexadecimal for NaNs), other 32-bit fields (DRAM addresses and strides) as `0x` and 8
hex digits, the rest in decimal. Commands with an unknown opcode or a reserved bit set print as
`{asm.RAW_DIRECTIVE}` lines with a comment saying why, so every program disassembles to text that
assembles to the same bytes."""


def _opcode_section(opcode):
    line, encoding = _encoding(EXAMPLES[opcode])
    table = _table(["field", "bits", "width", "description"], _field_rows(opcode))
    return f"""\
### {opcode.name} (opcode {int(opcode)})

Unit: {_unit_of(opcode)}. {isa.SEMANTICS[opcode]}

{table}

{_code(bit_diagram(opcode), "text")}

Example:

{_code(line, "text")}

{_code(encoding, "text")}"""


def _errors():
    rows = [[int(e), f"`{e.name}`", isa.ERROR_TEXT[e]] for e in isa.ErrorCode]
    return "## Error codes\n\nThe `ERROR` register holds the code of the first error; it stops the NPU.\n\n" + \
        _table(["code", "name", "meaning"], rows)


def _registers():
    rows = [[f"0x{int(r):02X}", f"`{r.name}`", isa.REGISTER_DOC[r]] for r in isa.Register]
    return "## Registers\n\nAXI4-Lite control and status registers, 32 bits each, at these byte offsets.\n\n" + \
        _table(["offset", "name", "access and meaning"], rows)


def render_isa_markdown():
    """The full text of docs/isa.md, generated from :mod:`fp8npu.hdl.isa`.

    Returns
    -------
    str
        Markdown ending in a single newline.
    """
    parts = [_intro(), _assembly(), "## Opcodes"]
    parts += [_opcode_section(opcode) for opcode in isa.Opcode]
    parts += [_errors(), _registers()]
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    """Rewrite docs/isa.md, or with ``--check`` report whether it is up to date (exit status 1)."""
    parser = argparse.ArgumentParser(prog="python -m fp8npu.compiler.isadoc",
                                     description="Regenerate docs/isa.md from hdl/isa.py.")
    parser.add_argument("--check", action="store_true", help="only check that docs/isa.md is up to date")
    args = parser.parse_args(argv)
    text = render_isa_markdown()
    if args.check:
        stale = not DOC_PATH.exists() or DOC_PATH.read_text(encoding="utf-8") != text
        print(f"{DOC_PATH} is {'stale' if stale else 'up to date'}", file=sys.stderr)
        return int(stale)
    DOC_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DOC_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
