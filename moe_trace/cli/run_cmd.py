"""`moe-trace run CHECKPOINT`: profile generation of a local checkpoint on real prompts."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_trace.errors import ConfigError, NoMoELayersError

from moe_trace.checks import device as check_device
from moe_trace.checks import output_dir

from .options import HelpFormatter

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="profile generation of a local checkpoint on your prompts (tokenizer, batching, padding)",
        formatter_class=HelpFormatter,
        description="Load a local checkpoint and its tokenizer, tokenize the prompts (optionally through the chat "
                    "template), generate in left-padded batches with profiling on, print the report (with "
                    "latency in the timing and kineto modes) and write report.json, layers.csv, "
                    "generations.jsonl and, in kineto mode, the trace under --logdir. Nothing downloads.")
    p.add_argument("checkpoint", help="a local checkpoint directory (config.json + weights)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the checkpoint)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt (repeat the option for several; default: the first --batch-size bundled prompts)")
    p.add_argument("--prompts-file", default=None, metavar="F", help="prompts, one per line (added to --prompt)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call (left padded)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt at most")
    p.add_argument("--sample", action="store_true", help="sample (do_sample=True) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="torch seed for sampling")
    p.add_argument("--mode", default="timing", choices=["stats", "timing", "kineto"],
                   help="stats: routing counters; timing: + router/experts/shared ms; kineto: + torch.profiler trace")
    p.add_argument("--device", default="cpu", help="device of the whole model (cpu, cuda, cuda:1); see --device-map")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="accelerate device map instead of --device, e.g. auto (splits and offloads the layers)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="model dtype (auto: the checkpoint's)")
    p.add_argument("--logdir", default="runs/run", help="where report.json, layers.csv, generations and traces go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over batches")
    p.set_defaults(func=cmd_run)


def collect_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --prompts-file {args.prompts_file}: {exc.strerror or exc}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompts-file {args.prompts_file} holds no prompts (one per line)")
    if not prompts:
        from moe_trace.routing.pipeline import BUNDLED_PROMPTS

        prompts = BUNDLED_PROMPTS.read_text(encoding="utf-8").splitlines()[: args.batch_size]
    return prompts


def load_tokenizer(path: str, chat: bool):
    """The tokenizer of a local directory, left padded for generation, with a pad token."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--tokenizer {path}: not a directory")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}); save one there with "
                          "tokenizer.save_pretrained(DIR) or pass --tokenizer DIR")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # transformers raises OSError / ValueError / TypeError depending on what is missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"no tokenizer in {path} ({first[:160]}); save one there with "
                          "tokenizer.save_pretrained(DIR) or pass --tokenizer DIR") from None
    if not callable(tok) or not tok("hello world", add_special_tokens=False)["input_ids"]:
        raise ConfigError(f"the tokenizer in {path} encodes text to no tokens: pass a working one with --tokenizer DIR")
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"the tokenizer in {path} has neither a pad nor an eos token; batching needs one")
        tok.pad_token = tok.eos_token
    if chat and not getattr(tok, "chat_template", None):
        raise ConfigError(f"--chat: the tokenizer in {path} has no chat template; drop --chat or use a tokenizer "
                          "that has one")
    return tok


def encode(tok, prompts: list[str], chat: bool):
    if chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
        return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tok(prompts, return_tensors="pt", padding=True)


def cmd_run(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"{args.checkpoint} does not exist: give a local checkpoint directory")
    if not ckpt.is_dir() or not (ckpt / "config.json").is_file():
        raise ConfigError(f"{args.checkpoint} is not a checkpoint directory (no config.json)")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ConfigError("--batch-size and --max-new-tokens must be >= 1")
    if args.device_map is None:
        check_device(args.device)
    elif args.device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        try:
            check_device(args.device_map, "--device-map")
        except ConfigError:
            raise ConfigError(f"--device-map {args.device_map!r}: use auto, balanced, balanced_low_0, sequential or "
                              "one device (cpu, cuda:0, ...)") from None
    output_dir(args.logdir, "--logdir")  # report.json goes there after the work: check it before
    prompts = collect_prompts(args)
    tok = load_tokenizer(args.tokenizer or args.checkpoint, args.chat)

    import moe_trace
    from moe_trace.cli.core_cmds import build_on_meta

    try:  # no weights yet: a non-MoE checkpoint fails here, in a second, with one line
        moe_trace.detect(build_on_meta(str(ckpt)))
    except NoMoELayersError as exc:
        raise NoMoELayersError(f"{args.checkpoint}: {exc}") from None

    import torch
    from tqdm.auto import tqdm

    from moe_trace.models import load_checkpoint

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_checkpoint(ckpt, dtype=dtype, device=args.device, device_map=args.device_map)
    vocab = model.config.get_text_config().vocab_size
    if len(tok) > vocab:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary is {vocab}: "
                          "pass the tokenizer that belongs to this checkpoint (--tokenizer DIR)")
    first_device = next(model.parameters()).device
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    logdir = Path(args.logdir)
    torch.manual_seed(args.seed)
    print(f"moe-trace run: {args.checkpoint}, {len(prompts)} prompt(s) in {len(batches)} batch(es) of "
          f"<= {args.batch_size}, <= {args.max_new_tokens} new tokens, mode {args.mode}"
          + (", chat template" if args.chat else ""))
    generations = []
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
                  "pad_token_id": tok.pad_token_id}
    if not args.sample:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    with moe_trace.profile(model, mode=args.mode, logdir=logdir) as run, torch.no_grad():
        for batch in tqdm(batches, desc="batches", unit="batch", disable=args.no_progress, file=sys.stderr):
            enc = encode(tok, batch, args.chat).to(first_device)
            out = model.generate(**enc, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            for prompt, ids, mask in zip(batch, new.tolist(), enc["attention_mask"].sum(1).tolist()):
                if tok.eos_token_id in ids:
                    ids = ids[: ids.index(tok.eos_token_id) + 1]
                generations.append({"prompt": prompt, "prompt_tokens": mask, "new_tokens": len(ids),
                                    "text": tok.decode(ids, skip_special_tokens=True)})
    report = run.report()
    print(report)
    logdir.mkdir(parents=True, exist_ok=True)
    report.to_json(logdir / "report.json")
    report.to_csv(logdir / "layers.csv")
    with open(logdir / "generations.jsonl", "w", encoding="utf-8") as f:
        for g in generations:
            f.write(json.dumps(g) + "\n")
    print(f"wrote {logdir / 'report.json'}, {logdir / 'layers.csv'} and {logdir / 'generations.jsonl'}")
    for f in run.trace_files:
        print(f"wrote trace {f}  (view: tensorboard --logdir {logdir.parent}  or open it in ui.perfetto.dev)")
    return 0
