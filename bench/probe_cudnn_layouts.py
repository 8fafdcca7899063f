"""Which memory layouts of out and grad_out give right gradients from aten's cuDNN attention
backward (session 14's question: the masked_attention op's masked branch, on K/V repeated
to 32 heads, q laid out (B, H, L, D), its saved out copied to (B, L, H, D), returned a dq
3.7 × the fp32 reference's norm away on the H200 while public SDPA was right).

    python bench/probe_cudnn_layouts.py           # each case in a fresh process
    python bench/probe_cudnn_layouts.py --same    # all cases in this one process, in order

torch's cuDNN graph cache keys a backward graph on q, k, v and the bias (sizes, strides),
not on out's or grad_out's strides, which the graph bakes in; running every case in one
process as well as each in its own shows whether a stale graph is the cause. Prints one line
per case: the relative error of dq, dk, dv against an fp32 computation.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import torch

B, HQ, S, D = 2, 32, 1024, 128
LAYOUTS = ("bhld", "blhd")


def laid(t, layout):
    """``t`` (B, H, L, D) with the memory of ``layout``."""
    return t.contiguous() if layout == "bhld" else t.transpose(1, 2).contiguous().transpose(1, 2)


def case(q_layout, hkv, o_layout, do_layout):
    a = torch.ops.aten
    g = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(B, HQ, S, D, device="cuda", generator=g) for _ in range(2))
    k, v = (torch.randn(B, hkv, S, D, device="cuda", generator=g) for _ in range(2))
    keep = torch.ones(B, S, dtype=torch.bool, device="cuda")
    keep[1, :150] = False
    mask = ((torch.ones(S, S, dtype=torch.bool, device="cuda").tril()[None] & keep[:, None])
            | torch.eye(S, dtype=torch.bool, device="cuda"))[:, None]
    n = HQ // hkv
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        ref_in[0], ref_in[1].repeat_interleave(n, 1), ref_in[2].repeat_interleave(n, 1),
        attn_mask=mask)
    want = torch.autograd.grad(ref, ref_in, dout)
    bf = lambda t, lay: laid(t.to(torch.bfloat16), lay)  # noqa: E731
    qb, kb, vb = bf(q, q_layout), bf(k, q_layout), bf(v, q_layout)
    bias = torch.zeros(mask.shape, dtype=torch.bfloat16, device="cuda").masked_fill_(
        ~mask, -65504.0)
    r = a._scaled_dot_product_cudnn_attention(qb, kb, vb, bias, True, 0.0, False, False,
                                              scale=D ** -0.5)
    out, lse = r[0], r[1]
    native = "bhld" if out.stride(1) > out.stride(2) else "blhd"
    o = out if o_layout == "native" else laid(out, o_layout)
    rng = torch.empty((), dtype=torch.long, device="cuda")
    got = a._scaled_dot_product_cudnn_attention_backward(
        bf(dout, do_layout), qb, kb, vb, o, lse, rng, rng, bias, None, None, S, S, 0.0,
        False, scale=D ** -0.5)
    errs = [((x.float() - w).norm() / w.norm()).item() for x, w in zip(got, want)]
    print(f"q {q_layout} hkv {hkv:2d} out {o_layout:6s} ({native}) dout {do_layout}: "
          + " ".join(f"{nm} {e:.2e}" for nm, e in zip(("dq", "dk", "dv"), errs))
          + ("  WRONG" if max(errs) > 0.05 else ""), flush=True)


CASES = list(itertools.product(LAYOUTS, (8, 32), ("native", *LAYOUTS), LAYOUTS))


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        ql, hkv, ol, dl = sys.argv[2:6]
        case(ql, int(hkv), ol, dl)
    elif len(sys.argv) > 1 and sys.argv[1] == "--same":
        print("all cases in one process:")
        for c in CASES:
            case(*c)
    else:
        print("each case in a fresh process:")
        for ql, hkv, ol, dl in CASES:
            subprocess.run([sys.executable, __file__, "--case", ql, str(hkv), ol, dl],
                           check=False)


if __name__ == "__main__":
    main()
