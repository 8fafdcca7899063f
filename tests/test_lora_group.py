"""The multi-site LoRA op (q/k/v, gate/up sharing one input) against eager PyTorch."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafuse.kernels.lora_group import lora_linear_group


def _eager(x, ws, bs, As, Bs, scales):
    return [F.linear(x, w, b) + F.linear(F.linear(x, A), B) * s
            for w, b, A, B, s in zip(ws, bs, As, Bs, scales)]


def _make(seed, lead, K, Ns, ranks, bias, dtype):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(*lead, K)
    ws = [rnd(n, K) / K**0.5 for n in Ns]
    bs = [rnd(n) if bias else None for n in Ns]
    As = [rnd(r, K) / K**0.5 for r in ranks]
    Bs = [rnd(n, r) for n, r in zip(Ns, ranks)]
    scales = [0.5 + i for i in range(len(Ns))]
    dys = [rnd(*lead, n) for n in Ns]
    cast = lambda ts: [t if t is None else t.to(dtype) for t in ts]  # noqa: E731
    return x.to(dtype), cast(ws), cast(bs), cast(As), cast(Bs), scales, cast(dys)


def _run(fn, x, ws, bs, As, Bs, scales, dys, x_grad=True, wb_grad=False):
    """Outputs and gradients. ``wb_grad``: the first site's weight and bias are trainable
    (not LoRA's case, but the op must still be right), the others frozen."""
    x = x.detach().requires_grad_(x_grad)
    As = [a.detach().requires_grad_() for a in As]
    Bs = [b.detach().requires_grad_() for b in Bs]
    ws = [w.detach().requires_grad_(wb_grad and i == 0) for i, w in enumerate(ws)]
    bs = [b if b is None else b.detach().requires_grad_(wb_grad and i == 0) for i, b in enumerate(bs)]
    ys = fn(x, ws, bs, As, Bs, scales)
    torch.autograd.backward(ys, dys)
    trainable = [t.grad for t in ws + bs if t is not None and t.requires_grad]
    assert all(t.grad is None for t in ws + bs if t is not None and not t.requires_grad)
    return ys + ([x.grad] if x_grad else []) + [a.grad for a in As] + [b.grad for b in Bs] + trainable


shapes = dict(
    seed=st.integers(0, 2**16),
    lead=st.sampled_from([(5,), (2, 7), (3, 1, 4)]),
    K=st.integers(3, 40),
    Ns=st.lists(st.integers(1, 33), min_size=2, max_size=3),
    rank=st.integers(1, 12),
    bias=st.booleans(),
)


@settings(max_examples=40, deadline=None)
@given(**shapes, x_grad=st.booleans(), wb_grad=st.booleans())
def test_group_fp32_matches_eager(seed, lead, K, Ns, rank, bias, x_grad, wb_grad):
    ranks = [rank + i for i in range(len(Ns))]
    args = _make(seed, lead, K, Ns, ranks, bias, torch.float32)
    got = _run(lora_linear_group, *args, x_grad=x_grad, wb_grad=wb_grad)
    want = _run(_eager, *args, x_grad=x_grad, wb_grad=wb_grad)
    assert len(got) == len(want)
    for g, w in zip(got, want):  # norm-wise: elementwise error follows cancellation
        assert g.shape == w.shape and g.dtype == w.dtype
        assert ((g - w).norm() / w.norm()).item() < 1e-5


def _to64(args, fn=lambda t: t):
    return [[None if t is None else fn(t.double()) for t in a]
            if isinstance(a, list) and a and not isinstance(a[0], float)
            else (fn(a.double()) if torch.is_tensor(a) else a) for a in args]


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_group_bf16_no_farther_from_fp64_than_eager(seed, lead, K, Ns, rank, bias):
    """Errors are measured against the fp64 computation on the same bf16 values and
    normalised by the same computation on absolute values (the size of the terms a
    rounding error scales with), so cancellation in a small result does not make a
    one-ulp difference in an intermediate look like a wrong answer."""
    ranks = [rank] * len(Ns)
    args16 = _make(seed, lead, K, Ns, ranks, bias, torch.bfloat16)
    ref = _run(_eager, *_to64(args16))
    scale = _run(_eager, *_to64(args16, torch.abs))
    got = _run(lora_linear_group, *args16)
    eager = _run(_eager, *args16)
    err = lambda a, r, m: ((a.double() - r).norm() / m.norm()).item()  # noqa: E731
    for g, e, r, m in zip(got, eager, ref, scale):
        assert torch.isfinite(g).all()
        assert err(g, r, m) <= 1.5 * err(e, r, m) + 2**-8, (err(g, r, m), err(e, r, m))


def test_group_under_compile_dynamic():
    args = _make(0, (2, 9), 16, [12, 5, 5], [4, 4, 4], True, torch.float32)
    fn = torch.compile(lora_linear_group, backend="aot_eager", dynamic=True)
    got = _run(fn, *args)
    want = _run(_eager, *args)
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < 1e-5
