"""Packaging: the four code folders import under fp8npu.*, and a built wheel carries every
module and works on its own."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("hdl", "compiler", "sim", "fpga")


def test_namespace_imports_point_at_the_tree():
    import fp8npu.compiler
    import fp8npu.fpga
    import fp8npu.hdl
    import fp8npu.sim
    for mod, folder in ((fp8npu.hdl, "hdl"), (fp8npu.compiler, "compiler"), (fp8npu.sim, "sim"),
                        (fp8npu.fpga, "fpga")):
        assert Path(mod.__file__).parent.name == folder


#: Which folders each folder may import (at any level: module top or inside functions).
LAYERS = {"hdl": set(), "fpga": {"hdl"}, "sim": {"hdl"}, "compiler": {"hdl", "sim", "fpga"}}


def test_folders_import_in_one_direction():
    """hdl <- fpga, sim <- compiler: no import cycle between the four folders."""
    wrong = []
    for folder, allowed in LAYERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "fp8npu" and len(parts) > 1 and parts[1] in LAYERS:
                        if parts[1] != folder and parts[1] not in allowed:
                            wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not wrong, wrong


def test_wheel_contains_every_module_and_imports(tmp_path):
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, timeout=600)
    wheel = next(out.glob("fp8npu-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"fp8npu/{p.relative_to(ROOT).as_posix()}" for folder in FOLDERS
                for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected <= names, sorted(expected - names)
    assert any(n.endswith("entry_points.txt") for n in names)
    # The unpacked wheel alone (no source tree) provides the package and the CLI.
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = ("import fp8npu.hdl.mac, fp8npu.sim.golden, fp8npu.compiler.cli, fp8npu.fpga.synth, pathlib, sys;"
            "assert str(pathlib.Path(fp8npu.hdl.mac.__file__)).startswith(sys.argv[1]), fp8npu.hdl.mac.__file__;"
            "sys.exit(fp8npu.compiler.cli.main(['generate', 'multiplier', '-o', 'm.v']))")
    proc = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(unpacked)!r});" + code,
                           str(unpacked)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "module fp8npu_multiplier" in (tmp_path / "m.v").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```")[0].strip() for b in readme.split("```sh\n")[1:]]
    assert len(blocks) == 2, "the quickstart has exactly two commands"
    install_and_test = blocks[1]
    assert "pytest" in install_and_test and "[test]" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
