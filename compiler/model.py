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

from .gemm import GemmOp, fence, lower_gemm
from .program import Program, VerifyError, allocate

__all__ = ["QuantConfig", "CompiledModel", "Segment", "CompileError", "ModelFileError", "compile", "load",
           "MAGIC", "FORMAT_VERSION"]

MAGIC = b"FP8NPU-MODEL\0\0\0\0"
FORMAT_VERSION = 1

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
    ``batch`` of them separated by fences (``bmm``: one per batch element).

    ``runtime`` names the GEMM operands the host fills before the launch (``a``,
    ``row_scales``; for ``mm`` and ``bmm`` also ``b``, ``col_scales``, ``col_scale``);
    ``buffers`` holds, per batch element, a role -> (address, bytes) map; ``gemm`` is
    :meth:`GemmOp.to_spec`'s data (layouts to pack and unpack; the same for every element).
    ``flops`` = 2 M K N per element; ``cycles`` is the functional simulator's estimate for one
    launch (filled by :func:`compile` when it runs the example).
    """

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

    def op(self, cfg):
        return GemmOp.from_spec(cfg, self.gemm)

    @property
    def host_to_npu_bytes(self):
        return sum(b[r][1] for b in self.buffers for r in self.runtime)

    @property
    def npu_to_host_bytes(self):
        return sum(b["c"][1] for b in self.buffers)


@dataclass
class CompiledModel:
    """A compiled torch module: the NPU segments, the DRAM image and the exported graph whose
    other ops run on the host. Run it with :func:`fp8npu.compiler.runtime.run`."""

    cfg: NPUConfig
    quant: QuantConfig
    program: object                 # torch.export.ExportedProgram (decomposed)
    segments: dict                  # node name -> Segment
    dram: bytes
    inputs: list                    # [{"name", "shape", "dtype"}] of the user inputs
    host_ops: list                  # [{"node", "target", "module_path", "flops"}] in graph order
    info: dict = field(default_factory=dict)
    moe: dict = field(default_factory=dict)    # node name -> MoE layer record (see _lower_moe)

    @property
    def dram_bytes(self):
        return len(self.dram)

    # ---- file format ---------------------------------------------------------------------
    def save(self, path):
        """Write the model to ``path`` (see the module docstring for the format)."""
        graph = io.BytesIO()
        with _quiet():
            torch.export.save(self.program, graph)
        header = {
            "config": self.cfg.to_dict(), "quant": asdict(self.quant), "inputs": self.inputs,
            "host_ops": self.host_ops, "info": self.info, "moe": self.moe,
            "segments": [dict(asdict(s), shape=list(s.shape), in_shape=list(s.in_shape),
                              out_shape=list(s.out_shape), runtime=list(s.runtime),
                              buffers=[{k: list(v) for k, v in b.items()} for b in s.buffers])
                         for s in self.segments.values()],
        }
        parts = [json.dumps(header).encode(), bytes(self.dram), graph.getvalue()]
        body = struct.pack("<I", FORMAT_VERSION) + b"".join(struct.pack("<Q", len(p)) + p for p in parts)
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
    if len(data) < len(MAGIC) + 4 + 32:
        raise ModelFileError(f"the model file {name!r} is truncated")
    (version,) = struct.unpack_from("<I", body)
    if version != FORMAT_VERSION:
        raise ModelFileError(f"the model file {name!r} has format version {version}; this fp8npu reads "
                             f"version {FORMAT_VERSION}: compile the model again")
    if hashlib.sha256(body).digest() != digest:
        raise ModelFileError(f"the model file {name!r} is corrupt or truncated (its checksum does not match)")
    try:
        parts, at = [], 4
        for _ in range(3):
            (n,) = struct.unpack_from("<Q", body, at)
            if at + 8 + n > len(body):
                raise ValueError("a part runs past the end of the file")
            parts.append(body[at + 8:at + 8 + n])
            at += 8 + n
        header = json.loads(parts[0])
        cfg = NPUConfig.from_dict(header["config"])
        quant = QuantConfig(**header["quant"])
        segments = {}
        for s in header["segments"]:
            s = dict(s, shape=tuple(s["shape"]), in_shape=tuple(s["in_shape"]), out_shape=tuple(s["out_shape"]),
                     runtime=tuple(s["runtime"]), buffers=[{k: tuple(v) for k, v in b.items()} for b in s["buffers"]])
            segments[s["node"]] = Segment(**s)
        extra = (header["inputs"], header["host_ops"], header.get("info", {}), header.get("moe", {}))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error, OverflowError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, KeyError) else f"no {exc} entry"
        raise ModelFileError(f"the model file {name!r} is malformed ({reason[:200]})") from None
    from . import moe as _moe  # noqa: F401  (registers the fp8npu::moe op the graph may use)
    try:
        with _quiet():
            program = torch.export.load(io.BytesIO(parts[2]))
    except Exception as exc:
        raise ModelFileError(f"the graph in the model file {name!r} cannot be read by this torch "
                             f"({torch.__version__}): {type(exc).__name__}") from None
    return CompiledModel(cfg, quant, program, segments, bytes(parts[1]), *extra)


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
    try:
        with moe_mod.substitute(module) as moe_specs:
            ep, example_inputs = _capture(module, example_inputs)
    except ValueError as exc:
        if isinstance(exc, CompileError):
            raise
        raise CompileError(f"a Mixture-of-Experts layer cannot be compiled: {exc}") from None
    params = _placeholder_values(ep)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    npu_nodes = [n for n in nodes if n.target in NPU_OPS]
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
            progress(len(segments), len(npu_nodes), node.name)
        prog = Program(cfg)
        seg = _lower_node(prog, cfg, quant, node, params, path, line)
        prog.emit(Opcode.END, note=node.name)
        prog.buffer(f"{node.name}.program", nbytes=len(prog) * isa.COMMAND_BYTES, kind="program")
        segments[node.name] = seg
        programs[node.name] = prog
    # one DRAM: constants and programs for the whole model, runtime buffers per launch
    buffers, lifetimes = [], {}
    for i, prog in enumerate(programs.values()):
        for b in prog.buffers.values():
            buffers.append(b)
            if b.kind in ("input", "output", "scratch"):
                lifetimes[b] = (i, i)
    for j, (_, bufs) in enumerate(moe_buffers):
        for b in bufs.values():
            buffers.append(b)
            if b.kind == "scratch":
                lifetimes[b] = (len(programs) + j, len(programs) + j)
    order = sorted(buffers, key=lambda b: b.kind not in ("const", "program"))
    layout = allocate(buffers, 0, lifetimes, order=order)
    dram = layout.image(buffers)
    for name, prog in programs.items():
        try:
            code = prog.verify(layout, 0, layout.end)
        except VerifyError as exc:
            raise CompileError(f"internal: the program of {name} does not verify: {exc}") from None
        addr = layout.address(prog.buffers[f"{name}.program"])
        dram[addr:addr + len(code)] = code
        seg = segments[name]
        seg.prog_addr, seg.prog_len = addr, len(prog)
        seg.buffers = [{} for _ in range(seg.batch)]
        for b in prog.buffers.values():
            if "role" in b.meta:
                seg.buffers[b.meta.get("batch", 0)][b.meta["role"]] = (layout.address(b), b.nbytes)
    for name, bufs in moe_buffers:
        moe_records[name]["buffers"] = {key: [layout.address(b), b.nbytes] for key, b in bufs.items()}
    inputs = [{"name": spec.arg.name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
              for spec, t in zip([s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"],
                                 example_inputs)]
    model = CompiledModel(cfg, quant, ep, segments, bytes(dram), inputs, host_ops,
                          {"compile_seconds": round(time.perf_counter() - t0, 3), "module": type(module).__name__},
                          moe_records)
    if estimate and (segments or moe_records):
        from .runtime import run
        run(model, example_inputs, backend="func", record_cycles=True)
    model.info["compile_seconds"] = round(time.perf_counter() - t0, 3)
    return model


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def _lower_moe(cfg, quant, node, params, moe_specs, path):
    """An MoE layer: its experts' weights quantized and packed into const buffers (shared by the
    programs the runtime lowers for each row count), and a scratch buffer for those programs.
    Returns (record for the model file, {key: Buffer})."""
    from fp8npu.sim.reference import gemm_scales

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
        rows, cols, col_scale = gemm_scales(torch.ones(m_max, 1), "token", scales, quant.weights, m_max, k, n)
        try:
            packed = weight_operands(cfg, m_max, fmt, codes.T.contiguous(), fmt, col_scale=col_scale,
                                     block_scales=(rows, cols))
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
                       block_scales=(rows, cols), col_scale=col_scale, runtime=("a", "row_scales"),
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


def _lower_node(prog, cfg, quant, node, params, path, line):
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
        from fp8npu.sim.reference import gemm_scales
        ones_a = torch.ones((max(m, 1), 1), dtype=torch.float32)
        rows, cols, col_scale = gemm_scales(ones_a, "token", w_scales, quant.weights, max(m, 1), k, n)
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
        kb_n, nb_n = -(-k // 128), -(-n // 128)
        rows = torch.ones((max(m, 1), kb_n))
        cols = torch.ones((kb_n, nb_n))
        col_scale = torch.ones(n) if quant.weights == "channel" else None
        runtime = ("a", "row_scales", "b", "col_scales") + (("col_scale",) if col_scale is not None else ())
    if m == 0:
        raise CompileError(f"{where}: an empty input (0 rows) cannot run on the NPU")
    batch = in_shape[0] if kind == "bmm" else 1
    if batch == 0:
        raise CompileError(f"{where}: an empty batch cannot run on the NPU")
    with prog.noting(node.name):
        for b in range(batch):
            if b:
                fence(prog)
            op = lower_gemm(prog, cfg, zeros_a, b_codes, fmt, fmt, block_scales=(rows, cols), col_scale=col_scale,
                            bias=bias, runtime=runtime, name=f"{node.name}.{b}" if kind == "bmm" else node.name)
            for buf in op.buffers.values():
                buf.meta["batch"] = b
    return Segment(node=node.name, kind=kind, target=str(node.target), module_path=path, shape=(m, k, n),
                   in_shape=in_shape, out_shape=out_shape, prog_addr=0, prog_len=0, runtime=runtime, buffers=[],
                   gemm=op.to_spec(), flops=2 * m * k * n * batch, batch=batch)
