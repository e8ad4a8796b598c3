"""A local checkpoint with its tokenizer, real prompts, a padded batch (what `moe-trace run` does).

    python examples/local_checkpoint.py                  # saves a tiny checkpoint + tokenizer to a temp dir first
    python examples/local_checkpoint.py /path/to/checkpoint
"""
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_trace

if len(sys.argv) > 1:
    path = sys.argv[1]
else:  # a tiny stand-in: random weights and a word-level tokenizer, both saved like a real checkpoint
    from moe_trace.models import save_tiny_checkpoint
    from moe_trace.models.tokenizer import save_tiny_tokenizer

    path = tempfile.mkdtemp(prefix="tiny_olmoe_")
    save_tiny_checkpoint("olmoe", path)
    save_tiny_tokenizer(path, vocab_size=256)

tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side = "left"                           # decoder-only generation pads on the left
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(path).eval()

prompts = ["Why is the sky blue?", "The quick brown fox"]
batch = tokenizer(prompts, return_tensors="pt", padding=True)
with moe_trace.profile(model, mode="timing") as run, torch.no_grad():
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
for p, ids in zip(prompts, out[:, batch["input_ids"].shape[1]:]):
    print(f"{p!r} -> {tokenizer.decode(ids, skip_special_tokens=True)!r}")
print(run.report())
