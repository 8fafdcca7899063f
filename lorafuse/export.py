"""Export a LoRA fine-tune to GGUF, llama.cpp's file format, with the adapters merged.

``export_gguf(model, "model.gguf")`` takes a PEFT LoRA model (or a plain Hugging Face causal
LM), possibly wrapped by ``torch.compile``, and writes one GGUF file: the base weights with
every active LoRA adapter merged in (``W + (B @ A) * scaling`` in fp32, site by site; the
model passed in is not modified), the hyper-parameters llama.cpp reads and, when one is
given, the tokenizer. ``python -m lorafuse.export --model DIR --out FILE.gguf`` does the same
from saved folders.

Supported: Llama and Mistral (llama.cpp's ``llama`` architecture) and Qwen2 (``qwen2``);
dtypes f32, f16, bf16 and q8_0 (k-quants such as q4_k_m are made from the f16 file by
llama.cpp's ``llama-quantize``). Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style).

Conventions are llama.cpp's (``convert_hf_to_gguf.py``): GGUF tensor names from gguf-py's
name map; 1-D tensors (norms, biases) stay f32; for the ``llama`` architecture the rows of
q and k are reordered within each head, since llama.cpp rotates adjacent pairs of a head
(x0, x1), (x2, x3), ... while transformers rotates (x_i, x_{i + d/2}); llama3/linear RoPE
scaling becomes a ``rope_freqs`` tensor of per-frequency divisors.

The file is written to ``<out>.partial`` in the same folder, tensor by tensor (one merged
tensor in memory at a time), and renamed at the end: a failed export leaves no .gguf.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# HF config.model_type -> gguf MODEL_ARCH member name
SUPPORTED_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
# dtype -> (GGMLQuantizationType member, LlamaFileType member)
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
          "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# pre-tokenizer regexes of tokenizer.json -> llama.cpp's tokenizer.ggml.pre name
_PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
_SCALED_ROPE_TYPES = ("linear", "llama3")  # pure per-frequency scaling: a rope_freqs tensor


class ExportError(ValueError):
    """The model, tokenizer, dtype or path cannot be exported as asked (the message says why)."""


def export_gguf(model, path, dtype: str = "f16", tokenizer=None) -> Path:
    """Write ``model`` with its active LoRA adapters merged to the GGUF file ``path``.

    ``model``: a PEFT LoRA model or a Hugging Face causal LM (``torch.compile``-wrapped or
    not) of a supported architecture; bitsandbytes 4-bit bases are dequantized. ``dtype``:
    "f32", "f16", "bf16" or "q8_0" for the 2-D weights (q8_0 falls back to f16 for a weight
    whose rows are not a multiple of 32, as llama.cpp's converter does). ``tokenizer``: a
    fast (tokenizers-backed) byte-level BPE tokenizer, written into the file so llama.cpp
    can run it; without one the file holds weights only. Returns the path written.
    """
    gguf = _import_gguf()
    import numpy as np  # a dependency of gguf

    qtype, file_type = _resolve_dtype(gguf, dtype)
    hf_model = _unwrap(model)
    cfg = hf_model.config
    arch = _check_architecture(gguf, cfg)
    rope_theta, rope_factors = _rope(cfg)
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist")

    tensors = _gguf_tensors(gguf, arch, cfg, _hf_tensors(hf_model), qtype, rope_factors)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(getattr(cfg, "name_or_path", "") or cfg.model_type).name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, cfg, rope_theta)
    if tokenizer is not None:
        _add_tokenizer(gguf, writer, tokenizer, cfg.vocab_size)
    for t in tensors:  # the dtype argument only matters for raw uint8 data, which this is not
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes(gguf),
                               raw_dtype=t.qtype)

    partial = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for t in tensors:
                writer.write_tensor_data(gguf.quants.quantize(t.load().numpy(), t.qtype))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- checks


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs the gguf package: pip install 'lorafuse[gguf]'") from e
    return gguf


def _resolve_dtype(gguf, dtype: str):
    """(GGMLQuantizationType, LlamaFileType) for a dtype name, or a clear error."""
    key = str(dtype).lower()
    if key in DTYPES:
        qtype, file_type = DTYPES[key]
        return gguf.GGMLQuantizationType[qtype], gguf.LlamaFileType[file_type]
    llama_cpp_types = {name.removeprefix("MOSTLY_").lower()
                       for name in gguf.LlamaFileType.__members__ if name.startswith("MOSTLY_")}
    if key in llama_cpp_types:
        raise ExportError(
            f"dtype {dtype!r} is made by llama.cpp's quantizer, not by lorafuse (which writes "
            f"{', '.join(DTYPES)}): export f16, then run "
            f"`llama-quantize model-f16.gguf model-{key}.gguf {key.upper()}`")
    raise ExportError(f"unknown dtype {dtype!r}: supported are {', '.join(DTYPES)} "
                      "(other quantizations: export f16 and run llama.cpp's llama-quantize)")


def _unwrap(model):
    """The Hugging Face model under torch.compile and PEFT wrappers (LoRA layers still in it)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    while hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        model = model._orig_mod
    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, LoraModel):
            raise ExportError(f"only LoRA adapters can be merged; this PEFT model is a "
                              f"{type(model.base_model).__name__}")
        model = model.base_model
    if isinstance(model, LoraModel):
        model = model.model
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
        raise ExportError(f"expected a Hugging Face causal LM (or a PEFT model of one), got "
                          f"{type(model).__name__}")
    return model


def _check_architecture(gguf, cfg):
    """The gguf MODEL_ARCH for ``cfg``, after refusing what llama.cpp would compute differently."""
    model_type = cfg.model_type
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"architecture {model_type!r} is not supported by GGUF export; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = gguf.MODEL_ARCH[SUPPORTED_ARCHITECTURES[model_type]]
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"{model_type} with hidden_act={cfg.hidden_act!r}: llama.cpp's "
                          f"{gguf.MODEL_ARCH_NAMES[arch]} architecture uses silu")
    if arch == gguf.MODEL_ARCH.QWEN2 and _head_dim(cfg) * cfg.num_attention_heads != cfg.hidden_size:
        raise ExportError("qwen2 with head_dim * num_attention_heads != hidden_size: llama.cpp's "
                          "qwen2 architecture assumes they are equal")
    window = getattr(cfg, "sliding_window", None)
    sliding = getattr(cfg, "use_sliding_window", model_type == "mistral")
    if sliding and window is not None and window < cfg.max_position_embeddings:
        warnings.warn(f"lorafuse: export_gguf: {model_type} has sliding_window={window}, which "
                      "llama.cpp's architecture ignores: its outputs differ from transformers' "
                      f"for sequences longer than {window} tokens", stacklevel=3)
    return arch


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope(cfg):
    """(rope_theta, per-frequency divisors or None) as llama.cpp takes them."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ExportError(f"RoPE parameters per layer type ({', '.join(params)}) are not supported "
                          "by GGUF export")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    if rope_type not in _SCALED_ROPE_TYPES:
        raise ExportError(f"RoPE type {rope_type!r} is not supported by GGUF export "
                          f"(supported: default, {', '.join(_SCALED_ROPE_TYPES)})")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg)
    if attention_factor != 1.0:
        raise ExportError(f"RoPE type {rope_type!r} with attention factor {attention_factor}: "
                          "not representable as llama.cpp frequency factors")
    dim = _head_dim(cfg)
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return theta, (default / scaled.float()).cpu()


# ----------------------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    """One tensor to write: its name and shape (numpy order), how to compute its fp32 value."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    param: torch.Tensor | None = None  # the parameter itself when nothing is merged into it
    qtype: object = None

    def nbytes(self, gguf) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _hf_tensors(hf_model) -> list[_Tensor]:
    """Every parameter of ``hf_model`` under its Hugging Face name (as in a saved checkpoint),
    LoRA sites as their merged weight; PEFT's modules_to_save as the copy the forward uses."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    out: list[_Tensor] = []

    def visit(module, prefix):
        if isinstance(module, ModulesToSaveWrapper):
            return visit(_active_copy(module), prefix)
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            out.append(_Tensor(prefix + "weight", _weight_shape(base.weight),
                               lambda: _merged_weight(module, prefix[:-1])))
            if getattr(base, "bias", None) is not None:
                out.append(_Tensor(prefix + "bias", base.bias.shape, lambda: _dense(base.bias)))
            return None
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise ExportError(f"{prefix[:-1]}: PEFT's {type(module).__name__} cannot be merged "
                              "(only LoRA layers and modules_to_save)")
        for name, p in module.named_parameters(recurse=False):
            out.append(_Tensor(prefix + name, _weight_shape(p), lambda p=p: _dense(p), param=p))
        for name, child in module.named_children():
            visit(child, prefix + name + ".")
        return None

    visit(hf_model, "")
    return out


def _active_copy(wrapper):
    """The module a ModulesToSaveWrapper's forward runs: the active adapter's trained copy."""
    active = [a for a in wrapper.active_adapters if a in wrapper.modules_to_save]
    if wrapper.disable_adapters or not active:
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _weight_shape(w) -> torch.Size:
    quant_state = getattr(w, "quant_state", None)  # bitsandbytes 4-bit: packed data, real shape here
    return torch.Size(quant_state.shape) if quant_state is not None else w.shape


def _dense(w) -> torch.Tensor:
    """A parameter's value in fp32 on the CPU (bitsandbytes 4-bit weights dequantized)."""
    if w.device.type == "meta":
        raise ExportError("a parameter is on the meta device (offloaded by accelerate?): load "
                          "the model fully into memory before exporting")
    if type(w).__name__ == "Int8Params":
        raise ExportError("bitsandbytes 8-bit weights are not supported by GGUF export: load "
                          "the base model in 16 or 32 bits (or 4-bit) instead")
    if getattr(w, "quant_state", None) is not None:
        try:
            w = _dequantize_4bit(w)
        except Exception as e:
            raise ExportError(f"could not dequantize a bitsandbytes 4-bit weight of shape "
                              f"{tuple(w.quant_state.shape)}: {e}") from e
    return w.detach().to("cpu", torch.float32)


def _dequantize_4bit(w) -> torch.Tensor:
    import bitsandbytes as bnb

    state = w.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return bnb.functional.dequantize_4bit(w.data, state)
    # bitsandbytes' CPU inference path (eval mode, AVX512-BF16) repacked the weight into a
    # private layout that dequantize_4bit does not read: take the weight the layer now
    # computes with from its own matmul, I @ W^T = W^T, a block of identity rows at a time
    n, k = state.shape
    blocks = []
    for start in range(0, k, 1024):
        rows = torch.arange(min(1024, k - start))
        eye = torch.zeros(len(rows), k, device=w.device)
        eye[rows, start + rows] = 1.0
        blocks.append(bnb.matmul_4bit(eye, w, quant_state=state).float())
    return torch.cat(blocks).T


def _merged_weight(layer, where: str) -> torch.Tensor:
    """What ``layer``'s forward uses as its weight: W, or W + (B @ A) * scaling summed over the
    active adapters (the order of PEFT's own merge), in fp32."""
    weight = _dense(layer.get_base_layer().weight)
    if layer.merged:
        if layer.disable_adapters:
            raise ExportError(f"{where}: adapters are merged into the weights and disabled; "
                              "unmerge them (model.unmerge_adapter()) before exporting")
        return weight  # the adapters are in the weight already
    if layer.disable_adapters:
        return weight
    for adapter in layer.active_adapters:
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None or getattr(layer, "use_dora", {}).get(adapter):
            name = type(variant).__name__ if variant is not None else "DoRA"
            raise ExportError(f"{where}: adapter {adapter!r} is a LoRA variant ({name}); merge "
                              "it with PEFT (merge_and_unload()) and export the merged model")
        if adapter in layer.lora_A:
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            if a.weight.dim() != 2:
                raise ExportError(f"{where}: LoRA on {type(layer.get_base_layer()).__name__} "
                                  "is not supported (only Linear and Embedding)")
            if getattr(b, "bias", None) is not None:
                raise ExportError(f"{where}: LoRA with lora_bias=True is not supported")
            delta = _dense(b.weight) @ _dense(a.weight)
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
        elif adapter in getattr(layer, "lora_embedding_A", {}):
            delta = (_dense(layer.lora_embedding_B[adapter]) @
                     _dense(layer.lora_embedding_A[adapter])).T
        else:
            continue  # this site has no weights for that adapter
        weight = weight + delta * layer.scaling[adapter]
    return weight


def _permute_for_llama_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows (q/k weight or bias) from transformers' rotate-half pairing
    (i, i + d/2) to llama.cpp's adjacent pairing (2i, 2i + 1): rows [h, half, i] -> [h, i, half]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def _permuted(load, n_heads: int):
    return lambda: _permute_for_llama_rope(load(), n_heads)


def _gguf_tensors(gguf, arch, cfg, hf_tensors: list[_Tensor], qtype, rope_factors) -> list[_Tensor]:
    """The tensors in GGUF naming, order, layout and storage type."""
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    by_name = {t.name: t for t in hf_tensors}
    embed, head = by_name.get("model.embed_tokens.weight"), by_name.get("lm_head.weight")
    tied = embed is not None and head is not None and head.param is not None \
        and head.param is embed.param  # llama.cpp reuses token_embd when output is absent
    n_heads, n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads

    out, kept_f16 = [], []
    if rope_factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        out.append(_Tensor(name, tuple(rope_factors.shape), lambda: rope_factors,
                           qtype=gguf.GGMLQuantizationType.F32))
    for t in hf_tensors:
        if tied and t is head:
            continue
        name = name_map.get_name(t.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {t.name} has no GGUF name in llama.cpp's "
                              f"{gguf.MODEL_ARCH_NAMES[arch]} architecture")
        load = t.load
        if arch == gguf.MODEL_ARCH.LLAMA and t.name.endswith(("q_proj.weight", "q_proj.bias",
                                                             "k_proj.weight", "k_proj.bias")):
            load = _permuted(t.load, n_heads if ".q_proj." in t.name else n_kv_heads)
        tensor_qtype = qtype
        if len(t.shape) < 2:
            tensor_qtype = gguf.GGMLQuantizationType.F32  # norms and biases, as llama.cpp keeps them
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
            tensor_qtype = gguf.GGMLQuantizationType.F16  # a Q8_0 block is 32 values of one row
            kept_f16.append(name)
        out.append(_Tensor(name, tuple(t.shape), load, qtype=tensor_qtype))
    if kept_f16:
        warnings.warn(f"lorafuse: export_gguf: q8_0 needs rows of a multiple of 32 values; "
                      f"kept in f16: {', '.join(kept_f16)}", stacklevel=3)
    return out


# ----------------------------------------------------------------------------- metadata


def _add_hyperparameters(writer, cfg, rope_theta: float) -> None:
    head_dim = _head_dim(cfg)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def _add_tokenizer(gguf, writer, tokenizer, vocab_size: int) -> None:
    """Vocabulary, merges, token types, special ids and flags of a byte-level BPE tokenizer,
    as llama.cpp's "gpt2" tokenizer model reads them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) "
                          "tokenizer; load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    spec = json.loads(backend.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model["type"] != "BPE" or model.get("byte_fallback") or not _has_byte_level(pre):
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); this one "
            f"is {model['type']}{' with byte fallback' if model.get('byte_fallback') else ''} and "
            f"pre-tokenizer {pre.get('type')!r} (SentencePiece style, as Llama 2's and Mistral "
            "7B's). Export without the tokenizer, or merge with PEFT (merge_and_unload(), "
            "save_pretrained() with the tokenizer) and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py")

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())}, the model's "
                          f"vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp's names for unused ids
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if any(m.count(" ") != 1 for m in merges):
        raise ExportError("a BPE merge contains a space; llama.cpp's merge list cannot hold it")

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = _added_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _has_byte_level(pre: dict) -> bool:
    return pre.get("type") == "ByteLevel" or any(_has_byte_level(p) for p in pre.get("pretokenizers", ()))


def _pre_tokenizer_name(pre: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex that splits text before BPE)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    parts = pre.get("pretokenizers", ())
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    if len(regexes) == 1 and regexes[0] in _PRE_TOKENIZER_REGEXES:
        return _PRE_TOKENIZER_REGEXES[regexes[0]]
    warnings.warn("lorafuse: export_gguf: the tokenizer's pre-tokenizer is not one llama.cpp "
                  "names (gpt-2, llama-bpe, qwen2); written as 'default': llama.cpp may split "
                  "some texts into different tokens than transformers", stacklevel=4)
    return "default"


def _added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front and EOS at the end (compared on a sample text)."""
    text = "Hello world"
    core = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.encode(text, add_special_tokens=True)
    start = next((i for i in range(len(full) - len(core) + 1) if full[i:i + len(core)] == core), None)
    if start is None:
        return False, False
    prefix, suffix = full[:start], full[start + len(core):]
    add_bos = prefix == [tokenizer.bos_token_id] and prefix != []
    add_eos = suffix == [tokenizer.eos_token_id] and suffix != []
    if (prefix and not add_bos) or (suffix and not add_eos):
        warnings.warn(f"lorafuse: export_gguf: the tokenizer adds {prefix} before and {suffix} "
                      "after each text; llama.cpp can only add BOS/EOS", stacklevel=4)
    return add_bos, add_eos


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    """``python -m lorafuse.export --model DIR --out FILE.gguf [--adapter DIR] [--dtype f16]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lorafuse.export",
        description="Merge a LoRA adapter into its base model and write a GGUF file for llama.cpp.")
    parser.add_argument("--model", required=True,
                        help="Hugging Face model folder (config.json and weights)")
    parser.add_argument("--adapter", help="PEFT LoRA adapter folder to merge (adapter_config.json)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--dtype", default="f16", help=f"{', '.join(DTYPES)} (default f16)")
    args = parser.parse_args(argv)
    try:
        _resolve_dtype(_import_gguf(), args.dtype)  # before the (slow) model load
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise ExportError(f"--model {model_dir}: no config.json there (not a Hugging Face "
                              "model folder)")
        adapter_dir = Path(args.adapter) if args.adapter else None
        if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
            raise ExportError(f"--adapter {adapter_dir}: no adapter_config.json there (not a "
                              "PEFT adapter folder)")
        out = Path(args.out)
        if not out.parent.is_dir():
            raise ExportError(f"--out {out}: folder {out.parent} does not exist")

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        tokenizer = _load_tokenizer(adapter_dir, model_dir)
        export_gguf(model, out, dtype=args.dtype, tokenizer=tokenizer)
    except (ExportError, OSError, ImportError) as e:
        print(f"lorafuse export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _load_tokenizer(adapter_dir, model_dir):
    """The tokenizer saved with the adapter, else with the model, else None (with a warning)."""
    from transformers import AutoTokenizer

    for folder in (adapter_dir, model_dir):
        if folder is not None and any((folder / f).is_file()
                                      for f in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder)
    warnings.warn("lorafuse: export: no tokenizer in the model or adapter folder; the GGUF "
                  "file holds no vocabulary, which llama.cpp needs to run text", stacklevel=2)
    return None


if __name__ == "__main__":
    sys.exit(main())
