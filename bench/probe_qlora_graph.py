"""Which 4-bit linears the dequant_matmul pass rewrites on this machine, and why it leaves the
others: a tiny random Llama loaded in 4-bit (NF4, double quant, bf16 compute) + PEFT LoRA,
compiled with lorafuse (verbose report on stderr), one training step.

    python bench/probe_qlora_graph.py [--device cuda]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import lorafuse

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, use_cache=False)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": args.device})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    report = lorafuse.Report() if hasattr(lorafuse, "Report") else None
    compiled = torch.compile(model, backend=lorafuse.backend(
        passes=("lora", "attention", "dequant_matmul"), verbose=True))
    ids = torch.randint(0, 512, (2, 64), device=args.device)
    with torch.autocast(args.device, torch.bfloat16):
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    from torch._dynamo.utils import counters

    print("counters", dict(counters["lorafuse"]), "loss", loss.item())
    del report, collections


if __name__ == "__main__":
    main()
