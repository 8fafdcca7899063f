"""The fused LoRA linear op alone, at the Llama-3.1-8B projection shapes (one H200, bf16).

    python bench/bench_lora_op.py [--json PATH] [--rep MS] [--no-inductor] [--time-budget S]

M = 4096 tokens, r = 16, no bias, base weight frozen, x needs a gradient (a mid-layer
site). Sites of one shape (q/o, k/v, gate/up) are measured once. Per site: forward, and forward + backward, median times from
triton.testing.do_bench, for

  eager     PEFT's formula: F.linear(x, W) + F.linear(F.linear(x, A), B) * s (3 GEMMs,
            a mul and an add; autograd backward)
  inductor  torch.compile of that function (default mode, dynamic shapes: one compile)
  cublas    lorafuse's op, cuBLAS path      (LORAFUSE_LORA_IMPL=cublas)
  triton    lorafuse's op, Triton path      (LORAFUSE_LORA_IMPL=triton)

TFLOP/s count the GEMM work (forward 2MK(N+r) + 2MrN; backward 2MNK + 4MrK + 4MrN: dx, dA,
dB) against the 763.5 TFLOP/s measured dense bf16 ceiling of the H200. Each variant's
relative error against an fp32 computation (y and dx) is reported beside it. The table is
printed last; run_gpu.sh gives this script 90 s, so --time-budget skips (and says so)
what would not fit: Inductor, whose compile is the slowest step, is measured last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_TFLOPS = 763.5  # measured dense bf16 GEMM ceiling of the H200 (ANCHORS.md)
SITES = [  # name, N (out features), K (in features): Llama-3.1-8B
    ("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
    ("gate", 14336, 4096), ("up", 14336, 4096), ("down", 4096, 14336),
]
VARIANTS = ["eager", "inductor", "cublas", "triton"]
DEVICE = "cuda"  # a seam for dry runs of this script's logic elsewhere


def log(msg: str) -> None:
    print(f"[bench_lora_op] {msg}", file=sys.stderr, flush=True)


def peft_eager(x, w, a, b, s: float):
    return F.linear(x, w) + F.linear(F.linear(x, a), b) * s


def flops(M, N, K, r):
    fwd = 2 * M * K * (N + r) + 2 * M * r * N
    bwd = 2 * M * N * K + 4 * M * r * K + 4 * M * r * N
    return fwd, fwd + bwd


def rel_err(t, ref):
    return ((t.float() - ref).norm() / ref.norm()).item()


def measure(name, fn, inputs, dy, rep, ref):
    """Forward and forward+backward medians (ms), and the errors of y and dx vs fp32."""
    import triton.testing

    x, w, a, b, s = inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fn(x, w, a, b, s)  # first call: compile / autotune happen here
        y.backward(dy)
    fallback = [str(c.message) for c in caught if "using cuBLAS" in str(c.message)]
    if fallback:  # the op fell back: timing it would label cuBLAS as Triton
        raise RuntimeError(fallback[0])
    errs = {"y_err": rel_err(y, ref["y"]), "dx_err": rel_err(x.grad, ref["dx"])}

    def step():
        fn(x, w, a, b, s).backward(dy)

    fwd = triton.testing.do_bench(lambda: fn(x, w, a, b, s), warmup=max(1, rep // 4), rep=rep,
                                  return_mode="median")
    both = triton.testing.do_bench(step, warmup=max(1, rep // 4), rep=rep,
                                   grad_to_none=[x, a, b], return_mode="median")
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, **errs}


def fp32_reference(inputs, dy):
    x, w, a, b, s = (t.detach().float() if torch.is_tensor(t) else t for t in inputs)
    x.requires_grad_(True)
    y = peft_eager(x, w, a, b, s)
    y.backward(dy.float())
    return {"y": y.detach(), "dx": x.grad}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--rep", type=int, default=40, help="do_bench repetition time, ms")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sites", default=",".join(s for s, _, _ in SITES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-inductor", action="store_true")
    p.add_argument("--time-budget", type=float, default=80.0,
                   help="seconds; what would start later is skipped (0: no limit)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_lora_op.py needs a CUDA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Nothing was measured.", file=sys.stderr)
        return 2
    try:
        import triton
        import triton.testing  # noqa: F401
    except ImportError as e:
        print(f"bench_lora_op.py needs triton ({e}). Nothing was measured.", file=sys.stderr)
        return 2

    from lorafuse.kernels import lora

    t0 = time.time()
    M, r, scale = args.tokens, args.rank, 1.0
    variants = [v for v in args.variants.split(",") if v and not (args.no_inductor and v == "inductor")]
    # Inductor last: its compile is the slowest step, the first to go when time is short.
    variants.sort(key=lambda v: v == "inductor")
    sites = [s for s in SITES if s[0] in args.sites.split(",")]
    compiled = torch.compile(peft_eager, dynamic=True) if "inductor" in variants else None

    def op_fn(x, w, a, b, s):
        return lora.lora_linear(x, w, None, a, b, s)

    fns = {"eager": peft_eager, "inductor": compiled, "cublas": op_fn, "triton": op_fn}
    dev = torch.device(DEVICE)
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")

    shapes = list(dict.fromkeys((n, k) for _, n, k in sites))  # q/o, k/v, gate/up share one
    data = {}
    for N, K in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        bf = dict(device=dev, dtype=torch.bfloat16)
        x = torch.randn(M, K, generator=g, **bf).requires_grad_(True)
        w = torch.randn(N, K, generator=g, **bf) * K ** -0.5
        a = (torch.randn(r, K, generator=g, **bf) * K ** -0.5).requires_grad_(True)
        b = (torch.randn(N, r, generator=g, **bf) * 0.1).requires_grad_(True)
        dy = torch.randn(M, N, generator=g, **bf)
        inputs = (x, w, a, b, scale)
        data[(N, K)] = (inputs, dy, fp32_reference(inputs, dy))

    measured = {}  # (N, K, variant) -> result
    for v in variants:
        for N, K in shapes:
            left = args.time_budget - (time.time() - t0)
            # Inductor's first call compiles (tens of seconds): start it only with room left.
            if args.time_budget and left < (30 if v == "inductor" and fns[v] is compiled else 3):
                measured[(N, K, v)] = {"skipped": f"time budget {args.time_budget:.0f}s"}
                log(f"N={N} K={K} {v}: skipped, {left:.0f}s left")
                continue
            if v in ("cublas", "triton"):
                os.environ[lora.IMPL_ENV] = v  # the op reads it at every call
            inputs, dy, ref = data[(N, K)]
            try:
                res = measure(v, fns[v], inputs, dy, args.rep, ref)
            except Exception as e:  # one failing variant costs one cell, not the run
                msg = (str(e).strip().splitlines() or [""])[0]
                res = {"error": f"{type(e).__name__}: {msg}"[:200]}
            for t in inputs[:4]:
                t.grad = None
            measured[(N, K, v)] = res
            log(f"N={N} K={K} {v}: {res} (+{time.time() - t0:.0f}s)")

    rows = []
    for site, N, K in sites:
        f_fwd, f_both = flops(M, N, K, r)
        for v in variants:
            res = dict(measured[(N, K, v)])
            if "fwd_ms" in res:
                res["fwd_tflops"] = f_fwd / res["fwd_ms"] / 1e9
                res["fwd_bwd_tflops"] = f_both / res["fwd_bwd_ms"] / 1e9
            rows.append({"site": site, "N": N, "K": K, "variant": v, **res})

    table = markdown(rows, sites, variants, M, r)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "tokens": M, "rank": r, "dtype": "bfloat16",
            "peak_tflops": PEAK_TFLOPS, "elapsed_s": time.time() - t0, "results": rows,
            "triton_configs": triton_configs(),
        }, indent=1))
    print(table)
    return 0


def triton_configs():
    """The autotuner's pick per key, for the record (empty if the kernel never ran)."""
    try:
        from lorafuse.kernels import lora_triton
    except ImportError:
        return {}
    return {str(k): str(c) for k, c in getattr(lora_triton._autotuned, "cache", {}).items()}


def markdown(rows, sites, variants, M, r):
    by = {(row["site"], row["variant"]): row for row in rows}

    def cell(site, v, field):
        row = by[(site, v)]
        if field in row:
            return f"{row[field]:.3f}"
        return "skip" if "skipped" in row else "err"

    head = ["site", "N×K"] + [f"{v} fwd" for v in variants] + [f"{v} f+b" for v in variants]
    head += ["best ours f+b TFLOP/s", "% of peak"]
    lines = [f"### LoRA linear op, {M} tokens, r={r}, bf16 — median ms (triton.testing.do_bench)",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    total = {(v, f): 0.0 for v in variants for f in ("fwd_ms", "fwd_bwd_ms")}
    total_flops = 0.0
    for site, N, K in sites:
        ours = [by[(site, v)] for v in ("cublas", "triton") if v in variants]
        ours = [row for row in ours if "fwd_bwd_ms" in row]
        best = max(ours, key=lambda row: row["fwd_bwd_tflops"]) if ours else None
        cells = [site, f"{N}×{K}"]
        cells += [cell(site, v, "fwd_ms") for v in variants]
        cells += [cell(site, v, "fwd_bwd_ms") for v in variants]
        cells += [f"{best['fwd_bwd_tflops']:.0f} ({best['variant']})" if best else "-",
                  f"{100 * best['fwd_bwd_tflops'] / PEAK_TFLOPS:.0f}%" if best else "-"]
        lines.append("| " + " | ".join(cells) + " |")
        total_flops += flops(M, N, K, r)[1]
        for v in variants:
            for f in ("fwd_ms", "fwd_bwd_ms"):
                total[(v, f)] += by[(site, v)].get(f, float("nan"))
    cells = ["layer (sum)", ""] + [f"{total[(v, 'fwd_ms')]:.3f}" for v in variants]
    cells += [f"{total[(v, 'fwd_bwd_ms')]:.3f}" for v in variants]
    best_ms = min((total[(v, "fwd_bwd_ms")] for v in ("cublas", "triton") if v in variants
                   and total[(v, "fwd_bwd_ms")] == total[(v, "fwd_bwd_ms")]), default=float("nan"))
    tf = total_flops / best_ms / 1e9 if best_ms == best_ms else float("nan")
    cells += [f"{tf:.0f}", f"{100 * tf / PEAK_TFLOPS:.0f}%"]
    lines.append("| " + " | ".join(cells) + " |")
    errs = []
    for v in variants:
        ys = [by[(s, v)]["y_err"] for s, _, _ in sites if "y_err" in by[(s, v)]]
        dxs = [by[(s, v)]["dx_err"] for s, _, _ in sites if "dx_err" in by[(s, v)]]
        if ys:
            errs.append(f"{v} y {max(ys):.2e} dx {max(dxs):.2e}")
    lines += ["", "Max relative error vs fp32 over the sites: " + "; ".join(errs) + ".",
              f"Ceiling {PEAK_TFLOPS} TFLOP/s; 'best ours' is the faster of cublas/triton "
              "(what the op's auto dispatch would pick)."]
    failed = dict.fromkeys(f"{row['variant']}: {row['error']}" for row in rows if "error" in row)
    if failed:
        lines.append("Errors: " + "; ".join(list(failed)[:3]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
