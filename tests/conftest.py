"""Shared test setup: a private Inductor cache, Dynamo resets, tiny PEFT models.

The Inductor cache directory is set here, at import time, before anything imports
torch or compiles: Inductor keys its on-disk caches on the graph, so a warm cache
from an earlier run would let a compile skip lorafuse's partitioner hook entirely.
Every session gets a fresh directory (removed at the end); within a session,
compiles share it, so identical kernels are built once. Under pytest-xdist the
controller makes the directory (its conftest is imported before the workers start)
and the workers inherit it: the kernels and graphs of the shared tiny geometry are
compiled once per run, not once per worker. Tests that need the partitioner to run
turn the AOTAutograd cache off (``no_autograd_cache``), whichever worker compiled first.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

_SESSION_CACHE = "LORAFUSE_TEST_INDUCTOR_CACHE"  # the controller's directory, for its workers
if os.environ.get("PYTEST_XDIST_WORKER") and os.path.isdir(os.environ.get(_SESSION_CACHE, "")):
    _CACHE_DIR = os.environ[_SESSION_CACHE]  # the controller removes it at its exit
else:
    _CACHE_DIR = tempfile.mkdtemp(prefix="lorafuse-test-inductor-")
    os.environ[_SESSION_CACHE] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE_DIR
os.environ["TRITON_CACHE_DIR"] = os.path.join(_CACHE_DIR, "triton")

# pytest-xdist workers share the cores: each gets its share of OpenMP threads (and so do
# the subprocesses its tests start), unless OMP_NUM_THREADS says otherwise. With two
# workers of two threads each on two cores, OpenMP threads spin against the other
# worker's (measured: two test files side by side 15 % slower; bench_elementwise.py saw
# Inductor's CPU kernels 100x slower on a shared machine).
_WORKER_THREADS = None
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _WORKER_THREADS = max(1, (_cores or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))
    os.environ["OMP_NUM_THREADS"] = str(_WORKER_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

if _WORKER_THREADS is not None:
    torch.set_num_threads(_WORKER_THREADS)  # in case torch was imported before this file

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) draws the same examples every run, so a red CI
# is a regression, not a new random draw; local runs keep exploring fresh examples.
_hypothesis_settings.register_profile("ci", derandomize=True)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
CI_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") == "ci"


def examples(n: int, ci: int) -> int:
    """``max_examples`` of a slow property test (a compile or the Triton interpreter per
    example): ``n`` when exploring (fresh draws each run), ``ci`` under the ci profile,
    whose draws are fixed (the same ``ci`` random examples every run). The interpreter
    workers inherit HYPOTHESIS_PROFILE, so their draws follow the same rule."""
    return ci if CI_PROFILE else n
from torch._dynamo.utils import counters  # noqa: E402

# Geometry shared by every architecture: same head_dim, hidden and intermediate sizes
# (intermediate deliberately not a power of two), so identical kernels are compiled
# once per session and models differ only where the architectures do.
VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 72
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gpt2")
MORE_ARCHS = ("qwen3", "phi3", "gemma3")  # built by make_tiny_model too; used by fewer tests


# The longest files first. `-n 2 --dist loadfile` hands whole files to the two workers in
# collection order (pytest_configure turns off xdist's reordering by test count, which
# put 2-test files such as test_readme.py last), so a long file collected last left one
# worker idle while the other finished it; with the long ones first the last files handed
# out are short. Per-file seconds, CI-style run of 2026-11-30: 339, 190, 175, 161, 127, 103,
# 90, then 68 down to 17; the files not listed take under 10 s each. test_norm_fold.py
# (session 18) ≈ 90 s alone.
SLOW_FILES_FIRST = ("test_models.py", "test_attention.py", "test_layer_checkpoint.py",
                    "test_readme.py", "test_quant_storage.py", "test_memory_budget.py",
                    "test_loss.py", "test_norm_fold.py", "test_tiled_mlp.py", "test_key_ranges.py",
                    "test_dequant_matmul.py", "test_all_passes.py", "test_flash_attention.py",
                    "test_norm.py", "test_rope.py", "test_cli.py", "test_workflow.py",
                    "test_offload.py", "test_trainer.py", "test_backend.py", "test_demo.py",
                    "test_gated_mlp.py")


def pytest_configure(config):
    # pytest-xdist (3.x) hands out `--dist loadfile`'s files by their number of tests unless
    # told otherwise: keep the collection order (pytest_collection_modifyitems below)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_report_header(config):
    return f"lorafuse tests: Inductor cache {_CACHE_DIR}"


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files


def reset_dynamo() -> None:
    """Forget every compiled frame and zero Dynamo's counters (lorafuse's included)."""
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture
def fresh_dynamo():
    """Run the test with Dynamo reset and counters zeroed, and reset again after it
    (so a test's compiled frames never leak into the next test)."""
    reset_dynamo()
    yield counters
    reset_dynamo()


@pytest.fixture
def no_autograd_cache():
    """The test's compiles never hit the AOTAutograd cache, so lorafuse's partitioner runs
    for each (the report's memory plan, spies on it). Inductor's caches stay on: a hit there
    compiles the same partitioned graph to the same code, only without rebuilding the
    session's kernels (what ``fresh_inductor_cache`` costs: 15-30 s a test on CPU)."""
    reset_dynamo()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    reset_dynamo()


@pytest.fixture
def fresh_inductor_cache():
    """An empty Inductor cache for one test: the compile cannot be a cache hit, so
    every compile_fx hook (partitioner included) runs. For tests of the caches
    themselves; a test that only needs the partitioner to run takes ``no_autograd_cache``."""
    from torch._inductor.utils import fresh_cache

    reset_dynamo()
    with fresh_cache():
        yield
    reset_dynamo()


def _hf_config(arch: str, layers: int, overrides: dict):
    import transformers

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, use_cache=False,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if arch in ("llama", "mistral", "qwen2", "gemma2", "qwen3", "phi3", "gemma3"):
        common.update(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, attention_dropout=0.0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
    elif arch == "qwen2":  # q/k/v carry biases: a base linear with bias
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
    elif arch == "gemma2":  # eager attention: softcapped logits (tanh), no SDPA
        cfg = transformers.Gemma2Config(**common, query_pre_attn_scalar=HEAD_DIM,
                                        attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0, sliding_window=8)
    elif arch == "qwen3":  # per-head q/k RMSNorm
        cfg = transformers.Qwen3Config(**common)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        common.pop("head_dim")
        cfg = transformers.Phi3Config(**common, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    elif arch == "gemma3":  # sliding-window layers (window 8) on SDPA
        cfg = transformers.Gemma3TextConfig(**common, sliding_window=8,
                                            query_pre_attn_scalar=HEAD_DIM)
    elif arch == "gpt2":  # Conv1D projections: view → addmm → view
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=HEADS,
            n_inner=INTERMEDIATE, n_positions=64, use_cache=False, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS + MORE_ARCHS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_model(arch: str, *, layers: int = 2, r: int = 4, lora_alpha: int = 8,
                    target_modules="all-linear", lora_dropout: float = 0.0,
                    use_dora: bool = False, b_std: float = 0.2, seed: int = 0,
                    lora_kwargs: dict | None = None, **config_overrides):
    """A tiny random-init causal LM of ``arch`` wrapped by PEFT LoRA, in fp32, in
    training mode. LoRA B (and an embedding's LoRA A) is re-initialised random: PEFT
    zeros it, which would make every gradient of the other factor zero and hide a wrong
    one."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = _hf_config(arch, layers, config_overrides)
    kwargs = {"attn_implementation": "eager"} if arch == "gemma2" else {}
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **kwargs)
    if arch == "gpt2":
        model.loss_type = "ForCausalLM"  # avoids a logger.warning_once graph break
    lcfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                      lora_dropout=lora_dropout, use_dora=use_dora,
                      fan_in_fan_out=(arch == "gpt2"), **(lora_kwargs or {}))
    model = get_peft_model(model, lcfg)
    randomize_lora(model, b_std, seed)
    return model.train()


def randomize_lora(model, std: float = 0.2, seed: int = 0) -> None:
    """Random LoRA B (PEFT zeros B of linears, A of embeddings): no zero factor remains."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def lora_sites(model) -> int:
    """Number of PEFT ``lora.Linear`` modules: what the LoRA pass should rewrite."""
    from peft.tuners.lora.layer import Linear

    return sum(isinstance(m, Linear) for m in model.modules())


def assert_close_fp32(got, want, rtol: float = 1e-5, what: str = "") -> None:
    """Elementwise fp32 agreement with the absolute slack scaled to ``want``'s magnitude:
    the same sums taken in another order differ by a few ulps of the largest summands,
    not of each result element (which cancellation can make arbitrarily small)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(),
                               msg=(lambda m: f"{what}: {m}") if what else None)


def run_once(cache: dict, key, fn):
    """``fn()`` once per ``key`` in ``cache`` (a module's compiled-model runs shared by its
    tests); a failure is remembered too, so the key's other tests do not pay for it again."""
    if key not in cache:
        try:
            cache[key] = fn()
        except Exception as e:
            cache[key] = e
            raise
    if isinstance(cache[key], Exception):
        raise cache[key]
    return cache[key]


def assert_check_passed(results: dict, check: str) -> None:
    """One check of a Triton-interpreter worker (``run_interpreter_worker``)."""
    assert check in results, f"{check} did not run"
    ok, detail = results[check]
    assert ok, detail


def lora_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sgd_steps(fn, model, batches, lr: float):
    """Train ``model`` through ``fn`` (itself or a compiled wrapper) one plain SGD step per
    batch (no Adam: its per-element scaling would amplify rounding differences between
    runs): ``(losses, grads)``, the LoRA gradients of each step."""
    params = lora_params(model)
    losses, grads = [], []
    for batch in batches:
        loss = fn(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in params.items()})
        with torch.no_grad():
            for p in params.values():
                p -= lr * p.grad
                p.grad = None
    return losses, grads


def lorafuse_sgd_run(model, batches, lr: float, options) -> dict:
    """``sgd_steps`` through ``backend="lorafuse"`` with ``options`` (strict; None: eager),
    collecting the compile's report: ``{"report", "losses", "grads"}``."""
    import functools

    import lorafuse
    from lorafuse.report import Report

    reset_dynamo()
    report = Report()
    fn = model
    if options is not None:
        backend = functools.partial(lorafuse.lorafuse_backend, _collect=report,
                                    options={"strict": True, **options})
        fn = torch.compile(model, backend=backend)
    losses, grads = sgd_steps(fn, model, batches, lr)
    reset_dynamo()
    return {"report": report, "losses": losses, "grads": grads}


def fold_sgd_run(model, monkeypatch, env: str, on: bool, spy: str, seen: list, steps: int = 2,
                 batch: int = 2, seq: int = 16, lr: float = 0.5) -> dict:
    """A ``lorafuse_sgd_run`` (default options, AOTAutograd cache off so the partitioner
    runs) of ``steps`` fixed batches with the LoRA pass's fold behind ``env`` on or off;
    ``seen`` gets what each call of ``spy`` (the ``lorafuse.passes.lora`` function giving a
    fold's arguments) returned."""
    import lorafuse.passes.lora as lora_pass

    monkeypatch.setenv(env, "1" if on else "0")
    real = getattr(lora_pass, spy)

    def spying(*args):
        out = real(*args)
        seen.append(out)
        return out

    monkeypatch.setattr(lora_pass, spy, spying)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(steps)]
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out = lorafuse_sgd_run(model, [{"input_ids": i, "labels": i} for i in ids], lr, {})
    monkeypatch.undo()
    return out


def assert_same_sgd_training(got: dict, want: dict, loss_rtol: float, grad_rtol=None) -> None:
    """Two ``lorafuse_sgd_run`` results: each step's loss within ``loss_rtol``; each LoRA
    gradient within ``grad_rtol`` (relative norm), or only finite and nonzero when None."""
    for step, (loss, want_loss) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        torch.testing.assert_close(loss, want_loss, rtol=loss_rtol, atol=0)
        for name, g in want["grads"][step].items():
            mine = got["grads"][step][name]
            assert torch.isfinite(mine).all() and g.norm() > 0, (step, name)
            if grad_rtol is not None:
                err = ((mine - g).norm() / g.norm()).item()
                assert err <= grad_rtol, (step, name, err)


def bf16_base(model):
    """``model`` with every non-LoRA parameter in bf16 (LoRA factors stay fp32, PEFT's
    default for a bf16-loaded model)."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    return model


def partitioned_graph(run):
    """The one graph of a ``lorafuse_sgd_run``, which the partitioner planned (an
    AOTAutograd cache hit would have skipped it)."""
    (graph,) = run["report"].graphs
    assert graph.fell_back is None, graph.fell_back
    assert graph.activation_bytes is not None, "the partitioner did not run (a cache hit?)"
    return graph


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: ``tiny_model(arch, **kw)`` → a PEFT-wrapped tiny model (see make_tiny_model)."""
    return make_tiny_model


# --------------------------------------------------------------------------- Triton interpreter
# TRITON_INTERPRET is read when triton is first imported, which the pytest process has done
# already: a test file runs its kernel checks in one subprocess (the file run as a script),
# whose last stdout line is {check: [ok, detail]}.


def interpreter_unusable() -> str:
    """Why the Triton interpreter cannot run the kernels here, or "" (DESIGN.md: triton
    3.6's interpreter fails on range loops over runtime bounds with numpy >= 2.3)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tv = tuple(int(p) for p in version("triton").split(".")[:2])
    except PackageNotFoundError:
        return "triton not installed"
    nv = tuple(int(p) for p in version("numpy").split(".")[:2])
    if tv <= (3, 6) and nv >= (2, 3):
        return f"triton {version('triton')} interpreter needs numpy < 2.3 (have {version('numpy')})"
    return ""


def run_interpreter_worker(test_file: str, **env) -> dict:
    """Run ``test_file`` as a script under TRITON_INTERPRET=1 with ``env`` added; return its
    checks. Skips the calling test where the interpreter cannot run."""
    reason = interpreter_unusable()
    if reason:
        pytest.skip(reason)
    repo = Path(test_file).resolve().parents[1]
    full_env = dict(os.environ, TRITON_INTERPRET="1", **env,
                    PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, test_file], env=full_env, cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class CheckRecorder:
    """Worker side: ``record(name, fn)`` runs one check and keeps (ok, traceback);
    ``record.report()`` prints them all as the last stdout line."""

    def __init__(self):
        self.results = {}

    def __call__(self, name, fn) -> None:
        try:
            fn()
            self.results[name] = (True, "")
        except Exception:
            self.results[name] = (False, traceback.format_exc()[-2500:])

    def report(self) -> None:
        print(json.dumps(self.results))
