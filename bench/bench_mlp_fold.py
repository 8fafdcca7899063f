"""The down projection's LoRA dA with and without the MLP fold (kernels/lora_gated.py).

    python bench/bench_mlp_fold.py [--json PATH]
    python bench/bench_mlp_fold.py --device cpu --small    # smoke test of this script

Shape (bf16, Llama-3.1-8B, batch 2 × 2048 = 4096 tokens): gate and up (4096, 14336),
g = dy B (4096, 16), dA (16, 14336). Variants:
  stored     the unfolded backward: ``s · gᵀ p`` on the kept product p (one cuBLAS GEMM;
             its read of p is what keeping p buys)
  fold ...   the fold's Triton kernel, p formed from gate and up in registers, for a few
             (BLOCK_T, BLOCK_I, num_warps, num_stages) configurations; the
             first is the kernel's CONFIG
Time: lorafuse's heated CUDA-event median (kernels/_dispatch.time_ms, as the backend's own
choices are timed); bandwidth: the bytes each must read (stored: p; fold: gate and up)
over the time, against the H200's 4182 GB/s. Error: relative norm against fp64 on the
same rounded p. A markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_GBPS = 4182.0
SHAPES = {"8b": (4096, 14336, 16), "small": (40, 72, 4)}
# (BLOCK_T, BLOCK_I, num_warps, num_stages); None: the kernel's CONFIG
CONFIGS = [None, (128, 64, 4, 3), (64, 64, 4, 5), (64, 128, 4, 3), (32, 64, 4, 3),
           (64, 32, 4, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    from lorafuse.kernels import lora_gated
    from lorafuse.kernels._dispatch import time_ms
    from lorafuse.kernels.lora import _scaled_mm

    T, I, R = SHAPES["small" if args.small else "8b"]
    dev, dt, s = args.device, torch.bfloat16, 2.0
    gen = torch.Generator(dev).manual_seed(0)
    gate, up = (torch.randn(T, I, device=dev, generator=gen).to(dt) for _ in range(2))
    g = (torch.randn(T, R, device=dev, generator=gen) * 0.1).to(dt)
    p = (F.silu(gate.float()) * up.float()).to(dt)
    truth = (g.double().t() @ p.double()) * s
    cuda = dev == "cuda"
    timer = time_ms if cuda else (lambda fn, a=(): 0.0)

    rows = []

    def add(name, fn, read_bytes):
        out = fn()
        err = ((out.double() - truth).norm() / truth.norm()).item()
        ms = timer(fn)
        gbps = read_bytes / (ms * 1e-3) / 1e9 if ms else 0.0
        rows.append(dict(variant=name, ms=ms, gbps=gbps, frac=gbps / PEAK_GBPS, err=err))
        print(f"[bench_mlp_fold] {name}: {ms:.4f} ms, {gbps:.0f} GB/s, err {err:.2e}",
              file=sys.stderr, flush=True)

    add("stored", lambda: _scaled_mm(g.t(), p, s), p.numel() * 2)
    for cfg in CONFIGS:
        name = f"fold {cfg or lora_gated.CONFIG}" + (" (CONFIG)" if cfg is None else "")
        fn = (lambda c=cfg: lora_gated.gated_da_triton(g, gate, up, "silu", s, dt, dt, c)) \
            if cuda else (lambda: lora_gated.gated_da(g, gate, up, "silu", s, dt, dt))
        try:
            add(name, fn, 2 * gate.numel() * 2)
        except Exception as e:  # a configuration the GPU cannot run: say so, go on
            print(f"[bench_mlp_fold] {name}: {type(e).__name__}: {e}", file=sys.stderr)
        if not cuda:
            break
    print(f"\n### MLP fold: the down LoRA's dA, T={T}, I={I}, r={R}, bf16, {dev}\n")
    print("| variant | ms | GB/s | of 4182 GB/s | rel. error vs fp64 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms']:.4f} | {r['gbps']:.0f} | {r['frac']:.2f} | "
              f"{r['err']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
