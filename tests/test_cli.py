"""The ``lorafuse`` command: ``finetune`` on each data format, its error messages, its output
folder (complete or absent), the GPU memory check, and the forwarded subcommands."""

import json
import math
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import _hf_config, reset_dynamo
from lorafuse import cli

WORDS = "the cat dog bird sat ran on a mat log red big and then hello what is yes no".split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _tokenizer(chat_template=CHAT_TEMPLATE):
    """A word-level tokenizer built here: BOS added in front, pad/EOS tokens, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-init Llama (1 layer) and the tokenizer, saved as a local model folder."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_hf_config("llama", 1, {})).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _sentence(rng, lo=3, hi=10):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _examples(fmt, n=12):
    import random

    rng = random.Random(0)
    if fmt == "text":
        return [{"text": _sentence(rng)} for _ in range(n)]
    if fmt == "prompt_completion":
        return [{"prompt": _sentence(rng), "completion": _sentence(rng)} for _ in range(n)]
    return [{"messages": [{"role": "user", "content": _sentence(rng)},
                          {"role": "assistant", "content": _sentence(rng)}]} for _ in range(n)]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _finetune(model_dir, data, out, *extra):
    return cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                     "--max-steps", "3", "--batch-size", "2", "--no-compile", *extra])


def _step_losses(stdout):
    return [float(x) for x in re.findall(r"^step \d+/\d+  loss (\S+)", stdout, re.M)]


def _leftovers(folder):
    """Temporary folders finetune leaves next to --out (there should be none)."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- data → batches

def test_prompt_tokens_and_padding_are_masked_in_labels():
    tok = _tokenizer()
    ex = cli.tokenize_example(tok, {"prompt": "what is the cat", "completion": "a red cat"})
    prompt_ids = tok("what is the cat")["input_ids"]  # BOS + 4 words
    completion_ids = tok("a red cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(prompt_ids) == 5 and len(completion_ids) == 4
    assert ex["input_ids"] == prompt_ids + completion_ids
    assert ex["labels"] == [-100] * 5 + completion_ids

    short = cli.tokenize_example(tok, {"text": "the dog ran"})
    assert short["input_ids"] == tok("the dog ran")["input_ids"] + [tok.eos_token_id]
    assert short["labels"] == short["input_ids"]  # text: loss on every token

    batch = cli.pad_collate([ex, short], length=12, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 12)
    assert batch["labels"][0].tolist() == ex["labels"] + [-100] * 3
    assert batch["labels"][1].tolist() == short["labels"] + [-100] * 7
    assert batch["input_ids"][1].tolist() == short["input_ids"] + [tok.pad_token_id] * 7
    assert batch["attention_mask"].sum(1).tolist() == [9, 5]
    assert batch["attention_mask"][1, 5:].eq(0).all() and batch["attention_mask"][1, :5].eq(1).all()


def test_messages_go_through_the_chat_template():
    tok = _tokenizer()
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
    ex = cli.tokenize_example(tok, {"messages": msgs})
    want = tok("<|user|> hello </s> <|assistant|> yes </s>", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == want == tok.convert_tokens_to_ids(
        ["<|user|>", "hello", "</s>", "<|assistant|>", "yes", "</s>"])
    assert ex["labels"] == want


def test_truncation_and_prompts_that_leave_no_completion(tmp_path):
    tok = _tokenizer()
    data = _write(tmp_path / "d.jsonl", [{"text": "the cat sat on a mat and then the dog ran"},
                                         {"prompt": "the cat sat on a mat", "completion": "yes"},
                                         {"prompt": "the cat", "completion": "no"}])
    examples, facts = cli.load_dataset(data, tok, seq_len=5)
    assert facts == {"formats": ["prompt_completion", "text"], "truncated": 2, "dropped": 1}
    assert [len(ex["input_ids"]) for ex in examples] == [5, 5]
    assert examples[1]["labels"] == [-100, -100, -100, tok.convert_tokens_to_ids("no"), tok.eos_token_id]


# --------------------------------------------------------------------------- good runs

@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages"])
def test_finetune_each_format_saves_adapters_that_load(model_dir, tmp_path, capsys, fmt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _write(tmp_path / "data.jsonl", _examples(fmt))
    out = tmp_path / "runs" / "adapter"
    assert _finetune(model_dir, data, out, "--lr", "1e-2") == 0
    stdout = capsys.readouterr().out
    losses = _step_losses(stdout)
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), stdout
    assert f"loss {losses[0]:.4f} → {losses[-1]:.4f}" in stdout  # the summary line
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert _leftovers(out.parent) == []

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 7  # q k v o gate up down of the one layer
    assert all(p.abs().max() > 0 for p in lora_b.values())  # PEFT starts B at zero: these trained
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_overwrite_replaces_a_non_empty_out(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "data.jsonl", _examples("text"))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    assert _finetune(model_dir, data, out) == 1
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _finetune(model_dir, data, out, "--overwrite") == 0
    names = {p.name for p in out.iterdir()}
    assert "adapter_model.safetensors" in names and "old.txt" not in names
    assert _leftovers(tmp_path) == []


def test_a_failure_while_training_leaves_no_out(model_dir, tmp_path, monkeypatch):
    import transformers

    def broken_train(self, *a, **kw):
        raise RuntimeError("simulated crash in the middle of training")

    monkeypatch.setattr(transformers.Trainer, "train", broken_train)
    data = _write(tmp_path / "data.jsonl", _examples("text"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        _finetune(model_dir, data, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


# --------------------------------------------------------------------------- user errors

GOOD = {"text": "the cat sat"}
BAD_DATA = {
    "bad_json": ([GOOD, '{"text": "the dog" "ran"}'], 2, "not valid JSON"),
    "prompt_without_completion": ([GOOD, GOOD, {"prompt": "the cat"}],
                                  3, 'needs both "prompt" and "completion"; "completion" is missing'),
    "unknown_keys": ([{"input": "the cat"}], 1, 'expected one of {"text": ...}, {"prompt": ..., "completion"'),
    "text_not_a_string": ([GOOD, {"text": 5}], 2, '"text" should be a string, found a number: 5'),
    "completion_not_a_string": ([{"prompt": "a", "completion": ["cat"]}], 1,
                                '"completion" should be a string, found an array'),
    "messages_not_a_list": ([{"messages": "hello"}], 1, '"messages" should be a non-empty array'),
    "message_without_content": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}], 1,
                                'messages[1] should be an object with string "role" and "content"'),
    "not_an_object": ([GOOD, '["the cat"]'], 2, "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_malformed_data_names_file_line_and_what_was_expected(model_dir, tmp_path, capsys, case):
    lines, line_no, expected = BAD_DATA[case]
    data = _write(tmp_path / "data.jsonl", lines)
    assert _finetune(model_dir, data, tmp_path / "adapter") == 1
    err = capsys.readouterr().err
    assert f"{data}:{line_no}: " in err and expected in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no --out, no temporary


def test_empty_data_file_and_missing_paths(model_dir, tmp_path, capsys):
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    assert _finetune(model_dir, empty, tmp_path / "a") == 1
    assert f"{empty}: no examples (the file is empty)" in capsys.readouterr().err
    assert _finetune(model_dir, tmp_path / "nope.jsonl", tmp_path / "a") == 1
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert _finetune(tmp_path / "no-model", empty, tmp_path / "a") == 1
    assert "no-model: no such folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_unknown_pass_and_bad_numbers(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "data.jsonl", _examples("text"))
    assert _finetune(model_dir, data, tmp_path / "a", "--passes", "lora,fusion") == 1
    assert "--passes: lorafuse: unknown pass(es) ['fusion']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        _finetune(model_dir, data, tmp_path / "a", "--lora-r", "0")
    assert exc.value.code == 2 and "must be > 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_messages_need_a_chat_template(model_dir, tmp_path, capsys):
    plain = tmp_path / "no-template"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    data = _write(tmp_path / "data.jsonl", _examples("messages"))
    assert _finetune(plain, data, tmp_path / "adapter") == 1
    err = capsys.readouterr().err
    assert f"{data}:1: " in err and "need the tokenizer's chat template" in err, err
    assert not (tmp_path / "adapter").exists()


def test_qlora_needs_a_gpu(model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = _write(tmp_path / "data.jsonl", _examples("text"))
    assert _finetune(model_dir, data, tmp_path / "adapter", "--qlora") == 1
    assert "--qlora needs a CUDA GPU" in capsys.readouterr().err


# --------------------------------------------------------------------------- GPU memory estimate

def test_memory_estimate_counts_weights_and_lora_exactly(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    targets = ["q_proj", "down_proj"]
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, target_modules=targets))
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    n_base = sum(p.numel() for p in lora.parameters() if not p.requires_grad)
    sizes = cli.model_sizes(config, targets)
    parts = cli.estimate_memory(sizes, qlora=False, lora_r=8, batch_size=2, seq_len=32, dtype_bytes=2)
    assert parts["weights"] == 2 * n_base and parts["lora"] == 16 * n_lora
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    bigger = cli.estimate_memory(sizes, qlora=True, lora_r=8, batch_size=4, seq_len=32, dtype_bytes=2)
    assert bigger["activations"] == 2 * parts["activations"]  # linear in tokens
    assert bigger["weights"] < parts["weights"]  # 4-bit linears


def test_gpu_too_small_says_what_would_fit(model_dir, tmp_path, capsys, monkeypatch):
    """A (pretend) GPU between what batch 1 and batch 8 need: refused before loading anything,
    and each suggestion named fits by the same estimate."""
    from transformers import AutoConfig

    sizes = cli.model_sizes(AutoConfig.from_pretrained(model_dir), "all-linear")
    data = _write(tmp_path / "data.jsonl", _examples("text", n=16))
    seq = 16  # the data's longest example (12 tokens) rounded up to a multiple of 8

    def need(**kw):
        return cli.estimate_memory(sizes, **{**dict(qlora=False, lora_r=16, batch_size=8, seq_len=seq), **kw})["total"]

    total = (need(batch_size=1) + need()) // 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="Small GPU", total_memory=total))
    out = tmp_path / "adapter"
    rc = cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                   "--batch-size", "8", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and f"needs about {need() / 2**30:.1f} GiB" in err, err
    bs, accum = map(int, re.search(r"--batch-size (\d+) --grad-accum (\d+)", err).groups())
    assert bs < 8 and bs * accum == 8 and need(batch_size=bs) <= total < need(batch_size=2 * bs)
    assert ("--qlora (about" in err) == (need(qlora=True) <= total)
    assert not out.exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- subcommands

def test_export_gguf_forwards_or_says_it_is_missing(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lorafuse.export", None)  # as if the module were absent
    assert cli.main(["export-gguf", "--model", "m", "--out", "x.gguf"]) == 1
    assert "export-gguf is not available" in capsys.readouterr().err
    monkeypatch.undo()

    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "lorafuse.export", fake)
    assert cli.main(["export-gguf", "--model", "m", "--out", "x.gguf"]) == 0
    assert seen == [["--model", "m", "--out", "x.gguf"]]


def test_export_gguf_reaches_the_real_module(capsys):
    pytest.importorskip("lorafuse.export")
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-gguf", "--help"])
    assert exc.value.code == 0 and "--adapter" in capsys.readouterr().out


def test_demo_is_forwarded(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0 and "--steps" in capsys.readouterr().out


def test_console_script_reports_user_errors_without_traceback(tmp_path):
    exe = shutil.which("lorafuse")
    cmd = [exe] if exe else [sys.executable, "-m", "lorafuse.cli"]
    proc = subprocess.run([*cmd, "finetune", "--model", str(tmp_path / "missing"), "--data", "d.jsonl",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "lorafuse finetune: error: --model" in proc.stderr and "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_subcommand_prints_usage(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "finetune" in err and "export-gguf" in err and "demo" in err


# --------------------------------------------------------------------------- compiled (slow)

@pytest.mark.slow
def test_finetune_compiled_with_lorafuse_prints_the_report(model_dir, tmp_path, capsys):
    reset_dynamo()
    data = _write(tmp_path / "data.jsonl", _examples("prompt_completion"))
    out = tmp_path / "adapter"
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                     "--max-steps", "3", "--batch-size", "2"]) == 0
    cap = capsys.readouterr()
    assert "lora: 7 matched" in cap.err  # the backend's report (verbose) at the first compile
    losses = _step_losses(cap.out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert "lorafuse fused lora 7" in cap.out
    assert (out / "adapter_model.safetensors").is_file()
    reset_dynamo()


@pytest.mark.parametrize("option,message", [
    ("offload", "--option 'offload': expected KEY=VALUE"),
    ("offload_activations=yes", "--option: lorafuse: option(s) ['offload_activations'] take True or False"),
    ("activation_dtype=int4", "--option: "),
    ("no_such=1", "--option: lorafuse: unknown option(s) ['no_such']"),
    ("passes=[\"lora\"]", "--option passes: use --passes")])
def test_bad_backend_options_are_clear_errors(model_dir, tmp_path, capsys, option, message):
    data = _write(tmp_path / "data.jsonl", _examples("text"))
    assert _finetune(model_dir, data, tmp_path / "a", "--option", option) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_finetune_with_memory_options(model_dir, tmp_path, capsys):
    """--option reaches the backend: int8 storage, offloading and drop_logits show in the
    report, and the run trains."""
    reset_dynamo()
    data = _write(tmp_path / "data.jsonl", _examples("prompt_completion"))
    out = tmp_path / "adapter"
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "2", "--passes", "lora", "loss",
                     "--option", "activation_dtype=int8", "--option", "offload_activations=true",
                     "--option", "drop_logits=true"]) == 0
    cap = capsys.readouterr()
    assert "activation_dtype int8:" in cap.err and "offload_activations:" in cap.err
    assert "drop_logits: lm_head's logits are not returned" in cap.err
    losses = _step_losses(cap.out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    reset_dynamo()
