"""Example layers for the showcase and the benchmarks, written the way open models write them
(Hugging Face's Llama and Mixtral code shapes), so that what they measure is what a user's
model gets.

* :class:`DecoderBlock` — RMSNorm, grouped-query attention with rotary embeddings and a
  static KV cache (buffers updated with ``index_copy_`` at the positions given as an input,
  as Hugging Face's static cache does), then a SwiGLU MLP or a Mixtral-style MoE FFN;
  ``forward(x [1, T, D], positions [T])``.
* :class:`MixtralMoE` — router, softmax, top-k, renormalized weights, data-dependent
  dispatch to a list of gated experts.
* :func:`modes` — the example inputs of a prefill mode and a decode mode.
"""

import torch
import torch.nn.functional as F

__all__ = ["RMSNorm", "rotate_half", "rope_tables", "SwiGLU", "MixtralExpert", "MixtralMoE", "Attention",
           "DecoderBlock", "decoder_block", "mixtral_moe", "modes"]


class RMSNorm(torch.nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(dim, max_len):
    """Rotary embedding tables (cos, sin) [max_len, dim], as Llama computes them."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    emb = torch.outer(torch.arange(max_len).float(), inv).repeat(1, 2)
    return emb.cos(), emb.sin()


class SwiGLU(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, f, bias=False)
        self.up_proj = torch.nn.Linear(d, f, bias=False)
        self.down_proj = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtralExpert(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class MixtralMoE(torch.nn.Module):
    """Mixtral's sparse MoE block: softmax router, top-k, renormalized weights."""

    def __init__(self, d, f, experts=8, top_k=2):
        super().__init__()
        self.top_k, self.num_experts = top_k, experts
        self.gate = torch.nn.Linear(d, experts, bias=False)
        self.experts = torch.nn.ModuleList([MixtralExpert(d, f) for _ in range(experts)])

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(F.softmax(self.gate(h), dim=-1, dtype=torch.float), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](h[rows]) * weights[rows, slot, None])
        return out.reshape(shape)


class Attention(torch.nn.Module):
    """Grouped-query attention with rotary embeddings, a causal mask from the positions, and a
    static KV cache of ``max_len`` positions; ``sdpa`` picks F.scaled_dot_product_attention or
    the same written by hand (QK^T, masked softmax, PV)."""

    def __init__(self, d, heads, kv_heads, max_len, sdpa=True):
        super().__init__()
        self.h, self.kvh, self.hd, self.max_len, self.sdpa = heads, kv_heads, d // heads, max_len, sdpa
        self.q_proj = torch.nn.Linear(d, d, bias=False)
        self.k_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = torch.nn.Linear(d, d, bias=False)
        cos, sin = rope_tables(self.hd, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, max_len, self.hd))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, max_len, self.hd))

    def forward(self, x, pos):
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kvh, self.hd).transpose(1, 2)
        cos, sin = self.cos[pos], self.sin[pos]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        keys = self.k_cache.repeat_interleave(self.h // self.kvh, dim=1)
        values = self.v_cache.repeat_interleave(self.h // self.kvh, dim=1)
        mask = torch.arange(self.max_len)[None, :] <= pos[:, None]
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            s = q @ keys.transpose(-1, -2) / self.hd ** 0.5
            y = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ values
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(torch.nn.Module):
    """A Llama-style decoder block; the FFN is SwiGLU, or a Mixtral MoE with ``experts`` > 0."""

    def __init__(self, d=64, heads=4, kv_heads=2, ffn=128, max_len=32, experts=0, top_k=2, sdpa=True):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.self_attn = Attention(d, heads, kv_heads, max_len, sdpa)
        self.mlp = MixtralMoE(d, ffn, experts, top_k) if experts else SwiGLU(d, ffn)

    def forward(self, x, pos):
        x = x + self.self_attn(self.attn_norm(x), pos)
        return x + self.mlp(self.mlp_norm(x))


def decoder_block(seed=0, **kw):
    """A :class:`DecoderBlock` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    block = DecoderBlock(**kw).eval()
    for name, p in block.named_parameters():
        if name.endswith("norm.weight"):
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return block


def mixtral_moe(d, ffn, experts, top_k=2, seed=0):
    torch.manual_seed(seed)
    return MixtralMoE(d, ffn, experts, top_k).eval()


def modes(x, prefill):
    """Example inputs: ``prefill`` positions of ``x [1, T, D]``, and one decode position."""
    return {"prefill": (x[:, :prefill], torch.arange(prefill)),
            "decode": (x[:, :1], torch.tensor([prefill]))}

