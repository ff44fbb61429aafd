"""``fp8npu demo``: the showcase. A small decoder block — RMSNorm, grouped-query attention with
rotary embeddings and a KV cache, and a Mixture-of-Experts FFN (Mixtral style: 4 experts,
top-2) — is compiled to FP8 NPU programs for a prefill mode and a decode mode, then a prompt
is prefilled and a few tokens decoded, on the functional simulator and on the generated
Verilog under Verilator. The report shows that both give the same bits, where the work ran,
how busy the MAC array was, what each decode step sent to the NPU, and how close the FP8
result is to float32. (``fp8npu demo mac`` checks the MAC alone.)"""

import copy
import time

import torch
import torch.nn.functional as F
from fp8npu.hdl.config import NPUConfig

from .examples import decoder_block, modes
from .model import compile
from .runtime import Session, npu_totals

__all__ = ["run_block_demo"]


def _calls(model, x, prefill, backend, **options):
    """Prefill, then decode the remaining positions one by one: (outputs, [launches per call])."""
    session = Session(model, backend, **options)
    outs, per_call = [], []
    try:
        steps = [("prefill", x[:, :prefill], torch.arange(prefill))]
        steps += [("decode", x[:, t:t + 1], torch.tensor([t])) for t in range(prefill, x.shape[1])]
        for mode, xs, pos in steps:
            before = len(session.launches)
            outs.append(session.run((xs, pos), mode=mode))
            per_call.append((mode, session.launches[before:]))
    finally:
        session.close()
    return torch.cat(outs, dim=1), per_call


def run_block_demo(out_dir, seed=2026, echo=print, d_model=128, prefill=64, decode=4, experts=4):
    """Compile, run on both engines, print the report; returns 0 when the bits agree."""
    tokens = prefill + decode
    block = decoder_block(seed, d=d_model, heads=4, kv_heads=2, ffn=d_model, max_len=tokens, experts=experts)
    x = torch.randn(1, tokens, d_model)
    cfg = NPUConfig()
    t0 = time.perf_counter()
    model = compile(block, modes(x, prefill), cfg)
    t_compile = time.perf_counter() - t0
    path = out_dir / "block.npu"
    model.save(path)
    npu, host, share = npu_totals(model, "prefill")
    echo(f"compiled a decoder block (d_model {d_model}, 4 heads / 2 KV heads with rotary embeddings and a "
         f"{tokens}-position KV cache, MoE FFN: {experts} experts, top-2) for the {cfg.rows}x{cfg.cols} NPU in "
         f"{t_compile:.1f} s, in two modes: prefill ({len(model.graph('prefill').segments)} NPU segments + the "
         f"experts) and decode; {share:.1%} of the prefill's FLOPs on the NPU; wrote {path}")
    echo(f"  quantization: {model.quant.describe()}; KV cache kept in NPU DRAM between calls")

    t0 = time.perf_counter()
    y_func, calls_func = _calls(model, x, prefill, "func")
    t_func = time.perf_counter() - t0
    echo(f"functional simulator: prefill {prefill} tokens + decode {decode} tokens in {t_func:.1f} s")
    echo("RTL: the NPU's Verilog under Verilator + cocotb (the first run builds the 8x8 model, "
         "about two minutes; later runs reuse it)")
    t0 = time.perf_counter()
    y_rtl, calls_rtl = _calls(model, x, prefill, "rtl", fast=True)
    t_rtl = time.perf_counter() - t0
    echo(f"  RTL run {t_rtl:.1f} s")
    same = torch.equal(y_func.view(torch.int32), y_rtl.view(torch.int32))
    differ = int((y_func.view(torch.int32) != y_rtl.view(torch.int32)).sum())

    echo("")
    echo(f"{'call':<10} {'NPU launches':>12} {'RTL cycles':>11} {'MAC util':>9} {'host->NPU B':>12} "
         f"{'funcsim cycles':>15}")
    for i, ((mode, rtl), (_, func)) in enumerate(zip(calls_rtl, calls_func)):
        cycles = sum(r["cycles"] for r in rtl)
        macs = sum(r["mac_ops"] for r in rtl)
        sent = sum(r["host_to_npu_bytes"] for r in rtl)
        name = mode if mode == "prefill" else f"decode {i}"
        echo(f"{name:<10} {len(rtl):>12} {cycles:>11,} {macs / max(1, cycles * cfg.rows * cfg.cols):>9.1%} "
             f"{sent:>12,} {sum(r['cycles'] for r in func):>15,}")
    prefill_rtl = calls_rtl[0][1]
    echo("")
    echo("prefill launches:")
    echo(f"  {'NPU op':<22} {'GEMM (MxKxN)':>16} {'RTL cycles':>11} {'MAC util':>9}")
    graph = model.graph("prefill")
    for r in prefill_rtl:
        seg = graph.segments.get(r["segment"])
        gemm = ""
        if seg is not None:
            m, k, n = seg.shape
            gemm = (f"{seg.batch}x " if seg.batch > 1 else "") + f"{m}x{k}x{n}"
        echo(f"  {r['segment']:<22} {gemm:>16} {r['cycles']:>11,} {r['utilization']:>9.1%}")
    cycles = sum(r["cycles"] for _, rtl in calls_rtl for r in rtl)
    macs = sum(r["mac_ops"] for _, rtl in calls_rtl for r in rtl)
    util = macs / max(1, cycles * cfg.rows * cfg.cols)
    reference = copy.deepcopy(block)
    want = torch.cat([reference(x[:, :prefill], torch.arange(prefill))]
                     + [reference(x[:, t:t + 1], torch.tensor([t])) for t in range(prefill, tokens)], dim=1)
    cos = F.cosine_similarity(y_rtl.flatten(), want.flatten(), dim=0).item()
    rel = ((y_rtl - want).norm() / want.norm()).item()
    echo("")
    echo(f"NPU: {cycles:,} cycles over {sum(len(r) for _, r in calls_rtl)} launches, MAC utilization {util:.1%}; "
         f"prefill: {npu:,} of {npu + host:,} FLOPs ({share:.1%}) on the NPU")
    echo(f"accuracy against the float32 block (same prefill and decode steps): cosine {cos:.6f}, "
         f"relative error {rel:.2e}")
    echo(f"{'PASS' if same else 'FAIL'}: RTL and functional simulator outputs "
         f"{'identical bit for bit' if same else f'differ in {differ} values'} "
         f"({y_rtl.numel():,} FP32 values over prefill and {decode} decode steps)")
    return 0 if same else 1
