"""GGUF export (lorafuse/export.py): the file read back with gguf-py holds the merged
weights under llama.cpp's names and layout, with the right metadata; the model rebuilt from
it computes the PEFT model's logits; errors are clear and leave no file behind; and, where
llama-cpp-python is installed, llama.cpp itself loads the file and generates the same
tokens as transformers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import assert_close_fp32, make_tiny_model, randomize_lora
from lorafuse import export as gexport
from lorafuse.export import ExportError, export_gguf

gguf = pytest.importorskip("gguf")

# llama.cpp's tensor names for a Hugging Face Llama/Mistral/Qwen2 checkpoint (convert_hf_to_gguf.py)
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (pairs (2i, 2i+1) of a head) back to transformers' (i, i+d/2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


def read_gguf(path):
    """(tensors as fp32 torch in PyTorch's shape, their GGML types, metadata values)."""
    reader = gguf.GGUFReader(path)
    tensors, types = {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = torch.from_numpy(
            gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")).reshape(shape)
        types[t.name] = t.tensor_type.name
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return tensors, types, meta


def hf_state_from_gguf(tensors: dict, cfg, permuted: bool) -> dict:
    """The Hugging Face state dict a GGUF file stands for (q/k rows put back for llama)."""
    names = {gguf_name(n): n for n in reference_names(cfg)}
    state = {}
    for name, value in tensors.items():
        hf_name = names[name]
        if permuted and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
            value = unpermute_rope_rows(value, heads)
        state[hf_name] = value
    return state


def reference_names(cfg) -> list[str]:
    import transformers

    return list(transformers.AutoModelForCausalLM.from_config(cfg).state_dict())


def peft_merged_state(model) -> dict:
    """PEFT's own merge (merge_and_unload on a copy): the reference for the merged weights."""
    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().float() for k, v in merged.state_dict().items()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rebuilt_logits(path, cfg, ids):
    """Logits of a fresh transformers model loaded with the weights read back from the file."""
    import transformers

    tensors, _, _ = read_gguf(path)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = hf_state_from_gguf(tensors, cfg, permuted=cfg.model_type != "qwen2")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    return logits(model.eval(), ids)


# the pre-tokenizer regexes of Llama 3's and Qwen2's tokenizer.json
SPLIT_REGEXES = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog. " * 4,
                  "Hello world, hello there! It's 2024: 12345 apples, I'll   see\n\nyou."]


def byte_level_tokenizer(pre: str = "gpt-2", vocab_size: int = 300):
    """A small byte-level BPE trained here (no download), as transformers wraps it. ``pre``:
    GPT-2's pre-tokenizer (ByteLevel's own regex), or Llama 3's / Qwen2's regex split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if pre == "gpt-2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Llama 3 also takes a whole word found in the vocabulary without merging
        tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")


def ids_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=g)


# ----------------------------------------------------------------------------- round trips


def test_permutation_is_llama_cpp_rope_pairing():
    """The q/k reordering turns transformers' rotate-half RoPE into llama.cpp's adjacent-pair
    RoPE: permute(rope_half(q)) == rope_pairs(permute(q)) for a random q and position."""
    n_heads, head_dim = 3, 8
    q = torch.randn(n_heads * head_dim, dtype=torch.float64)
    angle = 5 * (10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    cos, sin = angle.cos(), angle.sin()
    x = q.view(n_heads, 2, head_dim // 2)  # transformers: element i pairs with i + d/2
    half = torch.stack([x[:, 0] * cos - x[:, 1] * sin, x[:, 1] * cos + x[:, 0] * sin], 1)
    p = gexport._permute_for_llama_rope(q, n_heads).view(n_heads, head_dim // 2, 2)  # pairs (2i, 2i+1)
    pairs = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], -1)
    torch.testing.assert_close(gexport._permute_for_llama_rope(half.reshape(-1), n_heads),
                               pairs.reshape(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unpermute_rope_rows(gexport._permute_for_llama_rope(q, n_heads), n_heads), q)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f32_file_holds_exactly_the_merged_weights(arch, tmp_path):
    model = make_tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_for(model)
    want_logits = logits(model.eval(), ids)
    want = peft_merged_state(model)

    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    tensors, types, meta = read_gguf(path)

    assert set(tensors) == {gguf_name(n) for n in want}
    assert set(types.values()) == {"F32"}
    state = hf_state_from_gguf(tensors, model.config, permuted=arch != "qwen2")
    for name, value in want.items():
        assert state[name].shape == value.shape, name
        assert torch.equal(state[name], value), name  # same sums, same order as PEFT's merge
    if arch == "qwen2":  # no permutation for qwen2: q as transformers has it, bias included
        assert torch.equal(tensors["blk.0.attn_q.bias"], want["model.layers.0.self_attn.q_proj.bias"])
    else:  # the permutation did move rows
        assert not torch.equal(tensors["blk.0.attn_q.weight"], want["model.layers.0.self_attn.q_proj.weight"])
    assert_close_fp32(rebuilt_logits(path, model.config, ids), want_logits)

    # the user's model is untouched: same tensors, adapters unmerged, same outputs
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert torch.equal(logits(model, ids), want_logits)

    cfg, arch_name = model.config, meta["general.architecture"]
    assert arch_name == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[arch]
    expected = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
                "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
                "attention.head_count": cfg.num_attention_heads,
                "attention.head_count_kv": cfg.num_key_value_heads,
                "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
                "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}
    for key, value in expected.items():
        assert meta[f"{arch_name}.{key}"] == value, key
    assert meta[f"{arch_name}.rope.freq_base"] == cfg.rope_parameters["rope_theta"]
    assert math.isclose(meta[f"{arch_name}.attention.layer_norm_rms_epsilon"], cfg.rms_norm_eps,
                        rel_tol=1e-6)
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32


@pytest.fixture(scope="module")
def llama_and_reference():
    model = make_tiny_model("llama", seed=3)
    return model, peft_merged_state(model)


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_dtypes_are_the_merged_weights_rounded_once(llama_and_reference, dtype, torch_dtype,
                                                         tmp_path):
    model, want = llama_and_reference
    tensors, types, meta = read_gguf(export_gguf(model, tmp_path / "m.gguf", dtype=dtype))
    state = hf_state_from_gguf(tensors, model.config, permuted=True)
    for name, value in want.items():
        if value.dim() == 1:  # norms stay f32, as llama.cpp keeps them
            assert types[gguf_name(name)] == "F32" and torch.equal(state[name], value), name
        else:  # round to nearest even from the fp32 merge, once
            assert types[gguf_name(name)] == dtype.upper()
            assert torch.equal(state[name], value.to(torch_dtype).float()), name
    assert meta["general.file_type"] == gguf.LlamaFileType[gexport.DTYPES[dtype][1]]


def test_q8_0_within_one_quantization_step_and_f16_where_rows_do_not_fit(llama_and_reference,
                                                                         tmp_path):
    model, want = llama_and_reference
    with pytest.warns(UserWarning, match="kept in f16: blk.0.ffn_down.weight"):
        path = export_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    tensors, types, _ = read_gguf(path)
    state = hf_state_from_gguf(tensors, model.config, permuted=True)
    for name, value in want.items():
        got = state[name]
        if value.dim() == 1:
            assert torch.equal(got, value), name
        elif value.shape[-1] % 32:  # down_proj: 72 inputs per row
            assert types[gguf_name(name)] == "F16" and torch.equal(got, value.half().float()), name
        else:  # 32 values share one scale amax/127: error at most half a step, plus f16 scale rounding
            assert types[gguf_name(name)] == "Q8_0"
            step = value.reshape(value.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            err = (got - value).reshape(step.shape[0], -1, 32).abs()
            assert (err <= 0.51 * step + 1e-3 * step * 127).all(), name
            assert not torch.equal(got, value)  # it did quantize


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    model = make_tiny_model("llama", tie_word_embeddings=True)
    ids = ids_for(model)
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    tensors, _, _ = read_gguf(path)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert_close_fp32(rebuilt_logits(path, model.config, ids), logits(model.eval(), ids))


def test_compiled_model_lm_head_lora_and_several_adapters(tmp_path):
    """torch.compile's wrapper is looked through; LoRA on lm_head and on the embedding and a
    second active adapter are all merged, as the forward computes them."""
    from peft import LoraConfig

    model = make_tiny_model("llama", target_modules=["q_proj", "v_proj", "lm_head", "embed_tokens"])
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    model.base_model.set_adapter(["default", "second"])
    randomize_lora(model, 0.2, seed=5)
    ids = ids_for(model)
    want_logits = logits(model.eval(), ids)
    path = export_gguf(torch.compile(model, backend="eager"), tmp_path / "m.gguf", dtype="f32")
    assert_close_fp32(rebuilt_logits(path, model.config, ids), want_logits)


def test_modules_to_save_export_the_trained_copy(tmp_path):
    model = make_tiny_model("llama", lora_kwargs={"modules_to_save": ["lm_head"]})
    head = model.base_model.model.lm_head
    with torch.no_grad():  # the trained copy differs from the original
        head.modules_to_save["default"].weight.add_(torch.randn_like(head.original_module.weight))
    ids = ids_for(model)
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert_close_fp32(rebuilt_logits(path, model.config, ids), logits(model.eval(), ids))


def test_disabled_adapters_export_the_base_model(tmp_path):
    model = make_tiny_model("llama")
    ids = ids_for(model)
    with model.disable_adapter():
        want = logits(model.eval(), ids)
        path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert not torch.allclose(want, logits(model, ids))  # the adapters do change the output
    assert_close_fp32(rebuilt_logits(path, model.config, ids), want)


def test_qlora_4bit_base_is_dequantized(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers
    from peft import LoraConfig, get_peft_model

    from conftest import _hf_config

    torch.manual_seed(0)
    cfg = _hf_config("llama", 1, dict(hidden_size=64, intermediate_size=128, head_dim=16))
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, dtype=torch.float32, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, 0.2)
    ids = ids_for(model)
    want = logits(model.train(), ids)  # training mode: bitsandbytes dequantizes, fp32 matmul
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32")
    assert_close_fp32(rebuilt_logits(path, model.config, ids), want)

    # an eval-mode forward on CPU may repack the weights into bitsandbytes' AVX512-BF16
    # layout (absmax rounded to bf16): the export still reads the weights the layer uses
    evaluated = logits(model.eval(), ids)
    path = export_gguf(model, tmp_path / "m2.gguf", dtype="f32")
    got = rebuilt_logits(path, model.config, ids)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * scale)
    torch.testing.assert_close(got, evaluated, rtol=0, atol=1e-2 * scale)


def test_tokenizer_metadata(tmp_path):
    tokenizer = byte_level_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer) + 4)  # padded like real models
    _, _, meta = read_gguf(export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert tokens[:len(vocab)] == [t for t, _ in vocab]
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), len(vocab) + 4)]
    assert types[tokenizer.bos_token_id] == gguf.TokenType.CONTROL
    assert types[len(vocab)] == gguf.TokenType.UNUSED
    assert types.count(gguf.TokenType.NORMAL) == len(vocab) - 2
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds nothing


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_named_for_llama_cpp(pre):
    spec = json.loads(byte_level_tokenizer(pre).backend_tokenizer.to_str())
    assert gexport._pre_tokenizer_name(spec["pre_tokenizer"]) == pre


def test_unknown_pre_tokenizer_is_written_as_default_with_a_warning():
    from tokenizers import Regex, pre_tokenizers

    tokenizer = byte_level_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(use_regex=False)])
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    with pytest.warns(UserWarning, match="written as 'default'"):
        assert gexport._pre_tokenizer_name(spec["pre_tokenizer"]) == "default"


def test_sentencepiece_style_tokenizer_is_refused(tmp_path):
    """Byte-fallback BPE with a Metaspace pre-tokenizer (Llama 2, Mistral 7B) needs llama.cpp's
    "llama" tokenizer model, which this exporter does not write: a clear error, no file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "a": 2}, merges=[], byte_fallback=True,
                               unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(ExportError, match="BPE with byte fallback and pre-tokenizer 'Metaspace'"):
        export_gguf(make_tiny_model("mistral"), tmp_path / "m.gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype,match", [("q4_k_m", "llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M"),
                                         ("float8", "unknown dtype 'float8'")])
def test_bad_dtype_is_refused_before_writing(llama_and_reference, tmp_path, dtype, match):
    with pytest.raises(ExportError, match=match):
        export_gguf(llama_and_reference[0], tmp_path / "m.gguf", dtype=dtype)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_unsupported_architecture_is_refused(arch, tmp_path):
    with pytest.raises(ExportError, match="supported: llama, mistral, qwen2"):
        export_gguf(make_tiny_model(arch), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_dora_is_refused(tmp_path):
    with pytest.raises(ExportError, match="LoRA variant .DoraLinearVariant.*merge_and_unload"):
        export_gguf(make_tiny_model("llama", use_dora=True), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_mistral_sliding_window_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match="sliding_window=8, which llama.cpp's architecture ignores"):
        export_gguf(make_tiny_model("mistral", sliding_window=8), tmp_path / "m.gguf")


def test_failure_while_writing_leaves_no_file(llama_and_reference, tmp_path, monkeypatch):
    calls = []

    def failing_quantize(data, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing_quantize)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(llama_and_reference[0], tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_model_and_adapter_folders(tmp_path, capsys):
    tokenizer = byte_level_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "base")  # the base, no LoRA layers
    model.save_pretrained(tmp_path / "adapter")  # PEFT saves only the adapter
    tokenizer.save_pretrained(tmp_path / "adapter")
    ids = ids_for(model)

    out = tmp_path / "model.gguf"
    assert gexport.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                         "--out", str(out), "--dtype", "f32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_close_fp32(rebuilt_logits(out, model.config, ids), logits(model.eval(), ids))
    vocab = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    assert read_gguf(out)[2]["tokenizer.ggml.tokens"] == vocab


@pytest.mark.parametrize("case", ["missing model", "missing adapter", "bad dtype", "missing folder"])
def test_cli_errors_exit_nonzero_and_write_nothing(case, tmp_path, capsys):
    make_tiny_model("llama").unload().save_pretrained(tmp_path / "base")
    out = tmp_path / "m.gguf"
    args = {"missing model": ["--model", str(tmp_path / "nope"), "--out", str(out)],
            "missing adapter": ["--model", str(tmp_path / "base"), "--adapter",
                                str(tmp_path / "nope"), "--out", str(out)],
            "bad dtype": ["--model", str(tmp_path / "base"), "--out", str(out), "--dtype", "q4_0"],
            "missing folder": ["--model", str(tmp_path / "base"),
                               "--out", str(tmp_path / "no" / "m.gguf")]}[case]
    assert gexport.main(args) != 0
    err = capsys.readouterr().err
    assert "error:" in err and ("nope" in err or "llama-quantize" in err or "does not exist" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# ----------------------------------------------------------------------------- llama.cpp

# Run in a subprocess: a crash inside llama.cpp fails one test instead of killing pytest.
# Prints {"tokens": tokenizer's ids for the prompt, "logits": the prompt's logits,
# "generated": greedy continuation}.
LLAMA_CPP_WORKER = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import llama as llama_module

path, prompt, n_new, extra_bufts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
default_params = llama_module.llama_cpp.llama_model_default_params
def model_params():  # CPU repacked ("extra") buffers on or off
    params = default_params()
    params.use_extra_bufts = extra_bufts
    return params
llama_module.llama_cpp.llama_model_default_params = model_params
llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, n_threads=1)
tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)
llm.eval(tokens)
logits = np.array(llm.scores[:len(tokens)]).tolist()
generated = []
for _ in range(n_new):
    generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    llm.eval([generated[-1]])
llm.close()
print(json.dumps({"tokens": tokens, "logits": logits, "generated": generated}))
"""


def run_llama_cpp(path, prompt: str, n_new: int, extra_bufts: bool) -> dict:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", LLAMA_CPP_WORKER, str(path), prompt, str(n_new),
                           "1" if extra_bufts else "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"llama.cpp exited with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("arch,dtype", [("llama", "f32"), ("llama", "f16"), ("llama", "bf16"),
                                        ("llama", "q8_0"), ("llama3", "f32"), ("mistral", "f32"),
                                        ("qwen2", "f32")])
def test_llama_cpp_generates_what_transformers_generates(arch, dtype, tmp_path):
    """llama.cpp (llama-cpp-python) loads the exported file with its tokenizer: it splits the
    prompt into the same ids, computes the same logits and continues greedily with the same
    ten tokens as transformers on the PEFT model. "llama3": Llama 3's RoPE scaling (a
    rope_freqs tensor) and tied embeddings (no output tensor)."""
    pytest.importorskip("llama_cpp")
    tokenizer = byte_level_tokenizer()
    extra = dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True) if arch == "llama3" else {}
    model = make_tiny_model("llama" if arch == "llama3" else arch, vocab_size=len(tokenizer),
                            max_position_embeddings=128, rms_norm_eps=1e-5,
                            initializer_range=0.2, **extra)  # std 0.2: decisive, varied argmaxes
    model.eval()
    prompt = "the quick brown fox"
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        want_logits = model(input_ids=torch.tensor([ids])).logits[0]
        want = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert len(set(want)) >= 4  # a comparison of varied tokens, not one token repeated

    path = export_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer=tokenizer)
    if arch == "llama3":
        assert {"rope_freqs.weight", "output.weight"} & set(read_gguf(path)[0]) == {"rope_freqs.weight"}
    # this machine's llama.cpp build crashes on Q8_0 in its CPU repacked buffers (its own
    # llama-quantize output too); the plain CPU buffers run it
    got = run_llama_cpp(path, prompt, n_new=10, extra_bufts=dtype != "q8_0")
    assert got["tokens"] == ids
    scale = want_logits.abs().max().item()
    # llama.cpp keeps its KV cache in f16 (f32 files too) and, for q8_0 weights, rounds the
    # activations to 8 bits in each matmul
    tolerance = {"f32": 1e-3, "f16": 3e-3, "bf16": 2e-2, "q8_0": 5e-2}[dtype]
    torch.testing.assert_close(torch.tensor(got["logits"]), want_logits, rtol=0, atol=tolerance * scale)
    assert got["generated"] == want


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_transformers(pre, tmp_path):
    """Contractions, digit runs, repeated spaces and newlines split as transformers splits them."""
    pytest.importorskip("llama_cpp")
    tokenizer = byte_level_tokenizer(pre)
    model = make_tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=128)
    path = export_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tokenizer)
    text = "Hello world! It's 2024: 123456 apples, they'll   see\n\n you. ÅÉ ok"
    got = run_llama_cpp(path, text, n_new=0, extra_bufts=True)
    assert got["tokens"] == tokenizer.encode(text)
