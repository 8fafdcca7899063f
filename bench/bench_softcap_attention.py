"""Gemma2's eager softcap attention vs ``lorafuse::flash_attention``, forward + backward.

    python bench/bench_softcap_attention.py               # Gemma2-9B-like shapes, median ms
    python bench/bench_softcap_attention.py --seqs 2048 --softcaps 50 --windows none

At a Gemma2-9B-like shape (batch 2, 16 query heads, 8 K/V heads, head dim 256, softcap
50, window 4096 or none) it times, forward + backward on bf16 q/k/v (median of CUDA-event
timings, ``triton.testing.do_bench``):

- ``eager``: transformers' ``eager_attention_forward`` chain as Gemma2 runs it (repeat_kv,
  matmul, scale, tanh softcap, + additive mask, fp32 softmax, matmul), the mask built once
  as HF builds it per forward (every layer shares it);
- ``inductor``: ``torch.compile`` (Inductor) of that chain;
- ``lorafuse``: ``flash_attention`` on the unrepeated K/V, no mask tensor;
- ``sdpa-flash``, for the rows without softcap or window: SDPA's flash kernel with
  ``is_causal`` and ``enable_gqa`` — the ceiling a softcap kernel can hope to reach.

Note: Gemma2-9B's window is 4096, so at 2048 and 4096 tokens it masks nothing (a query at
i sees keys i - 4096 < j <= i); pass ``--windows 1024`` to see it bite.

Before timing, each case checks the lorafuse op's output and gradients against the fp32
reference (``attention_reference``) next to eager bf16's error on the same inputs.
Prints a markdown table; needs a CUDA GPU (it says so and exits 2 otherwise).
"""

from __future__ import annotations

import argparse
import sys

import torch

FLOPS_MATMULS = 3.5  # fwd (2 matmuls) + bwd (5 matmuls) = 3.5 × the forward's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--softcaps", nargs="+", default=["50", "none"],
                   help="tanh logit caps; 'none' for no cap")
    p.add_argument("--windows", nargs="+", default=["4096", "none"],
                   help="sliding windows; 'none' for plain causal")
    p.add_argument("--variants", nargs="+", default=["eager", "inductor", "lorafuse", "sdpa-flash"])
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check")
    p.add_argument("--rep", type=int, default=50, help="do_bench's rep (ms)")
    args = p.parse_args(argv)
    args.softcaps = [None if s == "none" else float(s) for s in args.softcaps]
    args.windows = [None if w == "none" else int(w) for w in args.windows]
    return args


def eager_chain(q, k, v, mask, scale, softcap):
    """transformers' eager_attention_forward (Gemma2), dropout 0, returning (B, H, L, D)."""
    b, hkv, length, d = k.shape
    n = q.shape[1] // hkv
    k = k[:, :, None].expand(b, hkv, n, length, d).reshape(b, hkv * n, length, d)
    v = v[:, :, None].expand(b, hkv, n, length, d).reshape(b, hkv * n, length, d)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def hf_mask(length, window, dtype, device):
    """HF's additive (1, 1, L, L) mask: 0 where visible, the dtype's min elsewhere."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    ok = j <= i
    if window is not None:
        ok &= j > i - window
    return torch.zeros(1, 1, length, length, dtype=dtype, device=device).masked_fill(
        ~ok, torch.finfo(dtype).min)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_softcap_attention: needs a CUDA GPU (none found); nothing measured.",
              file=sys.stderr)
        return 2
    import triton.testing
    import torch.nn.functional as F

    from lorafuse.kernels.flash_attention import attention_reference, flash_attention

    dev, dt = "cuda", torch.bfloat16
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    compiled = torch.compile(eager_chain, dynamic=False)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; B={b} H={h} Hkv={hkv} D={d}, bf16, fwd+bwd\n")
    print("| seq | softcap | window | variant | fwd+bwd ms | TFLOP/s | rel err out / dq / dk / dv "
          "vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for length in args.seqs:
        g = torch.Generator(device=dev).manual_seed(length)
        q = torch.randn(b, h, length, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(b, hkv, length, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(b, hkv, length, d, device=dev, dtype=dt, generator=g)
        dout = torch.randn(b, h, length, d, device=dev, dtype=dt, generator=g)
        # causal: half the L × L scores; a window shorter than L cuts that further
        for softcap in args.softcaps:
            for window in args.windows:
                band = sum(min(i + 1, window or i + 1) for i in range(length))
                flops = FLOPS_MATMULS * 4 * b * h * band * d
                mask = hf_mask(length, window, dt, dev)
                calls = {
                    "eager": lambda q, k, v: eager_chain(q, k, v, mask, scale, softcap),
                    "inductor": lambda q, k, v: compiled(q, k, v, mask, scale, softcap),
                    "lorafuse": lambda q, k, v: flash_attention(
                        q, k, v, causal=True, scale=scale, softcap=softcap, window=window),
                }
                if softcap is None and (window is None or window >= length):
                    calls["sdpa-flash"] = lambda q, k, v: _sdpa_flash(F, q, k, v, scale)
                want = None
                if not args.no_check:  # the fp32 reference, its gradients by autograd
                    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
                    out_ref = eager_chain(qf, kf, vf, mask.float(), scale, softcap)
                    want = (out_ref, *torch.autograd.grad(out_ref, (qf, kf, vf), dout.float()))
                    del qf, kf, vf, out_ref
                for name, call in calls.items():
                    if name not in args.variants:
                        continue
                    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

                    def step():
                        o = call(qq, kk, vv)
                        return (o, *torch.autograd.grad(o, (qq, kk, vv), dout))

                    try:
                        got = step()
                        err = "—" if want is None else " / ".join(
                            f"{rel(a, w):.1e}" for a, w in zip(got, want))
                        del got
                        ms = triton.testing.do_bench(step, warmup=10, rep=args.rep,
                                                     return_mode="median")
                        row = f"{ms:.3f} | {flops / ms / 1e9:.0f} | {err}"
                    except Exception as exc:  # a variant that cannot run this case
                        row = f"— | — | {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    print(f"| {length} | {softcap or 'none'} | {window or 'none'} | {name} | "
                          f"{row} |", flush=True)
                    torch.cuda.empty_cache()
                del want
    return 0


def _sdpa_flash(F, q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=True)


if __name__ == "__main__":
    sys.exit(main())
