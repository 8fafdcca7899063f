"""GPU checks at real sizes (run on the GPU machine: ``pytest -m cuda``).

In bf16 the truth is an fp32 computation on the same inputs and parameters; lorafuse
must be at least as close to it as eager bf16 is (DESIGN.md, "What correct means").
"""

import copy
import math
import os
import statistics

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    """Every GPU test compiles from a reset Dynamo: a tiny model compiled at another length
    by an earlier test would otherwise recompile with symbolic sizes (automatic dynamic
    shapes), which changes what the passes can prove (session 11: the long causal mask
    test failed after the offload tests for that reason alone)."""
    yield


# (N, K) of the seven LoRA sites of the Llama-3.1-8B shape.
SITES_8B = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("site", list(SITES_8B))
def test_lora_op_real_sizes_bf16(site):
    from lorafuse.kernels.lora import lora_linear

    N, K = SITES_8B[site]
    M, r, s = 4096, 16, 2.0
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, M // 2, K, device="cuda", generator=g).bfloat16()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    dy = torch.randn(2, M // 2, N, device="cuda", generator=g).bfloat16()

    def run(fn, *ts, dtype):
        ts = [t.detach().to(dtype).requires_grad_() for t in ts]
        y = fn(*ts)
        y.backward(dy.to(dtype))
        return [y] + [t.grad for t in ts]

    eager = lambda x, A, B: torch.nn.functional.linear(x, W.to(x.dtype)) + (x @ A.t()) @ B.t() * s  # noqa: E731
    fused = lambda x, A, B: lora_linear(x, W, None, A, B, s)  # noqa: E731
    ref = run(eager, x, A, B, dtype=torch.float64)
    got_eager = run(eager, x, A, B, dtype=torch.bfloat16)
    got = run(fused, x, A, B, dtype=torch.bfloat16)
    for name, r_, e_, f_ in zip(("y", "dx", "dA", "dB"), ref, got_eager, got):
        assert torch.isfinite(f_).all(), name
        err_f, err_e = _rel(f_, r_), _rel(e_, r_)
        print(f"{site} {name}: lorafuse {err_f:.2e} eager-bf16 {err_e:.2e}")
        assert err_f <= 1.25 * err_e + 1e-4, (name, err_f, err_e)


def test_mlp_fold_down_op_8b_shape_bf16():
    """The down op with the MLP fold (dA from gate and up, kernels/lora_gated.py) at the 8B
    shape: every output and gradient as close to fp64 as eager bf16's, and dA the unfolded
    op's within a bf16 rounding (both read the same rounded product)."""
    from lorafuse.kernels.lora import lora_linear_op

    N, K = SITES_8B["down"]
    M, r, s = 4096, 16, 2.0
    g = torch.Generator("cuda").manual_seed(5)
    gate, up = (torch.randn(2, M // 2, K, device="cuda", generator=g).bfloat16() for _ in "gu")
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    dy = torch.randn(2, M // 2, N, device="cuda", generator=g).bfloat16()

    def run(dtype, fold=None):
        ts = [t.detach().to(dtype).requires_grad_() for t in (gate, up, A, B)]
        p = torch.nn.functional.silu(ts[0]) * ts[1]
        if fold is None:  # eager PEFT
            y = torch.nn.functional.linear(p, W.to(dtype)) + (p @ ts[2].t()) @ ts[3].t() * s
        else:
            extra = (ts[0], ts[1], "silu") if fold else ()
            y = lora_linear_op(p, W, None, ts[2], ts[3], s, None, *extra)[0]
        y.backward(dy.to(dtype))
        return [y] + [t.grad for t in ts]

    ref, eager = run(torch.float64), run(torch.bfloat16)
    folded, plain = run(torch.bfloat16, True), run(torch.bfloat16, False)
    for name, r_, e_, f_, p_ in zip(("y", "dgate", "dup", "dA", "dB"), ref, eager, folded, plain):
        assert torch.isfinite(f_).all(), name
        err_f, err_e = _rel(f_, r_), _rel(e_, r_)
        print(f"down fold {name}: lorafuse {err_f:.2e} eager-bf16 {err_e:.2e}")
        assert err_f <= 1.25 * err_e + 1e-4, (name, err_f, err_e)
        assert _rel(f_, p_) <= 2.0**-8, (name, _rel(f_, p_))


def test_lora_kernels_past_int32_offsets_at_long_context():
    """Session 10: at 262,144 tokens the gate/up outputs (× 14,336) pass 2³¹ elements, and
    the Triton kernels fell back to cuBLAS with 15 GiB fp32 temporaries. Now they run over
    blocks of rows, with no fallback warning; rows on both sides of each block boundary
    equal an fp32 product of the same rows, rounded once."""
    import warnings

    from lorafuse.kernels import _dispatch
    from lorafuse.kernels import lora_triton as lt
    from lorafuse.kernels.lora import base_plus_lowrank

    M, N, K, r, s = 150_016, 14336, 4096, 16, 2.0  # M × N = 2.15e9 > 2³¹
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    h = torch.randn(M, r, device="cuda", generator=g, dtype=torch.bfloat16)
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    step = lt._rows_per_launch(x, h, torch.empty((M, N), device="meta", dtype=torch.bfloat16))
    assert step < M
    _dispatch.warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = base_plus_lowrank(x, W, None, h, B, s)
        pointer = lt.lowrank_tail_gemm(x, W.t(), h, B.t(), None, alpha2=s)
    assert not [w for w in seen if "lorafuse" in str(w.message)], [str(w.message) for w in seen]
    rows = torch.tensor([0, step - 1, step, 2 * step - 1, 2 * step, M - 1], device="cuda")
    rows = rows[rows < M]
    exact = (x[rows].float() @ W.float().t() + s * h[rows].float() @ B.float().t()).bfloat16()
    for name, out in (("forward", y), ("pointer", pointer)):
        same = (out[rows] == exact).float().mean().item()
        assert same >= 0.99, (name, same)  # one rounding of an fp32 sum: nearly all equal
    del y, pointer


@pytest.mark.parametrize("grouped", [False, True])
def test_small_lora_term_is_kept_not_rounded_away(grouped):
    """A LoRA term below half a bf16 ulp of the base output: eager PEFT (and cuBLAS's
    beta = 1 epilogue) round the base product first and lose most of it; the fused op
    must keep it on average (``captured`` ≈ 1, see bench/probe_rounding.py)."""
    from lorafuse.kernels.lora import lora_linear
    from lorafuse.kernels.lora_group import lora_linear_group

    M, K, r, s = 4096, 4096, 16, 2.0
    g = torch.Generator("cuda").manual_seed(3)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    Ws = [(torch.randn(n, K, device="cuda", generator=g) * 0.02).bfloat16() for n in (4096, 1024)]
    As = [(torch.randn(r, K, device="cuda", generator=g) / K**0.5).bfloat16() for _ in Ws]
    Bs = [(torch.randn(w.shape[0], r, device="cuda", generator=g) * 1e-4).bfloat16() for w in Ws]
    if grouped:
        ys = lora_linear_group(x, Ws, [None, None], As, Bs, [s, s])
    else:
        ys = [lora_linear(x, w, None, a, b, s) for w, a, b in zip(Ws, As, Bs)]
    for y, w, a, b in zip(ys, Ws, As, Bs):
        base = x.double() @ w.double().t()
        h = (x.double() @ a.double().t()).bfloat16().double()  # h is rounded in every path
        low = s * h @ b.double().t()
        eager = (torch.nn.functional.linear(x, w) + (x @ a.t()) @ b.t() * s).double()
        captured = lambda t: (((t - base) * low).sum() / (low * low).sum()).item()  # noqa: E731
        print(f"grouped={grouped} N={w.shape[0]}: captured lorafuse {captured(y.double()):.3f} "
              f"eager {captured(eager):.3f}")
        assert captured(y.double()) > 0.9
        assert captured(eager) < 0.5  # the probe would be meaningless if eager kept it too


def _llama_1b():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=True, max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")


def _lora_grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _loss_and_grads(model, ids, want_grads, autocast):
    """The loss, and (when asked) the LoRA gradients, which are then cleared again so the
    next model's backward starts from none (eager and compiled share parameters)."""
    with torch.set_grad_enabled(want_grads):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        if not want_grads:
            return loss, None
        loss.backward()
        grads = _lora_grads(model)
        model.zero_grad(set_to_none=True)
        return loss, grads


def test_llama_1b_shape_20_steps_against_fp32():
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters

    steps, grad_steps = int(os.environ.get("LORAFUSE_CUDA_STEPS", 20)), {1, 10, 20}
    model = get_peft_model(_llama_1b(), LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ref = copy.deepcopy(model).float()  # fp32 copy of the same parameters
    ref_params = dict(ref.named_parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    counters.clear()
    compiled = torch.compile(model, backend="lorafuse")
    g = torch.Generator("cuda").manual_seed(1)
    batches = [torch.randint(0, 128256, (2, 2048), device="cuda", generator=g) for _ in range(4)]

    rows = []
    for step in range(1, steps + 1):
        ids = batches[(step - 1) % 4]
        want_grads = step in grad_steps
        with torch.no_grad():  # the fp32 reference and eager bf16 see the same parameters
            for n, p in model.named_parameters():
                if p.requires_grad:
                    ref_params[n].copy_(p)
        loss_ref, g_ref = _loss_and_grads(ref, ids, want_grads, autocast=False)
        loss_eager, g_eager = _loss_and_grads(model, ids, want_grads, autocast=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        row = dict(step=step, fp32=loss_ref.item(), eager=loss_eager.item(), lorafuse=loss.item())
        if want_grads:
            g_lf = _lora_grads(model)
            num = lambda gs: sum((gs[n] - g_ref[n]).norm() ** 2 for n in g_ref) ** 0.5  # noqa: E731
            den = sum(g_ref[n].norm() ** 2 for n in g_ref) ** 0.5
            row["grad_err_eager"], row["grad_err_lorafuse"] = (num(g_eager) / den).item(), (num(g_lf) / den).item()
        rows.append(row)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(row, flush=True)

    assert counters["lorafuse"]["lora"] == 16 * 7
    err_l = [abs(r["lorafuse"] - r["fp32"]) for r in rows]
    err_e = [abs(r["eager"] - r["fp32"]) for r in rows]
    # Per step: no farther from fp32 than eager bf16, up to a floor far below the drift
    # ANCHORS.md measured (1e-2 .. 6e-2); on average strictly no farther.
    for r, el, ee in zip(rows, err_l, err_e):
        assert el <= 1.25 * ee + 2e-3, r
    assert sum(err_l) <= sum(err_e) * 1.05 + 1e-3
    for r in rows:
        if "grad_err_lorafuse" in r:
            assert r["grad_err_lorafuse"] <= 1.1 * r["grad_err_eager"] + 1e-3, r


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_or_masked_attention_8b_shape_bf16(padded, flash, monkeypatch):
    """The masked_attention op at the 8B attention shape in bf16: forward and gradients no
    farther from an fp32 computation than the traced masked SDPA call in bf16 is. Padded
    with ``flash``: the key-range branch (Triton flash attention with per-query bounds),
    taken whether or not it is the faster here."""
    import torch.nn.functional as F

    from lorafuse.kernels import attention as ka
    from lorafuse.kernels.attention import repeat_kv

    monkeypatch.setattr(ka, "_ranges_take_flash", lambda *a, **kw: True)

    b, hq, hkv, length, d = 2, 32, 8, 2048, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, dout = (torch.randn(b, hq, length, d, device="cuda", generator=g) for _ in range(2))
    k, v = (torch.randn(b, hkv, length, d, device="cuda", generator=g) for _ in range(2))
    keep = torch.ones(b, length, dtype=torch.bool, device="cuda")
    if padded:
        keep[1, :300] = False  # left padding in row 1
    mask = (torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None]
            & keep[:, None, :])[:, None]
    if padded:  # a fully masked query row has no defined output: let them attend to themselves
        mask = mask | torch.eye(length, dtype=torch.bool, device="cuda")
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    assert bool(flag) == (not padded)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        return [out, *torch.autograd.grad(out, ins, dout.to(dtype))]

    traced = lambda q_, k_, v_: F.scaled_dot_product_attention(  # noqa: E731
        q_, repeat_kv(k_, 4), repeat_kv(v_, 4), attn_mask=mask)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    assert bool(ok)  # causal rows, and padded rows the eye keeps non-empty, are ranges
    ours = lambda q_, k_, v_: torch.ops.lorafuse.sdpa_causal_ranges_or_masked(  # noqa: E731
        q_, k_, v_, mask, flag, ok, lo, hi, 4, None, flash)[0]
    ref = run(traced, torch.float32)
    for name, got, eager, want in zip(("out", "dq", "dk", "dv"), run(ours, torch.bfloat16),
                                      run(traced, torch.bfloat16), ref):
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) <= 1.25 * _rel(eager, want) + 1e-3, (name, _rel(got, want),
                                                                   _rel(eager, want))


@pytest.mark.parametrize("branch,backend", [("causal", None), ("left-padded", None),
                                            ("causal", "FLASH_ATTENTION"),
                                            ("left-padded", "EFFICIENT_ATTENTION")])
def test_sdpa_branches_keep_the_kernels_lse_at_the_8b_shape(branch, backend, monkeypatch):
    """The masked_attention op's causal and masked branches at the 8B attention shape, in
    the layout transformers hands them (q, k, v transposed views of (B, L, H, D)): they run
    the kernel public SDPA picks through its aten op, keep its lse, and the backward does
    not run the forward again; out equals public SDPA's (the same kernel and mask), the
    gradients within bf16 rounding of public SDPA's. Left padding leaves its padded queries
    no key at all (transformers 5.x): those rows too must match, and be finite. ``backend``
    restricts SDPA (``sdpa_kernel``, references included) as a user may: flash (the H200
    picks cuDNN, other GPUs flash) keeps its lse too; efficient is not called directly
    (public SDPA, recomputed in the backward)."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lorafuse import _torch
    from lorafuse.kernels import attention as ka

    b, hq, hkv, length, d = 2, 32, 8, 2048, 128
    g = torch.Generator(device="cuda").manual_seed(2)
    q, dout = (torch.randn(b, length, hq, d, device="cuda", generator=g,
                           dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    k, v = (torch.randn(b, length, hkv, d, device="cuda", generator=g,
                        dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    keep = torch.ones(b, length, dtype=torch.bool, device="cuda")
    if branch == "left-padded":
        keep[1, :300] = False
    mask = (torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None]
            & keep[:, None, :])[:, None]
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    assert bool(flag) == (branch == "causal") and not (branch != "causal" and bool(ok))
    forwards = []
    real = _torch.fused_sdpa_forward
    monkeypatch.setattr(_torch, "fused_sdpa_forward",
                        lambda *a, **kw: forwards.append(a[0]) or real(*a, **kw))
    restrict = sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()
    with restrict:
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse, path = torch.ops.lorafuse.sdpa_causal_ranges_or_masked(
            *ins, mask, flag, ok, lo, hi, hq // hkv, None, True)
        grads = torch.autograd.grad(out, ins, dout)
        refs = [t.detach().requires_grad_() for t in (q, k, v)]
        want = (F.scaled_dot_product_attention(*refs, is_causal=True, enable_gqa=True)
                if branch == "causal" else F.scaled_dot_product_attention(
                    refs[0], ka.repeat_kv(refs[1], 4), ka.repeat_kv(refs[2], 4),
                    attn_mask=mask))
        want_grads = torch.autograd.grad(want, refs, dout)
    print(f"{branch} ({backend or 'default'}): path {int(path)} (kernels {forwards}), lse "
          f"mean {lse.mean().item():.3f}")
    if backend == "EFFICIENT_ATTENTION":
        assert int(path) == ka.RECOMPUTED and not forwards and not lse.any()
    else:
        assert int(path) >= ka.FUSED and len(forwards) == 1, (int(path), forwards)
        assert backend is None or forwards == ["flash"], forwards
        assert torch.isfinite(lse).all() and lse.abs().sum() > 0
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
    for name, got, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert _rel(got, w) < 1e-2, (name, _rel(got, w))


def test_cudnn_backward_right_whatever_layouts_came_before():
    """torch caches cuDNN's attention backward graph per q, k, v and bias but bakes out's and
    dout's strides into it (bench/probe_cudnn_layouts.py): session 14's GPU run of the
    masked branch on q laid out (B, H, L, D) got a dq 3.7 × the reference's norm away after
    another call had built the graph. In one process, for q in both layouts, the op's masked
    branch with dout in one layout and then the other (the same q, k, v and bias: one cached
    graph, whose strides the second call must not replay wrongly), each beside public SDPA
    (dout in its out's layout): the op's output and gradients as close to an fp32
    computation as public SDPA's."""
    import torch.nn.functional as F

    from lorafuse.kernels import attention as ka

    b, hq, hkv, length, d = 2, 32, 8, 1024, 128
    g = torch.Generator(device="cuda").manual_seed(4)
    q0, dout0 = (torch.randn(b, hq, length, d, device="cuda", generator=g) for _ in range(2))
    k0, v0 = (torch.randn(b, hkv, length, d, device="cuda", generator=g) for _ in range(2))
    keep = torch.ones(b, length, dtype=torch.bool, device="cuda")
    keep[1, :150] = False
    mask = ((torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None]
             & keep[:, None]) | torch.eye(length, dtype=torch.bool, device="cuda"))[:, None]
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)

    def traced(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, ka.repeat_kv(k_, 4), ka.repeat_kv(v_, 4),
                                              attn_mask=mask)

    def ours(q_, k_, v_):
        return torch.ops.lorafuse.sdpa_causal_ranges_or_masked(
            q_, k_, v_, mask, flag, ok, lo, hi, 4, None, False)[0]

    def grads(fn, ins, dout_layout=None):
        ins = [t.detach().requires_grad_() for t in ins]
        out = fn(*ins)
        dout = dout0.to(out.dtype)
        dout = laid(dout, dout_layout) if dout_layout else torch.empty_like(out).copy_(dout)
        return [out.float(), *torch.autograd.grad(out, ins, dout)]

    def laid(t, layout):
        return t.contiguous() if layout == "bhld" else \
            t.transpose(1, 2).contiguous().transpose(1, 2)

    want = grads(traced, (q0, k0, v0))
    for q_layout in ("bhld", "blhd"):
        ins = [laid(t.to(torch.bfloat16), q_layout) for t in (q0, k0, v0)]
        for dout_layout in ("bhld", "blhd"):
            public = grads(traced, ins)
            got = grads(ours, ins, dout_layout)
            errs = [(_rel(x, w), _rel(p, w)) for x, p, w in zip(got, public, want)]
            print(f"q {q_layout}, dout {dout_layout}: " + ", ".join(
                f"{n} {e:.2e} (public {p:.2e})" for n, (e, p) in zip(("out", "dq", "dk", "dv"),
                                                                     errs)))
            for name, (e, p) in zip(("out", "dq", "dk", "dv"), errs):
                assert e <= 1.25 * p + 1e-3 and p < 2e-2, (q_layout, dout_layout, name, e, p)


def test_timer_measures_kernels_not_launches():
    """A path of many tiny kernels is launch-bound on an idle GPU: its host time per call is
    several times its kernels' time (100 launches a call: 5 timed calls stay well inside
    the GPU's queue of pending launches). time_ms (a GPU spin queued first) reports the kernels'
    time, well under the host's."""
    import time

    from lorafuse.kernels import _dispatch

    x = torch.zeros(8, device="cuda")

    def many_tiny():
        for _ in range(100):
            x.add_(1.0)

    many_tiny()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        many_tiny()
    host_ms = (time.perf_counter() - t0) * 1e3 / 5  # issuing 100 launches
    torch.cuda.synchronize()
    rng = torch.cuda.get_rng_state()
    device_ms = _dispatch.time_ms(many_tiny)
    print(f"100 tiny kernels: host {host_ms:.3f} ms a call, time_ms {device_ms:.3f} ms")
    assert device_ms < 0.7 * host_ms, (device_ms, host_ms)
    assert torch.equal(torch.cuda.get_rng_state(), rng)  # dropout's generator untouched


def test_ranges_path_timed_at_the_8b_shape(monkeypatch):
    """At the 8B attention shape, right-padded (session 12's --pad-right 256 batch), the
    masked_attention op times its flash and masked paths once and takes the faster: prints
    both times and the choice (for bench/RESULTS.md); the op's output is the masked call's
    to bf16 rounding whichever it took."""
    import torch.nn.functional as F

    from lorafuse.kernels import _dispatch
    from lorafuse.kernels import attention as ka

    monkeypatch.setattr(ka, "RANGES_PATHS", {})
    rounds, time_ms = {}, _dispatch.time_ms  # the real timer, before the patch

    def timer(fn):
        rounds.setdefault(fn.__name__, []).append(time_ms(fn))
        return rounds[fn.__name__][-1]

    monkeypatch.setattr(_dispatch, "time_ms", timer)
    b, hq, hkv, length, d = 2, 32, 8, 2048, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, length, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, length, d, device="cuda", generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    keep = torch.ones(b, length, dtype=torch.bool, device="cuda")
    keep[1, length - 200:] = False  # right padding in row 1
    mask = (torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None]
            & keep[:, None, :])[:, None]
    flag = torch.ops.lorafuse.mask_is_causal(mask)
    lo, hi, ok = torch.ops.lorafuse.mask_key_ranges(mask)
    assert bool(ok) and not bool(flag)
    out, _, path = torch.ops.lorafuse.sdpa_causal_ranges_or_masked(q, k, v, mask, flag, ok, lo,
                                                                   hi, 4, None, True)
    assert set(rounds) == {"flash", "masked"}, rounds
    times = {n: statistics.median(t) for n, t in rounds.items()}  # what pick_fastest compares
    took = int(path) == ka.FLASH_BOUNDS
    assert took == (times["flash"] < times["masked"])
    print(f"ranges batch at 8B: flash {times['flash']:.3f} ms, masked SDPA "
          f"{times['masked']:.3f} ms (forward + backward) -> {'flash' if took else 'masked'} "
          f"(path {int(path)})")
    want = F.scaled_dot_product_attention(q, ka.repeat_kv(k, 4), ka.repeat_kv(v, 4),
                                          attn_mask=mask)
    rows = keep[:, None, :, None]  # padded queries: compare the real rows
    torch.testing.assert_close(out.masked_fill(~rows, 0), want.masked_fill(~rows, 0),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("site", list(SITES_8B))
def test_forward_paths_compute_the_same_numbers(site, monkeypatch):
    """The LoRA forward's candidates (TMA, pointer, cuBLAS writing fp32) all accumulate in
    fp32 and round once; the automatic choice may take any of them, so they must agree to
    within accumulation order, and the choice must be one of them."""
    from lorafuse.kernels import lora, lora_triton

    N, K = SITES_8B[site]
    M, r, s = 4096, 16, 2.0
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    h = (torch.randn(M, r, device="cuda", generator=g)).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    want = (x.double() @ W.double().t() + s * h.double() @ B.double().t())
    modes = ["pointer", "cublas"]
    if lora_triton.tail_gemm_nt_tma_supported(x, W, h, B, None):
        modes.append("tma")
    ys = {}
    for mode in modes + ["auto"]:
        monkeypatch.setenv(lora.FWD_KERNEL_ENV, mode)
        ys[mode] = lora.base_plus_lowrank(x, W, None, h, B, s)
    ulp = want.abs().clamp_min(1e-3) * 2.0**-7  # one bf16 ulp, generously
    for mode, y in ys.items():
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all(), mode
        err = (y.double() - want).abs()
        assert (err <= ulp).float().mean() > 0.999, (mode, err.max().item())
        print(f"{site} {mode}: rel {_rel(y, want):.2e}")
    chosen = [v for k, v in lora._choice.items() if k[0] == "fwd" and k[2] == N and k[3] == K]
    assert chosen and set(chosen) <= set(modes), chosen


def test_autotuned_kernels_launched_directly_after_tuning_compute_the_same():
    """``launch_autotuned``: the first call for a shape tunes, later ones launch the chosen
    config without the autotuner. Both must be the same kernel, bit for bit: the TMA and
    pointer LoRA kernels and the 4-bit GEMM, at the q/o shape."""
    import bitsandbytes.functional as F

    from lorafuse.kernels import _dispatch, lora_triton, nf4

    M, N, K, r, s = 4096, 4096, 4096, 16, 2.0
    g = torch.Generator("cuda").manual_seed(3)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    h = torch.randn(M, r, device="cuda", generator=g).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.05).bfloat16()
    q, qs = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    kw = nf4.from_quant_state(qs)
    scales = nf4.block_scales(kw["absmax"], kw["absmax2"], kw["code2"], kw["offset"])
    calls = {  # name: (call, the autotuned kernel behind it)
        "pointer": (lambda: lora_triton.lowrank_tail_gemm(x, W.t(), h, B.t(), None, alpha2=s),
                    lora_triton._autotuned),
        "nf4": (lambda: nf4.triton_nf4_gemm(x, q, scales, kw["shape"], 64, "nf4", h=h,
                                            lora_b=B, alpha=s), nf4._nf4_autotuned),
    }
    if lora_triton.tail_gemm_nt_tma_supported(x, W, h, B, None):
        calls["tma"] = (lambda: lora_triton.tail_gemm_nt_tma(x, W, h, B, None, alpha2=s),
                        lora_triton._tma_autotuned)
    for name, (fn, kernel) in calls.items():
        first = fn()
        assert any(k[0] is kernel for k in _dispatch._tuned), name  # the next call is direct
        second = fn()
        assert torch.equal(first, second), name
        print(f"{name}: identical")


def test_h_ops_are_the_ops_second_output_on_gpu():
    """``lora_linear_h`` and ``nf4_linear_h`` (the reduced recompute of checkpoint_layers,
    partition.lowrank_only_recomputes) give their op's h bit for bit on the GPU paths, at
    the down projection's 8B shape (x' = x, and a separate x')."""
    F = pytest.importorskip("bitsandbytes.functional")
    from lorafuse.kernels import nf4

    M, N, K, r = 4096, 4096, 14336, 16
    g = torch.Generator("cuda").manual_seed(4)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    xl = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).bfloat16()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.01).bfloat16()
    for x_lora in (None, xl):
        _, h = torch.ops.lorafuse.lora_linear.default(x, W, None, A, B, 2.0, x_lora)
        assert torch.equal(torch.ops.lorafuse.lora_linear_h.default(x, A, x_lora), h)
    q, qs = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    kw = nf4.from_quant_state(qs)
    for x_lora in (x, xl):
        _, h = torch.ops.lorafuse.nf4_linear.default(
            x, q, kw["absmax"], kw["absmax2"], kw["code2"], kw["offset"], kw["shape"], 64,
            "nf4", None, A, B, 2.0, x_lora, torch.bfloat16)
        assert torch.equal(torch.ops.lorafuse.nf4_linear_h.default(x, A, x_lora), h)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_triton_dequantize_bit_exact_on_gpu(quant_type, nested):
    """The Triton 4-bit decode against bitsandbytes' CUDA kernel, 8B shapes, bit for bit."""
    BF = pytest.importorskip("bitsandbytes.functional")
    from lorafuse.kernels import nf4

    g = torch.Generator("cuda").manual_seed(2)
    for n, k in ((4096, 4096), (1024, 4096), (4096, 14336)):
        w = torch.randn(n, k, device="cuda", generator=g).bfloat16() * 0.02
        q, qs = BF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
        kw = nf4.from_quant_state(qs)
        for dtype in (torch.bfloat16, torch.float16):
            qs_d = copy.copy(qs)
            qs_d.dtype = dtype
            want = BF.dequantize_4bit(q, qs_d)
            got = nf4.triton_dequantize_4bit(q, kw["absmax"], kw.get("absmax2"), kw.get("code2"),
                                             kw.get("offset"), kw["shape"], kw["blocksize"],
                                             kw["quant_type"], dtype)
            assert got.dtype == dtype and torch.equal(got, want), (n, k, dtype)


def _small_llama():
    """A 4-layer bf16 Llama (hidden 1024) with PEFT LoRA on every linear, and one batch of
    2 × 1024 token ids; the same weights and ids at every call."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                      max_position_embeddings=2048, use_cache=False)
    ids = torch.randint(0, 4096, (2, 1024), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False))
    return model, ids


def _small_llama_fp32_grads():
    """The first step's LoRA gradients of ``_small_llama_run``'s model computed in fp32
    (the same bf16 weights upcast, eager, no autocast): the reference bf16 runs are
    measured against."""
    model, ids = _small_llama()
    model.float()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offload_exact_pinned_buffer_round_trip_and_reuse():
    """A tensor whose pinned copy PyTorch would round up by nearly 2 × (70 MiB → 128 MiB)
    goes to an exact-size buffer (cudaHostRegister): pinned, the same values there and
    back, and the same buffer again once the first copy is gone."""
    from lorafuse.kernels import offload

    x = torch.randn(35 * 2**20, device="cuda", dtype=torch.bfloat16)  # 70 MiB
    assert offload.wants_exact(x.numel() * 2)
    before = offload._exact_pool.pinned_bytes
    cpu = torch.ops.lorafuse.offload.default(x)
    torch.cuda.synchronize()
    assert cpu.is_pinned(), "registered memory not seen as pinned: reloads would be synchronous"
    assert offload._exact_pool.pinned_bytes == before + x.numel() * 2
    back = torch.ops.lorafuse.reload.default(cpu, x.device, [])
    torch.cuda.synchronize()
    assert torch.equal(back, x) and torch.equal(cpu, x.cpu())
    address = cpu.data_ptr()
    del cpu
    again = torch.ops.lorafuse.offload.default(x * 2)
    torch.cuda.synchronize()
    assert again.data_ptr() == address and torch.equal(again, (x * 2).cpu())
    assert offload._exact_pool.pinned_bytes == before + x.numel() * 2


def _small_llama_run(steps=3, history=False, keep=False, report=None, **options):
    """``_small_llama``'s model compiled by lorafuse with ``options``, trained ``steps``
    SGD steps on its batch under bf16 autocast: per step the loss, the peak memory and the
    memory held between the forward and the backward; the first step's LoRA gradients;
    the parameters at the end. ``history``: also ``"peak"``, what was allocated at the
    last step's peak (bench/memory_peak.py's report of the allocator's history).
    ``keep``: also ``"model"``, the compiled model, alive (caches keyed by its weights'
    storages drop their entries once it is freed). ``report``: a ``lorafuse.report.Report``
    that collects each compiled graph's report."""
    import functools

    import lorafuse
    from lorafuse.kernels import offload

    model, ids = _small_llama()
    if report is None:
        compiled = torch.compile(model, backend="lorafuse", options=options)
    else:
        compiled = torch.compile(model, backend=functools.partial(
            lorafuse.lorafuse_backend, _collect=report, options=options))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(list(trainable.values()), lr=0.1)
    out = {"losses": [], "peaks": [], "held": []}
    for step in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if history and step == steps - 1:
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)
        with torch.autocast("cuda", torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        out["held"].append(torch.cuda.memory_allocated())  # what the backward will need
        loss.backward()
        torch.cuda.synchronize()
        out["peaks"].append(torch.cuda.max_memory_allocated())
        if history and step == steps - 1:
            out["peak"] = _peak_report(torch.cuda.memory._snapshot())
            torch.cuda.memory._record_memory_history(enabled=None)
        assert not offload._prefetched, "a prefetch was left over"
        assert not offload._token_prefetched, "a prefetch was left over"
        out["losses"].append(loss.item())
        print(f"step {step}: loss {out['losses'][-1]:.4f}, held {_mib(out['held'][-1:])}, "
              f"peak {_mib(out['peaks'][-1:])}", flush=True)  # progress under -s
        if step == 0:
            out["grads"] = {n: p.grad.float().clone() for n, p in trainable.items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["params"] = {n: p.detach().float().clone() for n, p in trainable.items()}
    if keep:
        out["model"] = compiled
    return out


def _peak_report(snapshot) -> str:
    """bench/memory_peak.py's report (the live blocks at the peak, by allocating line)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "memory_peak.py"
    spec = importlib.util.spec_from_file_location("memory_peak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.report(snapshot, top=15)


def _mib(values):
    return f"{max(values) / 2**20:.0f} MiB"


def _assert_trains_as(got, want, ref):
    """``got``'s losses equal ``want``'s to the run-to-run noise of the attention backward,
    and its first-step LoRA gradients are no farther from the fp32 ones (``ref``)."""
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= 1e-3 * abs(b), (got["losses"], want["losses"])
    for name, g in ref.items():
        err_got, err_want = _rel(got["grads"][name], g), _rel(want["grads"][name], g)
        assert err_got <= 1.5 * err_want + 1e-3, (name, err_got, err_want)


@pytest.mark.parametrize("partition", [False, True])
def test_offload_activations_under_cuda_graphs_same_training(monkeypatch, partition):
    """offload_activations with ``"triton.cudagraphs"``: the capturable ops (tokens, fixed
    pinned buffers, the staging ring, the join; kernels/offload.py) recorded into the
    forward's and the backward's CUDA graphs (step 1 is Inductor's warm-up, step 2 records,
    steps 3-5 replay), with Inductor's graph partition as the backend sets it (off) and as
    a user may ask for it: the same losses and LoRA parameters as without offloading, no
    CUDA-graph skip, no prefetch left over (checked per step), and the report says which
    ops. (Session 32's version ran the eager ops between partitions: passed, 1.8 × slower.)"""
    import lorafuse.partition
    from torch._dynamo.utils import counters

    monkeypatch.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 2**16)
    want = _small_llama_run(steps=5)
    skips = counters["inductor"].get("cudagraph_skips", 0)
    inductor = {"triton.cudagraphs": True, **({"graph_partition": True} if partition else {})}
    from lorafuse.report import Report

    report = Report()
    got = _small_llama_run(steps=5, offload_activations=True, inductor=inductor,
                           report=report)
    print(f"losses {want['losses']} vs {got['losses']}; peak {_mib(want['peaks'])} vs "
          f"{_mib(got['peaks'])}")
    assert counters["inductor"].get("cudagraph_skips", 0) == skips, "CUDA graphs skipped"
    assert any(g.offloaded_tensors for g in report.graphs)
    assert all(g.offload_capturable for g in report.graphs if g.offloaded_tensors)
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= 1e-3 * abs(b), (got["losses"], want["losses"])
    for name, p in want["params"].items():
        assert _rel(got["params"][name], p) <= 1e-2, name


@pytest.mark.parametrize("pinned", ["pytorch", "exact"])
def test_offload_activations_same_training_less_peak_memory(monkeypatch, pinned):
    """offload_activations on the GPU (side stream, pinned memory, prefetch one ahead, a
    small in-flight limit): the same losses and LoRA parameters as without it (to the
    run-to-run noise of the attention backward), less memory held between the forward and
    the backward, a lower peak, and no prefetch left over after each backward. "exact":
    every copy that rounding would grow by an eighth goes to the exact-size buffers, which
    later steps reuse (their finalizers run from the backward)."""
    import lorafuse.partition
    from lorafuse.kernels import offload

    monkeypatch.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 2**16)
    monkeypatch.setattr(offload, "INFLIGHT_BYTES", 2**24)  # this model offloads ~10 × that
    monkeypatch.setattr(offload, "EXACT_MIN_BYTES", 0 if pinned == "exact" else 2**62)
    pool, pins, returns = offload._exact_pool, [], []
    monkeypatch.setattr(pool, "_pin", lambda a, n, pin=pool._pin: pins.append(n) or pin(a, n))
    monkeypatch.setattr(pool, "_give_back",
                        lambda *a, back=pool._give_back: returns.append(a[1]) or back(*a))
    want = _small_llama_run(history=True)
    got = _small_llama_run(history=True, offload_activations=True)
    if pinned == "exact":
        print(f"exact-size buffers: {len(pins)} pinned ({sum(pins) / 2**20:.1f} MiB), "
              f"{len(returns)} returns over 3 steps")
        # step 1 pins one buffer per offloaded tensor; steps 2 and 3 reuse them all
        assert pins and sorted(returns) == sorted(pins * 3), (len(pins), len(returns))
    else:
        assert not pins
    print(f"losses {want['losses']} vs {got['losses']}; peak {_mib(want['peaks'])} vs "
          f"{_mib(got['peaks'])}; held after the forward {_mib(want['held'])} vs "
          f"{_mib(got['held'])}")
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= 1e-3 * abs(b), (got["losses"], want["losses"])
    for name, p in want["params"].items():
        assert _rel(got["params"][name], p) <= 1e-2, name
    assert max(got["held"][1:]) < max(want["held"][1:]), (got["held"], want["held"])
    if max(got["peaks"][1:]) >= max(want["peaks"][1:]):
        # Session 20 (with the MLP fold): 512.3 against 500.7 MB here, while the memory
        # held after the forward fell 444 -> 239 MiB: Inductor's reordering for peak memory
        # had hoisted the reloads (session 21; offloading graphs now compile without it,
        # 351.6 MB). The failure says where each run's last step peaked, and the peak with
        # that reordering back on, to tell whether it is the cause again.
        reordered = _small_llama_run(offload_activations=True,
                                     inductor={"reorder_for_peak_memory": True})
        pytest.fail(f"peaks {got['peaks']} with offloading, {want['peaks']} without, "
                    f"{reordered['peaks']} with offloading and reorder_for_peak_memory on"
                    f"\nwithout offloading:\n{want['peak']}\nwith offloading:\n{got['peak']}")


def test_drop_logits_same_losses_on_gpu():
    """drop_logits with the loss pass on the GPU (the op's CUDA path, bf16 autocast): the
    same losses as the loss pass returning the logits (to the run-to-run noise of the
    attention backward, as the offload test), first-step LoRA gradients no farther from
    the fp32 gradients than that run's, and a peak no higher.

    (Session 8: the two bf16 runs' gradients differed by up to 1.2 % on layer 0's
    lora_A, with the first losses bitwise equal: two compiled graphs round differently.
    Each is therefore measured against fp32, not against the other.)"""
    passes = ["lora", "attention", "loss"]
    want = _small_llama_run(passes=passes)
    got = _small_llama_run(passes=passes, drop_logits=True)
    ref = _small_llama_fp32_grads()
    print(f"losses {want['losses']} vs {got['losses']}; peak {_mib(want['peaks'])} vs "
          f"{_mib(got['peaks'])}")
    for a, b in zip(got["losses"], want["losses"]):
        assert abs(a - b) <= 1e-3 * abs(b), (got["losses"], want["losses"])
    worst = 0.0
    for name, g in ref.items():
        err_got, err_want = _rel(got["grads"][name], g), _rel(want["grads"][name], g)
        worst = max(worst, err_got / err_want)
        assert err_got <= 1.5 * err_want + 1e-3, (name, err_got, err_want)
    print(f"largest ratio of the two runs' gradient errors against fp32: {worst:.2f}")
    assert max(got["peaks"]) <= max(want["peaks"]), (got["peaks"], want["peaks"])


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_loss_triton_rows_at_the_8b_vocab(softcap, monkeypatch):
    """LORAFUSE_LOSS_IMPL=triton at Llama-3.1-8B's head (H 4096, V 128256, bf16, 2050
    rows over several chunks, some ignored): the loss within 1e-5 of the PyTorch path's,
    the gradients within a bf16 rounding of it, and no farther from fp32 (fp64 here) than
    eager bf16's; no fallback."""
    import warnings

    from lorafuse.kernels import loss as loss_kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    N, H, V = 2050, 4096, 128256
    hidden = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, H, device="cuda", generator=g) * H ** -0.5).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::7] = -100

    def run(impl):
        monkeypatch.setenv("LORAFUSE_LOSS_IMPL", impl)
        hidden.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss = loss_kernels.linear_cross_entropy(hidden, weight, labels, softcap)
            loss.backward()
        return loss.detach(), hidden.grad.clone()

    monkeypatch.setattr(loss_kernels, "CHUNK_ROWS", 700)  # three chunks, the last short
    (loss, dh), (t_loss, t_dh) = run("triton"), run("torch")
    h64 = hidden.detach().double().requires_grad_()
    ref = loss_kernels.linear_cross_entropy_reference(h64, weight.double(), labels, softcap)[0]
    ref.backward()
    h_eager = hidden.detach().requires_grad_()
    z = h_eager @ weight.t()  # eager bf16, as transformers computes it
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    eager = torch.nn.functional.cross_entropy(z.float(), labels)
    e_dh = torch.autograd.grad(eager, h_eager)[0]
    print(f"loss {loss.item():.6f} torch path {t_loss.item():.6f} fp64 {ref.item():.6f}; "
          f"dh rel err {_rel(dh, h64.grad):.2e} (torch path {_rel(t_dh, h64.grad):.2e}, "
          f"eager {_rel(e_dh, h64.grad):.2e})")
    assert abs(loss.item() - t_loss.item()) <= 1e-5 * abs(t_loss.item())
    assert _rel(dh, t_dh) <= 2.0**-7
    assert _rel(dh, h64.grad) <= 1.5 * _rel(e_dh, h64.grad) + 1e-6


@pytest.mark.parametrize("mode,prefetch", [(True, 1), ("full", 1), (True, 2)])
def test_checkpoint_layers_on_gpu(mode, prefetch):
    """checkpoint_layers (with offloading) on the GPU, bf16 autocast: the same losses as
    without it (to the run-to-run noise of the attention backward), first-step LoRA
    gradients no farther from fp32 than that run's, less memory held between the forward
    and the backward. "full" also replays SDPA's RNG state in the recompute (torch's
    functionalized RNG under Inductor), which only this test runs on CUDA. ``prefetch`` 2:
    each copy back starts two reloads ahead (``offload_prefetch``), and none is left over."""
    passes = ["lora", "attention", "loss"]
    want = _small_llama_run(passes=passes)
    got = _small_llama_run(passes=passes, checkpoint_layers=mode, offload_activations=True,
                           offload_prefetch=prefetch)
    ref = _small_llama_fp32_grads()
    print(f"losses {want['losses']} vs {got['losses']}; held {_mib(want['held'])} vs "
          f"{_mib(got['held'])}; peak {_mib(want['peaks'])} vs {_mib(got['peaks'])}")
    _assert_trains_as(got, want, ref)
    assert max(got["held"]) < max(want["held"]), (got["held"], want["held"])


@pytest.mark.parametrize("storage,cos_min", [("int8", 0.9995), ("fp8", 0.995)])
def test_quantized_storage_on_gpu(storage, cos_min):
    """activation_dtype on the GPU, where Inductor compiles the inlined (de)quantisation
    into Triton kernels: the first loss as without it (the forward computes the same), the
    first step's LoRA gradients within the CPU test's cosine bounds, less memory held
    between the forward and the backward."""
    want = _small_llama_run(steps=1)
    got = _small_llama_run(steps=1, activation_dtype=storage)
    print(f"{storage}: held after the forward {_mib(want['held'])} vs {_mib(got['held'])}; "
          f"peak {_mib(want['peaks'])} vs {_mib(got['peaks'])}")
    assert abs(got["losses"][0] - want["losses"][0]) <= 1e-3 * abs(want["losses"][0])
    for name, g in want["grads"].items():
        cos = torch.nn.functional.cosine_similarity(got["grads"][name].flatten(), g.flatten(),
                                                    dim=0)
        assert cos >= cos_min, (name, cos.item())
    assert got["held"][0] < want["held"][0], (got["held"], want["held"])


@pytest.mark.parametrize("N", [4096, 2050])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_triton_kernels_real_sizes(N, dtype):
    """The RMSNorm and LayerNorm Triton kernels, called directly (the op would fall back to
    PyTorch with a warning if a kernel raised), at the 8B width and an odd one: output and
    every gradient against fp32 math on the same inputs, no farther than eager in ``dtype``
    (+ one rounding)."""
    from lorafuse.kernels import norm

    g = torch.Generator("cuda").manual_seed(N)
    M = 4 * 2048 + 3
    x = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(N, device="cuda", generator=g)).to(dtype)
    b = (0.1 * torch.randn(N, device="cuda", generator=g)).to(dtype)
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    slack = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5

    def eager_and_fp32(fn, *params):
        out = []
        for cast in (lambda t: t, lambda t: t.float()):
            xs = cast(x).detach().clone().requires_grad_()
            ps = [cast(p).detach().clone().requires_grad_() for p in params]
            y = fn(xs, *ps)
            y.backward(cast(dy))
            out.append([y.detach().float()] + [t.grad.float() for t in (xs, *ps)])
        return out

    # LayerNorm
    y, mean, rstd = norm.layer_norm_forward_triton(x, w, b, 1e-5)
    dx, dw, db = norm.layer_norm_backward_triton(dy, x, w, mean, rstd, True, True, True)
    eager, want = eager_and_fp32(lambda t, w_, b_: torch.nn.functional.layer_norm(
        t, (N,), w_, b_, 1e-5), w, b)
    for name, got, e, r in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), eager, want):
        assert _rel(got.float(), r) <= _rel(e, r) + slack, (name, _rel(got.float(), r),
                                                            _rel(e, r))

    # RMSNorm as Llama writes it (normalise in fp32, cast, times weight)
    def llama_rms(t, w_):
        t32 = t.float()
        n = t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w_ * n.to(t.dtype)

    y, rstd = norm.rms_norm_forward_triton(x, w, 1e-6, 0.0, True, dtype)
    dx, dw = norm.rms_norm_backward_triton(dy, x, w, rstd, 0.0, True, True, True)
    eager, want = eager_and_fp32(llama_rms, w)
    for name, got, e, r in zip(("y", "dx", "dw"), (y, dx, dw), eager, want):
        assert _rel(got.float(), r) <= _rel(e, r) + slack, (name, _rel(got.float(), r),
                                                            _rel(e, r))


def test_long_causal_mask_proven_by_rows_on_gpu(monkeypatch):
    """At 1 × 8192 tokens transformers' compiled causal mask is 64 Mi booleans, above the
    attention pass's 2²⁴-element limit: it must be proven causal by blocks of rows (blocks
    made small here), on the GPU machine's torch too, whose Dynamo records ``==`` as
    ``__eq__`` (session 9: the pass gave up there and the step ran 1.8 × slower), with the
    proof never building a tensor of half the mask's bytes, and every SDPA call made
    causal."""
    import lorafuse.kernels.attention
    from conftest import VOCAB, make_tiny_model
    from lorafuse.backend import lorafuse_backend
    from lorafuse.report import Report

    import lorafuse.passes.attention as pa

    monkeypatch.setattr(lorafuse.kernels.attention, "ROW_BLOCK_ELEMENTS", 2**21)
    built, run = [], pa._run  # every tensor the proof builds, by rows or whole

    def recording_run(n, args, kwargs):
        out = run(n, args, kwargs)
        if isinstance(out, torch.Tensor):
            built.append((out.numel() * out.element_size(), n.name, tuple(out.shape)))
        return out

    monkeypatch.setattr(pa, "_run", recording_run)
    length, layers = 8192, 2
    # bf16: SDPA's flash backend takes GQA without an L² buffer; in fp32, eager and the
    # rewrite alike fall to the math backend (2.6 GiB here), which would hide the proof.
    model = make_tiny_model("llama", layers=layers).cuda().to(torch.bfloat16)
    report = Report()
    peaks = []

    def backend(gm, ex):  # the peak of the compile alone (the passes' proof runs there)
        compiled = lorafuse_backend(gm, ex, options={"passes": ["attention"]}, _collect=report)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        return compiled

    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, VOCAB, (1, length), device="cuda")
    with torch.no_grad():
        # The reference first: it also allocates cuBLAS's workspaces (tens of MiB on
        # Hopper, kept), which would otherwise count as the compiled call's.
        want = model(input_ids=ids).logits
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = compiled(input_ids=ids).logits
        torch.cuda.synchronize()
        step = torch.cuda.max_memory_allocated() - base
    att = next(p for p in report.graphs[0].passes if p.name == "attention")
    assert att.matched == [f"sdpa.{i} (causal+gqa)" for i in range(layers)], att.skipped
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    extra = max(peaks) - base
    largest = max(built)
    # Session 13: the compile's peak on the GPU machine (torch 2.11) was 61 MiB above the
    # weights, the forward's 67 MiB; on the CPU (torch 2.13, transformers 5.17 and 5.24)
    # the proof builds nothing above 2 MiB and no mask-sized node reaches Inductor. The
    # bound is on what the proof builds; the peaks are printed for bench/RESULTS.md.
    print(f"largest tensor the proof built: {largest[0] / 2**20:.1f} MiB ({largest[1]} "
          f"{largest[2]}); compile's peak above the weights {extra / 2**20:.1f} MiB, with "
          f"the forward {step / 2**20:.1f} MiB (the mask: {length**2 / 2**20:.0f})")
    assert largest[0] < length * length // 2, largest


def test_tiled_mlp_on_gpu():
    """The tiled_mlp pass on the GPU, bf16 autocast, with checkpoint_layers="full" and
    offloading (the long-context configuration), chunks of 512 of the 2048 tokens: the same
    losses as without the pass (to the run-to-run noise of the attention backward),
    first-step LoRA gradients no farther from fp32 than that run's, and a lower peak from the
    second step (the MLP's 2048 × 4096 intermediates exist for one chunk at a time)."""
    base = {"passes": ["lora", "attention", "loss"], "checkpoint_layers": "full",
            "offload_activations": True}
    want = _small_llama_run(**base)
    got = _small_llama_run(**{**base, "passes": ["lora", "tiled_mlp", "attention", "loss"]},
                           tiled_mlp_tokens=512)
    ref = _small_llama_fp32_grads()
    print(f"losses {want['losses']} vs {got['losses']}; peak {_mib(want['peaks'])} vs "
          f"{_mib(got['peaks'])}")
    _assert_trains_as(got, want, ref)
    # Compared from the second step. The first autotunes the Triton kernels at the chunk's
    # shapes (new keys), and triton.testing.do_bench allocates a 256 MiB L2-flush buffer
    # for each tuning (session 15: step 1 peaked at 496 MiB against 348 without the pass,
    # later steps at 325 against 354); step 1 may exceed the other run by that buffer.
    assert max(got["peaks"][1:]) < max(want["peaks"][1:]), (got["peaks"], want["peaks"])
    assert got["peaks"][0] <= max(want["peaks"]) + 2**28, (got["peaks"], want["peaks"])


@pytest.mark.parametrize("site", list(SITES_8B))
def test_fp8_dx_real_sizes_on_gpu(site):
    """fp8_dx at the 8B sites on the GPU: the Triton quantisation of dy (three sources) and
    the Triton transposed cast of W (fp8_copies=False) give PyTorch's e4m3 bytes, and the
    e4m3 GEMM equals the plain-PyTorch oracle to the output's rounding and
    stays within the stated bound of the exact dy W (relative norm ≤ 8 %, cosine ≥ 0.995);
    on a GPU before sm90 it does not apply (``applies`` says no, with its warning: the ops
    keep the exact dy W)."""
    from lorafuse.kernels import fp8_dx as fp8

    N, K = SITES_8B[site]
    M = 4096
    fp8.weight_cache.clear()
    g = torch.Generator("cuda").manual_seed(0)
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
    if torch.cuda.get_device_capability() < (9, 0):
        from lorafuse.kernels._dispatch import warned

        warned.clear()  # the warning is once per process: let this call give it
        with pytest.warns(RuntimeWarning, match="fp8_dx does not apply"):
            assert not fp8.applies([dy], [W])
        return
    q, sa = fp8.quantize_dy(list(dy.split([N // 4, N // 4, N // 2], 1)))  # the kernel, 3 sources
    q_ref, sa_ref = fp8.quantize_rows(dy)  # PyTorch's cast
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(sa, sa_ref)
    # fp8_copies=False: the Triton transposed cast gives the kept copy's bytes, in slices
    wq_ref, sb_ref = fp8.quantize_weight_t(W)
    parts = list(W.split([N // 4, N // 4, N // 2], 0))
    assert torch.equal(fp8.weight_scales(parts), sb_ref)
    wq = fp8.cast_weights_t(parts, (1.0 / sb_ref).reshape(-1))
    assert torch.equal(wq.view(torch.uint8), wq_ref.view(torch.uint8))
    got = fp8.fp8_dx([dy], [W])
    oracle = fp8.fp8_dx_reference(dy, W)
    exact = dy.double() @ W.double()
    assert _rel(got, oracle) <= 2 ** -7  # one bf16 rounding, fp32 sums in another order
    assert _rel(oracle, exact) <= 0.08
    cos = torch.nn.functional.cosine_similarity(oracle.double().flatten(), exact.flatten(), dim=0)
    assert cos >= 0.995
    assert len(fp8.weight_cache) == 1 and fp8.fp8_dx([dy], [W]).equal(got)  # cached, same numbers
    assert fp8.fp8_dx([dy], [W], copies=False).equal(got)
    fp8.weight_cache.clear()
    fp8.scale_cache.clear()


def test_fp8_recompute_gate_up_at_the_8b_shape():
    """fp8_recompute's group op at the 8B gate/up sites (x 4096 × 4096, W 2 × 14336 × 4096,
    r 16) on the GPU: the Triton quantisation and ``_scaled_mm`` run (no fallback), h is
    the exact op's bitwise, each y equals the plain-PyTorch oracle to its roundings and
    stays within the stated bound of the exact op (relative norm ≤ 8 %, cosine ≥ 0.995);
    on a GPU before sm90 it does not apply and the outputs are the exact op's."""
    from lorafuse.kernels import fp8_recompute as fr
    from lorafuse.kernels.lora_group import lora_linear_group_op

    M, K, N, r = 4096, 4096, 14336, 16
    g = torch.Generator("cuda").manual_seed(0)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()

    x = rn(2, M // 2, K)
    ws = [rn(N, K, scale=K ** -0.5) for _ in range(2)]
    As = [rn(r, K, scale=K ** -0.5) for _ in range(2)]
    Bs = [rn(N, r, scale=0.1) for _ in range(2)]
    got = fr.lora_linear_group_fp8_op(x, ws, [None, None], As, Bs, [2.0, 2.0])
    exact = lora_linear_group_op(x, ws, [None, None], As, Bs, [2.0, 2.0])
    if torch.cuda.get_device_capability() < (9, 0):  # no rowwise fp8 GEMM: the exact op
        assert not fr.applies(x.reshape(-1, K), ws)
        assert all(torch.equal(a, b) for a, b in zip(got, exact))
        return
    assert fr.applies(x.reshape(-1, K), ws) and not fr._failed, fr._failed
    assert torch.equal(got[-1], exact[-1])
    x2, h = x.reshape(-1, K), exact[-1].reshape(-1, 2 * r).float()
    for i in range(2):
        oracle = fr.fp8_linear_reference(x2, ws[i]) + h[:, i * r:(i + 1) * r] @ Bs[i].float().t() * 2.0
        assert _rel(got[i].reshape(M, N), oracle) <= 3 * 2 ** -8, i
        assert _rel(got[i], exact[i]) <= 0.08, i
        cos = torch.nn.functional.cosine_similarity(got[i].double().flatten(),
                                                    exact[i].double().flatten(), dim=0)
        assert cos >= 0.995, i


def test_fp8_dx_under_cuda_graphs():
    """fp8_dx under Inductor's CUDA graphs (issue 3's fastest configuration) on a small
    Llama: the same losses as without the graphs (to the attention backward's run-to-run
    noise) and first-step gradients no farther from fp32; the recorded backward read every
    fp8 weight copy, so the cache marked each one, and ``clear`` keeps them for the graphs
    (warned) until ``release_graph_held`` after the graphs are reset. Before sm90 fp8_dx
    does not apply: no copy is made, and it trains."""
    from lorafuse.kernels import fp8_dx as fp8

    fp8.weight_cache.clear()
    fp8.weight_cache.release_graph_held()
    if torch.cuda.get_device_capability() < (9, 0):
        got = _small_llama_run(fp8_dx=True, inductor={"triton.cudagraphs": True})
        assert len(fp8.weight_cache) == 0 and all(math.isfinite(l) for l in got["losses"])
        return
    want = _small_llama_run(fp8_dx=True)
    fp8.weight_cache.clear()  # no graph read these: freed without a warning
    assert not fp8.weight_cache._graph_held
    got = _small_llama_run(keep=True, fp8_dx=True, inductor={"triton.cudagraphs": True})
    _assert_trains_as(got, want, _small_llama_fp32_grads())
    entries = len(fp8.weight_cache)  # the model lives: its weights' entries too
    # q/k/v, o, gate/up, down in each of 4 layers; not the first q/k/v (no dx below them)
    assert entries == 4 * 4 - 1, entries
    assert len(fp8.weight_cache._captured) == entries, "the recording's reads were not marked"
    with pytest.warns(RuntimeWarning, match=f"reading {entries} of its entries"):
        fp8.weight_cache.clear()
    del got["model"]
    torch.compiler.reset()  # the graphs go
    assert fp8.weight_cache.release_graph_held() > 0
