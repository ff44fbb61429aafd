"""The assembler and disassembler (fp8npu.compiler.asm) and the ``fp8npu asm`` / ``fp8npu disasm``
commands: byte-exact round trips, the canonical text form, and one-sentence errors."""

import random
import re

import pytest
from fp8npu.compiler import asm, cli
from fp8npu.hdl import isa

ALLOWED = "LOAD, STORE, MATMUL, EPILOGUE, BLOCKSCALE, SYNC, END"

SOURCE = """\
# one tile: C = A x W
load dst=SP rows=8 row_bytes=8 dram_addr=0x1000 dram_stride=8    # A
LOAD sram_addr=8 rows=8 row_bytes=8 dram_addr=4160 dram_stride=0x8 PUSH_NEXT

MATMUL k=8 m=8 b_addr=8 a_stride=1 push_next pop_prev fmt_b=e5m2
Store fmt=e4m3 saturate=1 rows=8 cols=8 dram_addr=0x2000 dram_stride=8 scale=0.1 pop_prev
SYNC unit=store push_prev
END
"""

CANONICAL = """\
LOAD dst=sp sram_addr=0 rows=8 row_bytes=8 dram_addr=0x00001000 dram_stride=0x00000008
LOAD dst=sp sram_addr=8 rows=8 row_bytes=8 dram_addr=0x00001040 dram_stride=0x00000008 push_next
MATMUL fmt_a=e4m3 fmt_b=e5m2 accumulate=0 a_addr=0 a_stride=1 b_addr=8 acc_addr=0 m=8 k=8 pop_prev push_next
STORE fmt=e4m3 saturate=1 acc_addr=0 rows=8 cols=8 dram_addr=0x00002000 dram_stride=0x00000008 scale=0.1 pop_prev
SYNC unit=store push_prev
END
"""


def _random_command(rnd, opcode):
    """Encoded command of ``opcode`` with every field and flag random."""
    fields = isa.COMMON_FIELDS[1:] + isa.FIELDS[opcode]
    return isa.encode(opcode, **{f.name: rnd.getrandbits(f.width) for f in fields})


def _reserved_mask(opcode):
    mask = 0
    for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]:
        mask |= ((1 << f.width) - 1) << f.lsb
    return ~mask & ((1 << isa.COMMAND_BITS) - 1)


# ---- round trips -------------------------------------------------------------------------------

def test_canonical_form():
    program = asm.assemble(SOURCE)
    assert len(program) == 6 * isa.COMMAND_BYTES
    assert asm.disassemble(program) == CANONICAL
    assert asm.assemble(CANONICAL) == program


def test_assembly_matches_encode():
    program = asm.assemble(SOURCE)
    assert program[isa.COMMAND_BYTES:2 * isa.COMMAND_BYTES] == isa.encode(
        isa.Opcode.LOAD, sram_addr=8, rows=8, row_bytes=8, dram_addr=0x1040, dram_stride=8, push_next=1)
    store = isa.decode(program[3 * isa.COMMAND_BYTES:4 * isa.COMMAND_BYTES])
    assert store.scale == isa.pack_f32(0.1)
    assert store.fmt == isa.StoreFormat.E4M3


def test_fields_not_given_are_zero():
    assert asm.assemble("MATMUL") == isa.encode(isa.Opcode.MATMUL)
    assert asm.assemble("  end  # done") == isa.encode(isa.Opcode.END)
    assert asm.assemble("\n# nothing\n   \n") == b""
    assert asm.disassemble(b"") == ""


@pytest.mark.parametrize("opcode", list(isa.Opcode), ids=lambda o: o.name)
def test_every_opcode_round_trips_with_random_fields(opcode):
    rnd = random.Random(int(opcode))
    for _ in range(500):
        data = _random_command(rnd, opcode)
        text = asm.disassemble(data)
        assert text.split()[0] == opcode.name
        assert asm.assemble(text) == data
        assert asm.disassemble(asm.assemble(text)) == text


def test_random_bytes_round_trip():
    rnd = random.Random(2026)
    for n in range(300):
        data = bytearray(rnd.randbytes(isa.COMMAND_BYTES * rnd.randrange(1, 9)))
        if n % 2:  # a known opcode and no reserved bits in every command: the symbolic form
            for i in range(0, len(data), isa.COMMAND_BYTES):
                opcode = rnd.choice(list(isa.Opcode))
                word = int.from_bytes(data[i:i + isa.COMMAND_BYTES], "little") & ~_reserved_mask(opcode)
                word = word & ~0xFF | opcode
                data[i:i + isa.COMMAND_BYTES] = word.to_bytes(isa.COMMAND_BYTES, "little")
        text = asm.disassemble(bytes(data))
        assert asm.assemble(text) == data
        assert asm.disassemble(asm.assemble(text)) == text


def test_every_scale_bit_pattern_round_trips():
    rnd = random.Random(7)
    patterns = [0, 0x80000000, 1, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFFFFFFF]
    patterns += [rnd.getrandbits(32) for _ in range(3000)]
    for bits in patterns:
        data = isa.encode(isa.Opcode.STORE, scale=bits)
        assert asm.assemble(asm.disassemble(data)) == data


@pytest.mark.parametrize("literal, bits, shown", [
    ("0.5", 0x3F000000, "0.5"),
    ("0.1", 0x3DCCCCCD, "0.1"),
    ("100.", 0x42C80000, "100.0"),
    ("-2.0", 0xC0000000, "-2.0"),
    ("1e-3", 0x3A83126F, "0.001"),
    ("-0.0", 0x80000000, "-0.0"),
    ("1.5E+38", isa.pack_f32(1.5e38), "1.5e+38"),
    ("3.4028235e38", 0x7F7FFFFF, "3.4028235e+38"),
    ("1e-45", 0x00000001, "1e-45"),
    ("-INF", 0xFF800000, "-inf"),
    ("0x3f800000", 0x3F800000, "1.0"),
    ("0x7fc00001", 0x7FC00001, "0x7fc00001"),
])
def test_scale_literals(literal, bits, shown):
    data = asm.assemble(f"STORE scale={literal}")
    assert isa.decode(data).scale == bits
    assert asm.disassemble(data).split("scale=")[1] == shown + "\n"


def test_symbolic_and_integer_values_agree():
    for (opcode, name), names in asm.SYMBOLS.items():
        for value, symbol in enumerate(names):
            data = isa.encode(opcode, **{name: value})
            assert asm.assemble(f"{opcode.name} {name}={symbol.upper()}") == data
            assert asm.assemble(f"{opcode.name} {name}={value}") == data
            assert f"{name}={symbol}" in asm.disassemble(data).split()


def test_symbol_tables_name_real_fields():
    for (opcode, name), names in asm.SYMBOLS.items():
        field = {f.name: f for f in isa.FIELDS[opcode]}[name]
        assert len(names) <= 1 << field.width
    for opcode, name in asm.FLOAT_FIELDS:
        assert {f.name: f.width for f in isa.FIELDS[opcode]}[name] == 32
    assert asm.FLAGS == ("pop_prev", "pop_next", "push_prev", "push_next")


def test_values_without_names_print_as_integers():
    assert asm.disassemble(isa.encode(isa.Opcode.SYNC, unit=3)) == "SYNC unit=3\n"
    assert asm.assemble("SYNC unit=3") == isa.encode(isa.Opcode.SYNC, unit=3)
    assert "fmt=3 " in asm.disassemble(isa.encode(isa.Opcode.STORE, fmt=3))


def test_raw_commands():
    unknown = bytes([0xAB]) + bytes(31)
    text = asm.disassemble(unknown)
    assert text == f".word256 0x{'0' * 62}ab  # unknown opcode 171\n"
    assert asm.assemble(text) == unknown
    reserved = isa.encode(isa.Opcode.END, push_next=1)[:31] + b"\x80"
    text = asm.disassemble(reserved)
    assert text == f".word256 0x80{'0' * 59}807  # END with reserved bits set\n"
    assert asm.assemble(text) == reserved
    assert asm.assemble(".WORD256 0x7") == isa.encode(isa.Opcode.END)
    assert asm.assemble(".word256 0x" + "f" * 64) == b"\xff" * 32


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, message", [
    ("MATMU k=1", f"line 1: unknown opcode 'MATMU'; allowed: {ALLOWED}"),
    ("END\n# comment\n\nMATMUL kk=1",
     "line 4: MATMUL has no field 'kk'; fields: fmt_a, fmt_b, accumulate, commit, fresh, a_addr, a_stride, "
     "b_addr, acc_addr, m, k"),
    ("END x=1", "line 1: END has no field 'x'; fields: none"),
    ("LOAD opcode=1", "line 1: LOAD has no field 'opcode'; fields: dst, sram_addr, rows, row_bytes, "
                      "dram_addr, dram_stride"),
    ("END\nMATMUL k=70000", "line 2: MATMUL field k must be from 0 to 65535, not 70000"),
    ("MATMUL k=-1", "line 1: MATMUL field k must be from 0 to 65535, not -1"),
    ("LOAD dram_addr=0x100000000", "line 1: LOAD field dram_addr must be from 0 to 4294967295, not 4294967296"),
    ("SYNC unit=4", "line 1: SYNC field unit must be from 0 to 3, not 4"),
    ("MATMUL m=x1", "line 1: bad value 'x1' for field m: expected an integer"),
    ("MATMUL m=", "line 1: bad value '' for field m: expected an integer"),
    ("MATMUL m=1.5", "line 1: bad value '1.5' for field m: expected an integer"),
    ("MATMUL fmt_a=e4m4", "line 1: bad value 'e4m4' for field fmt_a: expected e4m3, e5m2 or an integer"),
    ("LOAD dst=dram", "line 1: bad value 'dram' for field dst: expected sp, acc or an integer"),
    ("STORE scale=2", "line 1: bad value '2' for field scale: write 2.0 for the number or 0x hex for the "
                      "FP32 bits"),
    ("STORE scale=half", "line 1: bad value 'half' for field scale: expected a float like 0.5 or 0x hex "
                         "for the FP32 bits"),
    ("STORE scale=1e39", "line 1: bad value '1e39' for field scale: beyond the FP32 range"),
    ("MATMUL k=1 m=2 k=3", "line 1: field k given twice"),
    ("MATMUL pop_prev push_next POP_PREV", "line 1: flag pop_prev given twice"),
    ("MATMUL pop_prev=1", "line 1: flag pop_prev takes no value; write pop_prev alone"),
    ("MATMUL pop", "line 1: unknown flag 'pop'; flags: pop_prev, pop_next, push_prev, push_next"),
    ("MATMUL k", "line 1: field k needs a value: write k=VALUE"),
    (".word256", "line 1: .word256 takes one value, 0x and up to 64 hex digits"),
    (".word256 0x1 0x2", "line 1: .word256 takes one value, 0x and up to 64 hex digits"),
    (".word256 12", "line 1: bad value '12' for .word256: expected 0x and up to 64 hex digits"),
    (".word256 0x" + "0" * 65,
     f"line 1: bad value '0x{'0' * 65}' for .word256: expected 0x and up to 64 hex digits"),
    (".byte 1", "line 1: unknown directive '.byte'; allowed: .word256"),
])
def test_assembly_errors(source, message):
    with pytest.raises(asm.AsmError, match=f"^{re.escape(message)}$") as info:
        asm.assemble(source)
    assert info.value.line == int(message.split()[1].rstrip(":"))
    assert isinstance(info.value, isa.DecodeError)


@pytest.mark.parametrize("size", [1, 31, 33, 100])
def test_disassemble_rejects_partial_commands(size):
    with pytest.raises(asm.AsmError,
                       match=rf"^a program is a whole number of 32-byte commands; {size} bytes is not$"):
        asm.disassemble(bytes(size))


@pytest.mark.parametrize("opcode, values, message", [
    (isa.Opcode.MATMUL, {"k": 1 << 16}, "MATMUL field k must be from 0 to 65535, not 65536"),
    (isa.Opcode.LOAD, {"dst": 2}, "LOAD field dst must be from 0 to 1, not 2"),
    (isa.Opcode.STORE, {"scale": 1 << 32}, "STORE field scale must be from 0 to 4294967295, not 4294967296"),
    (isa.Opcode.END, {"pop_prev": 2}, "END field pop_prev must be from 0 to 1, not 2"),
])
def test_encode_rejects_values_too_wide(opcode, values, message):
    with pytest.raises(isa.DecodeError, match=f"^{re.escape(message)}$"):
        isa.encode(opcode, **values)


# ---- command line ------------------------------------------------------------------------------

def test_cli_asm_then_disasm(tmp_path, capsys):
    source = tmp_path / "tile.s"
    source.write_text(SOURCE)
    assert cli.main(["asm", str(source)]) == 0
    program = tmp_path / "tile.bin"
    assert program.read_bytes() == asm.assemble(SOURCE)
    assert capsys.readouterr().err == f"wrote {program} (6 commands, 192 bytes)\n"
    assert cli.main(["disasm", str(program)]) == 0
    assert capsys.readouterr().out == CANONICAL


def test_cli_output_options(tmp_path, capsys):
    source = tmp_path / "tile.s"
    source.write_text(SOURCE)
    assert cli.main(["asm", str(source), "-o", str(tmp_path / "out.npu")]) == 0
    assert cli.main(["disasm", str(tmp_path / "out.npu"), "-o", str(tmp_path / "back.s")]) == 0
    assert (tmp_path / "back.s").read_text() == CANONICAL
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("sub", ["asm", "disasm"])
def test_cli_help(sub, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([sub, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: fp8npu {sub} [-h] [-o ")


def _cli_error(args, capsys):
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_cli_errors(tmp_path, capsys):
    missing = tmp_path / "missing.s"
    assert _cli_error(["asm", str(missing)], capsys) == \
        f"fp8npu: error: cannot read the assembly source '{missing}': No such file or directory\n"
    assert _cli_error(["disasm", str(tmp_path / "missing.bin")], capsys) == \
        f"fp8npu: error: cannot read the program '{tmp_path / 'missing.bin'}': No such file or directory\n"

    bad = tmp_path / "bad.s"
    bad.write_text("END\nMATMU k=1\n")
    assert _cli_error(["asm", str(bad)], capsys) == \
        f"fp8npu: error: {str(bad)!r}: line 2: unknown opcode 'MATMU'; allowed: {ALLOWED}\n"
    assert not (tmp_path / "bad.bin").exists()

    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes(40))
    assert _cli_error(["disasm", str(odd)], capsys) == \
        f"fp8npu: error: {str(odd)!r}: a program is a whole number of 32-byte commands; 40 bytes is not\n"

    binary = tmp_path / "latin.s"
    binary.write_bytes(b"END # \xff\n")
    assert _cli_error(["asm", str(binary)], capsys) == f"fp8npu: error: cannot read the assembly source '{binary}': not UTF-8 text\n"

    source = tmp_path / "prog.bin"
    source.write_text("END\n")
    assert _cli_error(["asm", str(source)], capsys) == \
        f"fp8npu: error: the output '{source}' would overwrite the input '{source}'; choose another with -o\n"

    assert _cli_error(["asm", str(source), "-o", str(tmp_path / "no" / "p.bin")], capsys) == \
        f"fp8npu: error: output folder '{tmp_path / 'no'}' does not exist\n"


def test_token_tables_follow_the_unit_chain():
    """The token counters and the flag table come from isa.UNIT_CHAIN: today's three units give
    the four documented counters, and a chain with a fourth unit (the planned vector unit) gets
    a pair of counters to its neighbour and flags that name them, without other edits."""
    import enum

    from fp8npu.hdl import isa
    assert [t.name for t in isa.Token] == ["LOAD_TO_COMPUTE", "COMPUTE_TO_LOAD", "COMPUTE_TO_STORE",
                                           "STORE_TO_COMPUTE"]
    U = isa.Unit
    assert isa.TOKEN_OF_FLAG[U.LOAD] == (None, isa.Token.COMPUTE_TO_LOAD, None, isa.Token.LOAD_TO_COMPUTE)
    assert isa.TOKEN_OF_FLAG[U.STORE] == (isa.Token.COMPUTE_TO_STORE, None, isa.Token.STORE_TO_COMPUTE, None)
    assert all(isa.TOKEN_EDGES[t] == (U[t.name.split("_TO_")[0]], U[t.name.split("_TO_")[1]]) for t in isa.Token)
    Four = enum.IntEnum("Four", {"LOAD": 0, "COMPUTE": 1, "VECTOR": 2, "STORE": 3})
    chain = tuple(Four)
    edges = [name for name, _, _ in isa._token_edges(chain)]
    assert edges == ["LOAD_TO_COMPUTE", "COMPUTE_TO_LOAD", "COMPUTE_TO_VECTOR", "VECTOR_TO_COMPUTE",
                     "VECTOR_TO_STORE", "STORE_TO_VECTOR"]
    Token4 = enum.IntEnum("Token4", edges)
    flags = {u: tuple(None if t is None else t.name for t in ts)
             for u, ts in isa._token_of_flag(chain, Token4).items()}
    assert flags[Four.VECTOR] == ("COMPUTE_TO_VECTOR", "STORE_TO_VECTOR", "VECTOR_TO_COMPUTE", "VECTOR_TO_STORE")
    assert flags[Four.STORE] == ("VECTOR_TO_STORE", None, "STORE_TO_VECTOR", None)
