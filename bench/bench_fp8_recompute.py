"""The ``fp8_recompute`` op against the bf16 op it replaces, at the 8B sites, piece by piece.

    python bench/bench_fp8_recompute.py [--rep MS]
    python bench/bench_fp8_recompute.py --device cpu --small    # smoke test of this script
    OPS=bench_fp8_recompute.py bash bench/run_gpu.sh ops        # on the GPU machine

Why: session 33's 8B step with ``fp8_recompute`` (ckfp8rr) ran 12 % slower than without it
(ckfp8r), where ≈ 0.8 ms less a gate/up group was predicted. This says whether the op
itself is slower, and which piece: quantising x, quantising each W, the e4m3 GEMMs, the
low-rank tail. Rows (M = 4096 tokens, r = 16, bf16):
  bf16 op      ``lora_linear_group`` / ``lora_linear`` (what the backward calls without
               the option; on CUDA the per-shape choice, tma or cuBLAS)
  fp8 op       ``lora_linear_group_fp8`` / ``lora_linear_fp8``
  quantise x, quantise W (each), scaled_mm (each), h + tails: the fp8 op's pieces.
Times: call ms (calls one after another, the host included where it is longer), GPU ms
(replayed from a CUDA graph: the kernels alone), host µs per call (50 queued calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import call_ms, gpu_alone  # noqa: E402
from bench.bench_fp8_dx import host_us  # noqa: E402
from lorafuse._torch import scaled_mm  # noqa: E402
from lorafuse.kernels import fp8_dx as fp8  # noqa: E402
from lorafuse.kernels import fp8_recompute  # noqa: E402,F401  (registers the ops)
from lorafuse.kernels import lora, lora_group  # noqa: E402,F401

SITES = {"gate_up": ((14336, 14336), 4096), "down": ((4096,), 14336),
         "qkv": ((4096, 1024, 1024), 4096)}
SMALL = {"gate_up": ((64, 64), 32), "down": ((32,), 64)}


def rows_for(name, ns, K, M, r, device, rep) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, torch.bfloat16)

    x = rand(M, K)
    ws = [rand(n, K, scale=K ** -0.5) for n in ns]
    as_ = [rand(r, K, scale=K ** -0.5) for _ in ns]
    bs = [rand(n, r, scale=0.1) for n in ns]
    ops = torch.ops.lorafuse
    if len(ns) > 1:
        bf16 = lambda: ops.lora_linear_group(x, ws, [None] * len(ns), as_, bs, [1.0] * len(ns))  # noqa: E731
        f8 = lambda: ops.lora_linear_group_fp8(x, ws, [None] * len(ns), as_, bs, [1.0] * len(ns))  # noqa: E731
    else:
        bf16 = lambda: ops.lora_linear(x, ws[0], None, as_[0], bs[0], 1.0, None)  # noqa: E731
        f8 = lambda: ops.lora_linear_fp8(x, ws[0], None, as_[0], bs[0], 1.0, None)  # noqa: E731
    xq, sx = fp8.quantize_dy([x])
    wqs = [fp8.quantize_dy([w]) for w in ws]
    acat = torch.cat(as_)
    h = x @ acat.t()
    ys = [torch.empty(M, n, device=device, dtype=torch.bfloat16) for n in ns]

    def tails():
        hh = x @ acat.t()
        for y, hi, b in zip(ys, torch.split(hh, [r] * len(ns), dim=-1), bs):
            y.addmm_(hi, b.t())

    pieces = [("bf16 op", bf16), ("fp8 op", f8), ("quantise x", lambda: fp8.quantize_dy([x]))]
    pieces += [(f"quantise W{i} ({n}×{K})", (lambda w=w: fp8.quantize_dy([w])))
               for i, (w, n) in enumerate(zip(ws, ns))]
    pieces += [(f"scaled_mm {i} ({M}×{n}×{K})",
                (lambda wq=wq, sw=sw: scaled_mm(xq, wq.t(), sx, sw.reshape(1, -1), torch.bfloat16)))
               for i, ((wq, sw), n) in enumerate(zip(wqs, ns))]
    pieces += [(f"bf16 mm {i} ({M}×{w.shape[0]}×{K})", (lambda w=w: x @ w.t())) for i, w in enumerate(ws)]
    pieces += [("h + tails", tails)]
    del h
    out = []
    for label, fn in pieces:
        row = {"site": name, "piece": label, "call_ms": call_ms(fn, device, rep),
               "host_us": host_us(fn, torch.device(device))}
        if device == "cuda":
            row.update(gpu_alone(fn, rep))
        out.append(row)
        print(f"[bench_fp8_recompute] {name} {label}: {row}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--rep", type=int, default=100, help="ms of timing per row")
    args = p.parse_args(argv)
    sites, M = (SMALL, 32) if args.small else (SITES, 4096)
    rows = []
    for name, (ns, K) in sites.items():
        rows += rows_for(name, ns, K, M, 16, args.device, args.rep)
    print("\n| site | piece | call ms | GPU ms | host µs |\n|---|---|---|---|---|")
    for r in rows:
        gpu = f"{r['gpu_ms']:.3f}" if "gpu_ms" in r else "—"
        print(f"| {r['site']} | {r['piece']} | {r['call_ms']:.3f} | {gpu} | {r['host_us']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
