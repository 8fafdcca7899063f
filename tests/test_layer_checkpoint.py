"""The ``checkpoint_layers`` option (layer_checkpoint.py): each decoder layer's forward
recomputed in the backward from the layer's input, planned on the joint graph.

Checks: the same losses and LoRA gradients as eager over several SGD steps (fp32, tightly:
recomputing gives the same values), on architectures whose layers are named differently
(Llama's ``model.layers.N``, GPT-2's ``transformer.h.N``) and with Gemma2's eager attention
chain; far fewer activation bytes kept, and what is kept per layer (its input, attention's
output and log-sum-exp); with offloading; left alone with a note where the layers draw random
numbers that a recompute would not replay (dropout under Inductor replays its seeds: the
same masks); refused beside an explicit memory_budget.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch

import lorafuse.layer_checkpoint
import lorafuse.partition
from lorafuse.backend import Options
from lorafuse.layer_checkpoint import layer_of

from conftest import VOCAB, lorafuse_sgd_run, make_tiny_model

STEPS, BATCH, SEQ, LR, LAYERS = 2, 2, 16, 0.5, 2
PASSES = ["lora", "attention", "norm", "rope", "gated_mlp", "loss"]


def _batches():
    out = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
        out.append({"input_ids": ids, "labels": ids})
    return out


def _saved_spy(monkeypatch):
    """Record the backward graph's saved activations (name -> example value) of each plan."""
    plans = []
    real = lorafuse.partition.LorafusePartitioner._record_into

    def spy(self, fwd, bwd, inputs, *args, **kwargs):
        plans.append({n.name: n.meta.get("val") for n in bwd.graph.nodes
                      if n.op == "placeholder" and not n.name.startswith("tangents")
                      and n.name not in inputs})
        return real(self, fwd, bwd, inputs, *args, **kwargs)

    monkeypatch.setattr(lorafuse.partition.LorafusePartitioner, "_record_into", spy)
    return plans


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("arch,mode", [("llama", True), ("gpt2", True), ("gemma2", True),
                                       ("llama", "full")])
def test_same_training_as_eager_fewer_bytes_kept(arch, mode, monkeypatch, no_autograd_cache):
    base = make_tiny_model(arch, layers=LAYERS, seed=5)
    plans = _saved_spy(monkeypatch)
    eager = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR, None)
    plain = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR, {"passes": PASSES})
    ckpt = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR,
                            {"passes": PASSES, "checkpoint_layers": mode})
    for step in range(STEPS):
        torch.testing.assert_close(ckpt["losses"][step], eager["losses"][step],
                                   rtol=1e-5, atol=0)
        for name, g in eager["grads"][step].items():
            assert g.norm() > 0, name
            assert _rel(ckpt["grads"][step][name], g) <= 1e-4, (arch, step, name)

    (graph,) = ckpt["report"].graphs
    assert graph.checkpointed_layers == LAYERS, graph.format()
    assert graph.checkpoint_note is None
    assert f"checkpoint_layers: {LAYERS} layers recomputed" in graph.format()
    # Every layer's MLP output but the last one's (the final norm's backward reads it) is
    # read by nothing in the backward: its recomputed LoRA linear computes x' Aᵀ alone.
    # Gemma2's post-MLP norm reads it in every layer.
    reduced = 0 if arch == "gemma2" else LAYERS - 1
    assert graph.lowrank_only == reduced, graph.format()
    assert (f"reduced to their adapter's x' Aᵀ: {reduced}" in graph.format()) == bool(reduced)
    assert graph.activation_bytes < 0.5 * plain["report"].graphs[0].activation_bytes, \
        (graph.activation_bytes, plain["report"].graphs[0].activation_bytes)

    # What is kept: no activation of the size of an MLP's hidden state (gate, up: all
    # recomputed), and per layer at most its input plus attention's output and
    # log-sum-exp ("full": its input), besides what the ops outside the layers keep (and,
    # with "full", the RNG states torch saves for SDPA's replay: bytes, not floats).
    saved = {n: v for n, v in plans[-1].items() if v.is_floating_point()}
    hidden = base.config.hidden_size
    inner = base.config.intermediate_size if arch != "gpt2" else 4 * hidden
    assert not [n for n, v in saved.items() if v.shape[-1] == inner], saved
    per_token = sum(v.numel() for v in saved.values()) / (BATCH * SEQ)
    head_dim = getattr(base.config, "head_dim", None) or hidden // base.config.num_attention_heads
    heads = base.config.num_attention_heads
    layer_bound = hidden + heads * head_dim + heads if mode is True else hidden
    outside = 6 * hidden + 2 * head_dim  # embedding, final norm, loss, rope cos/sin
    assert per_token <= LAYERS * layer_bound + outside, (per_token, sorted(saved))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_with_offloading_same_training(arch, monkeypatch, no_autograd_cache):
    """With offloading, each layer's post-attention residual is kept too (offloaded), so
    the attention output projection's recompute is reduced to its x' Aᵀ as the down
    projection's is: the same training, one more LoRA linear a layer reduced. Not in
    Gemma2, whose post-attention norm reads the projection's output."""
    monkeypatch.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 0)
    base = make_tiny_model(arch, layers=LAYERS, seed=6)
    plans = _saved_spy(monkeypatch)
    ckpt = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR,
                            {"passes": PASSES, "checkpoint_layers": True})
    both = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR,
                            {"passes": PASSES, "checkpoint_layers": True,
                             "offload_activations": True})
    (graph,) = both["report"].graphs
    assert graph.checkpointed_layers == LAYERS and graph.offloaded_tensors, graph.format()
    residuals = 0 if arch == "gemma2" else LAYERS
    assert graph.kept_residuals == residuals, graph.format()
    assert graph.lowrank_only == ckpt["report"].graphs[0].lowrank_only + residuals, \
        graph.format()
    # one more hidden-size activation a layer kept (and offloaded) for each residual
    hidden = base.config.hidden_size
    n_hidden = [sum(v.shape[-1] == hidden and v.dim() == 3 for v in plan.values()
                    if v.is_floating_point()) for plan in (plans[0], plans[-1])]
    assert n_hidden[1] == n_hidden[0] + residuals, n_hidden
    for step in range(STEPS):
        torch.testing.assert_close(both["losses"][step], ckpt["losses"][step], rtol=1e-6, atol=0)
        for name, g in ckpt["grads"][step].items():
            assert g.norm() > 0, name
            assert _rel(both["grads"][step][name], g) <= 1e-5, (step, name)
    if arch == "llama":  # the benchmarks' A/B switch: LORAFUSE_KEEP_RESIDUAL=0, the old plan
        monkeypatch.setenv("LORAFUSE_KEEP_RESIDUAL", "0")
        off = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR,
                               {"passes": PASSES, "checkpoint_layers": True,
                                "offload_activations": True})
        (graph,) = off["report"].graphs
        assert graph.kept_residuals == 0, graph.format()
        assert graph.lowrank_only == ckpt["report"].graphs[0].lowrank_only, graph.format()
        torch.testing.assert_close(off["losses"], both["losses"], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_dropout_recomputed_with_the_same_masks(no_autograd_cache):
    """Inductor draws dropout masks from seeds the graph computes once (inductor_random):
    the recomputed layers replay the same masks, so checkpointing changes nothing."""
    base = make_tiny_model("llama", layers=LAYERS, seed=7, attention_dropout=0.3)
    runs = {}
    for on in (False, True):
        torch.manual_seed(11)  # the same seeds drawn in both runs
        runs[on] = lorafuse_sgd_run(copy.deepcopy(base), _batches(), LR,
                                    {"passes": PASSES, "checkpoint_layers": on})
    assert runs[True]["report"].graphs[0].checkpointed_layers == LAYERS
    torch.manual_seed(12)
    other = lorafuse_sgd_run(copy.deepcopy(base), _batches()[:1], LR, {"passes": PASSES})
    assert (other["losses"][0] - runs[False]["losses"][0]).abs() > 1e-4, "dropout inactive?"
    for step in range(STEPS):
        torch.testing.assert_close(runs[True]["losses"][step], runs[False]["losses"][step],
                                   rtol=1e-5, atol=0)
        for name, g in runs[False]["grads"][step].items():
            assert _rel(runs[True]["grads"][step][name], g) <= 1e-4, (step, name)


def _toy_joint_graph():
    """A joint-graph-shaped module: two "layers" (x * 2, then + 1) and a backward op."""
    def f(primals_1, tangents_1):
        a = primals_1 * 2
        b = a + 1
        return b, tangents_1 * 2

    gm = torch.fx.symbolic_trace(f)
    for node in gm.graph.nodes:
        if node.op == "call_function" and "tangents" not in str(node.args):
            layer = "0" if node.name == "mul" else "1"
            node.meta["nn_module_stack"] = {"m": ("L['self'].model", "M"),
                                            "l": (f"L['self'].model.layers.{layer}", "Layer")}
    return gm


def test_layers_drawing_random_numbers_left_to_min_cut():
    gm = _toy_joint_graph()
    plan = lorafuse.layer_checkpoint.tag_layers(gm, draws_random=lambda n: n.name == "add")
    assert plan["layers"] == 0 and "draw random numbers (add" in plan["note"], plan
    assert not any("recompute" in n.meta for n in gm.graph.nodes)

    plan = lorafuse.layer_checkpoint.tag_layers(gm, draws_random=lambda n: False)
    assert plan == {"layers": 2, "ops": 2, "residuals": 0}
    tags = {n.name: n.meta.get("ac_graph_id") for n in gm.graph.nodes}
    assert tags["mul"] == 0 and tags["add"] == 1 and tags["mul_1"] is None, tags


def _residual_graph(between=None, attention=True):
    """Two layers shaped as a joint graph's forward: [attention →] a LoRA projection →
    (``between``, e.g. a cast or a norm's mul) → add to the layer's input → an MLP LoRA
    projection → add. Built node by node (nothing runs)."""
    import lorafuse.kernels  # noqa: F401  (registers torch.ops.lorafuse)

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x = g.placeholder("primals_1")
    g.placeholder("tangents_1")
    adds = []
    for i in range(2):
        nodes = []
        h = x
        if attention:
            h = g.call_function(aten._scaled_dot_product_flash_attention_for_cpu.default, (h, h, h))
            h = g.call_function(operator.getitem, (h, 0))
            nodes += [h.args[0], h]
        proj = g.call_function(torch.ops.lorafuse.lora_linear.default, (h,))
        out = g.call_function(operator.getitem, (proj, 0))
        nodes += [proj, out]
        if between is not None:
            out = g.call_function(between, (out, torch.float32) if "convert" in str(between)
                                  else (out, 2.0))
            nodes.append(out)
        first = g.call_function(aten.add.Tensor, (x, out))
        mlp = g.call_function(torch.ops.lorafuse.lora_linear.default, (first,))
        mlp_out = g.call_function(operator.getitem, (mlp, 0))
        x = g.call_function(aten.add.Tensor, (first, mlp_out))
        nodes += [first, mlp, mlp_out, x]
        for n in nodes:
            n.meta["nn_module_stack"] = {"m": ("L['self'].model", "M"),
                                         "l": (f"L['self'].model.layers.{i}", "Layer")}
        adds.append((first, x))
    g.output((x,))
    return torch.fx.GraphModule(torch.nn.Module(), g), adds


@pytest.mark.parametrize("between,attention,kept", [
    (None, True, True),
    (torch.ops.prims.convert_element_type.default, True, True),  # autocast's cast
    (torch.ops.aten.mul.Tensor, True, False),  # a norm between (Gemma2's post-attention norm)
    (None, False, False),  # no attention in the layer
])
def test_post_attention_residual_kept(between, attention, kept):
    from torch.utils.checkpoint import CheckpointPolicy

    gm, adds = _residual_graph(between, attention)
    plan = lorafuse.layer_checkpoint.tag_layers(gm, lambda n: False)
    assert plan["residuals"] == 0  # not asked for (no offloading)
    gm, adds = _residual_graph(between, attention)
    plan = lorafuse.layer_checkpoint.tag_layers(
        gm, lambda n: False, residual_ops={torch.ops.lorafuse.lora_linear.default})
    assert plan["layers"] == 2 and plan["residuals"] == (2 if kept else 0), plan
    for layer, (first, last) in enumerate(adds):
        want = CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.MUST_RECOMPUTE
        assert first.meta["recompute"] == want and first.meta["ac_graph_id"] == layer
        assert last.meta["recompute"] == CheckpointPolicy.MUST_RECOMPUTE  # the MLP's add


def test_refused_with_an_explicit_memory_budget():
    with pytest.raises(ValueError, match="checkpoint_layers with memory_budget"):
        Options.parse({"checkpoint_layers": True, "memory_budget": 0.5})
    for budget in ("auto", None):
        assert Options.parse({"checkpoint_layers": True, "memory_budget": budget})


def test_fused_ops_carry_their_layers_module_path():
    """Every op the passes insert inside a layer carries that layer's module path (else it
    would not be recomputed with its layer); the loss op and the final norm are outside."""
    from lorafuse.backend import _run_passes
    from lorafuse.report import GraphReport

    model = make_tiny_model("llama", layers=2, seed=8)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    graphs = []

    def backend(gm, example_inputs):
        _run_passes(gm, Options.parse({"passes": PASSES, "strict": True}), GraphReport(0))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
    torch._dynamo.reset()
    (gm,) = graphs
    ours = [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "namespace", None) == "lorafuse"]
    where = {n.name: layer_of(n) for n in ours}
    # outside the layers: the loss op, and the final norm (the last RMSNorm)
    norms = [n for n in ours if "rms_norm" in str(n.target)]
    outside = {n.name for n in ours if "linear_cross_entropy" in str(n.target)} | {norms[-1].name}
    assert {name for name, path in where.items() if path is None} == outside, where
    in_layers = {name: path for name, path in where.items() if name not in outside}
    assert {p.rsplit(".", 1)[-1] for p in in_layers.values()} == {"0", "1"}, where


@pytest.mark.slow
@pytest.mark.parametrize("passes,offload", [(["lora", "attention"], False),
                                            (["lora", "attention", "dequant_matmul"], False),
                                            (["lora", "attention", "dequant_matmul"], True)])
def test_qlora_same_training_as_eager(passes, offload, tmp_path_factory, monkeypatch,
                                     no_autograd_cache):
    """A bitsandbytes 4-bit (NF4, double quantised, fp32 compute) Llama with LoRA: the 4-bit
    matmuls are recomputed with their layer, as bitsandbytes' own ops (default passes) or as
    the fused 4-bit op (dequant_matmul); with offloading, each layer's post-attention
    residual is kept, and the fused op of its output projection reduced to x' Aᵀ too."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(lorafuse.partition, "OFFLOAD_MIN_BYTES", 0)
    import transformers
    from conftest import _hf_config
    from test_dequant_matmul import GEOMETRY, _quantized_model

    torch.manual_seed(0)  # 2 layers; sizes multiples of 64 (test_dequant_matmul says why)
    cfg = _hf_config("llama", LAYERS, GEOMETRY)
    path = tmp_path_factory.mktemp("qlora-llama")
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    runs = {}
    for name, options in (("eager", None), ("ckpt", {"passes": passes, "checkpoint_layers": True,
                                                     "offload_activations": offload})):
        torch.manual_seed(0)  # the same LoRA A initialisation in both models
        model = _quantized_model(path, "llama", "nf4", True, torch.float32, "all-linear")
        runs[name] = lorafuse_sgd_run(model, _batches(), LR, options)
    (graph,) = runs["ckpt"]["report"].graphs
    assert graph.checkpointed_layers == LAYERS, graph.format()
    # the fused op's recompute is reduced to x' Aᵀ where its output is not read (as in the
    # bf16 test above); bitsandbytes' own ops are left as they are
    fused = "dequant_matmul" in passes
    assert graph.kept_residuals == (LAYERS if fused and offload else 0), graph.format()
    assert graph.lowrank_only == (LAYERS - 1 + graph.kept_residuals if fused else 0), \
        graph.format()
    for step in range(STEPS):
        torch.testing.assert_close(runs["ckpt"]["losses"][step], runs["eager"]["losses"][step],
                                   rtol=1e-5, atol=0)
        for name, g in runs["eager"]["grads"][step].items():
            assert _rel(runs["ckpt"]["grads"][step][name], g) <= 1e-4, (step, name)


def test_lowrank_only_rewrite_on_a_small_graph():
    """``partition.lowrank_only_recomputes`` on a hand-built backward-like graph: the call
    whose output is unread (only its h) becomes ``lora_linear_h`` and computes the same h;
    the call whose output is read, and a call without example values, are kept."""
    from torch import fx
    from torch._dynamo.utils import counters

    from lorafuse.partition import lowrank_only_recomputes

    op = torch.ops.lorafuse.lora_linear.default
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*s, generator=g) for s in ((2, 3, 8), (5, 8), (4, 8), (5, 4)))
    graph = fx.Graph()
    px, pw, pa, pb = (graph.placeholder(n) for n in ("x", "w", "a", "b"))
    unread = graph.call_function(op, (px, pw, None, pa, pb, 0.5), {"x_lora": None})
    read = graph.call_function(op, (px, pw, None, pa, pb, 0.5, None))
    bare = graph.call_function(op, (px, pw, None, pa, pb, 0.5, None))  # no meta["val"]
    outs = [graph.call_function(operator.getitem, (unread, 1)),
            graph.call_function(operator.getitem, (read, 0)),
            graph.call_function(operator.getitem, (read, 1)),
            graph.call_function(operator.getitem, (bare, 1))]
    graph.output(tuple(outs))
    for node in (unread, read):
        node.meta["val"] = op(x, w, None, a, b, 0.5, None)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    want = gm(x, w, a, b)
    before = counters["lorafuse"]["recompute_h_only"]
    assert lowrank_only_recomputes(gm) == 1
    assert counters["lorafuse"]["recompute_h_only"] == before + 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(op) == 2 and targets.count(torch.ops.lorafuse.lora_linear_h.default) == 1
    got = gm(x, w, a, b)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
