"""Run a :class:`~fp8npu.compiler.model.CompiledModel`: one runtime for every backend.

:class:`Session` interprets the model's exported graph. Host ops run in torch; each NPU
segment runs as one launch through the host driver (:class:`fp8npu.sim.host.Driver`):

1. quantize the segment's runtime operands on the host (:mod:`fp8npu.sim.quant`: the
   activations, and for ``mm`` the right operand too), pack them into their DRAM buffers;
2. launch the segment's program and wait for the interrupt;
3. read the FP32 output buffer back and unpack it.

Backends: ``func`` (the functional simulator, default), ``rtl`` (the Verilog under
Verilator), ``serial`` (a board running the fp8npu bitstream, over its serial line:
``port`` names the port, for example ``/dev/ttyUSB0``, or is an open port object such as a
simulated board's), and ``reference``, which runs no program at all: each segment is computed
by :func:`fp8npu.sim.reference.reference_qmatmul`, written directly from the numerics
contract. ``func``, ``rtl`` and ``serial`` must equal ``reference`` bit for bit.

Every launch is recorded in :attr:`Session.launches` (segment, cycles, MAC utilization,
bytes moved); :func:`run` returns the outputs (the module's output structure) and, with
``details=True``, the session too.
"""

import time

import torch
from fp8npu.hdl.isa import Opcode
from fp8npu.sim import golden
from fp8npu.sim import quant as q
from fp8npu.sim.reference import (
    gemm_scales,
    quantize_operands,
    reference_qmatmul,
    scale_block,
    weight_col_scales,
)

from .model import CompiledModel

__all__ = ["Session", "run", "RunError", "BACKENDS"]

BACKENDS = ("func", "rtl", "serial", "reference")


class RunError(ValueError):
    """Bad inputs or a failed launch; the message says what in one sentence."""


class Session:
    """A compiled model loaded on one backend (see the module docstring).

    The session holds the model's state: the buffers it updates in place (a KV cache) start
    as compiled and carry over from one :meth:`run` to the next, on the host and in the NPU's
    DRAM, whatever the mode (``prefill`` then ``decode`` ... calls). :meth:`reset` starts over.

    ``transport_options`` go to the transport (for ``rtl``: ``fast``, ``backpressure``,
    ``progress`` ...). ``progress(done, total, what)`` is called before each launch.
    """

    def __init__(self, model, backend="func", progress=None, **transport_options):
        if not isinstance(model, CompiledModel):
            raise RunError(f"run() takes a CompiledModel, not {type(model).__name__}")
        if backend not in BACKENDS:
            raise RunError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.model = model
        self.backend = backend
        self.progress = progress
        self.launches = []
        self.driver = None
        if backend != "reference":
            from fp8npu.sim.host import Driver, FuncTransport, RTLTransport
            size = max(model.dram_bytes, 4096)
            if backend == "func":
                transport = FuncTransport(model.cfg, size, model.dram)
            elif backend == "serial":
                transport = _serial_transport(model, progress, **transport_options)
            else:
                transport = RTLTransport(model.cfg, size, model.dram, **transport_options)
            self.driver = Driver(transport, model.cfg)
            self.driver.check_config()
        self.reset()

    def reset(self):
        """Give every state buffer its compiled value again."""
        self.state = {}
        for graph in self.model.graphs.values():
            ep = graph.program
            for spec in ep.graph_signature.input_specs:
                if spec.kind.name == "BUFFER" and spec.target in ep.graph_signature.buffers_to_mutate.values():
                    source = ep.state_dict if spec.target in ep.state_dict else ep.constants
                    self.state.setdefault(spec.target, source[spec.target].clone())
        self._shadow = {}          # DRAM address -> bytes last written there (resident operands)

    # ---- inputs ----------------------------------------------------------------------------
    def _check_inputs(self, inputs, graph):
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        inputs = tuple(inputs)
        specs = graph.inputs
        mode = f" in mode {graph.mode}" if len(self.model.graphs) > 1 else ""
        if len(inputs) != len(specs):
            raise RunError(f"the model{mode} takes {len(specs)} input(s) ({', '.join(s['name'] for s in specs)}), "
                           f"not {len(inputs)}")
        for x, spec in zip(inputs, specs):
            if not isinstance(x, torch.Tensor):
                raise RunError(f"input {spec['name']} must be a tensor, not {type(x).__name__}")
            if list(x.shape) != list(spec["shape"]):
                raise RunError(f"input {spec['name']}{mode} must have shape {tuple(spec['shape'])} (the shape "
                               f"it was compiled for), not {tuple(x.shape)}")
            if str(x.dtype).replace("torch.", "") != spec["dtype"]:
                raise RunError(f"input {spec['name']} must be {spec['dtype']}, not "
                               f"{str(x.dtype).replace('torch.', '')}")
        return inputs

    # ---- execution -------------------------------------------------------------------------
    def run(self, inputs, mode=None, record_cycles=False):
        """The outputs of ``mode`` (default: the model's first) for ``inputs`` (a tensor or a
        tuple of tensors); the state buffers keep what the mode wrote into them."""
        from .model import evaluate
        try:
            graph = self.model.graph(mode)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        inputs = self._check_inputs(inputs, graph)
        segments = graph.segments
        done = [0]

        def segment(seg):
            def call(args):
                if self.progress:
                    self.progress(done[0], len(segments), seg.node)
                done[0] += 1
                return self._segment(seg, args, record_cycles)
            return call
        npu = {name: segment(seg) for name, seg in segments.items()}
        moe = {name: (lambda args, r=record: self._moe(r, args)) for name, record in graph.moe.items()}
        try:
            outputs, new_state, _ = evaluate(graph.program, inputs, self.state, npu, moe)
        except ValueError as exc:
            if isinstance(exc, RunError):
                raise
            raise RunError(str(exc)) from None
        self.state.update(new_state)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _upload(self, addr, data, persistent):
        """Write ``data`` at ``addr``; for a persistent buffer only the bytes that differ from
        what this session last wrote there. Returns the number of bytes written."""
        import numpy as np
        data = bytes(data)
        old = self._shadow.get(addr) if persistent else None
        if persistent:
            self._shadow[addr] = data
        if old is None or len(old) != len(data):
            self.driver.write(addr, data)
            return len(data)
        diff = np.frombuffer(old, np.uint8) != np.frombuffer(data, np.uint8)
        changed = np.flatnonzero(diff)
        if not len(changed):
            return 0
        # spans of changed bytes, merged across gaps shorter than one bus beat
        gap = max(1, self.model.cfg.bus_bytes)
        breaks = np.flatnonzero(np.diff(changed) > gap)
        starts = np.concatenate(([changed[0]], changed[breaks + 1]))
        ends = np.concatenate((changed[breaks], [changed[-1]])) + 1
        for a, b in zip(starts.tolist(), ends.tolist()):
            self.driver.write(addr + a, data[a:b])
        return int((ends - starts).sum())

    def _segment(self, seg, args, record_cycles):
        quant, cfg = self.model.quant, self.model.cfg
        m, k, n = seg.shape
        x = args[0].to(torch.float32)
        if seg.kind == "linear":
            xs = [x.reshape(m, k)]
            ws = [args[1].to(torch.float32)]
            bias = args[2].to(torch.float32) if len(args) > 2 and args[2] is not None else None
        else:                                          # mm: [M,K] x [K,N]; bmm: per batch element
            y = args[1].to(torch.float32)
            xs = list(x) if seg.kind == "bmm" else [x]
            ws = [t.T for t in (list(y) if seg.kind == "bmm" else [y])]
            bias = None
        if self.backend == "reference":
            outs = [reference_qmatmul(xb, wb, bias, quant, seg.w_scaling, cfg.accumulation, cfg.acc_block)
                    for xb, wb in zip(xs, ws)]
            self.launches.append({"segment": seg.node, "cycles": 0})
            return (torch.stack(outs) if seg.kind == "bmm" else outs[0]).reshape(seg.out_shape)
        op = seg.op(cfg)
        t0 = time.perf_counter()
        keep = seg.persistent_roles
        sent = 0
        host_values = []             # per element: the roles the host applies itself (GemmOp.finish)
        for b, (xb, wb) in enumerate(zip(xs, ws)):
            if seg.kind == "linear":
                a_codes, a_scales = q.quantize_activation(xb, quant.format, quant.activations, quant.scales)
                rows, _, _ = gemm_scales(a_scales, quant.activations, torch.ones(1, 1), "tensor", m, k, n,
                                         block_k=op.block_k)
                values = {"a": a_codes, "row_scales": rows}
            else:
                a_codes, b_codes, rows, cols, block_k = quantize_operands(xb, wb, quant, seg.w_scaling)
                if block_k != op.block_k:
                    raise RunError(f"internal: segment {seg.node} was compiled for K blocks of {op.block_k}, "
                                   f"not {block_k}")
                values = {"a": a_codes, "row_scales": rows, "b": b_codes, "col_scales": cols}
            host_values.append({role: values[role] for role in op.host_roles})
            for role in seg.runtime:
                if role in op.host_roles:
                    continue
                addr, _ = seg.buffers[b][role]
                sent += self._upload(addr, op.pack(role, values[role]), role in keep)
        result = self.driver.launch(seg.prog_addr, seg.prog_len)
        if not result.ok:
            raise RunError(f"segment {seg.node} ({seg.module_path}) stopped with {result.describe()}")
        outs = []
        for b in range(seg.batch):
            addr, nbytes = seg.buffers[b]["c"]
            outs.append(golden.bits_to_f32(op.finish(self.driver.read(addr, nbytes), host_values[b])))
        record = {"segment": seg.node, "cycles": result.cycles, "mac_ops": result.mac_ops,
                  "utilization": result.utilization, "wall_seconds": time.perf_counter() - t0,
                  "host_to_npu_bytes": sent, "npu_to_host_bytes": seg.npu_to_host_bytes}
        self.launches.append(record)
        if record_cycles:
            seg.cycles = result.cycles
        return (torch.stack(outs) if seg.kind == "bmm" else outs[0]).reshape(seg.out_shape)

    # ---- Mixture of Experts -------------------------------------------------------------
    def _moe(self, record, args):
        from .moe import MoESpec, expert_weight, run_moe
        spec = MoESpec(**record["spec"])
        x, weights = args[0], list(args[1])
        quant = self.model.quant

        def qlinear(tokens, which, expert):
            if self.backend == "reference":
                cfg = self.model.cfg
                return reference_qmatmul(tokens, expert_weight(spec, weights, which, expert), None, quant,
                                         accumulation=cfg.accumulation, acc_block=cfg.acc_block)
            return self._expert_launch(record, spec, tokens, which, expert, weights)
        return run_moe(spec, x, weights, qlinear)

    def _expert_launch(self, record, spec, tokens, which, expert, weights):
        """One expert projection on the NPU: a program lowered for the next power of two of the
        token count (cached), the shared weight buffers from compile time, the scratch buffer
        for the rest."""
        from .gemm import lower_gemm
        from .moe import expert_weight
        from .program import Buffer, Layout, Program, allocate

        quant, cfg = self.model.quant, self.model.cfg
        m = tokens.shape[0]
        m_b = min(1 << max(0, (m - 1).bit_length()), record["m_max"])
        w = expert_weight(spec, weights, which, expert)
        n, k = w.shape
        key = (record["node"], which, expert, m_b)
        cache = self.__dict__.setdefault("_programs", {})
        entry = cache.get(key)
        if entry is None:
            bufs = record["buffers"]
            shared = {}
            for role in ("b", "col_scales"):
                ref = bufs.get(f"{which}.{expert}.{role}")
                if ref is not None:
                    shared[role] = Buffer(f"{which}.{expert}.{role}", ref[1], "const")
            addresses = {b: bufs[f"{which}.{expert}.{r}"][0] for r, b in shared.items()}
            block_k = scale_block(quant.activations, quant.weights, k)
            kb_n = -(-k // block_k)
            # the weights' column scales (the shared buffer holds them packed; an NPU without a
            # vector unit has no such buffer, and the host applies them)
            _, w_scales = q.quantize_weight(w, quant.format, quant.weights, quant.scales)
            cols = weight_col_scales(w_scales, quant.weights, k, n, block_k)
            prog = Program(cfg)
            op = lower_gemm(prog, cfg, torch.zeros(m_b, k, dtype=torch.uint8), torch.zeros(k, n, dtype=torch.uint8),
                            quant.format, quant.format, block_scales=(torch.ones(m_b, kb_n), cols),
                            block_k=block_k, runtime=("a", "row_scales"),
                            name=f"{record['node']}.{which}.{expert}", shared=shared)
            prog.emit(Opcode.END)
            code = prog.buffer("program", nbytes=len(prog) * 32, kind="program")
            scratch_addr, scratch_bytes = bufs["scratch"]
            local = allocate(list(prog.buffers.values()), scratch_addr)
            if local.end > scratch_addr + scratch_bytes:
                raise RunError(f"internal: the expert program for {m_b} rows needs more than the MoE scratch")
            layout = Layout(0, {**local.addresses, **addresses}, self.model.dram_bytes)
            program = prog.verify(layout, 0, self.driver.transport.memory_bytes)
            consts = [(layout.address(b), b.data) for b in prog.buffers.values() if b.data is not None]
            consts.append((layout.address(code), program))
            io_addr = {r: (layout.address(op.buffers[r]), op.buffers[r].nbytes) for r in ("a", "row_scales", "c")
                       if r in op.buffers}
            entry = cache[key] = (op, consts, io_addr, layout.address(code), len(prog))
        op, consts, io_addr, prog_addr, prog_len = entry
        padded = torch.zeros((m_b, k), dtype=torch.float32)
        padded[:m] = tokens
        a_codes, a_scales = q.quantize_activation(padded, quant.format, quant.activations, quant.scales)
        rows, _, _ = gemm_scales(a_scales, quant.activations, torch.ones(1, 1), "tensor", m_b, k, n,
                                 block_k=op.block_k)
        t0 = time.perf_counter()
        for addr, data in consts:
            self.driver.write(addr, bytes(data))
        self.driver.write(io_addr["a"][0], bytes(op.pack("a", a_codes)))
        if "row_scales" in io_addr:
            self.driver.write(io_addr["row_scales"][0], bytes(op.pack("row_scales", rows)))
        result = self.driver.launch(prog_addr, prog_len)
        if not result.ok:
            raise RunError(f"expert {expert} {which} of the MoE layer {record['node']} stopped with "
                           f"{result.describe()}")
        y = golden.bits_to_f32(op.finish(self.driver.read(*io_addr["c"]),
                                         {r: rows for r in op.host_roles}))[:m]
        self.launches.append({"segment": f"{record['node']}.{which}.{expert}", "cycles": result.cycles,
                              "mac_ops": result.mac_ops, "utilization": result.utilization,
                              "wall_seconds": time.perf_counter() - t0,
                              "host_to_npu_bytes": io_addr["a"][1] + io_addr.get("row_scales", (0, 0))[1],
                              "npu_to_host_bytes": io_addr["c"][1]})
        return y

    def close(self):
        if self.driver is not None:
            self.driver.transport.close()


def _serial_transport(model, progress=None, port=None, baud=3_000_000, **options):
    """A :class:`~fp8npu.sim.host.SerialTransport` on ``port`` (a name, opened with pyserial at
    ``baud``, or an open port object), with the model's DRAM image written to the board."""
    from fp8npu.sim.host import HostError, SerialTransport
    if port is None:
        raise RunError("the serial backend needs the board's port (for example --port /dev/ttyUSB0)")
    if isinstance(port, str):
        try:
            import serial
        except ImportError:
            raise RunError("the serial backend needs pyserial: pip install 'fp8npu[board]'") from None
        try:
            port = serial.Serial(port, baud, timeout=0.5)
        except (serial.SerialException, ValueError, OSError) as exc:
            raise RunError(f"cannot open serial port {port!r}: {exc}; check the name (ls /dev/ttyUSB* /dev/ttyACM*) "
                           f"and that you may use it (the dialout group)") from None
    shown = None if progress is None else (lambda done, total: progress(done, total, "writing the model to the board"))
    try:
        transport = SerialTransport(port, progress=shown, **options)
    except HostError as exc:
        port.close()
        raise RunError(str(exc)) from None
    if transport.memory_bytes < model.dram_bytes:
        transport.close()
        raise RunError(f"the model needs {model.dram_bytes:,} bytes of DRAM; the board has {transport.memory_bytes:,}: "
                       f"build the board with more memory or compile a smaller model")
    transport.write(0, model.dram)
    return transport


def run(model, inputs, backend="func", details=False, record_cycles=False, progress=None, mode=None,
        **transport_options):
    """Run a compiled model (its ``mode``, default the first) once on ``inputs``, from its
    compiled state; returns its outputs (and the :class:`Session` with ``details=True``). See
    the module docstring for the backends; a :class:`Session` runs several calls in a row."""
    session = Session(model, backend, progress=progress, **transport_options)
    try:
        out = session.run(inputs, mode=mode, record_cycles=record_cycles)
    finally:
        session.close()
    return (out, session) if details else out


def npu_totals(model, mode=None):
    """FLOPs on the NPU and on the host (estimates, see docs/compiler.md) of one call of
    ``mode`` (default: the first), and their NPU share."""
    graph = model.graph(mode)
    npu = sum(s.flops for s in graph.segments.values()) + sum(r["flops"] for r in graph.moe.values())
    host = sum(h["flops"] for h in graph.host_ops)
    return npu, host, npu / max(1, npu + host)

