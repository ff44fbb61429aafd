"""Prefill and decode: a model with a KV cache, compiled in two modes that share the cache.

The blocks here keep their caches the way Hugging Face's static cache does (buffers updated
with ``index_copy_`` at the positions given as an input), which is also how torch.export
captures a decode step. Decode must reproduce prefill bit for bit (rows are independent on
the NPU and every quantization is per token or per position), the functional simulator must
equal the contract, the RTL the functional simulator, and a decode step must write only the
new positions of the cache into the NPU's DRAM.
"""

import io
import json

import pytest
import torch
import torch.nn.functional as F
from fp8npu.compiler.examples import DecoderBlock, RMSNorm, rope_tables, rotate_half
from fp8npu.compiler.examples import modes as _modes
from fp8npu.compiler.model import CompileError, compile, load
from fp8npu.compiler.runtime import RunError, Session, run
from fp8npu.hdl.config import NPUConfig

CFG = NPUConfig(rows=4, cols=4, sp_lines=1024, acc_lines=256)     # the model tests' NPU (one Verilator build)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _same(a, b):
    return torch.equal(_bits(a), _bits(b))


def LlamaKV(d=32, heads=4, kv_heads=2, ffn=48, max_len=8, sdpa=True):
    """A Llama decoder block with a static KV cache (compiler/examples.py, the showcase's block
    with a SwiGLU MLP): forward(x [1, T, D], positions [T])."""
    return DecoderBlock(d, heads, kv_heads, ffn, max_len, sdpa=sdpa)


class MLA(torch.nn.Module):
    """DeepSeek-style multi-head latent attention: low-rank q and kv projections, a decoupled
    rotary part shared by the heads, and a cache of the compressed kv latent (plus the rotary
    key), from which keys and values are projected back up at every call."""

    def __init__(self, d=32, heads=4, q_rank=24, kv_rank=16, nope=8, rope=4, v_dim=8, max_len=8):
        super().__init__()
        self.h, self.nope, self.rope, self.v_dim, self.max_len, self.kv_rank = heads, nope, rope, v_dim, max_len, kv_rank
        self.q_a_proj = torch.nn.Linear(d, q_rank, bias=False)
        self.q_a_norm = RMSNorm(q_rank)
        self.q_b_proj = torch.nn.Linear(q_rank, heads * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = torch.nn.Linear(d, kv_rank + rope, bias=False)
        self.kv_a_norm = RMSNorm(kv_rank)
        self.kv_b_proj = torch.nn.Linear(kv_rank, heads * (nope + v_dim), bias=False)
        self.o_proj = torch.nn.Linear(heads * v_dim, d, bias=False)
        cos, sin = rope_tables(rope, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("kv_cache", torch.zeros(1, max_len, kv_rank))
        self.register_buffer("pe_cache", torch.zeros(1, max_len, rope))

    def forward(self, x, pos):
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))).view(b, t, self.h, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        cos, sin = self.cos[pos], self.sin[pos]
        q_pe = q_pe * cos + rotate_half(q_pe) * sin
        k_pe = k_pe * cos + rotate_half(k_pe) * sin
        self.kv_cache.index_copy_(1, pos, self.kv_a_norm(latent))
        self.pe_cache.index_copy_(1, pos, k_pe)
        kv = self.kv_b_proj(self.kv_cache).view(b, self.max_len, self.h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, self.pe_cache[:, None].expand(b, self.h, self.max_len, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        mask = torch.arange(self.max_len)[None, :] <= pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.h * self.v_dim))


def _generate(model, x, prefill, backend="func", **options):
    """Prefill ``prefill`` tokens, then decode the rest one by one: (outputs [1, T, D], session)."""
    session = Session(model, backend, **options)
    try:
        outs = [session.run((x[:, :prefill], torch.arange(prefill)), mode="prefill")]
        for t in range(prefill, x.shape[1]):
            outs.append(session.run((x[:, t:t + 1], torch.tensor([t])), mode="decode"))
    finally:
        session.close()
    return torch.cat(outs, dim=1), session


def _fresh(cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


@pytest.mark.parametrize("cls,kw", [(LlamaKV, {}), (LlamaKV, {"sdpa": False}), (MLA, {})],
                         ids=["llama-sdpa", "llama-by-hand", "mla"])
def test_decode_reproduces_prefill_and_the_contract(cls, kw):
    """Prefill 5 tokens then decode 3 gives the same bits as prefilling all 8; the functional
    simulator equals the contract (reference backend) bit for bit on every call."""
    block = _fresh(cls, 11, **kw)
    x = torch.randn(1, 8, 32)
    model = compile(block, _modes(x, 5), CFG)
    assert model.modes == ["prefill", "decode"]
    assert [s["name"] for s in model.state] == [n for n, _ in block.named_buffers() if "cache" in n]
    whole = compile(block, {"prefill": (x, torch.arange(8))}, CFG, estimate=False)
    got, session = _generate(model, x, 5)
    want = run(whole, (x, torch.arange(8)))
    assert _same(got, want), "decode steps differ from the prefill of the whole sequence"
    ref, _ = _generate(model, x, 5, backend="reference")
    assert _same(got, ref)
    # the block's own float32 result, token by token from an empty cache
    float_block = _fresh(cls, 11, **kw)
    expect = float_block(x, torch.arange(8))
    assert F.cosine_similarity(got.flatten(), expect.flatten(), dim=0).item() > 0.99
    # the module itself was not changed by compiling or running
    assert all(float(b.abs().sum()) == 0 for n, b in block.named_buffers() if "cache" in n)


def test_state_operands_and_what_a_decode_step_writes():
    """The K^T and V operands of attention are recognised as cache positions (columns of
    K^T, rows of V) and the compressed MLA latent as rows of the kv up-projection; a decode step
    after the first writes only the bytes of the new position into those operands."""
    block = _fresh(LlamaKV, 12, max_len=32)
    x = torch.randn(1, 8, 32)
    model = compile(block, _modes(x, 4), CFG, estimate=False)
    for graph in model.graphs.values():
        assert {n: s.resident for n, s in graph.segments.items() if s.resident} == {"bmm": {"b": "n"},
                                                                                 "bmm_1": {"b": "k"}}
    _, session = _generate(model, x, 4)
    decode = model.graph("decode")
    steps = [session.launches[i:i + len(decode.segments)] for i in range(len(model.graph("prefill").segments),
                                                                          len(session.launches), len(decode.segments))]
    assert len(steps) == 4
    for step in steps[1:]:
        for launch in step:
            seg = decode.segments[launch["segment"]]
            if seg.resident:
                full = seg.host_to_npu_bytes
                a_bytes = sum(b[r][1] for b in seg.buffers for r in ("a", "row_scales"))
                assert launch["host_to_npu_bytes"] - a_bytes <= (full - a_bytes) // 4, (launch, full)
    mla = compile(_fresh(MLA, 13), _modes(x, 4), CFG, estimate=False)
    resident = {s.module_path: s.resident for s in mla.graph("decode").segments.values() if s.resident}
    assert resident == {"kv_b_proj": {"a": "m"}, "<top>": {"b": "k"}} and \
        [s.resident for s in mla.graph("decode").segments.values() if s.kind == "bmm"] == [{"b": "n"}, {"b": "k"}]


def test_rtl_equals_functional_simulator_prefill_and_decode():
    block = _fresh(LlamaKV, 14, max_len=6)
    x = torch.randn(1, 6, 32)
    model = compile(block, _modes(x, 4), CFG, estimate=False)
    got, session = _generate(model, x, 4, backend="rtl", fast=True)
    want, _ = _generate(model, x, 4)
    assert _same(got, want)
    assert len(session.launches) == 3 * 9


def test_decode_accuracy_d256():
    """Token-by-token decode of a d_model 256 block (8 heads, 4 KV heads) against float32."""
    block = _fresh(LlamaKV, 15, d=256, heads=8, kv_heads=4, ffn=512, max_len=16)
    x = torch.randn(1, 16, 256)
    model = compile(block, _modes(x, 8), NPUConfig(), estimate=False)
    got, _ = _generate(model, x, 8)
    want = _fresh(LlamaKV, 15, d=256, heads=8, kv_heads=4, ffn=512, max_len=16)(x, torch.arange(16))
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    print(f"decode, d_model 256: cosine {cos:.6f}")
    assert cos >= 0.999


def test_state_carries_over_and_resets():
    block = _fresh(LlamaKV, 16)
    x = torch.randn(1, 8, 32)
    model = compile(block, _modes(x, 4), CFG, estimate=False)
    session = Session(model)
    first = session.run((x[:, :4], torch.arange(4)), mode="prefill")
    step = session.run((x[:, 4:5], torch.tensor([4])), mode="decode")
    session.reset()
    assert _same(session.run((x[:, :4], torch.arange(4)), mode="prefill"), first)
    assert _same(session.run((x[:, 4:5], torch.tensor([4])), mode="decode"), step)
    # a decode step with an empty cache is a different computation
    assert not _same(run(model, (x[:, 4:5], torch.tensor([4])), mode="decode"), step)


def test_modes_save_load_and_errors(tmp_path):
    block = _fresh(LlamaKV, 17)
    x = torch.randn(1, 8, 32)
    model = compile(block, _modes(x, 4), CFG)
    buf = io.BytesIO()
    model.save(buf)
    again = load("m.npu", buf.getvalue())
    assert again.modes == model.modes and again.state == model.state and again.dram == model.dram
    assert _same(_generate(again, x, 4)[0], _generate(model, x, 4)[0])
    with pytest.raises(RunError, match=r"^the model has no mode 'generate'; its modes are prefill, decode$"):
        Session(model).run((x[:, :1], torch.tensor([4])), mode="generate")
    with pytest.raises(RunError, match=r"^input x in mode decode must have shape \(1, 1, 32\)"):
        Session(model).run((x[:, :2], torch.tensor([4, 5])), mode="decode")
    with pytest.raises(CompileError, match="mode name must be an identifier"):
        compile(block, {"pre fill": (x, torch.arange(8))}, CFG)
    with pytest.raises(CompileError, match="at least one mode"):
        compile(block, {}, CFG)


def test_command_line_prefill_then_decode(tmp_path, capsys):
    """compile a factory that returns modes, run prefill then two decode steps in one call of
    `fp8npu run`, and report both modes; the outputs equal a Session's."""
    from fp8npu.compiler import cli
    factory = tmp_path / "block.py"
    factory.write_text(
        "import torch\n"
        "from fp8npu.compiler.examples import decoder_block, modes\n"
        "def make():\n"
        "    x = torch.randn(1, 8, 32)\n"
        "    return decoder_block(18, d=32, heads=4, kv_heads=2, ffn=48, max_len=8), modes(x, 4)\n")
    out = tmp_path / "block.npu"
    assert cli.main(["compile", f"{factory}:make", "-o", str(out), "--config", str(_cfg_file(tmp_path))]) == 0
    assert "modes prefill, decode" in capsys.readouterr().err
    x = torch.randn(1, 8, 32)
    torch.save((x[:, :4], torch.arange(4)), tmp_path / "p.pt")
    torch.save((x[:, 4:5], torch.tensor([4])), tmp_path / "t4.pt")
    torch.save((x[:, 5:6], torch.tensor([5])), tmp_path / "t5.pt")
    calls = [f"prefill={tmp_path / 'p.pt'}", f"decode={tmp_path / 't4.pt'}", f"decode={tmp_path / 't5.pt'}"]
    assert cli.main(["run", str(out), "--inputs", *calls, "-o", str(tmp_path / "y.pt")]) == 0
    assert "3 calls (prefill, decode, decode)" in capsys.readouterr().out
    got = torch.load(tmp_path / "y.pt")
    want, _ = _generate(load(out), x[:, :6], 4)
    assert _same(torch.cat(got, dim=1), want)
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mode prefill:" in text and "mode decode:" in text and "state kept in DRAM" in text
    assert cli.main(["run", str(out), "--inputs", calls[0], str(tmp_path / "p.pt")]) == 2
    assert "either the input files of one call or MODE=FILE items" in capsys.readouterr().err


def _cfg_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CFG.to_dict()))
    return path


def test_block_accumulation_model_equals_its_contract():
    """A decoder block compiled for a block-accumulation NPU (acc_block 32, E4M3): the
    functional simulator equals the contract, and the RTL the functional simulator, over
    prefill and decode."""
    cfg = NPUConfig(rows=4, cols=4, accumulation="block", acc_block=32, formats=("e4m3",))
    block = _fresh(LlamaKV, 19, d=64, heads=4, kv_heads=2, ffn=96, max_len=8)
    x = torch.randn(1, 8, 64)
    model = compile(block, _modes(x, 5), cfg, estimate=False)
    got, _ = _generate(model, x, 5)
    want, _ = _generate(model, x, 5, backend="reference")
    assert _same(got, want)
    rtl, _ = _generate(model, x, 5, backend="rtl", fast=True)
    assert _same(rtl, got)
