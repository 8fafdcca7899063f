"""The fused RMSNorm and LayerNorm ops against eager, Inductor and Liger, forward and
forward + backward (one GPU).

    python bench/bench_norm.py [--rep MS] [--norms llama,gemma,layernorm] [--train-weight]
                               [--json PATH]
    SKIP_TESTS=1 OPS=bench_norm.py bash bench/run_gpu.sh ops    # on the GPU machine

Decides whether the norm pass should be a default pass: the project uses a kernel only
where it beats Inductor (lorafuse/passes/__init__.py: DEFAULT_PASSES).

Shapes (bf16 input, rows × hidden): the Llama-3.1-8B hidden norm (4096 tokens × 4096)
and a per-head q/k norm (4096 tokens × 32 heads × 128, Qwen3-8B). Weight either fp32
(output fp32, by type promotion) or bf16 (as HF loads a bf16 model). The input needs a
gradient; the weight is frozen (LoRA) unless --train-weight. Norms: llama (LlamaRMSNorm:
cast to the input's dtype before the weight), gemma (Gemma's ``1 + w`` in fp32), layernorm:
``F.layer_norm`` with a weight and a bias (GPT-2's form) at the hidden shape, bf16
weight and bias (F.layer_norm wants the input's dtype).

Two settings per shape:
  norm      y = norm(x)
  add+norm  r = a + b; y = norm(r); both r and y are used later (the residual stream):
            what a decoder layer does. Inductor fuses the add into its norm kernel; with
            lorafuse the add stays an Inductor kernel and the op is an extern call, so
            the 'lorafuse' variant here is torch.compile of exactly that (what the
            backend produces).
Variants:
  eager     transformers' formula in PyTorch ops (autograd backward)
  inductor  torch.compile of the same function (default mode)
  lorafuse  the op, Triton path (LORAFUSE_NORM_IMPL=triton), inside torch.compile for
            add+norm
  liger     liger_kernel's LigerRMSNormFunction (casting mode "llama" or "gemma", not in
            place) or LigerLayerNormFunction, when importable (.whl/base.tgz carries it);
            add+norm: the add in eager PyTorch, as in a model Liger patches
Times (median ms): calls one after another (triton.testing.do_bench), so the host's work
per call counts wherever it is longer than the kernels'; and "GPU ms", forward + backward
recorded in a CUDA graph and replayed (do_bench_cudagraph), the kernels alone, as a
training step under CUDA graphs runs them. GB/s from the GPU ms where measured.
Each variant's error against an fp32 computation on the same inputs (y and dx, relative
norm) is printed beside its times. A markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import call_ms, capture_failures, gpu_alone  # noqa: E402

EPS = 1e-5
SHAPES = [  # name, leading shape, hidden
    ("8B hidden", (4096,), 4096),
    ("q/k head", (4096, 32), 128),
]
VARIANTS = ("eager", "inductor", "lorafuse", "liger")
DEVICE = "cuda"  # a seam for dry runs of this script's logic elsewhere


def log(msg: str) -> None:
    print(f"[bench_norm] {msg}", file=sys.stderr, flush=True)


def hf_norm(variant: str, bias=None):
    """The model code (LlamaRMSNorm / Gemma2RMSNorm / nn.LayerNorm forward) as a function of
    (x, weight); ``bias``: LayerNorm's."""
    if variant == "layernorm":
        def f(x, w):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], w, bias, EPS)
    elif variant == "llama":
        def f(x, w):
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
            return w * h.to(x.dtype)
    else:
        def f(x, w):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
            return (h * (1.0 + w.float())).type_as(x)
    return f


def op_norm(variant: str, bias=None):
    from lorafuse.kernels.norm import layer_norm, out_dtype_of, rms_norm

    if variant == "layernorm":
        return lambda x, w: layer_norm(x, w, bias, EPS)
    cast_before = variant == "llama"

    def f(x, w):
        out = out_dtype_of(x.dtype, w.dtype, cast_before) if cast_before else x.dtype
        return rms_norm(x, w, EPS, 0.0 if cast_before else 1.0, cast_before, out)
    return f


def liger_norm(variant: str, bias=None):
    if variant == "layernorm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w: LigerLayerNormFunction.apply(x, w, bias, EPS)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    offset, mode = (0.0, "llama") if variant == "llama" else (1.0, "gemma")
    # not in place: in place, its backward overwrites dy, which the timing loop reuses
    return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, offset, mode, False)


def liger_available(variant: str) -> str:
    """'' when liger_kernel's norm for ``variant`` imports, else why not."""
    try:
        liger_norm(variant)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def with_add(norm):
    def f(a, b, w):
        r = a + b
        return r, norm(r, w)
    return f


def make_fns(variant: str, setting: str, bias=None, liger=True):
    eager, ours = hf_norm(variant, bias), op_norm(variant, bias)
    theirs = {"liger": liger_norm(variant, bias)} if liger else {}
    if setting == "norm":
        return {"eager": eager, "inductor": torch.compile(eager), "lorafuse": ours, **theirs}
    return {"eager": with_add(eager), "inductor": torch.compile(with_add(eager)),
            "lorafuse": torch.compile(with_add(ours)),
            **{k: with_add(f) for k, f in theirs.items()}}


def rel_err(t, ref) -> float:
    return ((t.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure(fn, setting, inputs, grads, rep, ref, leaves):
    """grads: the upstream gradient of each output ([dy], or [dr, dy] for add+norm)."""
    def run():
        out = fn(*inputs)
        if setting == "norm":
            return out, [out]
        return out[1], list(out)

    from lorafuse.kernels._dispatch import warned

    for t in leaves:  # gradients of an earlier variant must not accumulate into these
        t.grad = None
    warned.clear()  # a fallback warns once per process: let this variant's warn again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, outs = run()  # compile / JIT happen here
        torch.autograd.backward(outs, grads)
    fallback = [str(c.message) for c in caught if "lorafuse: Triton" in str(c.message)]
    if fallback:  # the op fell back to PyTorch: timing it would mislabel the numbers
        raise RuntimeError(fallback[0])
    errs = {"y_err": rel_err(y, ref["y"]), "dx_err": rel_err(leaves[0].grad, ref["dx"])}
    # y's graph keeps x's AccumulateGrad node alive, and that node runs on the stream it was
    # made on (the default one): inside the CUDA-graph capture below, on a side stream, it
    # would enqueue work on the legacy stream and invalidate the capture (session 31).
    del y, outs

    def step():
        _, o = run()
        torch.autograd.backward(o, grads)

    fwd = call_ms(lambda: run(), DEVICE, rep)
    both = call_ms(step, DEVICE, rep, grad_to_none=leaves)
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, **errs,
            **(gpu_alone(step, rep, grad_to_none=leaves) if DEVICE == "cuda" else {})}


def fp32_reference(variant, setting, inputs, grads, bias=None):
    f = hf_norm(variant, None if bias is None else bias.float())
    ins = [t.detach().float().requires_grad_(i == 0) for i, t in enumerate(inputs)]
    if setting == "norm":
        outs = [f(ins[0], ins[1])]
    else:
        r = ins[0] + ins[1]
        outs = [r, f(r, ins[2])]
    torch.autograd.backward(outs, [g.float() for g in grads])
    y = outs[-1]
    return {"y": y.detach(), "dx": ins[0].grad}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time, ms")
    p.add_argument("--norms", default="llama,gemma,layernorm",
                   help="which norms, of llama, gemma, layernorm")
    p.add_argument("--train-weight", action="store_true", help="the weight needs a gradient")
    p.add_argument("--settings", default="norm,add+norm")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_norm.py needs a CUDA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Nothing was measured.", file=sys.stderr)
        return 2
    try:
        import triton
        import triton.testing  # noqa: F401
    except ImportError as e:
        print(f"bench_norm.py needs triton ({e}). Nothing was measured.", file=sys.stderr)
        return 2
    os.environ["LORAFUSE_NORM_IMPL"] = "triton"
    torch._dynamo.config.cache_size_limit = 64
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    log(f"{name}, torch {torch.__version__}, triton {triton.__version__}")

    rows = []
    for norm in args.norms.split(","):
        rows += bench_norm(norm, args)
    print(table(rows))
    print(capture_failures(rows))
    print(verdict(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def bench_norm(norm: str, args) -> list:
    """The rows of one norm: every shape, weight dtype, setting and variant."""
    no_liger = liger_available(norm)
    if no_liger:
        log(f"liger_kernel's norm not importable ({no_liger}): no liger rows")
    layer = norm == "layernorm"
    dev = torch.device(DEVICE)
    rows = []
    for shape_name, lead, hidden in SHAPES:
        if layer and shape_name != "8B hidden":  # per-head norms are RMSNorms
            continue
        for w_dtype in (torch.bfloat16,) if layer else (torch.float32, torch.bfloat16):
            for setting in args.settings.split(","):
                g = torch.Generator(device=dev).manual_seed(0)
                shape = lead + (hidden,)
                x = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
                base = 0.0 if norm == "gemma" else 1.0
                w = (base + 0.1 * torch.randn(hidden, device=dev, generator=g)).to(w_dtype)
                w.requires_grad_(args.train_weight)
                b = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
                out_dtype = (torch.promote_types(w_dtype, torch.bfloat16)
                             if norm == "llama" else torch.bfloat16)
                dy = torch.randn(shape, device=dev, generator=g).to(out_dtype)
                dr = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
                bias = (0.1 * torch.randn(hidden, device=dev, generator=g)).to(w_dtype) \
                    if layer else None
                x.requires_grad_(True)
                inputs = (x, w) if setting == "norm" else (x, b, w)
                grads = [dy] if setting == "norm" else [dr, dy]
                ref = fp32_reference(norm, setting, inputs, grads, bias)
                fns = make_fns(norm, setting, bias, liger=not no_liger)
                for name in (v for v in VARIANTS if v in fns):
                    leaves = [x] + ([w] if args.train_weight else [])
                    try:
                        res = measure(fns[name], setting, inputs, grads, args.rep, ref, leaves)
                    except Exception as e:
                        log(f"{shape_name} {w_dtype} {setting} {name}: {type(e).__name__}: {e}")
                        res = {"error": f"{type(e).__name__}: {e}".replace("\n", " ")}
                    if "fwd_bwd_ms" in res:
                        res["gbps"] = min_bytes(setting, x.numel(), dy.element_size()) / (
                            res.get("gpu_ms", res["fwd_bwd_ms"]) * 1e-3) / 1e9
                    row = dict(norm=norm, shape=shape_name, rows=x.numel() // hidden,
                               hidden=hidden, weight=str(w_dtype).replace("torch.", ""),
                               setting=setting, variant=name, **res)
                    rows.append(row)
                    log(json.dumps(row))
    return rows


def min_bytes(setting: str, n: int, out_size: int) -> int:
    """Bytes a forward + backward must move for n bf16 input elements whose output (and
    its gradient) take ``out_size`` bytes each: norm reads x, writes y; its backward reads
    x and dy, writes dx. add+norm also reads a and b and writes r in the forward, reads
    dr in the backward (the weight and per-row statistics are negligible)."""
    per = 2 + out_size + 2 + out_size + 2
    return n * (per + (6 if setting == "add+norm" else 0))


PEAK_GBPS = 4182.0  # the H200's HBM3e


def _key(r) -> tuple:
    return r["norm"], r["shape"], r["weight"], r["setting"]


def table(rows) -> str:
    head = ("| norm | shape | weight | setting | variant | fwd ms | fwd+bwd ms | vs inductor | "
            f"GPU ms | vs inductor | GB/s (of {PEAK_GBPS:.0f}) | y err | dx err |")
    lines = [head, "|" + "---|" * 13]
    ind = {_key(r): r for r in rows if r["variant"] == "inductor"}
    for r in rows:
        lead = f"| {r['norm']} | {r['shape']} | {r['weight']} | {r['setting']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{lead} failed: {r['error'][:60]} | | | | | | | |")
            continue
        base = ind.get(_key(r), {})
        speed = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if "fwd_bwd_ms" in base else ""
        gpu = f"{r['gpu_ms']:.3f}" if "gpu_ms" in r else "—"
        gspeed = (f"{base['gpu_ms'] / r['gpu_ms']:.2f}x"
                  if "gpu_ms" in r and "gpu_ms" in base else "")
        lines.append(f"{lead} {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {speed} | {gpu} | "
                     f"{gspeed} | {r['gbps']:,.0f} ({r['gbps'] / PEAK_GBPS:.0%}) | "
                     f"{r['y_err']:.2e} | {r['dx_err']:.2e} |")
    return "\n".join(lines)


def verdict(rows) -> str:
    """Whether lorafuse beat eager, Inductor and Liger (fwd+bwd; the GPU-alone time where
    every variant of the row has one) in every add+norm row (the decoder-layer case), and
    what to set."""
    measured = {}
    for r in rows:
        if "fwd_bwd_ms" in r:
            measured.setdefault(_key(r), []).append(r)
    pairs = {}
    for k, rs in measured.items():
        field = "gpu_ms" if all("gpu_ms" in r for r in rs) else "fwd_bwd_ms"
        pairs[k] = {r["variant"]: r[field] for r in rs}
    keys = [k for k in pairs if k[3] == "add+norm"] or list(pairs)
    wins = [k for k in keys if pairs[k].get("lorafuse", 1e30) < min(
        pairs[k].get(v, 1e30) for v in VARIANTS if v != "lorafuse")]
    if keys and len(wins) == len(keys):
        return ("lorafuse's norm beat eager, Inductor and Liger in every add+norm row: make "
                "'norm' a default pass (DEFAULT_PASSES in lorafuse/passes/__init__.py).")
    return (f"lorafuse's norm beat the best of eager, Inductor and Liger in {len(wins)} of "
            f"{len(keys)} add+norm rows: keep 'norm' out of the default passes.")


if __name__ == "__main__":
    sys.exit(main())
