"""The lm_head + cross-entropy: the loss op's two paths against eager, Inductor and Liger,
forward + backward (one GPU).

    python bench/bench_loss.py [--rep MS] [--softcap C] [--json PATH]
    python bench/bench_loss.py --device cpu --small    # smoke test of this script
    SKIP_TESTS=1 OPS=bench_loss.py bash bench/run_gpu.sh ops    # on the GPU machine

Checks that the loss op's Triton rows kernel, its default path on CUDA since session 31
(``LORAFUSE_LOSS_IMPL``), stays faster than its PyTorch rows: the project uses a kernel
only where it is faster.

Shape (Llama-3.1-8B's head, batch 2 × 2048): hidden [4096, 4096] bf16 (needs a gradient),
lm_head W [128256, 4096] bf16 frozen, labels with 1 in 2048 ignored (the shifted label at
each sequence's end). Variants:
  eager     transformers' path: logits = hidden Wᵀ (bf16), F.cross_entropy(logits.float())
  inductor  torch.compile of the same function (default mode)
  lorafuse  lorafuse.kernels.loss.linear_cross_entropy, PyTorch rows
            (LORAFUSE_LOSS_IMPL=torch; the default until session 31)
  lorafuse_triton  the same op with LORAFUSE_LOSS_IMPL=triton (CUDA only; the default)
  liger     liger_kernel's LigerFusedLinearCrossEntropyLoss, when importable
Times (median ms): forward + backward called one after another (``do_bench``), and the
same replayed from a CUDA graph ("GPU ms", ``do_bench_cudagraph``: the kernels alone, as a
step under CUDA graphs runs them). "extra GiB": the peak memory of one forward + backward
above what was allocated before it (the full logits and their gradient, or one chunk's).
TFLOP/s: the two GEMMs (logits, dhidden: 4·N·H·V FLOPs) over the GPU ms. Each variant's
loss and dhidden error against an fp32 computation on the same inputs (relative) beside.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import call_ms, capture_failures, gpu_alone  # noqa: E402

SHAPES = {"8b": dict(N=4096, H=4096, V=128256), "small": dict(N=64, H=48, V=300)}
VARIANTS = ("eager", "inductor", "lorafuse", "lorafuse_triton", "liger")
PEAK_TFLOPS = 989.0  # H200 dense bf16


def log(msg: str) -> None:
    print(f"[bench_loss] {msg}", file=sys.stderr, flush=True)


def make_fns(softcap):
    def eager(h, w, labels):
        z = h @ w.t()
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        return F.cross_entropy(z.float(), labels)

    def ours(impl):
        def f(h, w, labels):
            from lorafuse.kernels.loss import IMPL_ENV, linear_cross_entropy

            with mock.patch.dict(os.environ, {IMPL_ENV: impl}):  # read at each call
                return linear_cross_entropy(h, w, labels, softcap)
        return f

    def liger(h, w, labels):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        if softcap is not None:
            return LigerFusedLinearCrossEntropyLoss(softcap=softcap)(w, h, labels)
        return LigerFusedLinearCrossEntropyLoss()(w, h, labels)

    return {"eager": eager, "inductor": torch.compile(eager), "lorafuse": ours("torch"),
            "lorafuse_triton": ours("triton"), "liger": liger}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def measure(fn, h, w, labels, ref, device, rep) -> dict:
    def step():
        fn(h, w, labels).backward()

    h.grad = None
    loss = fn(h, w, labels)  # compile / JIT / autotuning happen here
    loss.backward()
    res = {"loss_err": abs(loss.item() - ref["loss"]) / abs(ref["loss"]),
           "dh_err": rel(h.grad, ref["dh"])}
    del loss
    if device == "cuda":  # the peak of a second, warm call
        h.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        res["extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    res["call_ms"] = call_ms(step, device, rep, grad_to_none=[h])
    if device == "cuda":
        res.update(gpu_alone(step, rep, grad_to_none=[h]))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rep", type=int, default=100, help="timing repetition time, ms")
    p.add_argument("--softcap", type=float, default=None, help="Gemma2's final logit softcap")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_loss.py needs a CUDA GPU (or --device cpu --small for a smoke test): "
              f"torch.cuda.is_available() is False here (torch {torch.__version__}). "
              "Nothing was measured.", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # a shared machine: Inductor's CPU kernels spin otherwise
    else:
        log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch._dynamo.config.cache_size_limit = 64
    s = SHAPES["small" if args.small else "8b"]
    N, H, V = s["N"], s["H"], s["V"]
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, H, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * H ** -0.5).bfloat16()
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    labels[2047::2048] = -100

    from lorafuse.kernels.loss import linear_cross_entropy_reference

    h32 = h.detach().float().requires_grad_()
    ref_loss = linear_cross_entropy_reference(h32, w.float(), labels, args.softcap)[0]
    ref_loss.backward()
    ref = {"loss": ref_loss.item(), "dh": h32.grad}
    del h32, ref_loss

    rows = []
    for name, fn in make_fns(args.softcap).items():
        if name == "lorafuse_triton" and args.device != "cuda":
            continue  # on CPU the op takes its exact fp32 path: the Triton rows need CUDA
        try:
            res = measure(fn, h, w, labels, ref, args.device, args.rep)
        except Exception as e:
            log(f"{name}: {type(e).__name__}: {e}")
            res = {"error": f"{type(e).__name__}: {e}".replace("\n", " ")[:200]}
        if "gpu_ms" in res:
            res["tflops"] = 4 * N * H * V / (res["gpu_ms"] * 1e-3) / 1e12
        row = dict(shape=f"{N}x{H}, V {V}" + (f", softcap {args.softcap}" if args.softcap
                                             else ""), variant=name, **res)
        rows.append(row)
        log(json.dumps(row))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    print(capture_failures(rows))
    print(verdict(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def table(rows) -> str:
    head = ("| shape | variant | fwd+bwd ms (calls) | GPU ms | vs inductor (GPU) | TFLOP/s "
            f"(of {PEAK_TFLOPS:.0f}) | extra GiB | loss err | dh err |")
    lines = [head, "|" + "---|" * 9]
    ind = next((r for r in rows if r["variant"] == "inductor" and "gpu_ms" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | failed: {r['error'][:80]} "
                         "| | | | | | |")
            continue
        gpu = f"{r['gpu_ms']:.3f}" if "gpu_ms" in r else "—"
        speed = f"{ind['gpu_ms'] / r['gpu_ms']:.2f}x" if ind and "gpu_ms" in r else ""
        tf = f"{r['tflops']:.0f} ({r['tflops'] / PEAK_TFLOPS:.0%})" if "tflops" in r else "—"
        extra = f"{r['extra_gib']:.2f}" if "extra_gib" in r else "—"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['call_ms']:.3f} | {gpu} | {speed} | "
                     f"{tf} | {extra} | {r['loss_err']:.1e} | {r['dh_err']:.1e} |")
    return "\n".join(lines)


def verdict(rows) -> str:
    """Whether the Triton rows beat the PyTorch rows (GPU alone, else calls)."""
    t = {r["variant"]: r for r in rows if "error" not in r}
    a, b = t.get("lorafuse_triton"), t.get("lorafuse")
    if not a or not b:
        return "lorafuse_triton or lorafuse not measured: no verdict on LORAFUSE_LOSS_IMPL."
    key = "gpu_ms" if "gpu_ms" in a and "gpu_ms" in b else "call_ms"
    if a[key] < b[key]:
        return (f"Triton rows {a[key]:.3f} ms against PyTorch rows {b[key]:.3f} ({key}): "
                "the Triton rows stay the loss op's default on CUDA (LORAFUSE_LOSS_IMPL).")
    return (f"Triton rows {a[key]:.3f} ms, PyTorch rows {b[key]:.3f} ({key}): the Triton rows "
            "lost here; check the whole step (bench_train.py, lorafuse:fp8leantk against "
            "lorafuse:fp8lean) before keeping them the default on CUDA.")


if __name__ == "__main__":
    sys.exit(main())
