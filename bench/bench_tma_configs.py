"""One-off sweep of the TMA forward kernel's tile configurations (no autotuner), so a config
that fails to compile (warp specialisation on Hopper, shared memory) costs one row, not the
run. Prints a table per shape: ms and TFLOP/s per config, cuBLAS's x Wᵀ alone beside it.

    python bench/bench_tma_configs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorafuse.kernels import lora_triton as lt  # noqa: E402

SHAPES = [(4096, 4096, 4096), (4096, 1024, 4096), (4096, 14336, 4096), (4096, 4096, 14336),
          (4096, 6144, 4096)]  # M, N, K; the last: q/k/v as one output
CONFIGS = [  # BM, BN, BK, warps, stages, flatten, warp_specialize, persistent
    (bm, bn, bk, w, st, fl, ws, pe)
    for (bm, bn, bk, w, st) in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4),
                                (128, 128, 64, 4, 4), (128, 256, 128, 8, 2), (64, 256, 64, 4, 4)]
    for (fl, ws, pe) in [(True, False, True), (False, False, True), (False, True, True),
                         (False, False, False)]
]


def main() -> None:
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    r, s = 16, 2.0
    for M, N, K in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        h = torch.randn(M, r, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, r, device="cuda", dtype=torch.bfloat16) * 1e-3
        ref = (x.float() @ w.float().t() + s * (h.float() @ b.float().t())).to(torch.bfloat16)
        t_cublas = triton.testing.do_bench(lambda: x @ w.t(), rep=50)
        flop = 2 * M * N * (K + r)
        print(f"\n### M={M} N={N} K={K}: cuBLAS x Wᵀ {t_cublas:.3f} ms ({flop / t_cublas / 1e9:.0f} TFLOP/s)\n")
        print("| BM | BN | BK | warps | stages | flatten | ws | persistent | ms | TFLOP/s | vs cuBLAS | err |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for bm, bn, bk, wp, st, fl, ws, pe in CONFIGS:
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            descs = [TensorDescriptor.from_tensor(t, blk) for t, blk in
                     ((x, [bm, bk]), (w, [bn, bk]), (h, [bm, 16]), (b, [bn, 16]), (out, [bm, bn]))]
            tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
            grid = (min(sms, tiles) if pe else tiles,)

            def call():
                lt._tail_gemm_nt_tma_kernel[grid](
                    *descs, out, M, N, K, r, 4096, s, HAS_BIAS=False, INTERPRET_BF16=False,
                    BLOCK_K2=16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=fl,
                    WARP_SPECIALIZE=ws, num_warps=wp, num_stages=st)
            try:
                call()
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                t = triton.testing.do_bench(call, rep=50)
                cells = f"{t:.3f} | {flop / t / 1e9:.0f} | {t_cublas / t:.2f} | {err:.3g}"
            except Exception as e:
                cells = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''} | | |"
            print(f"| {bm} | {bn} | {bk} | {wp} | {st} | {fl} | {ws} | {pe} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
