"""The rope and gated-MLP ops against eager, Inductor and Liger, forward and forward + backward.

    python bench/bench_elementwise.py [--rep MS] [--ops rope,gated_mlp] [--act silu]
                                      [--json PATH]
    python bench/bench_elementwise.py --device cpu --small    # smoke test of this script

Decides whether the rope and gated_mlp passes should be default passes: the project uses
a kernel only where it beats Inductor (lorafuse/passes/__init__.py: DEFAULT_PASSES).

Shapes (bf16, Llama-3.1-8B, batch 2 × 2048 = 4096 tokens):
  rope       q [2, 32, 2048, 128] and k [2, 8, 2048, 128] as the model has them: transposed
             views of the q/k projections [2, 2048, 32·128]; cos/sin [1, 2048, 128] bf16
             (HF's rotary embedding casts them to the model dtype).
  gated_mlp  gate and up [2, 2048, 14336]; y = act(gate) * up (SiLU unless --act).
Variants:
  eager      transformers' apply_rotary_pos_emb / act(gate) * up in PyTorch ops (autograd)
  inductor   torch.compile of the same function (default mode)
  lorafuse   the op, Triton path (LORAFUSE_ROPE_IMPL / LORAFUSE_GATED_MLP_IMPL=triton on
             CUDA; on CPU the PyTorch reference)
  liger      liger_kernel's LigerRopeFunction / LigerSiLUMulFunction, when importable (both
             work in place: rope rotates q and k in their storage, SwiGLU's backward
             writes the gradients into gate and up; timing is unaffected)
Time: median ms of triton.testing.do_bench on CUDA (a perf_counter median on CPU), the
forward with autograd recording (as in training) and forward + backward: calls one after
another, so the host's work per call (Python, dispatch, launches) counts wherever it is
longer than the kernels'. On CUDA also "GPU ms": forward + backward recorded in a CUDA
graph and replayed (triton.testing.do_bench_cudagraph), the kernels alone, as a training
step under CUDA graphs runs them. Bandwidth (from the GPU ms where measured): the
bytes the op must move at least (each input read once, each output written once: rope
2·(|q| + |k|) + |cos| + |sin| per direction; gated forward 3·|gate|, backward 5·|gate|)
over the forward + backward time, and its fraction of the H200's 4182 GB/s. Each
variant's error against an fp32 computation on the same inputs (outputs, input
gradients; relative norm) is printed beside its times. A markdown table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import call_ms, capture_failures, gpu_alone  # noqa: E402

PEAK_GBPS = 4182.0  # H200 memory bandwidth ceiling (GB/s)
SHAPES = {
    "8b": dict(batch=2, seq=2048, q_heads=32, kv_heads=8, head_dim=128, inter=14336),
    "small": dict(batch=2, seq=24, q_heads=4, kv_heads=2, head_dim=16, inter=72),
}
VARIANTS = ("eager", "inductor", "lorafuse", "liger")


def log(msg: str) -> None:
    print(f"[bench_elementwise] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the ops


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (Llama), unsqueeze_dim=1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_case(s):
    B, S, Hq, Hk, D = s["batch"], s["seq"], s["q_heads"], s["kv_heads"], s["head_dim"]

    def heads(q_lin, k_lin):  # the projections as the attention module views them
        return (q_lin.view(B, S, Hq, D).transpose(1, 2), k_lin.view(B, S, Hk, D).transpose(1, 2))

    def eager(q_lin, k_lin, cos, sin):
        return hf_rope(*heads(q_lin, k_lin), cos, sin)

    def lorafuse(q_lin, k_lin, cos, sin):
        from lorafuse.kernels.rope import rope

        return rope(*heads(q_lin, k_lin), cos.unsqueeze(1), sin.unsqueeze(1))

    def liger(q_lin, k_lin, cos, sin):
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply(*heads(q_lin, k_lin), cos, sin)

    def inputs(dev, g):
        q = torch.randn(B, S, Hq * D, device=dev, generator=g).bfloat16().requires_grad_()
        k = torch.randn(B, S, Hk * D, device=dev, generator=g).bfloat16().requires_grad_()
        # HF's default rotary embedding (rope_theta 500000), cos/sin in the model dtype
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        freqs = torch.arange(S, device=dev).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        consts = [emb.cos().bfloat16(), emb.sin().bfloat16()]
        # laid out as the attention backward hands them to rope in the model: like q and k
        # ([B, S, H, D] in memory: lorafuse's attention ops allocate dq like q), not
        # contiguous [B, H, S, D], which cost the op's backward a strided read and autograd
        # a copy back to the projections' layout (sessions 30-31)
        grads = [torch.randn(B, S, H, D, device=dev, generator=g).bfloat16().transpose(1, 2)
                 for H in (Hq, Hk)]
        return [q, k], consts, grads

    elems = B * S * (Hq + Hk) * D
    one_way = 2 * elems * 2 + 2 * S * D * 2  # q, k read and written; cos, sin read (bf16)
    return dict(eager=eager, lorafuse=lorafuse, liger=liger, inputs=inputs,
                bytes_fwd=one_way, bytes_fwd_bwd=2 * one_way,
                shape=f"q {B}x{Hq}x{S}x{D}, k {B}x{Hk}x{S}x{D}")


ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def gated_case(s, act):
    B, S, N = s["batch"], s["seq"], s["inter"]

    def eager(gate, up):
        return (ACTS[act](gate) * up,)

    def lorafuse(gate, up):
        from lorafuse.kernels.gated_mlp import gated_mlp

        return (gated_mlp(gate, up, act),)

    def liger(gate, up):
        if act != "silu":
            raise NotImplementedError("LigerSiLUMulFunction is SiLU only")
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return (LigerSiLUMulFunction.apply(gate, up),)

    def inputs(dev, g):
        leaves = [torch.randn(B, S, N, device=dev, generator=g).bfloat16().requires_grad_()
                  for _ in range(2)]
        return leaves, [], [torch.randn(B, S, N, device=dev, generator=g).bfloat16()]

    elem_bytes = B * S * N * 2
    return dict(eager=eager, lorafuse=lorafuse, liger=liger, inputs=inputs,
                bytes_fwd=3 * elem_bytes, bytes_fwd_bwd=8 * elem_bytes,
                shape=f"{B}x{S}x{N} {act}")


# --------------------------------------------------------------------------- measuring


def rel_err(t, ref) -> float:
    return ((t.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_once(fn, leaves, consts, grads):
    """Outputs and input gradients of one call, on fresh copies of the leaves (Liger
    works in place)."""
    fresh = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*fresh, *consts)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs] + [t.grad for t in fresh]


def measure(fn, leaves, consts, grads, ref, device, rep):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_once(fn, leaves, consts, grads)  # compile / JIT happen here
    fallback = [str(c.message) for c in caught if "lorafuse: Triton" in str(c.message)]
    if fallback:  # the op fell back to PyTorch: timing it would mislabel the numbers
        raise RuntimeError(fallback[0])
    n_out = len(grads)
    errs = {"out_err": max(rel_err(a, b) for a, b in zip(got[:n_out], ref[:n_out])),
            "grad_err": max(rel_err(a, b) for a, b in zip(got[n_out:], ref[n_out:]))}

    def step():
        torch.autograd.backward(fn(*leaves, *consts), grads)

    fwd = call_ms(lambda: fn(*leaves, *consts), device, rep)
    both = call_ms(step, device, rep, grad_to_none=leaves)
    res = {"fwd_ms": fwd, "fwd_bwd_ms": both, **errs}
    if device == "cuda":
        res.update(gpu_alone(step, rep, grad_to_none=leaves))
    return res


def fp32_reference(eager, leaves, consts, grads):
    ins = [t.detach().float().requires_grad_() for t in leaves]
    outs = eager(*ins, *[c.float() for c in consts])
    torch.autograd.backward(outs, [g.float() for g in grads])
    return [o.detach() for o in outs] + [t.grad for t in ins]


def liger_available() -> str:
    """'' when liger_kernel imports, else why not."""
    try:
        import liger_kernel.ops.rope  # noqa: F401
        import liger_kernel.ops.swiglu  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rep", type=int, default=100, help="timing repetition time, ms")
    p.add_argument("--ops", default="rope,gated_mlp")
    p.add_argument("--act", choices=tuple(ACTS), default="silu", help="gated MLP activation")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_elementwise.py needs a CUDA GPU (or --device cpu --small for a smoke "
              f"test): torch.cuda.is_available() is False here (torch {torch.__version__}). "
              "Nothing was measured.", file=sys.stderr)
        return 2
    if args.device == "cuda":
        try:
            import triton
            import triton.testing  # noqa: F401
        except ImportError as e:
            print(f"bench_elementwise.py needs triton on CUDA ({e}). Nothing was measured.",
                  file=sys.stderr)
            return 2
        os.environ["LORAFUSE_ROPE_IMPL"] = "triton"
        os.environ["LORAFUSE_GATED_MLP_IMPL"] = "triton"
        log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}")
    else:  # a smoke test on a shared machine: OpenMP threads spinning against others
        torch.set_num_threads(1)  # made Inductor's CPU kernels 100x slower
    torch._dynamo.config.cache_size_limit = 64
    no_liger = liger_available()
    if no_liger:
        log(f"liger_kernel not importable ({no_liger}): no liger rows")
    shape = SHAPES["small" if args.small else "8b"]
    dev = torch.device(args.device)
    cases = {"rope": lambda: rope_case(shape), "gated_mlp": lambda: gated_case(shape, args.act)}

    rows = []
    for op in args.ops.split(","):
        case = cases[op]()
        g = torch.Generator(device=dev).manual_seed(0)
        leaves, consts, grads = case["inputs"](dev, g)
        ref = fp32_reference(case["eager"], leaves, consts, grads)
        fns = {"eager": case["eager"], "inductor": torch.compile(case["eager"]),
               "lorafuse": case["lorafuse"], "liger": case["liger"]}
        for name in VARIANTS:
            if name == "liger" and no_liger:
                continue
            try:
                res = measure(fns[name], leaves, consts, grads, ref, args.device, args.rep)
                res["gbps"] = case["bytes_fwd_bwd"] / (res["fwd_bwd_ms"] * 1e-3) / 1e9
                if "gpu_ms" in res:
                    res["gpu_gbps"] = case["bytes_fwd_bwd"] / (res["gpu_ms"] * 1e-3) / 1e9
                res["fwd_gbps"] = case["bytes_fwd"] / (res["fwd_ms"] * 1e-3) / 1e9
            except Exception as e:
                log(f"{op} {name}: {type(e).__name__}: {e}")
                res = {"error": f"{type(e).__name__}: {e}".replace("\n", " ")}
            row = dict(op=op, shape=case["shape"], variant=name, **res)
            rows.append(row)
            log(json.dumps(row))
    print(table(rows, PEAK_GBPS if args.device == "cuda" else None))
    print(capture_failures(rows))
    print(verdict(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def table(rows, peak) -> str:
    head = ("| op | shape | variant | fwd ms | fwd+bwd ms | vs inductor | GPU ms | "
            "vs inductor | GB/s (GPU ms) | of 4182 GB/s | out err | grad err |")
    lines = [head, "|" + "---|" * 12]
    ind = {r["op"]: r for r in rows if r["variant"] == "inductor"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['variant']} | "
                         f"failed: {r['error'][:80]} | | | | | | | | |")
            continue
        base = ind.get(r["op"], {})
        speed = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if "fwd_bwd_ms" in base else ""
        gpu = f"{r['gpu_ms']:.3f}" if "gpu_ms" in r else "—"
        gspeed = (f"{base['gpu_ms'] / r['gpu_ms']:.2f}x"
                  if "gpu_ms" in r and "gpu_ms" in base else "")
        gbps = r.get("gpu_gbps", r["gbps"])
        frac = f"{gbps / peak:.0%}" if peak else "n/a (CPU)"
        lines.append(f"| {r['op']} | {r['shape']} | {r['variant']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {speed} | {gpu} | {gspeed} | {gbps:.0f} | "
                     f"{frac} | {r['out_err']:.2e} | {r['grad_err']:.2e} |")
    return "\n".join(lines)


def verdict(rows) -> str:
    """Per op: did lorafuse beat Inductor forward + backward, called and (where measured)
    replayed from a CUDA graph?"""
    from lorafuse.passes import DEFAULT_PASSES

    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        t = {r["variant"]: r.get("fwd_bwd_ms", math.inf) for r in rows if r["op"] == op}
        g = {r["variant"]: r["gpu_ms"] for r in rows if r["op"] == op and "gpu_ms" in r}
        gpu_win = g.get("lorafuse", math.inf) < g.get("inductor", 0.0) if g else True
        default = op in DEFAULT_PASSES
        if t.get("lorafuse", math.inf) < t.get("inductor", 0.0) and gpu_win:
            out.append(f"{op}: lorafuse beat Inductor ({t['lorafuse']:.3f} vs "
                       f"{t['inductor']:.3f} ms): " + (
                           "a default pass already (DEFAULT_PASSES in "
                           "lorafuse/passes/__init__.py)." if default else
                           "a candidate default pass (DEFAULT_PASSES in lorafuse/passes/"
                           "__init__.py), pending the whole-model step (bench_train.py)."))
        elif default:
            out.append(f"{op}: lorafuse did not beat Inductor, and '{op}' is a default pass: "
                       "measure the whole-model step (bench_train.py) and reconsider.")
        else:
            out.append(f"{op}: lorafuse did not beat Inductor: keep '{op}' out of the "
                       "default passes.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
