"""The model compiler and runtime (compiler/model.py, compiler/runtime.py).

Proof obligations checked here:
* the functional simulator's outputs equal the reference backend's (the contract written
  directly in torch, sim/reference.py) bit for bit, for every quantization setting;
* the RTL's equal the functional simulator's bit for bit (one model, one build);
* accuracy against the float32 module;
* the .npu file round-trips, and bad files, bad inputs and config mismatches are one sentence.
"""

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from fp8npu.compiler import model as cm
from fp8npu.compiler.examples import RMSNorm, rotate_half
from fp8npu.compiler.gemm import GemmOp
from fp8npu.compiler.model import CompileError, ModelFileError, QuantConfig, compile, load
from fp8npu.compiler.runtime import RunError, Session, npu_totals, run
from fp8npu.hdl.config import NPUConfig

CFG = NPUConfig(rows=4, cols=4, sp_lines=1024, acc_lines=256)


class Block(torch.nn.Module):
    """LayerNorm, a biased and an unbiased linear, GELU, a residual and a product of activations."""

    def __init__(self, d=40, f=72):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, f)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = F.gelu(self.up(self.norm(x)))
        y = x + self.down(h)
        return y, y[0] @ y[1].T


def _block(seed=0):
    torch.manual_seed(seed)
    return Block().eval(), (torch.randn(2, 6, 40),)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _same(a, b):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


QUANTS = [QuantConfig(fmt, w, a, s) for fmt, w, a, s in itertools.product(
    ("e4m3", "e5m2"), ("tensor", "channel", "block"), ("tensor", "token", "tile"), ("pow2", "fp32"))]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q.format}-{q.weights}-{q.activations}-{q.scales}")
def test_functional_simulator_equals_the_contract(quant):
    module, (x,) = _block()
    model = compile(module, (x,), CFG, quant, estimate=False)
    assert {s.kind for s in model.segments.values()} == {"linear", "mm"}
    x2 = torch.randn_like(x)           # other data than the example: scales come from the data
    assert _same(run(model, x2), run(model, x2, backend="reference"))


def test_rtl_equals_functional_simulator():
    module, (x,) = _block(1)
    model = compile(module, (x,), CFG)
    got, session = run(model, x, backend="rtl", details=True, fast=True)
    assert _same(got, run(model, x))
    assert len(session.launches) == 3 and all(rec["cycles"] > 0 for rec in session.launches)


class ResidualMLP(torch.nn.Module):
    """A transformer block's feed-forward half at d_model = 256: x + W2 SiLU(W1 RMSNorm(x))."""

    def __init__(self, d=256):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.silu(self.up(self.norm(x))))


@pytest.mark.parametrize("quant", ["weights=channel,activations=token", "weights=block,activations=tile",
                                   "weights=tensor,activations=tensor,scales=fp32"])
def test_accuracy_against_float32(quant):
    """Cosine >= 0.999 against the float32 module. (E4M3 alone costs about 0.0006 of cosine per
    linear layer on random data; the residual path is exact FP32 on the host.)"""
    torch.manual_seed(3)
    block = ResidualMLP().eval()
    x = torch.randn(16, 256)
    want = block(x)
    got = run(compile(block, (x,), NPUConfig(), quant, estimate=False), x)
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    print(f"{quant}: cosine {cos:.6f}")
    assert cos >= 0.999


def test_save_and_load_round_trip(tmp_path):
    module, (x,) = _block(2)
    model = compile(module, (x,), CFG, "weights=block,activations=tile,scales=fp32")
    path = tmp_path / "block.npu"
    model.save(path)
    again = load(path)
    assert again.cfg == CFG and again.quant == model.quant and again.dram == model.dram
    assert [s.cycles for s in again.segments.values()] == [s.cycles for s in model.segments.values()]
    assert all(s.cycles > 0 for s in model.segments.values())
    assert _same(run(again, x), run(model, x))


def test_bad_model_files(tmp_path):
    module, (x,) = _block()
    buf = io.BytesIO()
    compile(module, (x,), CFG, estimate=False).save(buf)
    data = buf.getvalue()
    cases = {
        "foreign": (b"PK\x03\x04" + data[4:], r"is not an fp8npu model file"),
        "truncated": (data[:len(data) // 2], r"is corrupt or truncated \(its checksum does not match\)$"),
        "flipped": (data[:200] + bytes([data[200] ^ 1]) + data[201:], r"is corrupt or truncated"),
        "version": (data[:16] + b"\x09\x00\x00\x00" + data[20:], r"has format version 9; this fp8npu reads version 2"),
        "tiny": (data[:20], r"truncated"),
    }
    for name, (blob, message) in cases.items():
        with pytest.raises(ModelFileError, match=message):
            load(f"{name}.npu", blob)


def test_bad_inputs_at_run_time():
    module, (x,) = _block()
    model = compile(module, (x,), CFG, estimate=False)
    with pytest.raises(RunError, match=r"^input x must have shape \(2, 6, 40\) \(the shape it was compiled for\), "
                                       r"not \(2, 7, 40\)$"):
        run(model, torch.randn(2, 7, 40))
    with pytest.raises(RunError, match=r"^input x must be float32, not float64$"):
        run(model, x.double())
    with pytest.raises(RunError, match=r"^the model takes 1 input\(s\) \(x\), not 2$"):
        run(model, (x, x))
    with pytest.raises(RunError, match=r"^backend must be one of func, rtl, serial, reference, not 'gpu'$"):
        Session(model, "gpu")


def test_config_mismatch_is_refused():
    from fp8npu.sim.host import Driver, FuncTransport, HostError
    module, (x,) = _block()
    model = compile(module, (x,), CFG, estimate=False)
    other = FuncTransport(NPUConfig(), model.dram_bytes, model.dram)
    with pytest.raises(HostError, match=r"^the NPU is a 8x8 array.*but the program was built for a 4x4 array"):
        Driver(other, model.cfg).check_config()


def test_compile_errors_are_one_sentence():
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(CompileError, match=r"^aten.linear.default at <top>.*: the weight holds 1 NaN or infinite values$"):
        compile(lin, (torch.randn(3, 8),), CFG)

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(CompileError, match=r"^torch.export could not capture DataDependent: "):
        compile(DataDependent(), (torch.randn(5),), CFG)

    class Ragged(torch.nn.Module):
        """Data-dependent shapes are fine on the host, not on the NPU."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x[x[:, 0] > 0])

    with pytest.raises(CompileError, match=r"^aten.linear.default at lin .*: the input and output shapes must be "
                                           r"known at compile time$"):
        compile(Ragged(), (torch.randn(5, 4),), CFG)
    with pytest.raises(CompileError, match=r"^the NPU configuration does not support e5m2"):
        compile(lin, (torch.randn(3, 8),), NPUConfig(formats=("e4m3",)), "format=e5m2")
    with pytest.raises(ValueError, match=r"^quantization weights must be one of tensor, channel, block, not 'row'$"):
        QuantConfig.parse("weights=row")
    with pytest.raises(ValueError, match=r"^--quant takes KEY=VALUE pairs"):
        QuantConfig.parse("bits=8")


def test_partition_and_totals():
    module, (x,) = _block()
    model = compile(module, (x,), CFG, estimate=False)
    assert [s.module_path for s in model.segments.values()] == ["up", "down", "<top>"]
    npu, host, share = npu_totals(model)
    assert npu == 2 * 12 * 40 * 72 * 2 + 2 * 6 * 40 * 6
    assert 0 < host < npu and share > 0.9
    seg = model.segments["linear"]
    assert seg.host_to_npu_bytes == seg.buffers[0]["a"][1] + seg.buffers[0]["row_scales"][1]
    # per-launch buffers share DRAM; weights and programs do not (constants with the same bytes
    # are one copy)
    spans = sorted({(a, a + n) for s in model.segments.values() for b in s.buffers for r, (a, n) in b.items()
                    if r not in s.runtime and r != "c"})
    assert all(e1 <= a2 for (_, e1), (a2, _) in zip(spans, spans[1:]))


def test_lazy_package_exports():
    import fp8npu.compiler as c
    assert c.compile is cm.compile and c.run is run and c.load is load


# ---- a transformer block, written the way open models write it ---------------------------------
class Llama(torch.nn.Module):
    """RMSNorm, grouped-query attention with rotary embeddings and a causal mask, SwiGLU MLP,
    residuals. ``sdpa`` picks F.scaled_dot_product_attention or the same by hand."""

    def __init__(self, d=32, heads=4, kv_heads=2, ffn=48, seq=8, sdpa=True):
        super().__init__()
        self.h, self.kvh, self.hd, self.sdpa = heads, kv_heads, d // heads, sdpa
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.q_proj = torch.nn.Linear(d, d, bias=False)
        self.k_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)
        self.gate_proj = torch.nn.Linear(d, ffn, bias=False)
        self.up_proj = torch.nn.Linear(d, ffn, bias=False)
        self.down_proj = torch.nn.Linear(ffn, d, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        ang = torch.outer(torch.arange(seq).float(), inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def attention(self, x):
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kvh, self.hd).transpose(1, 2)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.h // self.kvh, dim=1)
        v = v.repeat_interleave(self.h // self.kvh, dim=1)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-1, -2) / self.hd ** 0.5
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
            y = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x):
        x = x + self.attention(self.attn_norm(x))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "by-hand"])
def test_transformer_block_on_the_npu(sdpa):
    """Every projection and both attention products run on the NPU; the functional simulator
    equals the contract bit for bit."""
    torch.manual_seed(4)
    block = Llama(sdpa=sdpa).eval()
    x = torch.randn(2, 8, 32)
    model = compile(block, (x,), CFG)
    kinds = sorted(s.kind for s in model.segments.values())
    assert kinds == ["bmm", "bmm"] + ["linear"] * 7
    assert npu_totals(model)[2] > 0.5
    assert _same(run(model, x), run(model, x, backend="reference"))


def test_transformer_block_rtl_equals_functional_simulator():
    torch.manual_seed(5)
    block = Llama(seq=4).eval()
    x = torch.randn(1, 4, 32)
    model = compile(block, (x,), CFG, estimate=False)
    assert _same(run(model, x, backend="rtl", fast=True), run(model, x))


def test_transformer_block_accuracy_d256():
    torch.manual_seed(6)
    block = Llama(d=256, heads=8, kv_heads=4, ffn=512, seq=16).eval()
    x = torch.randn(1, 16, 256)
    got = run(compile(block, (x,), NPUConfig(), estimate=False), x)
    cos = F.cosine_similarity(got.flatten(), block(x).flatten(), dim=0).item()
    print(f"transformer block d_model 256: cosine {cos:.6f}")
    assert cos >= 0.999


#: An NPU for small FPGAs: no vector unit, no FP8 stores (the host applies scales and bias).
TRIMMED = NPUConfig(rows=2, cols=2, sp_lines=1024, acc_lines=256, axi_data_bits=32, queue_depth=0, max_burst=4,
                    accumulation="block", acc_block=8, formats=("e4m3",), vector_unit=False, fp8_store=False,
                    round_stages=1, add_stages=1, rounders=1, pe_stages=1, check_stages=1, perf_counters=False,
                    token_limit=255, axi_addr_bits=20)


@pytest.mark.parametrize("quant", ["weights=channel,activations=token", "weights=tensor,activations=tensor,scales=fp32"])
def test_models_run_on_an_npu_without_vector_unit(quant):
    """The host finishes each product (scales, bias) that the NPU computes plainly: the
    functional simulator equals the contract bit for bit, for linear layers and products of
    activations, and for a transformer block with attention."""
    module, (x,) = _block(3)
    model = compile(module, (x,), TRIMMED, quant, estimate=False)
    assert all(GemmOp.from_spec(TRIMMED, s.gemm).host for s in model.segments.values())
    x2 = torch.randn_like(x)
    assert _same(run(model, x2), run(model, x2, backend="reference"))
    torch.manual_seed(6)
    block = Llama().eval()
    x = torch.randn(1, 8, 32)
    model = compile(block, (x,), TRIMMED, quant, estimate=False)
    assert _same(run(model, x), run(model, x, backend="reference"))


@pytest.mark.parametrize("quant", ["weights=block,activations=tile", "weights=block,activations=token,scales=fp32"])
def test_fine_grained_scaling_without_vector_unit(quant):
    """Fine-grained scaling over several K blocks on an NPU without a vector unit: the NPU
    stores one partial sum per 128-wide K block, the host scales and adds them by the contract;
    bit for bit the reference, for a linear layer (K = 320: three blocks, the last one short)
    and a product of two activations."""
    torch.manual_seed(8)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(320, 24)

        def forward(self, x, y):
            return self.fc(x) + x @ y

    x, y = torch.randn(5, 320), torch.randn(320, 24)
    model = compile(Two().eval(), (x, y), TRIMMED, quant, estimate=False)
    specs = [GemmOp.from_spec(TRIMMED, s.gemm) for s in model.segments.values()]
    assert all(op.host and op.host["parts"] == 3 for op in specs)
    x2, y2 = torch.randn_like(x), torch.randn_like(y)
    assert _same(run(model, (x2, y2)), run(model, (x2, y2), backend="reference"))


def test_rtl_without_vector_unit_equals_functional_simulator():
    module, (x,) = _block(2)
    model = compile(module, (x,), TRIMMED, estimate=False)
    assert _same(run(model, x, backend="rtl", fast=True), run(model, x))
