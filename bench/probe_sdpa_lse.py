"""Which of aten's SDPA kernels can keep their log-sum-exp for a custom op's backward, and
what each costs at the 8B shape (session 13's question: the masked_attention op's causal
and masked branches recompute their forward in the backward because public SDPA returns no
lse).

    python bench/probe_sdpa_lse.py

Prints, per call, forward + backward median ms and the max abs error against public SDPA
(autograd): public SDPA itself (the kernel it picks), the op's present recompute path
(forward, then forward + backward again), and the private aten forward/backward pairs
called directly with the lse kept.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_attention import timed  # noqa: E402

B, HQ, HKV, S, D = 2, 32, 8, 2048, 128


def main():
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, HQ, S, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, HKV, S, D, device=dev, dtype=dt, generator=g)
    dout = torch.randn(B, HQ, S, D, device=dev, dtype=dt, generator=g)
    n = HQ // HKV
    kr, vr = k.repeat_interleave(n, 1), v.repeat_interleave(n, 1)
    lengths = torch.tensor([S, S - 200], device=dev)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    mask = (causal[None] & (torch.arange(S, device=dev) < lengths[:, None, None]))[:, None]
    mask[..., 0] = True
    bias = torch.zeros(mask.shape, device=dev, dtype=dt).masked_fill_(~mask, float("-inf"))
    a = torch.ops.aten
    scale = D ** -0.5
    empty = torch.empty((), dtype=torch.long, device=dev)

    def public(is_causal):
        qq, kk, vv = (t.detach().requires_grad_() for t in ((q, k, v) if is_causal else (q, kr, vr)))
        out = (F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
               if is_causal else F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask))
        out.backward(dout)
        return out.detach(), qq.grad, kk.grad, vv.grad

    def recompute(is_causal):
        with torch.no_grad():
            (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
             if is_causal else F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask))
        return public(is_causal)

    def flash():
        r = a._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        out, lse = r[0], r[1]
        dq, dk, dv = a._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, r[2], r[3], r[4], r[5], 0.0, True, empty, empty,
            scale=scale)
        return out, dq, dk, dv

    def efficient():
        b4 = bias.expand(B, HQ, S, S)
        out, lse, s0, s1 = a._scaled_dot_product_efficient_attention(q, kr, vr, b4, True, 0.0,
                                                                    False, scale=scale)
        dq, dk, dv, _ = a._scaled_dot_product_efficient_attention_backward(
            dout, q, kr, vr, b4, out, lse, empty, empty, 0.0, [True, True, True, False],
            False, scale=scale)
        return out, dq, dk, dv

    def cudnn(k_, v_):  # on repeated K/V, or the unrepeated ones (cuDNN's own GQA)
        def run():
            b4 = bias.expand(B, HQ, S, S)
            r = a._scaled_dot_product_cudnn_attention(q, k_, v_, b4, True, 0.0, False, False,
                                                      scale=scale)
            dq, dk, dv = a._scaled_dot_product_cudnn_attention_backward(
                dout, q, k_, v_, r[0], r[1], r[6], r[7], b4, r[2], r[3], r[4], r[5], 0.0,
                False, scale=scale)
            return r[0], dq, dk, dv

        return run

    from lorafuse.kernels import attention as ka

    lo, hi, _ = torch.ops.lorafuse.mask_key_ranges(mask)

    def flash_bounds():  # lorafuse's Triton flash attention with the mask's key ranges
        out, lse = ka.flash_with_bounds(q, k, v, lo, hi, scale)
        dq, dk, dv = ka.flash_with_bounds_backward(dout, q, k, v, out, lse, lo, hi, scale)
        return out, dq, dk, dv

    print("torch", torch.__version__, torch.cuda.get_device_name())
    print("public SDPA's choice, masked on unrepeated K/V with enable_gqa:",
          torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=None, enable_gqa=True))
    for is_causal in (True, False):
        choice = torch._fused_sdp_choice(q, k if is_causal else kr, v if is_causal else vr,
                                         None if is_causal else mask, 0.0, is_causal,
                                         scale=None, enable_gqa=is_causal)
        print(f"public SDPA's choice, {'causal+gqa' if is_causal else 'masked'}: {choice}")
    rows = [("causal", "public SDPA", lambda: public(True), None),
            ("causal", "op's recompute", lambda: recompute(True), None),
            ("causal", "aten flash + lse", flash, True),
            ("masked", "public SDPA", lambda: public(False), None),
            ("masked", "op's recompute", lambda: recompute(False), None),
            ("masked", "aten efficient + lse", efficient, False),
            ("masked", "aten cudnn + lse", cudnn(kr, vr), False),
            ("masked", "aten cudnn on unrepeated K/V (GQA) + lse", cudnn(k, v), False),
            ("masked", "lorafuse flash with key bounds", flash_bounds, False)]
    refs = {True: public(True), False: public(False)}
    print("| branch | call | fwd+bwd ms | max abs err out, dq, dk, dv vs public |")
    print("|---|---|---|---|")
    for branch, name, fn, which in rows:
        try:
            res = fn()
            ms = timed(fn)
        except Exception as e:  # a probe: report and go on
            print(f"| {branch} | {name} | failed: {type(e).__name__}: {str(e)[:160]} | |")
            continue
        err = ""
        if which is not None:
            ref = refs[which]
            got = list(res)
            if not which:  # repeated K/V: fold the gradients back to the K/V heads
                got[2:4] = (t.view(B, HKV, n, S, D).sum(2) if t.shape[1] == HQ else t
                            for t in got[2:4])
                ref = list(ref)
                ref[2], ref[3] = (t.view(B, HKV, n, S, D).sum(2) for t in ref[2:4])
            err = ", ".join(f"{(x.float() - y.float()).abs().max().item():.2e}"
                            for x, y in zip(got, ref))
        print(f"| {branch} | {name} | {ms:.3f} | {err} |")


if __name__ == "__main__":
    main()
