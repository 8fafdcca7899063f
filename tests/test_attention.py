"""The attention pass: SDPA with a proven-causal mask → ``is_causal=True``; repeat_kv →
``enable_gqa=True``. Checked three ways: the mask test itself (property-tested against
SDPA's own causal mask), a small attention module compiled vs eager, and tiny models
trained a few steps compiled vs eager (fp32: losses and every LoRA gradient)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import lorafuse
from conftest import VOCAB, assert_close_fp32, lora_params, make_tiny_model
from lorafuse.passes.attention import is_causal_mask
from lorafuse.report import Report

# ----------------------------------------------------------------- the causal-mask test


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), lq=st.integers(1, 9), extra=st.integers(0, 3),
       form=st.sampled_from(["bool4", "bool2", "float_inf", "float_min", "bool_b1"]),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 8), st.integers(0, 11))))
def test_is_causal_mask_agrees_with_sdpa(b, h, lq, extra, form, flip):
    """``is_causal_mask`` says yes exactly when SDPA with the mask equals SDPA with
    ``is_causal=True`` on random q, k, v (never on a mask that differs anywhere)."""
    lkv = lq + extra
    allowed = torch.ones(lq, lkv, dtype=torch.bool).tril()
    if flip is not None:
        i, j = flip[0] % lq, flip[1] % lkv
        allowed[i, j] = ~allowed[i, j]
    if form == "bool4":
        mask = allowed.expand(b, 1, lq, lkv)
    elif form == "bool_b1":
        mask = allowed.expand(b, h, lq, lkv).clone()
    elif form == "bool2":
        mask = allowed
    else:
        low = float("-inf") if form == "float_inf" else torch.finfo(torch.float32).min
        mask = torch.zeros(lq, lkv).masked_fill(~allowed, low)
    q = torch.randn(b, h, lq, 8, dtype=torch.float64)
    k, v = torch.randn(2, b, h, lkv, 8, dtype=torch.float64)
    same = flip is None or bool(allowed.eq(torch.ones(lq, lkv, dtype=torch.bool).tril()).all())
    assert is_causal_mask(mask, q.shape, k.shape) == same
    if same:  # the claim the rewrite rests on
        m = mask if mask.dtype == torch.bool else mask.double()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(got, want)


def test_is_causal_mask_rejects_partial_masks():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    padded = causal.expand(2, 1, 4, 4).clone()
    padded[1, :, :, 0] = False  # a left-padded row
    assert not is_causal_mask(padded, (2, 2, 4, 8), (2, 2, 4, 8))
    assert not is_causal_mask(torch.zeros(4, 4).masked_fill(~causal, -1e4),  # not -inf
                              (1, 1, 4, 8), (1, 1, 4, 8))
    assert not is_causal_mask(causal.int(), (1, 1, 4, 8), (1, 1, 4, 8))
    assert not is_causal_mask(causal[:3], (1, 1, 4, 8), (1, 1, 4, 8))  # does not broadcast


# ----------------------------------------------------------------- an attention module


class GQAttention(torch.nn.Module):
    """What transformers does under tracing: mask from aranges, repeat_kv, SDPA."""

    def __init__(self, heads=4, kv_heads=2, dim=8, mask="causal"):
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.mask = heads, kv_heads, dim, mask
        self.q = torch.nn.Linear(heads * dim, heads * dim)
        self.kv = torch.nn.Linear(heads * dim, 2 * kv_heads * dim)

    def forward(self, x):
        b, length, _ = x.shape
        n = self.heads // self.kv_heads
        q = self.q(x).view(b, length, self.heads, self.dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.kv_heads, self.dim).permute(2, 0, 3, 1, 4)
        k = k[:, :, None, :, :].expand(b, self.kv_heads, n, length, self.dim)
        k = k.reshape(b, self.heads, length, self.dim)
        v = v[:, :, None, :, :].expand(b, self.kv_heads, n, length, self.dim)
        v = v.reshape(b, self.heads, length, self.dim)
        pos = torch.arange(length, device=x.device)
        mask = pos[None, :] <= pos[:, None]
        if self.mask == "window":  # a sliding window: not causal
            mask = mask & (pos[:, None] - pos[None, :] < 3)
        mask = mask[None, None].expand(b, 1, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, -1)


@pytest.mark.parametrize("mask,kv_heads,want", [("causal", 2, "causal+gqa"),
                                                ("causal", 4, "causal"),
                                                ("window", 2, None)])
def test_attention_module_compiled_matches_eager(fresh_dynamo, mask, kv_heads, want):
    torch.manual_seed(0)
    mod = GQAttention(kv_heads=kv_heads, mask=mask)
    x = torch.randn(2, 11, 32, requires_grad=True)
    report = Report()
    compiled = torch.compile(mod, backend=_collecting(report))
    got = compiled(x)
    want_out = mod(x)
    assert_close_fp32(got, want_out, what="output")
    gx, *gp = torch.autograd.grad(got.square().sum(), [x, *mod.parameters()])
    wx, *wp = torch.autograd.grad(want_out.square().sum(), [x, *mod.parameters()])
    for g, w in zip([gx, *gp], [wx, *wp]):
        assert_close_fp32(g, w, what="gradient")
    att = report.graphs[0].passes[[p.name for p in report.graphs[0].passes].index("attention")]
    if want is None:
        assert att.matched == [] and att.skipped == [("sdpa.0", "mask is not causal")]
    else:
        assert att.matched == [f"sdpa.0 ({want})"]
        assert counters["lorafuse"]["attention"] == 1


def _collecting(report):
    from lorafuse.backend import lorafuse_backend

    return lambda gm, ex: lorafuse_backend(gm, ex, _collect=report)


# ----------------------------------------------------------------- whole tiny models


def _train_side_by_side(model, batches):
    """Train ``model`` compiled and an eager copy on the same batches (no attention_mask:
    the case the pass rewrites); return both loss lists, the last gradients and the report."""
    eager = copy.deepcopy(model)
    report = Report()
    compiled = torch.compile(model, backend=_collecting(report))
    out = {"eager": ([], None), "lorafuse": ([], None)}
    for name, fwd, m in (("eager", eager, eager), ("lorafuse", compiled, model)):
        opt = torch.optim.AdamW(lora_params(m).values(), lr=1e-2)
        losses = []
        for ids in batches:
            loss = fwd(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in lora_params(m).items()}
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        out[name] = (losses, grads)
    return out, report


@pytest.mark.slow
@pytest.mark.parametrize("arch,overrides,want", [
    ("llama", {}, "causal+gqa"),
    ("mistral", {"sliding_window": 5}, None),  # the window makes the mask non-causal
])
def test_tiny_model_trains_like_eager(fresh_dynamo, arch, overrides, want):
    model = make_tiny_model(arch, **overrides)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(3)]
    out, report = _train_side_by_side(model, batches)
    (el, eg), (cl, cg) = out["eager"], out["lorafuse"]
    for step, (a, b) in enumerate(zip(cl, el), 1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"loss at step {step}")
    for n in eg:
        assert_close_fp32(cg[n], eg[n], rtol=1e-4, what=n)
    layers = model.config.num_hidden_layers
    att = next(p for p in report.graphs[0].passes if p.name == "attention")
    if want:
        assert att.matched == [f"sdpa.{i} ({want})" for i in range(layers)]
        assert counters["lorafuse"]["attention"] == layers
    else:
        assert att.matched == [] and {r for _, r in att.skipped} == {"mask is not causal"}
