"""The 4-bit (NF4, double-quantised, blocksize 64) linear at the Llama-3.1-8B shapes, per M:
which path is fastest for the forward y = x Wᵀ and the backward dx = dy W (H200, bf16).

    python bench/bench_nf4_gemm.py [--ms 1,16,128,1024,4096] [--rep 50]

Paths, median ms from triton.testing.do_bench:

  bf16_mm      x Wᵀ with W already in bf16: the floor (no decoding at all)
  bnb          bitsandbytes.matmul_4bit (its own choice: gemv_4bit for one row, else
               dequantize + cuBLAS); forward only
  dequant_mm   lorafuse's device path: dequantize (bitsandbytes' kernel) + one cuBLAS GEMM
  triton       lorafuse's Triton kernel (lorafuse.kernels.nf4.triton_nf4_gemm): W decoded
               inside its tiles, never written to memory

Also the max abs difference of the Triton output against the dequant_mm output (both
accumulate in fp32 from the same bf16 W values: a few bf16 ulps at most).

Then the dequantization alone at each site (`--dequant-only`: only that): lorafuse's Triton
kernel (`triton_dequantize_4bit`) against bitsandbytes' (`dequantize_4bit` with its nested
scales decoded by `dequantize_blockwise`, as the device path calls it), median ms and the
bandwidth it reaches (half a byte read and two bytes written per weight), and whether the
two outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafuse.kernels import nf4  # noqa: E402

SITES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096),
         ("down", 4096, 14336)]
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}


def main() -> None:
    import triton

    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,16,128,1024,4096")
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--dequant-only", action="store_true", help="only the dequantization table")
    args = p.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    torch.manual_seed(0)
    bench = lambda fn: triton.testing.do_bench(fn, rep=args.rep)  # noqa: E731
    if not args.dequant_only:
        gemm_table(ms, bench)
    dequant_table(bench)


def quantized_site(N: int, K: int):
    """A random (N, K) bf16 weight quantized as QLoRA does (NF4, double quant, blocksize
    64): (packed weight, bitsandbytes' quant state, lorafuse's view of that state)."""
    import bitsandbytes.functional as F

    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
    q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return q, qs, nf4.from_quant_state(qs)


def dequant_table(bench) -> None:
    print("\n### 4-bit dequantization (NF4, double quant, blocksize 64) to bf16, median ms\n")
    print("| site | N | K | triton ms | triton TB/s | bitsandbytes ms | bitsandbytes TB/s "
          "| identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name, N, K in SITES:
        q, qs, kw = quantized_site(N, K)  # imports bitsandbytes: its torch.ops exist
        state = (kw["absmax"], kw.get("absmax2"), kw.get("code2"), kw.get("offset"))
        op = torch.ops.bitsandbytes.dequantize_4bit.default
        fns = {
            "triton": lambda: nf4.triton_dequantize_4bit(q, *state, [N, K], 64, "nf4",
                                                         torch.bfloat16),
            "bitsandbytes": lambda: op(q.reshape(-1, 1), nf4._block_scales_fast(*state), 64,
                                       "nf4", [N, K], torch.bfloat16),
        }
        outs = {k: fn() for k, fn in fns.items()}
        t = {k: bench(fn) for k, fn in fns.items()}
        gb = N * K * 2.5 / 1e9  # 0.5 byte read + 2 bytes written per weight (scales: ~1 %)
        same = torch.equal(outs["triton"], outs["bitsandbytes"])
        print(f"| {name} | {N} | {K} | {t['triton']:.3f} | {gb / t['triton']:.2f} | "
              f"{t['bitsandbytes']:.3f} | {gb / t['bitsandbytes']:.2f} | {same} |", flush=True)


def gemm_table(ms, bench) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    rows = []
    layer = {}
    for name, N, K in SITES:
        q, qs, kw = quantized_site(N, K)
        w_deq = F.dequantize_4bit(q, qs).to(torch.bfloat16)  # the bf16 W every path uses
        scales = nf4.block_scales(kw["absmax"], kw.get("absmax2"), kw.get("code2"),
                                  kw.get("offset"))
        args_dq = (q, kw["absmax"], kw.get("absmax2"), kw.get("code2"), kw.get("offset"),
                   [N, K], 64, "nf4")
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            fwd = {
                "bf16_mm": lambda: x @ w_deq.t(),
                "bnb": lambda: bnb.matmul_4bit(x, q.t(), quant_state=qs),
                "dequant_mm": lambda: x @ nf4._dequantize_fast(*args_dq, torch.bfloat16).t(),
                "triton": lambda: nf4.triton_nf4_gemm(x, q, scales, [N, K], 64, "nf4"),
            }
            bwd = {
                "bf16_mm": lambda: dy @ w_deq,
                "dequant_mm": lambda: dy @ nf4._dequantize_fast(*args_dq, torch.bfloat16),
                "triton": lambda: nf4.triton_nf4_gemm(dy, q, scales, [N, K], 64, "nf4",
                                                      trans_w=True),
            }
            t, err = {}, {}
            for direction, fns in (("fwd", fwd), ("bwd", bwd)):
                ref = fns["dequant_mm"]().float()
                for k, fn in fns.items():
                    try:
                        out = fn()
                        torch.cuda.synchronize()
                        t[direction, k] = bench(fn)
                        if k == "triton":
                            err[direction] = (out.float() - ref).abs().max().item()
                    except Exception as e:  # report, keep going
                        print(f"{direction} {k} {name} M={M}: {type(e).__name__}: {e}",
                              file=sys.stderr)
                        t[direction, k] = float("nan")
            rows.append((name, N, K, M, t, err))
            for key, v in t.items():
                layer[M, key] = layer.get((M, key), 0.0) + PER_LAYER[name] * v
            print(f"{name} M={M}: " + ", ".join(f"{d} {k} {v:.3f}" for (d, k), v in t.items()),
                  file=sys.stderr, flush=True)
    cols = [("fwd", "bf16_mm"), ("fwd", "bnb"), ("fwd", "dequant_mm"), ("fwd", "triton"),
            ("bwd", "bf16_mm"), ("bwd", "dequant_mm"), ("bwd", "triton")]
    print("\n### 4-bit linear (NF4, double quant, blocksize 64), bf16, median ms\n")
    print("| site | N | K | M | " + " | ".join(f"{d} {k}" for d, k in cols)
          + " | triton err fwd / bwd |")
    print("|---|---|---|---|" + "---|" * len(cols) + "---|")
    for name, N, K, M, t, err in rows:
        print(f"| {name} | {N} | {K} | {M} | "
              + " | ".join(f"{t.get(c, float('nan')):.3f}" for c in cols)
              + f" | {err.get('fwd', float('nan')):.3g} / {err.get('bwd', float('nan')):.3g} |")
    for M in ms:
        print(f"| **layer** | | | {M} | "
              + " | ".join(f"**{layer.get((M, c), float('nan')):.3f}**" for c in cols) + " | |")
    for key, cfg in nf4._nf4_autotuned.cache.items():
        print(f"- triton config for {key[:4]}: {cfg}")


if __name__ == "__main__":
    main()
