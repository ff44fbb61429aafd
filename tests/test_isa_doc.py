"""docs/isa.md is generated from hdl/isa.py: it must equal render_isa_markdown() exactly, name
every opcode, field, error code and register, and its examples must be legal commands."""

import re
from pathlib import Path

import pytest
from fp8npu.compiler import asm, isadoc
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "isa.md"
WINDOW = (0, 0x10000)


@pytest.fixture(scope="module")
def doc():
    return DOC.read_text(encoding="utf-8")


def _section(doc, opcode):
    """The text of one opcode's section."""
    start = doc.index(f"### {opcode.name} (opcode {int(opcode)})")
    end = doc.find("\n#", start + 1)
    return doc[start:end]


def test_doc_matches_code(doc):
    assert isadoc.DOC_PATH == DOC
    assert doc == isadoc.render_isa_markdown(), "docs/isa.md is stale: run python -m fp8npu.compiler.isadoc"


def test_check_mode_reports_up_to_date(capsys):
    assert isadoc.main(["--check"]) == 0
    assert capsys.readouterr().err == f"{DOC} is up to date\n"


@pytest.mark.parametrize("opcode", list(isa.Opcode), ids=lambda o: o.name)
def test_every_opcode_and_field_is_documented(doc, opcode):
    section = _section(doc, opcode)
    assert isa.SEMANTICS[opcode] in section
    for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]:
        bits = str(f.msb) if f.width == 1 else f"{f.msb}:{f.lsb}"
        assert f"| `{f.name}` | {bits} | {f.width} | {f.doc} |" in section
        assert re.search(rf"\|\s*{f.name}\s*\|", section), f"{f.name} missing from the bit diagram"
    assert asm.disassemble(asm.assemble(isadoc.EXAMPLES[opcode])).strip() in section


def test_every_error_code_and_register_is_documented(doc):
    for code in isa.ErrorCode:
        assert f"| {int(code)} | `{code.name}` | {isa.ERROR_TEXT[code]} |" in doc
    for reg in isa.Register:
        assert f"| 0x{int(reg):02X} | `{reg.name}` | {isa.REGISTER_DOC[reg]} |" in doc


@pytest.mark.parametrize("opcode", list(isa.Opcode), ids=lambda o: o.name)
def test_field_tables_and_diagrams_cover_every_bit_once(opcode):
    owner = {}
    for f in isa.COMMON_FIELDS + isa.FIELDS[opcode]:
        for bit in range(f.lsb, f.msb + 1):
            assert bit not in owner, f"{opcode.name}: {f.name} overlaps {owner.get(bit)}"
            owner[bit] = f.name
    for split in (isa.COMMAND_BITS, 64):
        segments = isadoc._segments(opcode, split)
        assert sum(msb - lsb + 1 for msb, lsb, _ in segments) == isa.COMMAND_BITS
        assert all(owner.get(bit) == name for msb, lsb, name in segments for bit in range(lsb, msb + 1))
    assert sum(row[2] for row in isadoc._field_rows(opcode)) == isa.COMMAND_BITS
    rows = [line for line in isadoc.bit_diagram(opcode).splitlines() if line.startswith("|")]
    assert len(rows) == 2 * isa.COMMAND_BITS // 64


@pytest.mark.parametrize("opcode", list(isa.Opcode), ids=lambda o: o.name)
def test_examples_are_legal(opcode):
    cmd = isa.decode(asm.assemble(isadoc.EXAMPLES[opcode]))
    assert cmd.opcode == opcode
    assert isa.validate(cmd, NPUConfig(), *WINDOW) == isa.ErrorCode.NONE


def test_example_program_is_legal(doc):
    assert isadoc.EXAMPLE_PROGRAM in doc
    commands = isa.decode_program(asm.assemble(isadoc.EXAMPLE_PROGRAM))
    assert [c.opcode for c in commands] == [isa.Opcode.LOAD, isa.Opcode.LOAD, isa.Opcode.MATMUL,
                                            isa.Opcode.STORE, isa.Opcode.END]
    assert all(isa.validate(c, NPUConfig(), *WINDOW) == isa.ErrorCode.NONE for c in commands)
