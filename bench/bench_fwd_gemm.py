"""The LoRA forward GEMM alone, y = x Wᵀ + s · h Bᵀ, at the Llama-3.1-8B shapes (H200, bf16).

    python bench/bench_fwd_gemm.py [--m 4096] [--rep 100]

Kernels, median ms from triton.testing.do_bench (autotuning happens in a warm-up call):

  cublas_mm    x Wᵀ alone (no LoRA term): the floor a fused forward would like to reach
  cublas_b1    x Wᵀ then addmm of h Bᵀ with beta = 1: two GEMMs, and rounds twice
  pointer      lorafuse's pointer-based Triton tail GEMM (lora_triton.lowrank_tail_gemm)
  tma          lorafuse's TMA persistent Triton tail GEMM (lora_triton.tail_gemm_nt_tma)

The per-layer line sums the 7 projections (q, k, v, o, gate, up, down), times 32 layers is
the forward GEMM time of one 8B step. Also the max abs difference of each Triton kernel
against an fp32 computation rounded once (0 or one bf16 ulp expected).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafuse.kernels.lora_triton import lowrank_tail_gemm, tail_gemm_nt_tma  # noqa: E402

SITES = [("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
         ("gate", 14336, 4096), ("up", 14336, 4096), ("down", 4096, 14336)]
PEAK_TFLOPS = 763.5


def main() -> None:
    import triton

    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rep", type=int, default=100)
    args = p.parse_args()
    torch.manual_seed(0)
    M, r, s = args.m, args.r, 2.0
    kernels = {
        "cublas_mm": lambda x, w, h, b: x @ w.t(),
        "cublas_b1": lambda x, w, h, b: torch.addmm(x @ w.t(), h, b.t(), alpha=s),
        "pointer": lambda x, w, h, b: lowrank_tail_gemm(x, w.t(), h, b.t(), None, alpha2=s),
        "tma": lambda x, w, h, b: tail_gemm_nt_tma(x, w, h, b, None, alpha2=s),
    }
    rows, per_layer = [], dict.fromkeys(kernels, 0.0)
    seen = {}
    for name, N, K in SITES:
        key = (N, K)
        if key not in seen:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            h = torch.randn(M, r, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 1e-3
            ref = (x.float() @ w.float().t() + s * (h.float() @ b.float().t())).to(torch.bfloat16)
            times, errs = {}, {}
            for kname, fn in kernels.items():
                try:
                    out = fn(x, w, h, b)
                    torch.cuda.synchronize()
                    times[kname] = triton.testing.do_bench(lambda: fn(x, w, h, b), rep=args.rep)
                    errs[kname] = (out.float() - ref.float()).abs().max().item()
                except Exception as e:  # report, keep going
                    print(f"{kname} at N={N} K={K} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    times[kname], errs[kname] = float("nan"), float("nan")
            seen[key] = (times, errs)
        times, errs = seen[key]
        for k in kernels:
            per_layer[k] += times[k]
        flop = 2 * M * N * (K + r)
        rows.append((name, N, K, times, errs, flop))
    print(f"\n### forward GEMM, M = {M}, r = {r}, bf16, median ms (TFLOP/s)\n")
    print("| site | N | K | " + " | ".join(kernels) + " | max err pointer / tma |")
    print("|---|---|---|" + "---|" * len(kernels) + "---|")
    for name, N, K, times, errs, flop in rows:
        cells = [f"{times[k]:.3f} ({flop / times[k] / 1e9:.0f})" for k in kernels]
        print(f"| {name} | {N} | {K} | " + " | ".join(cells)
              + f" | {errs['pointer']:.3g} / {errs['tma']:.3g} |")
    print("| **layer** | | | " + " | ".join(f"**{per_layer[k]:.3f}**" for k in kernels) + " | |")
    print(f"\n32 layers: " + ", ".join(f"{k} {32 * per_layer[k]:.1f} ms" for k in kernels))
    from lorafuse.kernels import lora_triton as lt

    for key, cfg in lt._tma_autotuned.cache.items():  # what the autotuner chose per shape
        print(f"- tma config for (M bucket, N, K1, K2, ...) {key[:4]}: {cfg}")


if __name__ == "__main__":
    main()
