"""Probe: does each way of computing ``y = x Wᵀ + l`` in bf16 keep a small LoRA term l?

When |l| is below half a bf16 ulp of the base product, rounding the base product first
(eager PEFT) and then adding l rounds l away. A path that adds l in the fp32 accumulator
and rounds once keeps it on average. For each path this prints
``captured = <y - base, l> / <l, l>`` (base, l exact in fp64: 1 = l kept, 0 = l lost),
the relative error against fp64, and the median time (triton.testing.do_bench).
Run on the GPU machine: ``python bench/probe_rounding.py``.
"""

import sys

import torch


def main():
    if not torch.cuda.is_available():
        print("probe_rounding.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    from lorafuse.kernels.lora_triton import lowrank_tail_gemm

    bf = torch.bfloat16
    matmul = torch.backends.cuda.matmul
    rows = []
    for M, N, K in [(4096, 4096, 4096), (4096, 14336, 4096)]:
        g = torch.Generator("cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", generator=g).to(bf)
        W = (torch.randn(N, K, device="cuda", generator=g) * 0.02).to(bf)
        h = torch.randn(M, 16, device="cuda", generator=g).to(bf)
        B = (torch.randn(N, 16, device="cuda", generator=g) * 1e-4).to(bf)
        s = 1.0
        base64 = x.double() @ W.double().t()
        l64 = s * h.double() @ B.double().t()
        l = (s * h.float() @ B.float().t()).to(bf)

        def reduced(flag, fn):
            def run():
                old = matmul.allow_bf16_reduced_precision_reduction
                matmul.allow_bf16_reduced_precision_reduction = flag
                try:
                    return fn()
                finally:
                    matmul.allow_bf16_reduced_precision_reduction = old
            return run

        paths = {
            "eager: (x Wᵀ) + l": lambda: torch.nn.functional.linear(x, W) + l,
            "addmm_ beta=1 (l in C)": lambda: l.clone().addmm_(x, W.t()),
            "addmm_ beta=1, no reduced-precision reduction":
                reduced(False, lambda: l.clone().addmm_(x, W.t())),
            "mm out_dtype=fp32, + l, to bf16":
                lambda: (torch.mm(x, W.t(), out_dtype=torch.float32) + l).to(bf),
            "addmm out_dtype=fp32 (C = l fp32), to bf16":
                lambda: torch.addmm(l.float(), x, W.t(), out_dtype=torch.float32).to(bf),
            "triton tail GEMM": lambda: lowrank_tail_gemm(x, W.t(), h, B.t(), alpha2=s),
            "plain mm (no l), for time": lambda: x @ W.t(),
            "plain mm, no reduced-precision reduction": reduced(False, lambda: x @ W.t()),
        }
        for name, fn in paths.items():
            try:
                y = fn().double()
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # an API missing on this torch: say so, go on
                rows.append((f"{N}x{K}", name, f"error: {type(e).__name__}: {str(e)[:60]}", "", ""))
                continue
            captured = ((y - base64) * l64).sum() / (l64 * l64).sum()
            err = ((y - base64 - l64).norm() / (base64 + l64).norm()).item()
            rows.append((f"{N}x{K}", name, f"{captured.item():.3f}", f"{err:.2e}", f"{ms:.3f}"))
    print("| N×K (M=4096) | path | captured | rel err | ms |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
