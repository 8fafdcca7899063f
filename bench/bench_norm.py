"""The fused RMSNorm op against eager and Inductor, forward and forward + backward (one GPU).

    python bench/bench_norm.py [--rep MS] [--variant llama|gemma] [--train-weight] [--json PATH]

Decides whether the norm pass should be a default pass: the project uses a kernel only
where it beats Inductor (lorafuse/passes/__init__.py: DEFAULT_PASSES).

Shapes (bf16 input, rows × hidden): the Llama-3.1-8B hidden norm (4096 tokens × 4096)
and a per-head q/k norm (4096 tokens × 32 heads × 128, Qwen3-8B). Weight either fp32
(output fp32, by type promotion) or bf16 (as HF loads a bf16 model). The input needs a
gradient; the weight is frozen (LoRA) unless --train-weight.

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

EPS = 1e-5
SHAPES = [  # name, leading shape, hidden
    ("8B hidden", (4096,), 4096),
    ("q/k head", (4096, 32), 128),
]
VARIANTS = ("eager", "inductor", "lorafuse")
DEVICE = "cuda"  # a seam for dry runs of this script's logic elsewhere


def log(msg: str) -> None:
    print(f"[bench_norm] {msg}", file=sys.stderr, flush=True)


def hf_norm(variant: str):
    """The model code (LlamaRMSNorm / Gemma2RMSNorm forward) as a function."""
    if variant == "llama":
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


def op_norm(variant: str):
    from lorafuse.kernels.norm import out_dtype_of, rms_norm

    cast_before = variant == "llama"

    def f(x, w):
        out = out_dtype_of(x.dtype, w.dtype, cast_before) if cast_before else x.dtype
        return rms_norm(x, w, EPS, 0.0 if cast_before else 1.0, cast_before, out)
    return f


def with_add(norm):
    def f(a, b, w):
        r = a + b
        return r, norm(r, w)
    return f


def make_fns(variant: str, setting: str):
    eager, ours = hf_norm(variant), op_norm(variant)
    if setting == "norm":
        return {"eager": eager, "inductor": torch.compile(eager), "lorafuse": ours}
    return {"eager": with_add(eager), "inductor": torch.compile(with_add(eager)),
            "lorafuse": torch.compile(with_add(ours))}


def rel_err(t, ref) -> float:
    return ((t.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure(fn, setting, inputs, grads, rep, ref, leaves):
    """grads: the upstream gradient of each output ([dy], or [dr, dy] for add+norm)."""
    import triton.testing

    def run():
        out = fn(*inputs)
        if setting == "norm":
            return out, [out]
        return out[1], list(out)

    for t in leaves:  # gradients of an earlier variant must not accumulate into these
        t.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, outs = run()  # compile / JIT happen here
        torch.autograd.backward(outs, grads)
    fallback = [str(c.message) for c in caught if "RMSNorm" in str(c.message)]
    if fallback:  # the op fell back to PyTorch: timing it would mislabel the numbers
        raise RuntimeError(fallback[0])
    errs = {"y_err": rel_err(y, ref["y"]), "dx_err": rel_err(leaves[0].grad, ref["dx"])}

    def step():
        _, o = run()
        torch.autograd.backward(o, grads)

    kw = dict(warmup=max(1, rep // 4), rep=rep, return_mode="median")
    fwd = triton.testing.do_bench(lambda: run(), **kw)
    both = triton.testing.do_bench(step, grad_to_none=leaves, **kw)
    return {"fwd_ms": fwd, "fwd_bwd_ms": both, **errs}


def fp32_reference(variant, setting, inputs, grads):
    f = hf_norm(variant)
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
    p.add_argument("--variant", choices=("llama", "gemma"), default="llama")
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

    dev = torch.device(DEVICE)
    rows = []
    for shape_name, lead, hidden in SHAPES:
        for w_dtype in (torch.float32, torch.bfloat16):
            for setting in args.settings.split(","):
                g = torch.Generator(device=dev).manual_seed(0)
                shape = lead + (hidden,)
                x = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
                base = 1.0 if args.variant == "llama" else 0.0
                w = (base + 0.1 * torch.randn(hidden, device=dev, generator=g)).to(w_dtype)
                w.requires_grad_(args.train_weight)
                b = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
                out_dtype = (torch.promote_types(w_dtype, torch.bfloat16)
                             if args.variant == "llama" else torch.bfloat16)
                dy = torch.randn(shape, device=dev, generator=g).to(out_dtype)
                dr = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
                x.requires_grad_(True)
                inputs = (x, w) if setting == "norm" else (x, b, w)
                grads = [dy] if setting == "norm" else [dr, dy]
                ref = fp32_reference(args.variant, setting, inputs, grads)
                fns = make_fns(args.variant, setting)
                for name in VARIANTS:
                    leaves = [x] + ([w] if args.train_weight else [])
                    try:
                        res = measure(fns[name], setting, inputs, grads, args.rep, ref, leaves)
                    except Exception as e:
                        log(f"{shape_name} {w_dtype} {setting} {name}: {type(e).__name__}: {e}")
                        res = {"error": f"{type(e).__name__}: {e}".replace("\n", " ")}
                    row = dict(shape=shape_name, rows=x.numel() // hidden, hidden=hidden,
                               weight=str(w_dtype).replace("torch.", ""), setting=setting,
                               variant=name, **res)
                    rows.append(row)
                    log(json.dumps(row))
    print(table(rows))
    print()
    print(verdict(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def table(rows) -> str:
    head = ("| shape | weight | setting | variant | fwd ms | fwd+bwd ms | vs inductor | "
            "y err | dx err |")
    lines = [head, "|" + "---|" * 9]
    ind = {(r["shape"], r["weight"], r["setting"]): r.get("fwd_bwd_ms")
           for r in rows if r["variant"] == "inductor"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['weight']} | {r['setting']} | {r['variant']} | "
                         f"failed: {r['error'][:60]} | | | | |")
            continue
        base = ind.get((r["shape"], r["weight"], r["setting"]))
        speed = f"{base / r['fwd_bwd_ms']:.2f}x" if base else ""
        lines.append(f"| {r['shape']} | {r['weight']} | {r['setting']} | {r['variant']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {speed} | "
                     f"{r['y_err']:.2e} | {r['dx_err']:.2e} |")
    return "\n".join(lines)


def verdict(rows) -> str:
    """Whether lorafuse beat Inductor (fwd+bwd) in every add+norm row (the decoder-layer
    case), and what to set."""
    pairs = {}
    for r in rows:
        if "fwd_bwd_ms" in r:
            pairs.setdefault((r["shape"], r["weight"], r["setting"]), {})[r["variant"]] = \
                r["fwd_bwd_ms"]
    keys = [k for k in pairs if k[2] == "add+norm"] or list(pairs)
    wins = [k for k in keys if pairs[k].get("lorafuse", 1e30) < pairs[k].get("inductor", 0)]
    if keys and len(wins) == len(keys):
        return ("lorafuse's RMSNorm beat Inductor in every add+norm row: make 'norm' a "
                "default pass (DEFAULT_PASSES in lorafuse/passes/__init__.py).")
    return (f"lorafuse's RMSNorm beat Inductor in {len(wins)} of {len(keys)} add+norm rows: "
            "keep 'norm' out of the default passes.")


if __name__ == "__main__":
    sys.exit(main())
