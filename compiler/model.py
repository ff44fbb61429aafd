"""The model compiler: a torch module -> a :class:`CompiledModel` of NPU segments and host steps.

Pipeline (docs/compiler.md):

1. **capture** — ``torch.export.export(module, example_inputs)``, then
   ``run_decompositions`` with the default table except ``aten.linear`` (kept whole, so a
   linear layer is one node with its weight). The graph is a sequence of ``aten`` ops.
2. **partition** — each ``aten.linear`` (weight a parameter or constant), ``aten.mm`` and
   ``aten.bmm`` node with static shapes (a linear's leading dimensions flattened) becomes an
   NPU segment; every other op stays on the host, where torch runs it (bit-reproducibly on the
   same machine). Attention, written by hand or with ``F.scaled_dot_product_attention``,
   decomposes into ``bmm`` (QK^T and PV on the NPU) around a host softmax.
3. **lower** — per segment a :class:`~fp8npu.compiler.program.Program`: one scaled FP8 GEMM
   (:func:`~fp8npu.compiler.gemm.lower_gemm`) with 128-block scaling carrying the activation
   scales, column scales and bias in the epilogue. Weights are quantized now
   (:mod:`fp8npu.sim.quant`); activations (and the right operand of ``mm``) are quantized by
   the host at run time.
4. **allocate** — one DRAM for the model: weights, scales and programs live for the whole
   model; each segment's inputs and outputs live only during its launch, so segments share
   those bytes (:func:`~fp8npu.compiler.program.allocate` with lifetimes).
5. **verify** — every segment's program against the DRAM layout (tokens, ISA checks, buffer
   bounds).

Example inputs given as a dict of modes (``{"prefill": ..., "decode": ...}``) are captured
and lowered once per mode into one model: one DRAM, constants stored once, and the buffers
the module updates in place (KV caches) as state shared by the modes. Operands computed from
that state are found by :func:`_state_operands` and stay in DRAM (docs/compiler.md).

A :class:`CompiledModel` saves to one ``.npu`` file (:meth:`CompiledModel.save`, :func:`load`):
a magic, a format version, a JSON header (the NPUConfig, the quantization, the segments and
where their buffers lie), the DRAM image, the exported graph, and a SHA-256 of all of it.
"""

import hashlib
import io
import json
import struct
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from fp8npu.hdl import isa
from fp8npu.hdl.config import NPUConfig
from fp8npu.hdl.isa import Opcode
from fp8npu.sim import quant as q
from fp8npu.sim.reference import scale_block, weight_col_scales

from .gemm import GemmOp, lower_gemm, lower_gemm_batch
from .program import Program, VerifyError, address_space_problem, allocate

__all__ = ["QuantConfig", "CompiledModel", "Graph", "Segment", "CompileError", "ModelFileError", "compile", "load",
           "MAGIC", "FORMAT_VERSION"]

MAGIC = b"FP8NPU-MODEL\0\0\0\0"
FORMAT_VERSION = 2

aten = torch.ops.aten
#: aten ops the NPU runs, and the segment kind each becomes.
NPU_OPS = {aten.linear.default: "linear", aten.mm.default: "mm", aten.bmm.default: "bmm"}


class CompileError(ValueError):
    """A module the compiler cannot handle; the message names the op, module path and source line."""


class ModelFileError(ValueError):
    """A ``.npu`` file that cannot be used; the message says why in one sentence."""


@dataclass(frozen=True)
class QuantConfig:
    """How layers are quantized (docs/numerics.md section 7).

    format : "e4m3" (default) or "e5m2"
    weights : "channel" (default), "tensor" or "block" (128 x 128)
    activations : "token" (default), "tensor" or "tile" (1 x 128), computed at run time
    scales : "pow2" (default, exact) or "fp32"
    """

    format: str = "e4m3"
    weights: str = "channel"
    activations: str = "token"
    scales: str = "pow2"

    def __post_init__(self):
        allowed = {"format": ("e4m3", "e5m2"), "weights": q.WEIGHT_GRANULARITIES,
                   "activations": q.ACTIVATION_GRANULARITIES, "scales": q.SCALE_KINDS}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"quantization {name} must be one of {', '.join(values)}, "
                                 f"not {getattr(self, name)!r}")

    @classmethod
    def parse(cls, text):
        """``"weights=block,activations=tile"`` (any of format, weights, activations, scales)."""
        if not text:
            return cls()
        values = {}
        known = [f.name for f in fields(cls)]
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise ValueError(f"--quant takes KEY=VALUE pairs separated by commas with keys "
                                 f"{', '.join(known)}, not {item.strip()!r}")
            values[key] = value.strip()
        return cls(**values)

    def describe(self):
        return (f"{self.format.upper()}, weights per {self.weights}, activations per {self.activations}, "
                f"{'power-of-two' if self.scales == 'pow2' else 'FP32'} scales")


@dataclass
class Segment:
    """One NPU launch for graph node ``node``: a scaled FP8 GEMM (``linear``, ``mm``), or
    ``batch`` of them in one pipelined stream (``bmm``: one per batch element).

    ``runtime`` names the GEMM operands the host fills before the launch (``a``,
    ``row_scales``; for ``mm`` and ``bmm`` also ``b``, ``col_scales``);
    ``buffers`` holds, per batch element, a role -> (address, bytes) map; ``gemm`` is
    :meth:`GemmOp.to_spec`'s data (layouts to pack and unpack; the same for every element).
    ``flops`` = 2 M K N per element; ``cycles`` is the functional simulator's estimate for one
    launch (filled by :func:`compile` when it runs the example).

    ``resident`` names the operands that are positions of a state buffer (a KV cache): ``"a":
    "m"`` (rows of A are positions), ``"b": "n"`` (columns of B are, as in K^T) or ``"b": "k"``
    (rows of B are, as in V). Their DRAM buffers live as long as the model, and the runtime
    writes only the bytes that changed since the last launch: the new positions.
    """

    @property
    def w_scaling(self):
        """How the right operand is scaled (:func:`fp8npu.sim.reference.quantize_operands`)."""
        return self.resident.get("b")

    @property
    def persistent_roles(self):
        """Runtime roles whose buffers keep their contents from launch to launch."""
        roles = set()
        if "a" in self.resident:
            roles |= {"a", "row_scales"}
        if "b" in self.resident:
            roles |= {"b", "col_scales"}
        return roles & set(self.runtime)

    node: str
    kind: str
    target: str
    module_path: str
    shape: tuple
    in_shape: tuple
    out_shape: tuple
    prog_addr: int
    prog_len: int
    runtime: tuple
    buffers: dict
    gemm: dict
    flops: int
    cycles: int = 0
    batch: int = 1
    resident: dict = field(default_factory=dict)

    def op(self, cfg):
        return GemmOp.from_spec(cfg, self.gemm)

    @property
    def host_to_npu_bytes(self):
        return sum(b[r][1] for b in self.buffers for r in self.runtime if r in b)     # host-applied roles: none

    @property
    def npu_to_host_bytes(self):
        return sum(b["c"][1] for b in self.buffers)


@dataclass
class Graph:
    """One entry point of a compiled model, a *mode* (``prefill``, ``decode`` ...; a model
    compiled from one set of example inputs has one, ``forward``): the exported graph whose
    other ops run on the host, its NPU segments, its user inputs and its MoE layers."""

    mode: str
    program: object                 # torch.export.ExportedProgram (decomposed)
    segments: dict                  # node name -> Segment
    inputs: list                    # [{"name", "shape", "dtype"}] of the user inputs
    host_ops: list                  # [{"node", "target", "module_path", "flops"}] in graph order
    moe: dict = field(default_factory=dict)    # node name -> MoE layer record (see _lower_moe)

    def to_header(self):
        return {"mode": self.mode, "inputs": self.inputs, "host_ops": self.host_ops, "moe": self.moe,
                "segments": [dict(asdict(s), shape=list(s.shape), in_shape=list(s.in_shape),
                                  out_shape=list(s.out_shape), runtime=list(s.runtime),
                                  buffers=[{k: list(v) for k, v in b.items()} for b in s.buffers])
                             for s in self.segments.values()]}

    @classmethod
    def from_header(cls, h, program):
        segments = {}
        for s in h["segments"]:
            s = dict(s, shape=tuple(s["shape"]), in_shape=tuple(s["in_shape"]), out_shape=tuple(s["out_shape"]),
                     runtime=tuple(s["runtime"]), buffers=[{k: tuple(v) for k, v in b.items()} for b in s["buffers"]])
            segments[s["node"]] = Segment(**s)
        return cls(str(h["mode"]), program, segments, h["inputs"], h["host_ops"], h.get("moe", {}))


@dataclass
class CompiledModel:
    """A compiled torch module: one :class:`Graph` per mode, the DRAM image, and the state the
    modes share (buffers the module updates in place, such as a KV cache). Run it with
    :func:`fp8npu.compiler.runtime.run` or a :class:`~fp8npu.compiler.runtime.Session`.

    ``program``, ``segments``, ``inputs``, ``host_ops`` and ``moe`` are those of the first mode.
    """

    cfg: NPUConfig
    quant: QuantConfig
    graphs: dict                    # mode -> Graph, in the order the modes were given
    dram: bytes
    info: dict = field(default_factory=dict)
    state: list = field(default_factory=list)   # [{"name", "shape", "dtype"}] of buffers updated in place

    @property
    def dram_bytes(self):
        return len(self.dram)

    @property
    def modes(self):
        return list(self.graphs)

    def graph(self, mode=None):
        """The :class:`Graph` of ``mode`` (default: the first); an unknown mode is one clear error."""
        if mode is None:
            return next(iter(self.graphs.values()))
        if mode not in self.graphs:
            raise ValueError(f"the model has no mode {mode!r}; its modes are {', '.join(self.graphs)}")
        return self.graphs[mode]

    program = property(lambda self: self.graph().program)
    segments = property(lambda self: self.graph().segments)
    inputs = property(lambda self: self.graph().inputs)
    host_ops = property(lambda self: self.graph().host_ops)
    moe = property(lambda self: self.graph().moe)

    # ---- file format ---------------------------------------------------------------------
    def save(self, path):
        """Write the model to ``path`` (see the module docstring for the format)."""
        graphs = []
        for g in self.graphs.values():
            buf = io.BytesIO()
            with _quiet():
                torch.export.save(g.program, buf)
            graphs.append(buf.getvalue())
        header = {"config": self.cfg.to_dict(), "quant": asdict(self.quant), "info": self.info,
                  "state": self.state, "graphs": [g.to_header() for g in self.graphs.values()]}
        parts = [json.dumps(header).encode(), bytes(self.dram), *graphs]
        body = struct.pack("<II", FORMAT_VERSION, len(parts)) + b"".join(struct.pack("<Q", len(p)) + p for p in parts)
        data = MAGIC + body + hashlib.sha256(body).digest()
        if hasattr(path, "write"):
            path.write(data)
        else:
            with open(path, "wb") as f:
                f.write(data)


def load(path, data=None):
    """A :class:`CompiledModel` from a ``.npu`` file (or its bytes); a foreign, truncated or
    corrupt file is a :class:`ModelFileError` in one sentence."""
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ModelFileError(f"cannot read the model {str(path)!r}: {exc.strerror or exc}") from None
    name = str(path)
    if not data.startswith(MAGIC):
        raise ModelFileError(f"{name!r} is not an fp8npu model file (no {MAGIC.rstrip(bytes(1)).decode()} header)")
    body, digest = data[len(MAGIC):-32], data[-32:]
    if len(data) < len(MAGIC) + 8 + 32:
        raise ModelFileError(f"the model file {name!r} is truncated")
    (version,) = struct.unpack_from("<I", body)
    if version != FORMAT_VERSION:
        raise ModelFileError(f"the model file {name!r} has format version {version}; this fp8npu reads "
                             f"version {FORMAT_VERSION}: compile the model again")
    if hashlib.sha256(body).digest() != digest:
        raise ModelFileError(f"the model file {name!r} is corrupt or truncated (its checksum does not match)")
    try:
        (count,) = struct.unpack_from("<I", body, 4)
        parts, at = [], 8
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", body, at)
            if at + 8 + n > len(body):
                raise ValueError("a part runs past the end of the file")
            parts.append(body[at + 8:at + 8 + n])
            at += 8 + n
        header = json.loads(parts[0])
        cfg = NPUConfig.from_dict(header["config"])
        quant = QuantConfig(**header["quant"])
        graph_headers = header["graphs"]
        if not isinstance(graph_headers, list) or not graph_headers or len(graph_headers) != count - 2:
            raise ValueError("the number of graphs does not match the header")
        info, state = dict(header.get("info", {})), list(header.get("state", []))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error, OverflowError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"no {exc} entry"
        raise ModelFileError(f"the model file {name!r} is malformed ({reason[:200]})") from None
    from . import moe as _moe  # noqa: F401  (registers the fp8npu::moe op the graph may use)
    graphs = {}
    for h, blob in zip(graph_headers, parts[2:]):
        try:
            with _quiet():
                program = torch.export.load(io.BytesIO(blob))
        except Exception as exc:
            raise ModelFileError(f"the graph in the model file {name!r} cannot be read by this torch "
                                 f"({torch.__version__}): {type(exc).__name__}") from None
        try:
            g = Graph.from_header(h, program)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"no {exc} entry"
            raise ModelFileError(f"the model file {name!r} is malformed ({reason[:200]})") from None
        graphs[g.mode] = g
    return CompiledModel(cfg, quant, graphs, bytes(parts[1]), info, state)


# ---- capture ----------------------------------------------------------------------------------
def _where(node):
    """``module path (file:line)`` of a graph node, for error messages and reports."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = list(stack.values())[-1][0] or "<top>"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    line = ""
    for t in trace:
        t = t.strip()
        if t.startswith("File "):
            line = t.replace("File ", "").replace('"', "").replace(", line ", ":").split(",")[0]
    return path or "<top>", line


def _capture(module, example_inputs):
    if not isinstance(module, torch.nn.Module):
        raise CompileError(f"compile() takes a torch.nn.Module, not {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    try:
        with _quiet():
            ep = torch.export.export(module.eval(), example_inputs)
    except Exception as exc:
        first = " ".join(str(exc).strip().splitlines()[:1])[:300]
        raise CompileError(f"torch.export could not capture {type(module).__name__}: {type(exc).__name__}: "
                           f"{first}") from None
    table = torch.export.default_decompositions()
    table.pop(aten.linear.default, None)
    with _quiet():
        return ep.run_decompositions(table), example_inputs


def _quiet():
    """Silence torch's own FutureWarnings and logged warnings about its internals while
    exporting, saving and loading (our errors say what went wrong)."""
    import logging
    import warnings
    ctx = warnings.catch_warnings()
    logger = logging.getLogger("torch")

    class _Ctx:
        def __enter__(self):
            ctx.__enter__()
            warnings.simplefilter("ignore", FutureWarning)
            self.level = logger.level
            logger.setLevel(logging.CRITICAL)

        def __exit__(self, *exc):
            logger.setLevel(self.level)
            return ctx.__exit__(*exc)
    return _Ctx()


def _placeholder_values(ep):
    """Placeholder name -> tensor for parameters, buffers and constants of the exported program."""
    values = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        if spec.target in ep.state_dict:
            values[spec.arg.name] = ep.state_dict[spec.target]
        elif spec.target in ep.constants:
            values[spec.arg.name] = ep.constants[spec.target]
    return values


def _static_int(v):
    """``int(v)``, or None for a symbolic (data-dependent or dynamic) size."""
    try:
        return int(v)
    except Exception:
        return None


def _shape(node):
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims = tuple(_static_int(d) for d in val.shape)
    return None if None in dims else dims


def _flops_of(node):
    """An estimate of a host op's floating-point work: the elements it produces (0 when their
    number depends on the data)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return sum(_static_int(v.numel()) or 0 for v in vals if isinstance(v, torch.Tensor))


# ---- compile -------------------------------------------------------------------------------------
def compile(module, example_inputs, config=None, quant=None, estimate=True, progress=None):  # noqa: A001
    """Compile ``module`` for the NPU (see the module docstring); returns a :class:`CompiledModel`.

    ``example_inputs`` is a tuple of tensors (one mode, ``forward``), or a dict of modes, for
    example ``{"prefill": (x, positions), "decode": (x_one_token, position)}``: each mode is
    captured and lowered at its own shapes, and all share the module's parameters and the
    buffers it updates in place (a KV cache; docs/compiler.md).

    ``config`` is the :class:`NPUConfig` (default: the default configuration), ``quant`` a
    :class:`QuantConfig` or its text form. With ``estimate`` the example inputs are run once on
    the functional simulator to record each segment's cycles. ``progress(done, total, what)``
    is called as segments are lowered.
    """
    t0 = time.perf_counter()
    cfg = config or NPUConfig()
    quant = QuantConfig.parse(quant) if isinstance(quant, str) or quant is None else quant
    if quant.format not in cfg.formats:
        raise CompileError(f"the NPU configuration does not support {quant.format} (formats: "
                           f"{', '.join(cfg.formats)})")
    from . import moe as moe_mod
    if not isinstance(module, torch.nn.Module):
        raise CompileError(f"compile() takes a torch.nn.Module, not {type(module).__name__}")
    if isinstance(example_inputs, dict):
        if not example_inputs:
            raise CompileError("example_inputs must name at least one mode")
        for mode in example_inputs:
            if not (isinstance(mode, str) and mode.isidentifier()):
                raise CompileError(f"a mode name must be an identifier such as 'prefill' or 'decode', not {mode!r}")
        modes = dict(example_inputs)
    else:
        modes = {"forward": example_inputs}
    captured = {}
    try:
        with moe_mod.substitute(module) as moe_specs:
            for mode, inputs in modes.items():
                captured[mode] = _capture(module, inputs)
    except ValueError as exc:
        if isinstance(exc, CompileError):
            raise
        raise CompileError(f"a Mixture-of-Experts layer cannot be compiled: {exc}") from None

    total = sum(sum(n.op == "call_function" and n.target in NPU_OPS for n in ep.graph.nodes)
                for ep, _ in captured.values())
    graphs, programs, moe_buffers, state = {}, [], [], {}
    for mode, (ep, inputs) in captured.items():
        graph, progs, moe_bufs = _lower_graph(cfg, quant, mode, ep, inputs, moe_specs, progress,
                                              len(programs), total)
        graphs[mode] = graph
        programs += [(graph, name, prog) for name, prog in progs.items()]
        moe_buffers += [(graph, name, bufs) for name, bufs in moe_bufs]
        values = _placeholder_values(ep)
        for spec in ep.graph_signature.input_specs:
            if spec.kind.name == "BUFFER" and spec.target in ep.graph_signature.buffers_to_mutate.values():
                t = values[spec.arg.name]
                state.setdefault(spec.target, {"name": spec.target, "shape": list(t.shape),
                                               "dtype": str(t.dtype).replace("torch.", "")})

    # one DRAM: constants and programs for the whole model, runtime buffers per launch; the
    # operands that hold state (resident) for the whole model too
    buffers, lifetimes = [], {}
    for i, (graph, name, prog) in enumerate(programs):
        keep = graph.segments[name].persistent_roles
        for b in prog.buffers.values():
            buffers.append(b)
            if b.kind in ("input", "output", "scratch") and b.meta.get("role") not in keep:
                lifetimes[b] = (i, i)
    for j, (_, _, bufs) in enumerate(moe_buffers):
        for b in bufs.values():
            buffers.append(b)
            if b.kind == "scratch":
                lifetimes[b] = (len(programs) + j, len(programs) + j)
    buffers, alias = _share_constants(buffers)
    # a state operand laid out the same way in two modes is one copy: what prefill wrote there,
    # decode finds (correct either way: the host writes what differs from its last write)
    first = {}
    for b in list(buffers):
        key = b.meta.get("state")
        if key is not None:
            if key in first:
                alias[b] = first[key]
                buffers.remove(b)
            else:
                first[key] = b
    order = sorted(buffers, key=lambda b: (b.kind not in ("const", "program"), b in lifetimes))
    layout = allocate(buffers, 0, lifetimes, order=order)
    problem = address_space_problem(layout, cfg)
    if problem:
        raise CompileError(problem)
    for b, same in alias.items():
        layout.addresses[b] = layout.addresses[same]
    dram = layout.image(buffers)
    for graph, name, prog in programs:
        try:
            code = prog.verify(layout, 0, layout.end)
        except VerifyError as exc:
            raise CompileError(f"internal: the program of {name} does not verify: {exc}") from None
        addr = layout.address(prog.buffers[f"{name}.program"])
        dram[addr:addr + len(code)] = code
        seg = graph.segments[name]
        seg.prog_addr, seg.prog_len = addr, len(prog)
        seg.buffers = [{} for _ in range(seg.batch)]
        for b in prog.buffers.values():
            if "role" in b.meta:
                seg.buffers[b.meta.get("batch", 0)][b.meta["role"]] = (layout.address(b), b.nbytes)
    for graph, name, bufs in moe_buffers:
        graph.moe[name]["buffers"] = {key: [layout.address(b), b.nbytes] for key, b in bufs.items()}
    model = CompiledModel(cfg, quant, graphs, bytes(dram),
                          {"compile_seconds": 0.0, "module": type(module).__name__}, list(state.values()))
    if estimate:
        from .runtime import run
        for mode, (_, inputs) in captured.items():
            if graphs[mode].segments or graphs[mode].moe:
                run(model, inputs, backend="func", record_cycles=True, mode=mode)
    model.info["compile_seconds"] = round(time.perf_counter() - t0, 3)
    return model


def _share_constants(buffers):
    """Constant buffers with the same bytes (the same weights lowered for two modes, say) share
    one copy: returns (the buffers to place, {duplicate: the buffer it shares})."""
    seen, keep, alias = {}, [], {}
    for b in buffers:
        if b.kind == "const" and b.data is not None:
            key = (b.nbytes, b.align, hashlib.sha256(bytes(b.data)).digest())
            if key in seen:
                alias[b] = seen[key]
                continue
            seen[key] = b
        keep.append(b)
    return keep, alias


def _lower_graph(cfg, quant, mode, ep, example_inputs, moe_specs, progress, done, total):
    """Partition and lower one captured graph: (Graph, {node: Program}, [(node, MoE buffers)])."""
    params = _placeholder_values(ep)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    npu_nodes = [n for n in nodes if n.target in NPU_OPS]
    resident = _state_operands(ep, example_inputs, npu_nodes)
    segments, programs, host_ops, moe_records, moe_buffers = {}, {}, [], {}, []
    for node in nodes:
        path, line = _where(node)
        if node.target is torch.ops.fp8npu.moe.default:
            record, bufs = _lower_moe(cfg, quant, node, params, moe_specs, path)
            moe_records[node.name] = record
            moe_buffers.append((node.name, bufs))
            continue
        if node not in npu_nodes:
            host_ops.append({"node": node.name, "target": str(node.target), "module_path": path,
                             "flops": _flops_of(node)})
            continue
        if progress:
            progress(done + len(segments), total, node.name)
        prog = Program(cfg)
        here = resident.get(node.name, {})
        seg = _lower_node(prog, cfg, quant, node, params, path, line, {r: kind for r, (kind, _) in here.items()})
        for b in prog.buffers.values():
            operand = {"a": "a", "row_scales": "a", "b": "b", "col_scales": "b"}.get(b.meta.get("role"))
            if operand in here and b.meta["role"] in seg.persistent_roles:
                layout = json.dumps(seg.gemm["layouts"].get(b.meta["role"]), sort_keys=True)
                b.meta["state"] = (here[operand][1], b.meta["role"], b.meta.get("batch", 0), layout, b.nbytes)
        prog.emit(Opcode.END, note=node.name)
        prog.buffer(f"{node.name}.program", nbytes=len(prog) * isa.COMMAND_BYTES, kind="program")
        segments[node.name] = seg
        programs[node.name] = prog
    inputs = [{"name": spec.arg.name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
              for spec, t in zip([s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"],
                                 example_inputs)]
    return Graph(mode, ep, segments, inputs, host_ops, moe_records), programs, moe_buffers


# ---- state: buffers updated in place (KV caches) -------------------------------------------------
def evaluate(ep, inputs, state=None, npu=None, moe=None, override=None):
    """Interpret the exported graph ``ep`` on ``inputs``: every op in torch, except the nodes in
    ``npu`` (name -> function of the node's arguments) and ``moe`` (likewise). ``state`` gives
    the current value of buffers updated in place (by target); ``override`` (name -> function
    of a node's value) changes a node's value. Returns (user outputs, {buffer target: new value},
    {node name: value})."""
    values, user = {}, iter(inputs)
    consts = _placeholder_values(ep)
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            values[spec.arg.name] = next(user)
        elif state is not None and spec.target in state:
            values[spec.arg.name] = state[spec.target]
        elif spec.arg.name in consts:
            values[spec.arg.name] = consts[spec.arg.name]
        else:
            raise ValueError(f"the model's input {spec.arg.name} ({spec.kind.name}) is not supported")

    def load(a):
        return torch.fx.node.map_arg(a, lambda n: values[n.name])

    outputs = None
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = load(node.args[0])
            break
        args, kwargs = load(node.args), load(node.kwargs)
        if npu and node.name in npu:
            value = npu[node.name](args)
        elif moe and node.name in moe:
            value = moe[node.name](args)
        else:
            value = node.target(*args, **kwargs)
        if override and node.name in override:
            value = override[node.name](value)
        values[node.name] = value
    user_outputs, new_state = [], {}
    for value, spec in zip(outputs, ep.graph_signature.output_specs):
        if spec.kind.name == "USER_OUTPUT":
            user_outputs.append(value)
        elif spec.kind.name == "BUFFER_MUTATION":
            new_state[spec.target] = value
    return user_outputs, new_state, values


def _position_axis(node):
    """The axis a state update writes positions along: the dimension of the index tensor of an
    ``index_put`` (``cache[:, :, pos] = k``) or the ``dim`` of an ``index_copy``
    (``cache.index_copy_(2, pos, k)``, Hugging Face's static cache); None for other updates."""
    if node.target is aten.index_put.default:
        axes = [i for i, t in enumerate(node.args[1]) if t is not None]
        return axes[0] if len(axes) == 1 else None
    if node.target is aten.index_copy.default:
        return int(node.args[1])
    return None


def _state_operands(ep, example_inputs, npu_nodes):
    """Which operands of the NPU nodes are positions of a state buffer, along which axis, and
    which buffer: {node name: {"a": ("m", target)} | {"b": ("n" | "k", target)}} (the axes as
    in :class:`Segment`).

    Found by running the graph in float32 twice: as is, and with position 0 of each updated
    buffer set to NaN right after its update. An operand is resident when the NaNs stay in one
    column (or one row) of each of its matrices and spread along it; then that axis holds
    positions.
    """
    sig = ep.graph_signature
    updates = [n for n in ep.graph.nodes if n.name in sig.buffers_to_mutate]
    if not updates or not npu_nodes:
        return {}
    found, bad, sources = {}, set(), {}
    with torch.no_grad():
        for upd in updates:
            axis = _position_axis(upd)
            if axis is None:
                continue

            def poison(value, axis=axis):
                value = value.clone()
                if value.is_floating_point() and value.shape[axis] > 1:
                    value.select(axis, 0).fill_(float("nan"))
                return value
            try:
                _, _, values = evaluate(ep, example_inputs, override={upd.name: poison})
            except Exception:
                return {}
            for node in npu_nodes:
                for index, role in ((0, "a"), (1, "b")):
                    arg = node.args[index]
                    if not isinstance(arg, torch.fx.Node) or not isinstance(values.get(arg.name), torch.Tensor):
                        continue
                    mask = torch.isnan(values[arg.name])
                    if not mask.any():
                        continue
                    mask = mask.reshape(-1, mask.shape[-1]).unsqueeze(0) if mask.dim() < 3 else mask
                    rows, cols = mask.any(2), mask.any(1)
                    one_row, one_col = bool((rows.sum(1) <= 1).all()), bool((cols.sum(1) <= 1).all())
                    along = None
                    if mask.all():
                        pass                            # everything depends on it: computed from the state
                    elif one_col and not one_row:
                        along = "cols"
                    elif one_row and not one_col:
                        along = "rows"
                    kind = {("a", "rows"): "m", ("b", "rows"): "k", ("b", "cols"): "n"}.get((role, along))
                    if role == "b" and NPU_OPS[node.target] == "linear":
                        kind = None
                    key = (node.name, role)
                    if kind is None or found.get(key, kind) != kind:
                        bad.add(key)
                    found[key] = kind
                    sources.setdefault(key, []).append(sig.buffers_to_mutate[upd.name])
    result = {}
    for (name, role), kind in found.items():
        if (name, role) not in bad:
            result.setdefault(name, {})[role] = (kind, "+".join(sources[name, role]))
    return result


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def _lower_moe(cfg, quant, node, params, moe_specs, path):
    """An MoE layer: its experts' weights quantized and packed into const buffers (shared by the
    programs the runtime lowers for each row count), and a scratch buffer for those programs.
    Returns (record for the model file, {key: Buffer})."""
    from . import moe as moe_mod
    from .gemm import lower_gemm, weight_operands
    from .program import Program, allocate

    x, weight_nodes, spec_id = node.args
    spec = moe_specs[spec_id][1]
    in_shape = _shape(x)
    if in_shape is None:
        raise CompileError(f"the MoE layer at {path}: its input shape must be known at compile time")
    tokens = 1
    for d in in_shape[:-1]:
        tokens *= d
    m_max = _next_pow2(max(tokens, 1))
    weights = [params[n.name] for n in weight_nodes]
    fmt = quant.format
    buffers = {}
    which_list = [("gate_up", e) for e in range(spec.experts)] + [("down", e) for e in range(spec.experts)]
    if spec.shared:
        which_list += [("gate_up", -1), ("down", -1)]
    scratch = 0
    sized = set()
    for which, e in which_list:
        w = moe_mod.expert_weight(spec, weights, which, e)
        if not torch.isfinite(w).all():
            raise CompileError(f"the MoE layer at {path}: expert {e} {which} holds NaN or infinite weights")
        n, k = w.shape
        codes, scales = q.quantize_weight(w, fmt, quant.weights, quant.scales)
        block_k = scale_block(quant.activations, quant.weights, k)
        cols = weight_col_scales(scales, quant.weights, k, n, block_k)
        rows = torch.ones(m_max, cols.shape[0])
        try:
            packed = weight_operands(cfg, m_max, fmt, codes.T.contiguous(), fmt, block_scales=(rows, cols),
                                     block_k=block_k)
        except ValueError as exc:
            raise CompileError(f"the MoE layer at {path}: expert {which} projection: {exc}") from None
        for role, data in packed.items():
            from .program import Buffer
            buffers[f"{which}.{e}.{role}"] = Buffer(f"{node.name}.{which}.{e}.{role}", len(data), "const", data)
        if (which, n, k) not in sized:            # the largest program the runtime will lower
            sized.add((which, n, k))
            prog = Program(cfg)
            shared = {r: buffers[f"{which}.{e}.{r}"] for r in packed if r != "b"}
            shared["b"] = buffers[f"{which}.{e}.b"]
            lower_gemm(prog, cfg, torch.zeros(m_max, k, dtype=torch.uint8), codes.T.contiguous(), fmt, fmt,
                       block_scales=(rows, cols), block_k=block_k, runtime=("a", "row_scales"),
                       name="sizing", shared=shared)
            prog.emit(Opcode.END)
            prog.buffer("program", nbytes=len(prog) * isa.COMMAND_BYTES, kind="program")
            scratch = max(scratch, allocate(list(prog.buffers.values()), 0).end)
    from .program import Buffer
    buffers["scratch"] = Buffer(f"{node.name}.scratch", scratch, "scratch")
    d, f, fs = spec.d_model, spec.d_ff, spec.d_ff_shared
    flops = 2 * tokens * spec.top_k * 3 * d * f + (2 * tokens * 3 * d * fs if spec.shared else 0)
    record = {"node": node.name, "module_path": moe_specs[spec_id][0], "spec": spec.to_dict(), "tokens": tokens,
              "m_max": m_max, "flops": flops, "in_shape": list(in_shape)}
    return record, buffers


def _lower_node(prog, cfg, quant, node, params, path, line, resident):
    """Lower one linear or mm node into ``prog``; a :class:`Segment` without addresses yet."""
    kind = NPU_OPS[node.target]
    where = f"{node.target} at {path}" + (f" ({line})" if line else "")
    args = list(node.args)
    x = args[0]
    in_shape = _shape(x)
    out_shape = _shape(node)
    if in_shape is None or out_shape is None:
        raise CompileError(f"{where}: the input and output shapes must be known at compile time")
    k = in_shape[-1]
    m = 1
    for d in in_shape[:-1]:
        m *= d
    fmt = quant.format
    zeros_a = torch.zeros((max(m, 1), k), dtype=torch.uint8)
    if kind == "linear":
        weight = params.get(args[1].name) if isinstance(args[1], torch.fx.Node) else None
        if weight is None:
            raise CompileError(f"{where}: the weight of a linear layer must be a parameter or constant of the "
                               f"module, not a computed tensor")
        weight = weight.detach().to(torch.float32)
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise CompileError(f"{where}: the weight holds {bad} NaN or infinite values")
        n = weight.shape[0]
        bias = None
        if len(args) > 2 and args[2] is not None:
            bias = params.get(args[2].name) if isinstance(args[2], torch.fx.Node) else None
            if bias is None:
                raise CompileError(f"{where}: the bias of a linear layer must be a parameter or constant")
            bias = bias.detach().to(torch.float32)
            if not torch.isfinite(bias).all():
                raise CompileError(f"{where}: the bias holds NaN or infinite values")
        w_codes, w_scales = q.quantize_weight(weight, fmt, quant.weights, quant.scales)
        block_k = scale_block(quant.activations, quant.weights, k)
        cols = weight_col_scales(w_scales, quant.weights, k, n, block_k)
        rows = torch.ones((max(m, 1), cols.shape[0]))
        runtime = ("a", "row_scales")
        b_codes = w_codes.T.contiguous()
    else:
        y = args[1]
        y_shape = _shape(y)
        dims = 2 if kind == "mm" else 3
        if len(in_shape) != dims or y_shape is None or len(y_shape) != dims:
            raise CompileError(f"{where}: {kind} needs two {dims}-D operands with static shapes")
        if kind == "bmm":
            batch, m, k = in_shape
            zeros_a = torch.zeros((max(m, 1), k), dtype=torch.uint8)
        n = y_shape[-1]
        bias = None
        b_codes = torch.zeros((k, n), dtype=torch.uint8)
        w_granularity = {None: quant.weights, "n": "channel", "k": "tensor"}[resident.get("b")]
        block_k = scale_block(quant.activations, w_granularity, k)
        kb_n = -(-k // block_k)
        rows = torch.ones((max(m, 1), kb_n))
        cols = torch.ones((kb_n, n))
        runtime = ("a", "row_scales", "b", "col_scales")
    if m == 0:
        raise CompileError(f"{where}: an empty input (0 rows) cannot run on the NPU")
    batch = in_shape[0] if kind == "bmm" else 1
    if batch == 0:
        raise CompileError(f"{where}: an empty batch cannot run on the NPU")
    with prog.noting(node.name):
        try:
            if kind == "bmm":
                ops = lower_gemm_batch(prog, cfg, batch, zeros_a, b_codes, fmt, fmt, block_scales=(rows, cols),
                                       block_k=block_k, runtime=runtime, name=node.name)
            else:
                ops = [lower_gemm(prog, cfg, zeros_a, b_codes, fmt, fmt, block_scales=(rows, cols), block_k=block_k,
                                  bias=bias, runtime=runtime, name=node.name)]
        except ValueError as exc:
            raise CompileError(f"{where}: {exc}") from None
        for b, op in enumerate(ops):
            for role, buf in op.buffers.items():
                if role != "zero":
                    buf.meta["batch"] = b
    return Segment(node=node.name, kind=kind, target=str(node.target), module_path=path, shape=(m, k, n),
                   in_shape=in_shape, out_shape=out_shape, prog_addr=0, prog_len=0, runtime=runtime, buffers=[],
                   gemm=op.to_spec(), flops=2 * m * k * n * batch, batch=batch, resident=dict(resident))
