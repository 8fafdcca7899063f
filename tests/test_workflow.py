"""After training: the compiled PEFT model in evaluation, generation and saving.

The models are test_trainer.py's Trainer runs (``hf_runs``): a tiny Llama + LoRA trained
3 steps by HF ``Trainer``, once eagerly and once compiled in place with lorafuse, same seed,
fp32 on CPU. Checked against eager:
- an eval-mode forward under ``torch.no_grad()`` (logits and loss), a prefill and a decode
  step with a KV cache through the compiled model, and greedy ``generate`` (same tokens);
- ``save_pretrained`` of the adapters (same files, same config, the same tensors up to the
  training trajectories' ulps), ``merge_and_unload`` (logits of the merged model equal the
  adapter model's) and the merged model saved as safetensors and loaded back (bit-equal).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import assert_close_fp32, lora_sites
from test_trainer import SEQ, TRAJ_RTOL, make_texts, make_tokenizer, tiny_model, trainer_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    return trainer_runs(tmp_path_factory)


def eval_batch() -> dict:
    """A padded batch with labels, as a user's collator gives it."""
    from transformers import DataCollatorForLanguageModeling

    tok = make_tokenizer()
    collate = DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=SEQ)
    batch = collate([tok(t) for t in make_texts(2, seed=4)])
    assert (batch["attention_mask"] == 0).any()
    return batch


def eager_copy(model):
    """An uncompiled model with ``model``'s weights, in eval mode."""
    eager = tiny_model()
    eager.load_state_dict(model.state_dict())
    return eager.eval()


def prompt(length: int = SEQ):  # the eval batches' length: static shapes, fewer compiles
    ids = torch.randint(3, 32, (2, length), generator=torch.Generator().manual_seed(5))
    return ids, torch.ones_like(ids)


def test_eval_forward_matches_eager(hf_runs):
    model = hf_runs["compiled"].model.eval()
    eager, batch = eager_copy(model), eval_batch()
    with torch.no_grad():
        got, want = model(**batch), eager(**batch)
    assert_close_fp32(got.logits, want.logits, what="eval logits")
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_kv_cache_prefill_and_decode_match_eager(hf_runs):
    """Inference graphs with a KV cache go through the backend (compiled model's call)."""
    model = hf_runs["compiled"].model.eval()
    eager = eager_copy(model)
    ids, mask = prompt()
    fused_before = counters["lorafuse"]["lora"]
    steps = {}
    with torch.no_grad():
        for name, m in (("compiled", model), ("eager", eager)):
            first = m(input_ids=ids, attention_mask=mask, use_cache=True)
            nxt = first.logits[:, -1:].argmax(-1)
            second = m(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                       past_key_values=first.past_key_values, use_cache=True)
            steps[name] = (first.logits, nxt, second.logits)
    fused = counters["lorafuse"]["lora"] - fused_before
    assert fused >= 2 * lora_sites(model), "prefill and decode were not compiled"
    (got_prefill, got_tok, got_decode), (want_prefill, want_tok, want_decode) = steps.values()
    assert_close_fp32(got_prefill, want_prefill, what="prefill logits")
    assert torch.equal(got_tok, want_tok)
    assert_close_fp32(got_decode, want_decode, what="decode logits")


def test_generate_matches_eager(hf_runs):
    """Greedy generation with a KV cache gives eager's tokens. (PEFT's ``generate`` calls
    the base model's, so it runs uncompiled; the test above covers compiled decoding.)"""
    model = hf_runs["compiled"].model.eval()
    eager = eager_copy(model)
    ids, mask = prompt()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True,
              pad_token_id=0)
    with torch.no_grad():
        got, want = model.generate(input_ids=ids, **kw), eager.generate(input_ids=ids, **kw)
    assert got.shape == (2, ids.shape[1] + 4)
    assert torch.equal(got, want), (got, want)


def _saved(path) -> tuple[dict, dict, set]:
    from safetensors.torch import load_file

    with open(path / "adapter_config.json") as f:
        config = json.load(f)
    return config, load_file(path / "adapter_model.safetensors"), set(os.listdir(path))


def test_saved_adapters_match_eager(hf_runs, tmp_path):
    from peft import get_peft_model_state_dict

    compiled, eager = hf_runs["compiled"].model, hf_runs["eager"].model
    compiled.save_pretrained(tmp_path / "compiled")
    eager.save_pretrained(tmp_path / "eager")
    # the plain-loop recipe's wrapper, torch.compile(model, ...), saves through to the model
    torch.compile(compiled, backend="lorafuse").save_pretrained(tmp_path / "wrapped")
    got_cfg, got, got_files = _saved(tmp_path / "compiled")
    want_cfg, want, want_files = _saved(tmp_path / "eager")
    wrapped_cfg, wrapped, _ = _saved(tmp_path / "wrapped")
    assert got_files == want_files and got_cfg == want_cfg == wrapped_cfg
    live = get_peft_model_state_dict(compiled)
    initial = get_peft_model_state_dict(tiny_model())
    assert got.keys() == want.keys() == live.keys() == wrapped.keys()
    assert len(got) == 2 * lora_sites(compiled)
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32 and got[k].shape == want[k].shape
        assert torch.equal(got[k], live[k]) and torch.equal(wrapped[k], live[k]), k
        assert_close_fp32(got[k], want[k], rtol=TRAJ_RTOL, what=k)
        assert not torch.equal(got[k], initial[k]), f"{k} did not train"


def test_merge_and_unload_and_save_safetensors(hf_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = hf_runs["compiled"].model.eval()
    batch = eval_batch()
    with torch.no_grad():
        adapter_logits = model(**batch).logits
    merged = copy.deepcopy(model).merge_and_unload()  # a copy: the other tests keep the adapters
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    assert_close_fp32(merged_logits, adapter_logits, what="merged vs adapter logits")

    merged.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, merged_logits)
