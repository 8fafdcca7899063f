"""Layer checkpointing inside the compiler: the ``checkpoint_layers`` option.

Gradient checkpointing keeps only each decoder layer's input for the backward and runs the
layer's forward again there. Hugging Face's own (``gradient_checkpointing_enable``) breaks
PEFT models' full-graph capture (DESIGN.md); this does the same on the joint graph
instead, with torch's selective-checkpointing tags, which min-cut honours:

- every forward op of a repeated layer (found by its module path: the outermost module
  indexed in a ModuleList, ``model.layers.3``, whatever the architecture calls it) is
  tagged ``MUST_RECOMPUTE`` with that layer's number as its ``ac_graph_id``, except
  attention, whose output (and log-sum-exp) min-cut keeps, as torchtitan's selective
  checkpointing does: it is the layer's costliest op to recompute at long sequences, and
  SDPA's ops carry torch's "random" tag (for their dropout) even at ``dropout_p=0``,
  which would make torch save and replay RNG states around every recomputed call;
- min-cut then saves only what crosses from one layer to the next (torch's
  ``cleanup_recompute_tags`` marks such a tensor ``MUST_SAVE``), plus what the ops
  outside the layers need (embedding, final norm, loss), and orders the backward so that
  each layer is recomputed right before its own backward (``reordering_to_mimic_autograd_engine``).

A recomputed layer's MLP output is read by nothing in the backward (the next layer's
input is kept): partition.lowrank_only_recomputes then reduces the down projection's
recomputed LoRA op to its x' Aᵀ, skipping a quarter of the layer's recomputed matmul work,
which a checkpoint that reruns the layer's Python forward cannot skip.

With ``offload_activations`` the saved layer inputs go to CPU memory too: this is then
what Unsloth calls offloaded gradient checkpointing. There, each layer's post-attention
residual (the sum of the layer's input and its attention output projection, when that
projection is a LoRA op whose output feeds the add directly) is kept as well
(``MUST_SAVE``): the recompute then needs the output projection only for its x' Aᵀ, one
(tokens × hidden × hidden) GEMM less a layer, for one more hidden-size tensor a layer in
host memory and over PCIe (≈ 50 % more). Not without offloading, where it would cost GPU
memory, and not where a norm sits between the projection and the add (Gemma2's
post-attention norm reads the projection's output anyway). The fused ops carry their layer's
module path (passes/_graph.py ``inserting_before``), so they are recomputed with it.

Left to min-cut's ordinary plan (and reported): graphs with fewer than two layers, and
layers with an op that draws random numbers when it runs (SDPA with ``dropout_p > 0``),
whose recompute would draw different ones. Dropout that Inductor lowers draws from seeds
the graph computes once (``inductor_random``), so its recompute replays the same masks.

``recompute`` and ``ac_graph_id`` are the node-meta keys torch's own checkpoint tracing
sets and min-cut reads (``cleanup_recompute_tags``): a convention, not a public API, so
``tests/test_layer_checkpoint.py`` checks the plan on every torch that CI runs.
"""

from __future__ import annotations

import operator
import re

import torch
from torch.utils.checkpoint import CheckpointPolicy

# A module path ending in a ModuleList index: "….layers.3" or "….layers[3]".
_INDEXED = re.compile(r"(\[\d+\]|\.\d+)$")
# lorafuse's attention ops (kernels/attention.py, kernels/flash_attention.py); aten's all
# have "attention" in their names
_LORAFUSE_ATTENTION = ("flash_attention", "sdpa_causal_ranges_or_masked", "eager_ranges_or_chain")


def is_attention(node) -> bool:
    """An attention op (aten's SDPA family or lorafuse's), or a getitem of one."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return is_attention(node.args[0])
    namespace = getattr(node.target, "namespace", None)
    name = str(node.target).split(".")[1] if namespace else ""
    return (namespace == "aten" and "attention" in name) or \
        (namespace == "lorafuse" and name in _LORAFUSE_ATTENTION)


def layer_of(node) -> str | None:
    """The outermost indexed module on ``node``'s module path (its decoder layer), or None
    (ops outside the layers: embedding, final norm, lm_head, loss)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if _INDEXED.search(str(path)):
            return str(path)
    return None


# casts that may sit between a projection and the residual add (autocast)
_CASTS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _projection_output_in(node, layer, ops) -> bool:
    """``node`` is (a cast of) output 0 of an op in ``ops`` computed in ``layer``."""
    while node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != 0:
        return False
    op = node.args[0]
    return op.target in ops and layer_of(op) == layer


def is_post_attention_residual(node, layer, ops) -> bool:
    """``node`` adds (a cast of) the output of a projection op in ``ops`` computed in
    ``layer`` to a value from outside the layer (its input). ``tag_layers`` asks only after
    the layer's attention, and keeps the first such add a layer."""
    if node.target is not torch.ops.aten.add.Tensor or len(node.args) != 2 or \
            not all(isinstance(a, torch.fx.Node) for a in node.args):
        return False
    a, b = node.args
    return any(_projection_output_in(p, layer, ops) and layer_of(o) != layer
               for p, o in ((a, b), (b, a)))


def tag_layers(joint_gm, draws_random, keep_attention: bool = True,
               residual_ops=frozenset()) -> dict:
    """Tag the forward ops of each layer of the joint graph for recompute (see the module
    docstring). ``draws_random(node)``: whether an op draws random numbers.
    ``keep_attention=False`` (``checkpoint_layers="full"``): attention is recomputed too,
    and only what crosses between layers is kept (half the bytes of a Llama layer's input
    plus attention's output); torch then saves and replays the RNG state of each SDPA call,
    whose op carries the random tag even without dropout. ``residual_ops``: the LoRA ops
    whose recompute partition.lowrank_only_recomputes can reduce to x' Aᵀ; each layer's
    first add of such an op's output (after its attention) to the layer's input is kept,
    not recomputed (``is_post_attention_residual``; the module docstring says why and
    when). Empty (the default): nothing is kept.

    Returns ``{"layers": n, "ops": tagged, "residuals": kept}``, or ``{"layers": 0,
    "note": why}`` when nothing was tagged."""
    graph = joint_gm.graph
    backward = set()  # everything computed from an incoming gradient (nodes are in order)
    layer_ids: dict = {}
    tagged, residuals, attended = [], {}, set()  # residuals: layer -> its kept add
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or \
                any(a in backward for a in node.all_input_nodes):
            backward.add(node)
            continue
        if node.op != "call_function":
            continue
        layer = layer_of(node)
        if layer is None:
            continue
        if is_attention(node):
            attended.add(layer)
        if residual_ops and layer in attended and layer not in residuals \
                and is_post_attention_residual(node, layer, residual_ops):
            residuals[layer] = node
            continue
        if not (keep_attention and is_attention(node) and not draws_random(node)):
            tagged.append((node, layer_ids.setdefault(layer, len(layer_ids))))
    if len(layer_ids) < 2:
        return {"layers": 0, "note": f"checkpoint_layers: {len(layer_ids)} layer(s) found in "
                                     "this graph; nothing to checkpoint"}
    random = [node.name for node, _ in tagged if draws_random(node)]
    if random:
        return {"layers": 0, "note": "checkpoint_layers: not applied, the layers draw random "
                                     f"numbers ({', '.join(random[:3])}: dropout?) and their "
                                     "recompute would draw different ones"}
    for node, layer in tagged:
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        node.meta["ac_graph_id"] = layer
    for layer, node in residuals.items():
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        node.meta["ac_graph_id"] = layer_ids.setdefault(layer, len(layer_ids))
    return {"layers": len(layer_ids), "ops": len(tagged), "residuals": len(residuals)}
