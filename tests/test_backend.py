"""The backend pipeline on a tiny PEFT-shaped module (fast: small graphs compile in seconds).

Options, the verbose factory, fallbacks when a pass or the compile fails, the partitioner
hook and its cache key, and ``backend="lorafuse"`` through the entry point alone.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lorafuse
import lorafuse.passes
from lorafuse.partition import LorafusePartitioner
from lorafuse.report import Report

from conftest import assert_close_fp32

# The module: ``lorafuse.backend`` as an attribute is the options factory function.
backend_module = importlib.import_module("lorafuse.backend")
LORA_OPS = ("lorafuse.lora_linear", "lorafuse.lora_linear_group")


class LoraLinear(nn.Module):
    """PEFT's ``lora.Linear`` forward in miniature, with PEFT's attribute names:
    ``base_layer(x) + lora_B[a](lora_A[a](x)) * scaling[a]``."""

    def __init__(self, k, n, r, scale, bias=True):
        super().__init__()
        self.base_layer = nn.Linear(k, n, bias=bias).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(k, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, n, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.3)  # PEFT zeros it; we must not
        self.scaling = {"default": scale}

    def forward(self, x):
        a = "default"
        return self.base_layer(x) + self.lora_B[a](self.lora_A[a](x)) * self.scaling[a]


class Tiny(nn.Module):
    """Two LoRA sites that do not share an input: ``o(relu(q(x)))``."""

    SITES = 2

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q = LoraLinear(12, 20, 3, 2.0)
        self.o = LoraLinear(20, 12, 2, 0.5, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)))


def _step(fn, model, x, dy):
    """Output, and gradients of the input and every trainable parameter."""
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return y.detach(), grads


def assert_matches_eager(compile_fn, seed=0):
    """Compile a fresh Tiny with ``compile_fn`` and compare one step with eager."""
    eager_model, comp_model = Tiny(seed), Tiny(seed)
    x = torch.randn(3, 5, 12)
    dy = torch.randn(3, 5, 12)
    y_e, g_e = _step(eager_model, eager_model, x, dy)
    y_c, g_c = _step(compile_fn(comp_model), comp_model, x, dy)
    assert_close_fp32(y_c, y_e, what="output")
    assert g_c.keys() == g_e.keys() and len(g_e) == 5  # x, A and B of both sites
    for name in g_e:
        assert g_e[name].abs().max() > 0, name
        assert_close_fp32(g_c[name], g_e[name], what=name)


def _lora_ops_in(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and any(op in str(n.target) for op in LORA_OPS))


@pytest.fixture
def spy_compile_fx(monkeypatch):
    """Record every graph lorafuse hands to Inductor's compile_fx (lorafuse's ops in it, in
    ``seen``) and the Inductor config patches it passes (in ``patches``)."""
    real = backend_module.compile_fx
    seen, patches = [], []

    def spy(gm, example_inputs, **kw):
        seen.append(_lora_ops_in(gm))
        patches.append(dict(kw.get("config_patches") or {}))
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(backend_module, "compile_fx", spy)
    spy.seen, spy.patches = seen, patches
    spy.real = real
    return spy


# --------------------------------------------------------------------------- options


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['verbos'\]; known: .*'verbose'"):
        lorafuse.backend(verbos=True)
    with pytest.raises(ValueError, match=r"unknown pass\(es\) \['lroa'\]; available: \['lora'"):
        lorafuse.backend(passes=("lroa",))
    with pytest.raises(ValueError, match="unknown pass"):
        lorafuse.Options.parse({"passes": ["lora", "nope"]})
    assert lorafuse.Options.parse(None).passes == lorafuse.passes.DEFAULT_PASSES
    assert lorafuse.Options.parse({"passes": ["lora"]}).passes == ("lora",)  # list → tuple
    # a pass named twice (the defaults plus one of them again) runs once, in first place
    assert lorafuse.Options.parse({"passes": ["lora", "rope", "lora"]}).passes == ("lora", "rope")


def test_unknown_option_through_torch_compile(fresh_dynamo):
    """``torch.compile(..., options={...})`` reaches the backend, which rejects typos at
    the first compile (torch.compile itself never calls the backend earlier)."""
    compiled = torch.compile(Tiny(), backend="lorafuse", options={"verbos": True})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['verbos'\]"):
        compiled(torch.randn(2, 12))


def test_verbose_factory_prints_report_and_matches(fresh_dynamo, capsys):
    assert_matches_eager(lambda m: torch.compile(m, backend=lorafuse.backend(verbose=True)))
    err = capsys.readouterr().err
    assert "lorafuse graph" in err and f"lora: {Tiny.SITES} matched" in err, err
    assert counters["lorafuse"]["lora"] == Tiny.SITES
    assert counters["lorafuse"]["lora_skipped"] == 0


def test_factory_options_merge_with_compile_options(fresh_dynamo, spy_compile_fx):
    """Options given to torch.compile override the factory's: no passes → no rewrite."""
    backend = lorafuse.backend(verbose=False)
    assert_matches_eager(lambda m: torch.compile(m, backend=backend, options={"passes": ()}))
    assert counters["lorafuse"]["lora"] == 0
    assert spy_compile_fx.seen == [0]


def test_default_backend_rewrites_every_site(fresh_dynamo, spy_compile_fx):
    assert_matches_eager(lambda m: torch.compile(m, backend="lorafuse"))
    assert counters["lorafuse"]["lora"] == Tiny.SITES
    assert spy_compile_fx.seen == [Tiny.SITES]  # one graph, both sites as lorafuse ops


_WITHOUT_MASKED = tuple(p for p in lorafuse.passes.DEFAULT_PASSES if p != "masked_attention")


@pytest.mark.parametrize("mode,inductor,passes,ran", [
    (None, {}, None, lorafuse.passes.DEFAULT_PASSES),
    (None, {"triton.cudagraphs": True}, None, _WITHOUT_MASKED),
    ("reduce-overhead", {}, None, _WITHOUT_MASKED),
    (None, {"triton.cudagraphs": True}, ("lora", "masked_attention"),
     ("lora", "masked_attention")),
])
def test_cuda_graphs_drop_masked_attention_from_the_defaults(fresh_dynamo, mode, inductor,
                                                             passes, ran):
    """masked_attention is a default pass, but its mask checks return CPU bools and Inductor
    runs a graph holding CPU tensors without CUDA graphs: where the user asks for CUDA
    graphs (an Inductor option, or torch.compile's mode) and names no passes, the defaults
    run without it; passes the user names run."""
    report = Report()
    options = {"inductor": inductor, **({"passes": passes} if passes else {})}
    compiled = torch.compile(Tiny(), mode=mode, backend=functools.partial(
        backend_module.lorafuse_backend, options=options, _collect=report))
    compiled(torch.randn(3, 12))
    assert tuple(p.name for p in report.graphs[0].passes) == ran
    assert "masked_attention" in lorafuse.passes.DEFAULT_PASSES


@pytest.mark.parametrize("options,want", [
    ({}, None),
    ({"offload_activations": True}, False),
    ({"offload_activations": True, "inductor": {"reorder_for_peak_memory": True}}, True),
])
def test_offloading_turns_off_inductors_peak_memory_reordering(fresh_dynamo, spy_compile_fx,
                                                               options, want):
    """With offload_activations, Inductor's reordering for peak memory would hoist the
    backward's reloads (measured on the GPU); the backend turns it off unless the user's
    own Inductor options set it."""
    compiled = torch.compile(Tiny(), backend=lorafuse.backend(**options))
    compiled(torch.randn(3, 12))
    patches = spy_compile_fx.patches
    assert patches and all(p.get("reorder_for_peak_memory") == want for p in patches), patches


@pytest.mark.parametrize("options,want", [
    ({"offload_activations": True}, None),
    ({"inductor": {"triton.cudagraphs": True}}, None),
    ({"offload_activations": True, "inductor": {"triton.cudagraphs": True}}, False),
    ({"offload_activations": True, "inductor": {"triton.cudagraphs": True,
                                                "graph_partition": True}}, True),
])
def test_offloading_under_cuda_graphs_turns_inductors_graph_partition_off(
        fresh_dynamo, spy_compile_fx, options, want):
    """Offloading under CUDA graphs: the backend turns Inductor's graph partition off (on
    the GPU the partitioned step was 1.8 x slower and 5 GiB larger, session 32), unless the
    user's Inductor options set it (then the offload and reload ops are its
    cudagraph_unsafe boundaries); nothing otherwise. The compiled model still matches
    eager either way. (An Inductor without the key: the next test.)"""
    assert_matches_eager(lambda m: torch.compile(
        m, backend=lorafuse.backend(**options, strict=True)))
    patches = spy_compile_fx.patches
    assert patches and all(p.get("graph_partition") == want for p in patches), patches


def test_offloading_without_the_reordering_key_still_compiles(fresh_dynamo, monkeypatch,
                                                              spy_compile_fx):
    """A torch whose Inductor has neither reorder_for_peak_memory nor graph_partition: the
    backend patches neither unknown key (which would fail the compile and its plain-Inductor
    fallback), CUDA graphs asked for or not."""
    import types

    monkeypatch.setattr(backend_module, "inductor_config", types.SimpleNamespace())
    for inductor in ({}, {"triton.cudagraphs": True}):
        assert_matches_eager(lambda m: torch.compile(m, backend=lorafuse.backend(
            offload_activations=True, inductor=inductor, strict=True)))
        assert counters["lorafuse"]["lora"] == Tiny.SITES
        patches = spy_compile_fx.patches
        assert patches and not any("reorder_for_peak_memory" in p or "graph_partition" in p
                                   for p in patches), patches
        patches.clear()
        counters.clear()


# --------------------------------------------------------------------------- fallbacks


def _raise_after_rewriting(monkeypatch):
    """Replace the LoRA pass by one that rewrites every site, then raises."""
    real = lorafuse.passes.PASSES["lora"]
    mutated = []

    def broken(gm, report, **options):
        real(gm, report, **options)
        mutated.append(_lora_ops_in(gm))
        raise RuntimeError("boom after rewriting")

    # backend.py imported PASSES by name: patch the dict entry, not the module attribute.
    monkeypatch.setitem(lorafuse.passes.PASSES, "lora", broken)
    return mutated


def test_pass_failure_falls_back_to_the_untouched_graph(fresh_dynamo, monkeypatch, spy_compile_fx):
    mutated = _raise_after_rewriting(monkeypatch)
    report = Report()
    backend = functools.partial(lorafuse.lorafuse_backend, _collect=report)
    warning = r"pass 'lora' failed .*RuntimeError: boom after rewriting"
    with pytest.warns(UserWarning, match=warning):
        assert_matches_eager(lambda m: torch.compile(m, backend=backend))
    assert mutated == [Tiny.SITES], "the broken pass should have rewritten the graph first"
    assert spy_compile_fx.seen == [0], "Inductor got the half-rewritten graph"
    assert counters["lorafuse"]["lora"] == 0
    (graph,) = report.graphs
    pass_report = next(p for p in graph.passes if p.name == "lora")
    assert pass_report.error == "RuntimeError: boom after rewriting"
    assert pass_report.matched == []
    assert "pass failed, graph left unmodified" in str(report)


def test_pass_failure_raises_in_strict_mode(fresh_dynamo, monkeypatch):
    _raise_after_rewriting(monkeypatch)
    compiled = torch.compile(Tiny(), backend=lorafuse.backend(strict=True))
    with pytest.raises(Exception, match="boom after rewriting"):
        compiled(torch.randn(2, 12))


def test_compile_failure_falls_back_to_plain_inductor(fresh_dynamo, monkeypatch):
    """The rewritten graph fails in compile_fx; the pristine one compiles and is used."""
    real = backend_module.compile_fx
    seen = []

    def fails_on_lorafuse_ops(gm, example_inputs, **kw):
        seen.append(_lora_ops_in(gm))
        if seen[-1]:
            raise RuntimeError("no kernel for lorafuse ops today")
        return real(gm, example_inputs, **kw)

    monkeypatch.setattr(backend_module, "compile_fx", fails_on_lorafuse_ops)
    report = Report()
    backend = functools.partial(lorafuse.lorafuse_backend, _collect=report)
    with pytest.warns(UserWarning, match=r"compiling the rewritten graph \d+ failed .*no kernel"):
        assert_matches_eager(lambda m: torch.compile(m, backend=backend))
    assert seen == [Tiny.SITES, 0]
    (graph,) = report.graphs
    assert graph.fell_back == "RuntimeError: no kernel for lorafuse ops today"
    assert "fell back to plain Inductor" in str(report)
    # What ran is plain Inductor: the counters must not claim fused sites.
    assert counters["lorafuse"]["lora"] == 0, \
        "counters count sites whose rewrite was thrown away by the compile fallback"


# --------------------------------------------------------------------------- partitioner hook


def test_partitioner_hook_runs_and_reports(fresh_inductor_cache):
    report = Report()
    backend = functools.partial(lorafuse.lorafuse_backend, _collect=report)
    assert_matches_eager(lambda m: torch.compile(m, backend=backend))
    (graph,) = report.graphs
    assert isinstance(graph.saved_for_backward, int) and graph.saved_for_backward > 0
    assert isinstance(graph.saved_bytes, int) and graph.saved_bytes > 0
    assert "memory plan:" in str(report)


def test_partitioner_cache_key_follows_options(fresh_inductor_cache):
    """Inductor keys its caches on the partitioner's uuid(): equal options must give a
    warm-cache hit (the hook then does not run), other options a miss (it runs again)."""
    default = LorafusePartitioner(asdict(lorafuse.Options())).uuid()
    assert default is not None and default != ""
    assert default == LorafusePartitioner(asdict(lorafuse.Options())).uuid()
    assert default != LorafusePartitioner(asdict(lorafuse.Options(verbose=True))).uuid()
    assert default != LorafusePartitioner(asdict(lorafuse.Options(passes=()))).uuid()

    hook_ran, cache_hits = [], []
    for options in ({}, {}, {"verbose": True}):  # verbose changes nothing but the uuid
        torch._dynamo.reset()
        counters.clear()
        report = Report()
        backend = functools.partial(lorafuse.lorafuse_backend, options=options, _collect=report)
        assert_matches_eager(lambda m: torch.compile(m, backend=backend))
        hook_ran.append(report.graphs[0].saved_for_backward is not None)
        cache_hits.append(counters["aot_autograd"]["autograd_cache_hit"])
    assert hook_ran[0] and hook_ran[2], "a cache miss must run the partitioner"
    assert cache_hits == [0, 1, 0], (
        f"AOTAutograd cache hits per compile: {cache_hits}; the same graph with the same "
        "options must hit the warm cache, other options must miss")
    assert not hook_ran[1]


# --------------------------------------------------------------------------- entry point


def test_backend_name_works_without_importing_lorafuse():
    """``backend="lorafuse"`` resolves through the torch_dynamo_backends entry point in a
    fresh interpreter that never imports lorafuse itself."""
    script = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        from torch._dynamo.utils import counters

        assert "lorafuse" not in sys.modules

        class Site(nn.Module):
            def __init__(self):
                super().__init__()
                self.base_layer = nn.Linear(8, 6)
                self.lora_A = nn.Linear(8, 2, bias=False)
                self.lora_B = nn.Linear(2, 6, bias=False)

            def forward(self, x):
                return self.base_layer(x) + self.lora_B(self.lora_A(x)) * 2.0

        m = Site()
        x = torch.randn(4, 8)
        with torch.no_grad():
            y = torch.compile(m, backend="lorafuse")(x)
            torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)
        assert "lorafuse" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        assert "lorafuse" in sys.modules
        assert counters["lorafuse"]["lora"] == 1, dict(counters["lorafuse"])
        print("entry point OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "entry point OK" in proc.stdout
