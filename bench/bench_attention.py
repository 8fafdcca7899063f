"""SDPA as transformers calls it under torch.compile vs what the attention pass makes of it.

    python bench/bench_attention.py          # 8B and 1B attention shapes, fwd+bwd, median ms

Under tracing, transformers builds an explicit boolean causal mask and repeats K/V to the
query heads (repeat_kv), so SDPA gets `attn_mask=<B,1,S,S>`, `is_causal=False` and 4x the
K/V. This measures that call against `is_causal=True` (repeated K/V, and `enable_gqa=True`
on the grouped K/V) for each SDPA backend, forward + backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"8b": (2, 32, 8, 2048, 128), "1b": (4, 32, 8, 2048, 64)}
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    dev = "cuda"
    print("| shape | call | backend | fwd+bwd ms | fwd ms | max abs err vs masked |")
    print("|---|---|---|---|---|---|")
    for shape, (b, hq, hkv, s, d) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, generator=g)
        dout = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16, generator=g)
        mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril().expand(b, 1, s, s)
        rep = lambda t: t[:, :, None].expand(b, hkv, hq // hkv, s, d).reshape(b, hq, s, d)
        calls = {
            "mask+repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
                q, rep(k), rep(v), attn_mask=mask),
            "causal+repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
                q, rep(k), rep(v), is_causal=True),
            "causal+gqa": lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True),
            "mask+gqa": lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=True),
        }
        want = None
        for cname, call in calls.items():
            for bname, be in BACKENDS.items():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                ctx = sdpa_kernel([be]) if be is not None else torch.autocast(dev, enabled=False)
                try:
                    with ctx:
                        out = call(qq, kk, vv)
                        def fb():
                            o = call(qq, kk, vv)
                            torch.autograd.grad(o, (qq, kk, vv), dout)
                        def fo():
                            with torch.no_grad():
                                call(qq, kk, vv)
                        t_fb, t_f = timed(fb), timed(fo)
                    if want is None:
                        want = out.float()
                    err = (out.float() - want).abs().max().item()
                    print(f"| {shape} | {cname} | {bname} | {t_fb:.3f} | {t_f:.3f} | {err:.2e} |",
                          flush=True)
                except Exception as exc:  # a backend that refuses this call
                    print(f"| {shape} | {cname} | {bname} | — | — | {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:80]} |", flush=True)


if __name__ == "__main__":
    main()
