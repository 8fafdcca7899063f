"""Which 4-bit linears the dequant_matmul pass rewrites on this machine, and why it leaves the
others: a tiny random Llama loaded in 4-bit (NF4, double quant, bf16 compute) + PEFT LoRA,
in training mode, compiled with lorafuse (verbose report on stderr), one training step under
bf16 autocast. ``--dump`` also prints the graph Dynamo hands the backend and the forward and
backward bodies of each ``autograd_function_apply`` (bitsandbytes' MatMul4Bit), with the
parameter prefixes shortened: what to compare when a torch release captures another form.

    python bench/probe_qlora_graph.py [--device cpu|cuda] [--dump]

Training mode matters on CPU: ``from_pretrained`` returns the model in eval mode, and there
bitsandbytes 0.50 repacks the weight of every Linear4bit whose input needs no gradient
(layer 0's q/k/v) into its AVX512-BF16 inference layout on the first forward, inside the
traced region; those sites then call ``gemv_4bit`` (left alone by the pass), and plain
Inductor fails at run time on the repacked weight.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_PREFIX = re.compile(r"l_self_(dict_)?modules_base_model_(dict_)?modules_model_modules_model_"
                     r"(modules_)?(layers_modules_)?")


def _short(graph) -> str:
    return _PREFIX.sub("", str(graph)).replace("_modules_base_layer_parameters_weight", ".W")


def dump_then(backend):
    """A backend that prints the captured graph and the autograd_function_apply bodies,
    then hands the graph to ``backend``."""
    afa = torch.ops.higher_order.autograd_function_apply

    def _dump(gm, example_inputs, **kw):
        print(f"=== graph (torch {torch.__version__})\n{_short(gm.graph)}")
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is afa:
                for body in node.args[:2]:
                    print(f"=== {body.target} of {node.name} (used by {list(node.users)})\n"
                          f"{_short(getattr(gm, body.target).graph)}")
        return backend(gm, example_inputs, **kw)

    return _dump


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    import lorafuse

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dump", action="store_true", help="print the captured graph and bodies")
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
    model.train()  # from_pretrained leaves the modules in eval mode (see above)
    backend = lorafuse.backend(passes=("lora", "attention", "dequant_matmul"), verbose=True)
    compiled = torch.compile(model, backend=dump_then(backend) if args.dump else backend)
    ids = torch.randint(0, 512, (2, 64), device=args.device)
    with torch.autocast(args.device, torch.bfloat16):
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    from torch._dynamo.utils import counters

    print("counters", dict(counters["lorafuse"]), "loss", loss.item())


if __name__ == "__main__":
    main()
