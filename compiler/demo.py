"""``fp8npu demo``: the showcase. A small Llama-style decoder block (RMSNorm, rotary
embeddings, grouped-query causal attention, SwiGLU MLP) is compiled to FP8 NPU programs, run
on the functional simulator and on the generated Verilog under Verilator, and the report
shows that both give the same bits, where the work ran, how busy the MAC array was, and how
close the FP8 result is to float32. (``fp8npu demo mac`` checks the MAC alone.)"""

import time

import torch
import torch.nn.functional as F
from fp8npu.hdl.config import NPUConfig

from .bench import _llama_block
from .model import compile
from .runtime import npu_totals, run

__all__ = ["run_block_demo"]


def run_block_demo(out_dir, seed=2026, echo=print, d_model=64, tokens=16):
    """Compile, run on both engines, print the report; returns 0 when the bits agree."""
    torch.manual_seed(seed)
    block = _llama_block(d_model, 4, 2, 2 * d_model, tokens)
    x = torch.randn(1, tokens, d_model)
    cfg = NPUConfig()
    t0 = time.perf_counter()
    model = compile(block, (x,), cfg)
    t_compile = time.perf_counter() - t0
    path = out_dir / "block.npu"
    model.save(path)
    npu, host, share = npu_totals(model)
    echo(f"compiled a decoder block (d_model {d_model}, {tokens} tokens, 4 heads / 2 KV heads, SwiGLU) for the "
         f"{cfg.rows}x{cfg.cols} NPU in {t_compile:.1f} s: {len(model.segments)} NPU launches "
         f"(7 projections, QK^T and PV), {len(model.host_ops)} host ops; {share:.1%} of the FLOPs on the NPU; "
         f"wrote {path}")
    echo(f"  quantization: {model.quant.describe()}")

    t0 = time.perf_counter()
    y_func, s_func = run(model, x, details=True)
    t_func = time.perf_counter() - t0
    echo(f"functional simulator: {t_func:.1f} s")
    echo("RTL: the NPU's Verilog under Verilator + cocotb (the first run builds the 8x8 model, "
         "about two minutes; later runs reuse it)")
    t0 = time.perf_counter()
    y_rtl, s_rtl = run(model, x, backend="rtl", details=True, fast=True)
    t_rtl = time.perf_counter() - t0
    same = torch.equal(y_func.view(torch.int32), y_rtl.view(torch.int32))
    differ = int((y_func.view(torch.int32) != y_rtl.view(torch.int32)).sum())
    echo(f"  RTL run {t_rtl:.1f} s")
    echo("")
    echo(f"{'NPU launch':<14} {'GEMM (MxKxN)':>16} {'RTL cycles':>11} {'MAC util':>9} {'funcsim est.':>13}")
    for seg, r, f in zip(model.segments.values(), s_rtl.launches, s_func.launches):
        m, k, n = seg.shape
        gemm = f"{seg.batch}x " if seg.batch > 1 else ""
        echo(f"{seg.node:<14} {gemm + f'{m}x{k}x{n}':>16} {r['cycles']:>11,} {r['utilization']:>9.1%} "
             f"{f['cycles']:>13,}")
    cycles = sum(r["cycles"] for r in s_rtl.launches)
    macs = sum(r["mac_ops"] for r in s_rtl.launches)
    util = macs / max(1, cycles * cfg.rows * cfg.cols)
    want = block(x)
    cos = F.cosine_similarity(y_rtl.flatten(), want.flatten(), dim=0).item()
    rel = ((y_rtl - want).norm() / want.norm()).item()
    echo("")
    echo(f"NPU: {cycles:,} cycles, MAC utilization {util:.1%} over the NPU launches; "
         f"{npu:,} of {npu + host:,} FLOPs ({share:.1%}) on the NPU")
    echo(f"accuracy against the float32 block: cosine {cos:.6f}, relative error {rel:.2e}")
    echo(f"{'PASS' if same else 'FAIL'}: RTL and functional simulator outputs "
         f"{'identical bit for bit' if same else f'differ in {differ} values'} "
         f"({y_rtl.numel():,} FP32 values)")
    return 0 if same else 1
