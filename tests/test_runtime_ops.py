"""The ops' runtime twins (``lorafuse/kernels/_ops.py``): every lorafuse op has one with its
schema, a twin computes what its op computes, fake tensors see the same shapes, and the
graphs Inductor compiles call the twins, not the custom ops, while training as before."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import lorafuse
from lorafuse.kernels import _ops
from lorafuse.kernels._ops import NAMESPACE, TWIN_NAMESPACE, is_op, runtime_twin

from test_backend import Tiny, _step


def _ops_of(namespace):
    return {name for name in _ops._twin_names if hasattr(getattr(torch.ops, namespace), name)}


def test_import_lorafuse_registers_every_op_and_twin():
    """A compiled graph loaded from PyTorch's caches calls the twins by name, and no pass
    has run in that process to import the module that defines them (session 34: a warm
    cache on the H200 raised "no attribute 'lora_linear_group_fp8'"). So ``import
    lorafuse`` alone must define every op the package declares, in a fresh interpreter."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(lorafuse.__file__).parent
    declared = {m for f in root.rglob("*.py")
                for m in re.findall(r'@lorafuse_op\(\s*"lorafuse::(\w+)"', f.read_text())}
    assert {"lora_linear", "lora_linear_group_fp8", "offload_capturable"} <= declared
    code = ("import sys, torch, lorafuse\n"
            f"names = {sorted(declared)!r}\n"
            "missing = [n for n in names if not (hasattr(torch.ops.lorafuse, n)\n"
            "           and hasattr(torch.ops.lorafuse_rt, n))]\n"
            "print(missing)\n"
            "sys.exit(1 if missing else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, (out.stdout, out.stderr[-2000:])


def test_every_lorafuse_op_has_a_twin_with_its_schema():
    names = _ops_of(NAMESPACE)
    assert {"lora_linear", "lora_linear_backward", "nf4_linear", "nf4_linear_backward",
            "rms_norm", "linear_cross_entropy", "reload"} <= names
    for name in names:
        op = getattr(torch.ops.lorafuse, name).default
        twin = runtime_twin(op)
        assert twin is getattr(torch.ops.lorafuse_rt, name).default
        assert str(twin._schema) == str(op._schema).replace(f"{NAMESPACE}::",
                                                            f"{TWIN_NAMESPACE}::", 1)
        assert is_op(op, name) and is_op(twin, name)
    assert runtime_twin(torch.ops.aten.mm.default) is None
    assert runtime_twin("not an op") is None


@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 24), n=st.integers(1, 24), r=st.integers(1, 5),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_twin_computes_what_the_op_computes(m, k, n, r, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    a = torch.randn(r, k, generator=g, requires_grad=True)
    bb = torch.randn(n, r, generator=g, requires_grad=True)
    args = (x, w, b, a, bb, 0.7, None)
    want = torch.ops.lorafuse.lora_linear.default(*args)
    got = torch.ops.lorafuse_rt.lora_linear.default(*args)
    for w_, g_ in zip(want, got):
        assert torch.equal(w_, g_)
    dy = torch.randn(2, m, n, generator=g)
    bwd_args = (dy, x.detach(), w, a.detach(), bb.detach(), want[1].detach(), 0.7)
    want_b = torch.ops.lorafuse.lora_linear_backward.default(*bwd_args)
    got_b = torch.ops.lorafuse_rt.lora_linear_backward.default(*bwd_args)
    for w_, g_ in zip(want_b, got_b):
        assert torch.equal(w_, g_)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        shapes = [t.shape for t in torch.ops.lorafuse_rt.lora_linear.default(*fake)]
    assert shapes == [t.shape for t in want]


def test_lorafuse_op_refuses_another_namespace():
    with pytest.raises(ValueError, match="namespace"):
        _ops.lorafuse_op("elsewhere::f")


def test_compiled_graphs_call_the_twins_and_train_as_before(no_autograd_cache, monkeypatch):
    """Inductor's post-grad pass hands on forward and backward graphs whose lorafuse calls
    are all twins; the step's output and every gradient match eager."""
    seen = []
    real = _ops.swap_targets

    def spy(graph):
        n = real(graph)
        seen.append((n, [node.target for node in graph.nodes if node.op == "call_function"]))
        return n

    monkeypatch.setattr(_ops, "swap_targets", spy)
    eager, comp = Tiny(0), Tiny(0)
    x, dy = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    y0, g0 = _step(eager, eager, x, dy)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit skips the pass
        y1, g1 = _step(torch.compile(comp, backend="lorafuse"), comp, x, dy)
    assert len(seen) == 2  # forward and backward
    assert all(n > 0 for n, _ in seen)
    targets = [t for _, ts in seen for t in ts]
    assert not [t for t in targets if getattr(t, "namespace", None) == NAMESPACE]
    assert any(is_op(t, "lora_linear") for t in seen[0][1])
    assert any(is_op(t, "lora_linear_backward") for t in seen[1][1])
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6)


def _lora_graph():
    """A graph with one lorafuse op call (the LoRA op) between placeholders and output."""
    g = torch.fx.Graph()
    ins = [g.placeholder(n) for n in ("x", "w", "a", "b")]
    out = g.call_function(torch.ops.lorafuse.lora_linear.default,
                          (ins[0], ins[1], None, ins[2], ins[3], 1.0, None))
    g.output(out)
    return g


class _TheirPass(_ops.CustomGraphPass):
    def __init__(self, key):
        self.key, self.saw = key, []

    def __call__(self, graph):
        self.saw += [n.target for n in graph.nodes if n.op == "call_function"]

    def uuid(self):
        return self.key


def test_runtime_twins_pass_runs_the_users_pass_first_and_keys_the_cache():
    theirs = _TheirPass("u1")
    g = _lora_graph()
    _ops.RuntimeTwinsPass(theirs)(g)
    assert theirs.saw == [torch.ops.lorafuse.lora_linear.default]  # their names, first
    (call,) = [n for n in g.nodes if n.op == "call_function"]
    assert call.target is torch.ops.lorafuse_rt.lora_linear.default
    key = _ops.RuntimeTwinsPass(theirs).uuid()
    assert key and key == _ops.RuntimeTwinsPass(_TheirPass("u1")).uuid()
    assert key != _ops.RuntimeTwinsPass(_TheirPass("u2")).uuid()
    assert key != _ops.RuntimeTwinsPass().uuid() and _ops.RuntimeTwinsPass().uuid()
    assert _ops.RuntimeTwinsPass([theirs, lambda graph: None]).uuid() is None  # no key
    both = [_TheirPass("a"), _TheirPass("b")]
    _ops.RuntimeTwinsPass(both)(_lora_graph())
    assert all(p.saw == [torch.ops.lorafuse.lora_linear.default] for p in both)


def test_graphs_compiled_without_gradients_call_the_twins(no_autograd_cache, monkeypatch):
    """No partitioner runs for a graph without gradients (evaluation): Inductor's post-grad
    pass swaps its calls; the output matches eager. The user's own post-grad pass, given
    through the ``inductor`` option, still runs."""
    swapped = []
    real = _ops.swap_targets

    def spy(graph):
        swapped.append(real(graph))
        return swapped[-1]

    monkeypatch.setattr(_ops, "swap_targets", spy)
    theirs = _TheirPass("mine")
    model = Tiny(0)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        want = model(x)
        with torch._inductor.config.patch(fx_graph_cache=False):
            got = torch.compile(model, backend=lorafuse.backend(
                inductor={"post_grad_custom_post_pass": theirs}))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert swapped == [Tiny.SITES]
    assert sum(is_op(t, "lora_linear") for t in theirs.saw) == Tiny.SITES


def test_a_post_grad_pass_set_globally_still_runs(no_autograd_cache):
    """A user who sets Inductor's ``post_grad_custom_post_pass`` in its config, not in the
    options, keeps it: the backend chains it, it does not replace it."""
    theirs = _TheirPass("global")
    x = torch.randn(3, 5, 12)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False,
                                                       post_grad_custom_post_pass=theirs):
        torch.compile(Tiny(0), backend="lorafuse")(x)
    assert sum(is_op(t, "lora_linear") for t in theirs.saw) == Tiny.SITES
