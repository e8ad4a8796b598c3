"""`moe-trace run CHECKPOINT` end to end: a tiny saved checkpoint, a real word-level tokenizer built with
`tokenizers` (no download), padding, batches, chat template, the modes, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_trace.cli.main import main
from moe_trace.models import load_checkpoint, save_tiny_checkpoint
from moe_trace.models.tokenizer import save_tiny_tokenizer

PROMPTS = ["why is the sky blue", "the quick brown fox jumps over the lazy dog", "hello"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "olmoe"
    save_tiny_checkpoint("olmoe", path)
    save_tiny_tokenizer(path, vocab_size=256)
    return path


def _reference(ckpt, chat: bool, batch_size: int, new: int):
    """The same work by hand: plain experts pre-hooks count assignments; generations without profiling."""
    from transformers import AutoTokenizer

    from moe_trace.cli.run_cmd import encode

    model = load_checkpoint(ckpt)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    tok.padding_side = "left"
    layers = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    counts = np.zeros((len(layers), 8), dtype=np.int64)
    pad_mask = {}  # the batch's attention mask: its 0 positions (left padding) are not routed tokens

    def hook(i):
        def h(module, args, kwargs):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            m = pad_mask.get("prefill")
            if m is not None and idx.shape[0] == m.numel():  # the prefill forward: drop pad rows
                idx = idx[m.reshape(-1).bool()]
            counts[i] += np.bincount(idx.reshape(-1).numpy(), minlength=8)
        return h

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    texts = []
    try:
        with torch.no_grad():
            for b in range(0, len(PROMPTS), batch_size):
                enc = encode(tok, PROMPTS[b:b + batch_size], chat)
                pad_mask["prefill"] = enc["attention_mask"]
                out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
                for ids in out[:, enc["input_ids"].shape[1]:].tolist():
                    if tok.eos_token_id in ids:
                        ids = ids[: ids.index(tok.eos_token_id) + 1]
                    texts.append(tok.decode(ids, skip_special_tokens=True))
    finally:
        for h in handles:
            h.remove()
    return counts, texts


@pytest.mark.parametrize("chat", [False, True])
def test_run_counts_equal_reference_hooks_and_generations_unchanged(ckpt, tmp_path, capsys, chat):
    argv = ["run", str(ckpt), "--batch-size", "2", "--max-new-tokens", "4", "--logdir", str(tmp_path / "r"),
            "--no-progress"] + [a for p in PROMPTS for a in ("--prompt", p)] + (["--chat"] if chat else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "router ms" in out and "2 batch(es)" in out       # timing mode by default: latency columns
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    counts, texts = _reference(ckpt, chat, 2, 4)
    assert [l["expert_counts"] for l in report["layers"]] == counts.tolist()
    gens = [json.loads(line) for line in (tmp_path / "r" / "generations.jsonl").read_text().splitlines()]
    assert [g["text"] for g in gens] == texts and [g["prompt"] for g in gens] == PROMPTS
    assert report["phases"]["prefill"]["forward_calls"] == 2  # one prefill per batch
    assert report["timing_source"] is not None


def test_run_kineto_prompts_file_progress_bar(ckpt, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n\n")
    logdir = tmp_path / "k"
    proc = subprocess.run([sys.executable, "-m", "moe_trace", "run", str(ckpt), "--prompts-file", str(pf),
                           "--batch-size", "3", "--max-new-tokens", "3", "--mode", "kineto", "--logdir", str(logdir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "batches: 100%" in proc.stderr and "1/1" in proc.stderr    # the tqdm bar over batches
    traces = list(logdir.glob("*.pt.trace.json.gz"))
    assert len(traces) == 1 and (logdir / "report.json").exists()
    import moe_trace

    analyzed = moe_trace.analyze(traces[0]).to_dict()
    saved = json.loads((logdir / "report.json").read_text())
    assert [l["expert_counts"] for l in analyzed["layers"]] == [l["expert_counts"] for l in saved["layers"]]


def _err(argv, capsys):
    capsys.readouterr()  # drop the set-up's output
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-trace: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_run_errors_are_one_line(ckpt, tmp_path, capsys):
    assert "does not exist" in _err(["run", str(tmp_path / "nope")], capsys)
    bare = tmp_path / "bare"
    save_tiny_checkpoint("olmoe", bare)                       # weights but no tokenizer
    assert "no tokenizer in" in _err(["run", str(bare)], capsys)
    assert "--tokenizer" in _err(["run", str(bare), "--tokenizer", str(tmp_path)], capsys)
    notmpl = tmp_path / "tok_nochat"
    save_tiny_tokenizer(notmpl, chat_template=False)
    assert "chat template" in _err(["run", str(ckpt), "--tokenizer", str(notmpl), "--chat"], capsys)
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(dense)
    save_tiny_tokenizer(dense)
    assert "MoE" in _err(["run", str(dense)], capsys)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _err(["run", str(ckpt), "--device", "cuda"], capsys)
    big = tmp_path / "tok_big"
    # a tokenizer with more ids than the model's vocabulary
    from moe_trace.models.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(300, texts=[" ".join(f"w{i}" for i in range(400))]).save_pretrained(str(big))
    assert "vocabulary" in _err(["run", str(ckpt), "--tokenizer", str(big)], capsys)
