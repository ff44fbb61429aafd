"""Mixture-of-Experts layers written the way open models write them (compiler/moe.py): each
compiles without edits, the functional simulator equals the contract bit for bit, the RTL
equals the functional simulator, and routing agrees with float32."""

import pytest
import torch
import torch.nn.functional as F
from fp8npu.compiler import moe
from fp8npu.compiler.examples import MixtralExpert
from fp8npu.compiler.model import compile
from fp8npu.compiler.runtime import npu_totals, run
from fp8npu.hdl.config import NPUConfig

CFG = NPUConfig(rows=4, cols=4, sp_lines=1024, acc_lines=256)


class MixtralMoE(torch.nn.Module):
    """Hugging Face's MixtralSparseMoeBlock: softmax, top-k, renormalized, data-dependent dispatch."""

    def __init__(self, d=32, f=48, experts=4, top_k=2):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.experts = torch.nn.ModuleList([MixtralExpert(d, f) for _ in range(experts)])

    def forward(self, hidden_states):
        b, t, d = hidden_states.shape
        hidden_states = hidden_states.view(-1, d)
        routing_weights = F.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        final = torch.zeros((b * t, d), dtype=hidden_states.dtype)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            state = hidden_states[None, top_x].reshape(-1, d)
            final.index_add_(0, top_x, self.experts[e](state) * routing_weights[top_x, idx, None])
        return final.reshape(b, t, d)


class GatedMLP(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QwenMoE(torch.nn.Module):
    """Qwen2-MoE style: softmax without renormalization, a shared expert behind a sigmoid gate."""

    def __init__(self, d=32, f=24, experts=6, top_k=2):
        super().__init__()
        self.top_k, self.num_experts, self.norm_topk_prob = top_k, experts, False
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.experts = torch.nn.ModuleList([GatedMLP(d, f) for _ in range(experts)])
        self.shared_expert = GatedMLP(d, 40)
        self.shared_expert_gate = torch.nn.Linear(d, 1, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = x.view(-1, d)
        w = F.softmax(self.gate(h), dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            rows, slot = torch.where(sel == e)
            out.index_add_(0, rows, self.experts[e](h[rows]) * w[rows, slot, None])
        out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out.view(b, t, d)


class DeepSeekGate(torch.nn.Module):
    def __init__(self, d, experts, top_k, n_group, topk_group):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = True, 2.5
        self.weight = torch.nn.Parameter(torch.randn(experts, d) / d ** 0.5)
        self.register_buffer("e_score_correction_bias", torch.randn(experts) * 0.1)

    def forward(self, h):
        scores = torch.sigmoid(h @ self.weight.T)
        choice = scores + self.e_score_correction_bias
        t = h.shape[0]
        group_scores = choice.view(t, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        per_group = self.weight.shape[0] // self.n_group
        score_mask = group_mask.unsqueeze(-1).expand(t, self.n_group, per_group).reshape(t, -1)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor


class DeepSeekMoE(torch.nn.Module):
    """DeepSeek-V3 style: sigmoid scores, a choice bias, group-limited routing, shared experts."""

    def __init__(self, d=32, f=16, experts=8, top_k=2, n_group=4, topk_group=2):
        super().__init__()
        self.gate = DeepSeekGate(d, experts, top_k, n_group, topk_group)
        self.experts = torch.nn.ModuleList([GatedMLP(d, f) for _ in range(experts)])
        self.shared_experts = GatedMLP(d, 32)

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        idx, w = self.gate(h)
        out = torch.zeros_like(h)
        for e in range(len(self.experts)):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                out[rows] += self.experts[e](h[rows]) * w[rows, slot, None]
        return (out + self.shared_experts(h)).view(shape)


class Experts3D(torch.nn.Module):
    def __init__(self, e, d, f):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(e, 2 * f, d) / d ** 0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(e, d, f) / f ** 0.5)
        self.act_fn = torch.nn.SiLU()


class FusedMoE(torch.nn.Module):
    """Newer model code: all experts in one module holding 3-D weight tensors."""

    def __init__(self, d=32, f=24, experts=4, top_k=1):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.experts = Experts3D(experts, d, f)

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        w, sel = torch.topk(F.softmax(self.gate(h), dim=-1), self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        f = self.experts.down_proj.shape[2]
        for e in range(self.experts.gate_up_proj.shape[0]):
            rows, slot = torch.where(sel == e)
            gu = h[rows] @ self.experts.gate_up_proj[e].T
            y = (F.silu(gu[:, :f]) * gu[:, f:]) @ self.experts.down_proj[e].T
            out.index_add_(0, rows, y * w[rows, slot, None])
        return out.reshape(x.shape)


class Block(torch.nn.Module):
    def __init__(self, layer, d=32):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d)
        self.moe = layer

    def forward(self, x):
        return x + self.moe(self.norm(x))


LAYERS = {"mixtral": MixtralMoE, "qwen": QwenMoE, "deepseek": DeepSeekMoE, "fused3d": FusedMoE}


@pytest.mark.parametrize("name", list(LAYERS))
def test_moe_layers_compile_and_equal_the_contract(name):
    torch.manual_seed(1)
    block = Block(LAYERS[name]()).eval()
    x = torch.randn(2, 5, 32)
    found = moe.detect(block.moe)
    assert found is not None, "not recognized"
    model = compile(block, (x,), CFG, estimate=False)
    assert list(model.moe) and not model.segments
    assert npu_totals(model)[2] > 0.9
    got, session = run(model, x, details=True)
    want = run(model, x, backend="reference")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert all(rec["cycles"] > 0 for rec in session.launches)
    cos = F.cosine_similarity(got.flatten(), block(x).flatten(), dim=0).item()
    print(f"{name}: {len(session.launches)} launches, cosine {cos:.6f}")
    assert cos >= 0.999


def test_moe_rtl_equals_functional_simulator():
    """4 experts, top-2, a shared expert (Qwen style, sigmoid-gated)."""
    torch.manual_seed(2)
    block = Block(QwenMoE(experts=4)).eval()
    x = torch.randn(1, 6, 32)
    model = compile(block, (x,), CFG, estimate=False)
    rtl = run(model, x, backend="rtl", fast=True)
    assert torch.equal(rtl.view(torch.int32), run(model, x).view(torch.int32))


def test_routing_agrees_with_float32():
    """The router, scores and top-k run in FP32 on the host, so an MoE layer (d_model 256, 8
    experts, top-2) chooses exactly the float32 module's experts for every token (quantizing the
    router to FP8 would flip near ties). Checked through the layer: with the expert weights
    scaled to zero except one marker per expert, the output says which experts each token used."""
    torch.manual_seed(3)
    d = 256
    layer = MixtralMoE(d=d, f=64, experts=8, top_k=2).eval()
    with torch.no_grad():
        for e, ex in enumerate(layer.experts):
            ex.w1.weight.zero_()
            ex.w3.weight.zero_()
            ex.w2.weight.zero_()
            ex.w1.weight[0, 0] = ex.w3.weight[0, 0] = 1.0
            ex.w2.weight[e, 0] = 1.0
    x = torch.randn(64, 1, d)
    x[:, 0, 0] = 3.0 + torch.rand(64)                           # every expert sees a positive marker
    got = run(compile(layer, (x,), NPUConfig(), estimate=False), x)
    used_npu = (got[:, 0, :8] != 0)
    used_f32 = (layer(x)[:, 0, :8] != 0)
    same = (used_npu == used_f32).all(dim=1).float().mean().item()
    print(f"identical top-2 choice for {same:.1%} of tokens")
    assert used_f32.sum(dim=1).eq(2).all()
    assert same == 1.0


def test_moe_on_an_npu_without_vector_unit():
    """Expert projections on an NPU without a vector unit (the host applies their scales) equal
    the contract bit for bit (queues one command deep)."""
    cfg = NPUConfig(rows=2, cols=2, sp_lines=1024, acc_lines=256, axi_data_bits=32, queue_depth=1, max_burst=4,
                    accumulation="block", acc_block=8, formats=("e4m3",), vector_unit=False, fp8_store=False)
    torch.manual_seed(3)
    block = Block(QwenMoE(experts=4)).eval()
    x = torch.randn(1, 6, 32)
    model = compile(block, (x,), cfg, estimate=False)
    got, session = run(model, x, details=True)
    assert torch.equal(got.view(torch.int32), run(model, x, backend="reference").view(torch.int32))
    assert len(session.launches) > 4


def test_moe_fine_grained_scaling_on_an_npu_without_vector_unit():
    """Fine-grained scaling with K over several 128-wide blocks (d = 160, f = 136): the
    experts' NPU programs store one partial per K block, the host scales and sums them; bit
    for bit the contract."""
    cfg = NPUConfig(rows=2, cols=2, sp_lines=1024, acc_lines=256, axi_data_bits=32, queue_depth=2, max_burst=4,
                    accumulation="block", acc_block=8, formats=("e4m3",), vector_unit=False, fp8_store=False)
    torch.manual_seed(3)
    block = Block(QwenMoE(d=160, f=136, experts=3), d=160).eval()
    x = torch.randn(1, 5, 160)
    model = compile(block, (x,), cfg, "weights=block,activations=tile", estimate=False)
    got = run(model, x)
    assert torch.equal(got.view(torch.int32), run(model, x, backend="reference").view(torch.int32))
