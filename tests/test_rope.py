"""The rope op (``lorafuse::rope``), its Triton kernel and the rope pass; whole models
with the rope and gated_mlp passes.

- Op (CPU: the PyTorch reference) against transformers' own ``apply_rotary_pos_emb``
  (Llama's for full rotary, Phi-3's for partial), drawn by hypothesis: GQA (k with fewer
  heads), odd head_dim and odd half widths, partial rotary, HF's two layouts
  (unsqueeze_dim 1 and 2), cos/sin per batch row or shared, cos/sin whose halves differ
  (so the backward's transposed rotation is checked, not rope with −sin). fp32: output
  and both input gradients equal eager to rtol 1e-5. bf16/fp16: against the fp32
  computation on the same inputs, the op's error is at most 1.5 × eager's (+ fp32 noise).
- Triton kernel under TRITON_INTERPRET=1 in a subprocess (this file run as a script),
  against the reference path.
- The pass on Dynamo graphs without Inductor: what it matches and what it leaves alone.
- Whole models: tiny Llama (2 layers) compiled with ``backend=lorafuse`` and passes
  (lora, rope, gated_mlp) against eager for 3 AdamW steps: loss at every step, every
  LoRA gradient, one rope op and one gated-MLP op per layer. Qwen2, Qwen3, Gemma2,
  Phi-3 (partial rotary, fused gate_up) and GPT-2 (neither pattern) go through the same
  passes with the rewritten graph run eagerly (CPU Inductor compiles cost ~30 s each).
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import CheckRecorder, assert_check_passed, run_interpreter_worker

# --------------------------------------------------------------------------- eager code


def eager_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (Phi-3's where the rotation is partial)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as full
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as partial

    fn = full if cos.shape[-1] == q.shape[-1] else partial
    return fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def op_rope(q, k, cos, sin, unsqueeze_dim=1):
    from lorafuse.kernels.rope import rope

    return rope(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))


def make_inputs(B, Hq, Hk, S, D, R, layout, cos_batch, seed, dtype=torch.float32,
                cs_dtype=None):
    """q, k (leaves needing gradients, in HF's layout: bhsd is a transposed view of the
    projection), cos, sin [cos_batch, S, R] with halves that differ, and upstream grads."""
    g = torch.Generator().manual_seed(seed)
    cs_dtype = cs_dtype or dtype

    def leaf(H):
        t = torch.randn(B, S, H, D, generator=g).to(dtype)
        if layout == "bhsd":  # q.view(B, S, H, D).transpose(1, 2)
            return t.requires_grad_(), lambda x: x.transpose(1, 2)
        return t.requires_grad_(), lambda x: x

    (q, fq), (k, fk) = leaf(Hq), leaf(Hk)
    cos = torch.randn(cos_batch, S, R, generator=g).to(cs_dtype)
    sin = torch.randn(cos_batch, S, R, generator=g).to(cs_dtype)
    shape_q = fq(q).shape
    dq = torch.randn(shape_q, generator=g)
    dk = torch.randn(fk(k).shape, generator=g)
    return q, k, fq, fk, cos, sin, dq, dk


def run_rope(fn, q, k, fq, fk, cos, sin, dq, dk, unsqueeze_dim, ref=False):
    """[rope(q), rope(k), dq, dk] through ``fn``; ``ref``: everything in fp32 first."""
    cast = (lambda t: t.detach().float()) if ref else (lambda t: t.detach())
    ql, kl = cast(q).requires_grad_(), cast(k).requires_grad_()
    yq, yk = fn(fq(ql), fk(kl), cast(cos), cast(sin), unsqueeze_dim)
    gq, gk = torch.autograd.grad((yq, yk), (ql, kl), (dq.to(yq.dtype), dk.to(yk.dtype)))
    return [yq.detach(), yk.detach(), gq, gk]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_no_worse(got, eager, ref, what, slack=1.5):
    """got's distance from the fp32 reference ≤ slack × eager's, plus fp32 noise."""
    floor = 1e-6 * ref.double().norm().item()
    err = (got.double() - ref.double()).norm().item()
    err_eager = (eager.double() - ref.double()).norm().item()
    assert err <= slack * err_eager + floor, \
        f"{what}: error {err:.3g} vs eager {err_eager:.3g} (|ref| {ref.double().norm():.3g})"


NAMES = ("q_embed", "k_embed", "dq", "dk")

# --------------------------------------------------------------------------- op: hypothesis

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

EXAMPLES = int(os.environ.get("LORAFUSE_TEST_EXAMPLES", "25"))

if st is not None:

    @st.composite
    def rope_cases(draw):
        B, S, Hk = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
        half = draw(st.integers(1, 6))
        return dict(B=B, Hq=Hk * draw(st.integers(1, 3)), Hk=Hk, S=S,
                    D=2 * half + draw(st.sampled_from([0, 0, 1, 3])), R=2 * half,
                    layout=draw(st.sampled_from(["bhsd", "bshd"])),
                    cos_batch=draw(st.sampled_from([1, B])),
                    seed=draw(st.integers(0, 2**31 - 1)))

    def _unsqueeze_dim(c):
        return 1 if c["layout"] == "bhsd" else 2

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(rope_cases())
    def test_op_fp32_equals_eager(c):
        q, k, fq, fk, cos, sin, dq, dk = make_inputs(**c)
        u = _unsqueeze_dim(c)
        eager = run_rope(eager_rope, q, k, fq, fk, cos, sin, dq, dk, u)
        got = run_rope(op_rope, q, k, fq, fk, cos, sin, dq, dk, u)
        for name, a, b in zip(NAMES, got, eager):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(rope_cases(), st.sampled_from([torch.bfloat16, torch.float16]),
           st.sampled_from(["same", "float32"]))
    def test_op_low_precision_no_worse_than_eager(c, dtype, cs):
        """Half-precision q/k; cos/sin in that dtype (a bf16 model) or fp32 (autocast)."""
        cs_dtype = dtype if cs == "same" else torch.float32
        q, k, fq, fk, cos, sin, dq, dk = make_inputs(**c, dtype=dtype, cs_dtype=cs_dtype)
        dq, dk = dq.to(dtype).float(), dk.to(dtype).float()
        u = _unsqueeze_dim(c)
        eager = run_rope(eager_rope, q, k, fq, fk, cos, sin, dq, dk, u)
        got = run_rope(op_rope, q, k, fq, fk, cos, sin, dq, dk, u)
        ref = run_rope(eager_rope, q, k, fq, fk, cos, sin, dq, dk, u, ref=True)
        for name, a, b, r in zip(NAMES, got, eager, ref):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.isfinite(a).all(), name
            assert_no_worse(a, b, r, name)


def test_op_layout_fake_and_no_cos_grad():
    """Outputs keep q's and k's strides (HF's transposed views), the fake implementation
    agrees with the real one, only what needs a gradient gets one, and a cos that needs
    a gradient is refused rather than silently given none."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorafuse.kernels.rope import rope_backward_op, rope_op

    q = torch.randn(2, 7, 4, 10).transpose(1, 2)
    k = torch.randn(2, 7, 2, 10).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(2, 1, 7, 6), torch.randn(2, 1, 7, 6)
    yq, yk = rope_op(q, k, cos, sin, torch.bfloat16)
    assert (yq.stride(), yk.stride(), yq.dtype) == (q.stride(), k.stride(), torch.bfloat16)
    with FakeTensorMode() as mode:
        fq, fk = rope_op(*(mode.from_tensor(t) for t in (q, k, cos, sin)), torch.bfloat16)
    assert [(t.shape, t.stride(), t.dtype) for t in (fq, fk)] == \
        [(t.shape, t.stride(), t.dtype) for t in (yq, yk)]
    (gk,) = torch.autograd.grad(yk.float().sum(), [k])
    assert gk.shape == k.shape and gk.norm() > 0
    grads = (torch.randn(2, 7, 4, 10).transpose(1, 2), torch.randn(2, 2, 7, 10))
    real = rope_backward_op(*grads, cos, sin, torch.bfloat16, torch.float32)
    with FakeTensorMode() as mode:
        fake = rope_backward_op(*(mode.from_tensor(t) for t in (*grads, cos, sin)),
                                torch.bfloat16, torch.float32)
    assert [(t.shape, t.stride(), t.dtype) for t in fake] == \
        [(t.shape, t.stride(), t.dtype) for t in real]
    with pytest.raises(RuntimeError, match="no gradient for cos and sin"):
        yq, yk = rope_op(q, k, cos.requires_grad_(), sin, torch.float32)
        yq.sum().backward()


# --------------------------------------------------------------------------- Triton (subprocess)

DTYPES = ("float32", "bfloat16", "float16")
# (name, B, Hq, Hk, S, D, R, layout, cos per head)
TRITON_CASES = [
    ("gqa", 2, 4, 2, 5, 8, 8, "bhsd", False),
    ("partial-odd-head-dim", 1, 3, 1, 4, 11, 6, "bhsd", False),
    ("head-blocks-per-head-cos", 1, 5, 5, 3, 12, 12, "bhsd", True),
    ("bshd-gqa", 2, 4, 2, 3, 10, 10, "bshd", False),
    ("rank3", None, 3, 1, 6, 14, 10, "bhsd", False),  # [H, S, D], cos [S, R]
]


def _triton_check_ids():
    return [f"{c[0]}-{d}" for c in TRITON_CASES for d in DTYPES] + ["fallback-rank5"]


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__, LORAFUSE_ROPE_IMPL="triton")


@pytest.mark.parametrize("check", _triton_check_ids())
def test_triton_interpreter(interpreter_results, check):
    assert_check_passed(interpreter_results, check)


def _worker():
    """Runs in the subprocess (TRITON_INTERPRET=1, LORAFUSE_ROPE_IMPL=triton)."""
    import warnings

    from lorafuse.kernels import _dispatch, rope

    assert rope._INTERPRETED, "TRITON_INTERPRET did not take effect"
    record = CheckRecorder()

    def both_paths(fn):
        """fn() on the Triton path (a fallback warning is an error) and the reference."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = fn()
        os.environ["LORAFUSE_ROPE_IMPL"] = "torch"
        try:
            want = fn()
        finally:
            os.environ["LORAFUSE_ROPE_IMPL"] = "triton"
        return got, want

    def case(B, Hq, Hk, S, D, R, layout, per_head, dtype):
        g = torch.Generator().manual_seed(Hq * 100 + D)
        if B is None:  # rank 3: q [H, S, D], cos [S, R] unsqueezed at 0
            q = torch.randn(Hq, S, D, generator=g).to(dtype).requires_grad_()
            k = torch.randn(Hk, S, D, generator=g).to(dtype).requires_grad_()
            cos, sin = (torch.randn(S, R, generator=g).to(dtype) for _ in range(2))
            dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
            args = (q, k, lambda t: t, lambda t: t, cos, sin, dq, dk, 0)
            got, want = both_paths(lambda: run_rope(op_rope, *args))
            eager = run_rope(eager_rope, *args)
            ref = run_rope(eager_rope, *args, ref=True)
        elif per_head:  # cos [B, H, S, R], no broadcast
            q, k, fq, fk, _, _, dq, dk = make_inputs(B, Hq, Hk, S, D, R, layout, B, Hq, dtype)
            cos, sin = (torch.randn(B, Hq, S, R, generator=g).to(dtype) for _ in range(2))

            def per_head_rope(a, b, c, s, _u):
                return rope.rope(a, b, c, s)

            def per_head_eager(a, b, c, s, _u):
                return _per_head_eager(a, b, c, s)

            got, want = both_paths(lambda: run_rope(per_head_rope, q, k, fq, fk, cos, sin,
                                                    dq, dk, 1))
            eager = run_rope(per_head_eager, q, k, fq, fk, cos, sin, dq, dk, 1)
            ref = run_rope(per_head_eager, q, k, fq, fk, cos, sin, dq, dk, 1, ref=True)
        else:
            q, k, fq, fk, cos, sin, dq, dk = make_inputs(B, Hq, Hk, S, D, R, layout, B,
                                                         Hq * 7 + S, dtype)
            u = 1 if layout == "bhsd" else 2
            got, want = both_paths(lambda: run_rope(op_rope, q, k, fq, fk, cos, sin, dq, dk, u))
            eager = run_rope(eager_rope, q, k, fq, fk, cos, sin, dq, dk, u)
            ref = run_rope(eager_rope, q, k, fq, fk, cos, sin, dq, dk, u, ref=True)
        for name, a, b, e, r in zip(NAMES, got, want, eager, ref):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
            assert torch.isfinite(a).all(), name
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(),
                                           msg=lambda m: f"{name}: {m}")
            else:  # one rounding apart at most, and no farther from fp32 than eager
                assert rel(a, b) <= 2.0**-8, f"{name}: {rel(a, b):.3g} from the reference path"
                assert_no_worse(a, e, r, name)

    for name, *shape, per_head in TRITON_CASES:
        for d in DTYPES:
            record(f"{name}-{d}", lambda: case(*shape, per_head, getattr(torch, d)))

    def fallback():
        """Rank 5 is not the kernel's: the reference runs, with one warning."""
        _dispatch.warned.clear()
        q, k = torch.randn(2, 1, 3, 4, 8), torch.randn(2, 1, 1, 4, 8)
        cos, sin = torch.randn(2, 1, 1, 4, 8), torch.randn(2, 1, 1, 4, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = rope.rope(q, k, cos, sin)
        assert any("rank 5" in str(w.message) for w in caught), [str(w.message) for w in caught]
        want = rope.rope_reference(q, k, cos, sin, torch.float32)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    record("fallback-rank5", fallback)
    record.report()


def _per_head_eager(q, k, cos, sin):
    """HF's formula with cos/sin already shaped like q (no unsqueeze)."""
    from transformers.models.llama.modeling_llama import rotate_half

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --------------------------------------------------------------------------- the pass (no Inductor)


def pass_on(fn, *args, passes=("rope",), rtol=0.0):
    """Capture ``fn`` with Dynamo, run ``passes`` on the graph, check the rewritten graph
    computes what the original did (exactly by default: in one dtype the CPU path is the
    same torch calls); returns ({pass: PassReport}, rewritten graph)."""
    from lorafuse.passes import PASSES
    from lorafuse.report import PassReport

    out = {}

    def backend(gm, example_inputs):
        want = gm(*example_inputs)
        reports = {}
        for name in passes:
            reports[name] = PassReport(name)
            PASSES[name](gm, reports[name])
        got = gm(*example_inputs)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
        out["reports"], out["graph"] = reports, gm.graph
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out["reports"], out["graph"]


def _ops(graph, name):
    return [n for n in graph.nodes if f"lorafuse.{name}." in str(n.target)]


def _cats(graph):
    return [n for n in graph.nodes if n.target is torch.cat]


def test_pass_matches_llama_and_phi_forms():
    """Llama form with GQA on HF's transposed views, Phi-3's partial form, HF's
    unsqueeze_dim=2 layout, and an fp32 rope between casts (q.float() ... .to(bf16))."""
    from transformers.models.llama.modeling_llama import rotate_half

    def f(q_lin, k_lin, cos, sin, qb, kb):
        q = q_lin.view(2, 5, 4, 8).transpose(1, 2)
        k = k_lin.view(2, 5, 2, 8).transpose(1, 2)
        full = eager_rope(q, k, cos, sin)
        part = eager_rope(q, k, cos[..., :6], sin[..., :6])
        bshd = eager_rope(q_lin.view(2, 5, 4, 8), k_lin.view(2, 5, 2, 8), cos, sin, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = qb.float(), kb.float()
        cast = ((qf * c + rotate_half(qf) * s).to(qb.dtype),
                (kf * c + rotate_half(kf) * s).to(kb.dtype))
        return (*full, *part, *bshd, *cast)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 16, generator=g),
            torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g),
            torch.randn(2, 4, 5, 8, generator=g).to(torch.bfloat16),
            torch.randn(2, 2, 5, 8, generator=g).to(torch.bfloat16))
    reports, graph = pass_on(f, *args)
    pr = reports["rope"]
    assert len(pr.matched) == 4 and not pr.skipped, (pr.matched, pr.skipped)
    ops = _ops(graph, "rope")
    assert sorted(str(n.args[4]) for n in ops) == ["torch.bfloat16"] + ["torch.float32"] * 3
    cast_op = next(n for n in ops if n.args[4] == torch.bfloat16)
    assert cast_op.args[0].op == "placeholder"  # q.float() folded: the op reads bf16 q
    assert not _cats(graph) and not [n for n in graph.nodes if "neg" in str(n.target)]


def test_pass_leaves_alone_with_reasons():
    from transformers.models.llama.modeling_llama import rotate_half

    def leaky(q, k, cos, sin):  # rotate_half(q) escapes
        r = rotate_half(q)
        return q * cos + r * sin, k * cos + rotate_half(k) * sin, r

    def lonely(q, cos, sin):  # only q is rotated: no pair
        return q * cos + rotate_half(q) * sin

    def trained(q, k, cos, sin):  # cos/sin that need a gradient
        return eager_rope(q, k, cos, sin)

    def other(q, k, cos, sin):  # not rotations: rotate_half of another tensor, a cat
        return q * cos + rotate_half(k) * sin, torch.cat((-q[..., 4:], q[..., :4]), -1) * sin

    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    for fn, args, reason in (
            (leaky, (q, k, cos, sin), "used outside"),
            (lonely, (q, cos, sin), "no second rotation"),
            (trained, (q, k, cos.clone().requires_grad_(), sin), "need a gradient")):
        pr = pass_on(fn, *args)[0]["rope"]
        assert not pr.matched and any(reason in r for _, r in pr.skipped), pr.skipped
    pr, graph = pass_on(other, q, k, cos, sin)
    assert not pr["rope"].matched and not pr["rope"].skipped and not _ops(graph, "rope")


# --------------------------------------------------------------------------- whole models

STEPS = 3
BATCH, SEQ = 2, 12
LAYERS = 2
PASSES_ALL = ("lora", "rope", "gated_mlp")
PHI3_PARTIAL = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                         partial_rotary_factor=0.5))


def passes_only_backend(passes, reports, graphs=None):
    """A backend that runs lorafuse's passes on the captured graph and then runs the
    rewritten graph as it is (autograd through the ops' registered formulas); appends
    each pass's report to ``reports`` and each rewritten graph to ``graphs``."""
    from lorafuse.passes import PASSES
    from lorafuse.report import PassReport

    def backend(gm, example_inputs):
        for name in passes:
            pr = PassReport(name)
            PASSES[name](gm, pr)
            reports.append(pr)
        if graphs is not None:
            graphs.append(gm.graph)
        return gm.forward

    return backend


def side_by_side(model, compiled, steps=STEPS):
    """Eager and compiled on the same LoRA parameters for ``steps`` AdamW steps (stepping
    with the compiled side's gradients): per step (eager, compiled), each (loss, grads)."""
    from conftest import VOCAB, lora_params

    params = lora_params(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    record = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        out = []
        for fwd in (model, compiled):
            loss = fwd(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in params.items()}))
            opt.zero_grad(set_to_none=True)
        record.append(out)
        for n, p in params.items():
            p.grad = out[1][1][n]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return record


def assert_runs_match(record, rtol=1e-4):
    for step, ((le, ge), (lc, gc)) in enumerate(record):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
        assert ge.keys() == gc.keys()
        for name, g in ge.items():
            assert g.norm() > 0, f"eager gradient of {name} is zero: the test would be blind"
            err = rel(gc[name], g)
            assert err <= rtol, f"step {step}, {name}: relative error {err:.2e}"


_runs: dict = {}


def model_run(arch):
    """Per arch, once: (record, {pass: matched}, {pass: skipped}, rope widths (R, D))."""
    from conftest import make_tiny_model, reset_dynamo, run_once
    from torch._dynamo.utils import counters

    def go():
        import lorafuse

        reset_dynamo()
        overrides = PHI3_PARTIAL if arch == "phi3-partial" else {}
        model = make_tiny_model(arch.split("-")[0], layers=LAYERS, **overrides)
        reports = []
        if arch == "llama":  # the real pipeline: Inductor compiles the rewritten graph
            compiled = torch.compile(model, backend=lorafuse.backend(passes=PASSES_ALL,
                                                                     strict=True))
        else:
            compiled = torch.compile(model, backend=passes_only_backend(PASSES_ALL, reports))
        record = side_by_side(model, compiled)
        if arch == "llama":
            matched = {p: counters["lorafuse"][p] for p in PASSES_ALL}
            skipped = {p: counters["lorafuse"][p + "_skipped"] for p in PASSES_ALL}
        else:
            matched = {p: sum(len(r.matched) for r in reports if r.name == p) for p in PASSES_ALL}
            skipped = {p: sum(len(r.skipped) for r in reports if r.name == p) for p in PASSES_ALL}
        reset_dynamo()
        return record, matched, skipped

    return run_once(_runs, arch, go)


GATED_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "phi3-partial")
MODEL_ARCHS = GATED_ARCHS + ("gpt2",)


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_model_one_rope_and_gated_mlp_per_layer(arch):
    _, matched, skipped = model_run(arch)
    want = LAYERS if arch in GATED_ARCHS else 0  # GPT-2: learned positions, plain GELU MLP
    assert matched["rope"] == want and matched["gated_mlp"] == want, matched
    assert skipped["rope"] == 0 and skipped["gated_mlp"] == 0, skipped


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_model_losses_and_grads_match_eager(arch):
    assert_runs_match(model_run(arch)[0])


def test_after_the_attention_pass():
    """The default passes (rope among them) and gated_mlp: the attention pass's SDPA reads
    the rope op's outputs; one step matches eager."""
    from conftest import make_tiny_model, reset_dynamo

    from lorafuse.passes import DEFAULT_PASSES

    reset_dynamo()
    model = make_tiny_model("llama", layers=LAYERS)
    reports = []
    assert "rope" in DEFAULT_PASSES  # measured faster in a whole 8B step (session 32)
    passes = DEFAULT_PASSES + ("gated_mlp",)
    record = side_by_side(model, torch.compile(model, backend=passes_only_backend(passes, reports)),
                          steps=1)
    reset_dynamo()
    assert {r.name: (len(r.matched), len(r.skipped)) for r in reports} == {
        "lora": (7 * LAYERS, 0), "attention": (LAYERS, 0), "masked_attention": (0, 0),
        "rope": (LAYERS, 0), "gated_mlp": (LAYERS, 0)}
    assert_runs_match(record)


def test_phi3_partial_rotary_is_partial():
    """The tiny Phi-3 really rotates half of each head (the config override took)."""
    from conftest import HEAD_DIM, make_tiny_model

    model = make_tiny_model("phi3", layers=1, **PHI3_PARTIAL)
    rotary = model.base_model.model.model.rotary_emb
    assert rotary.inv_freq.numel() * 2 == HEAD_DIM // 2


if __name__ == "__main__":
    _worker()
