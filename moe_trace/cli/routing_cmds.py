"""`moe-trace routing-log` and `moe-trace routing-analyze` (router-logit logs, KDE, p-values, plots)."""
from __future__ import annotations

import argparse
from pathlib import Path

from moe_trace.checks import device as check_device
from moe_trace.checks import output_dir, output_file
from moe_trace.errors import ConfigError


def _csv(text: str | None, conv=str):
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [conv(t) for t in items]
    except ValueError as exc:
        raise ConfigError(f"bad list {text!r}: {exc}") from None


def register(sub) -> None:
    log = sub.add_parser(
        "routing-log", help="log full router logits, chosen experts and weights per sample and layer",
        description="Run prompts through a model (default: the built-in tiny random-weight model) with router "
                    "logging on and write routing logs (the seed pipeline's JSON format, or columnar .npz shards "
                    "for large runs). Nothing is downloaded.")
    log.add_argument("--model", default=None, help="a local checkpoint directory (default: the built-in tiny model)")
    log.add_argument("--family", default=None, help="family of the built-in tiny model (default: olmoe)")
    log.add_argument("--tokenizer", default=None,
                     help="a local tokenizer directory (default: bytes of the UTF-8 text modulo the vocabulary)")
    log.add_argument("--prompts", action="append", default=None, metavar="PATH",
                     help="a .txt (one prompt a line), .jsonl/.json (objects with a text field, optional 'dataset') "
                          "or a directory saved by datasets' save_to_disk; repeat for several datasets "
                          "(default: the bundled prompts)")
    log.add_argument("--text-field", default=None, help="the text field of JSONL rows / dataset columns")
    log.add_argument("--out", default="routing_logs", help="output directory, or a .json file (json format only)")
    log.add_argument("--format", default="json", choices=["json", "columnar"],
                     help="json: one file per dataset; columnar: .npz shards for large logs")
    log.add_argument("--max-samples", type=int, default=None, help="stop after this many samples in total")
    log.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens in total")
    log.add_argument("--per-dataset", type=int, default=None, help="at most this many prompts of each dataset")
    log.add_argument("--max-length", type=int, default=256, help="truncate prompts to this many tokens")
    log.add_argument("--generate", type=int, default=0, help="also decode N new tokens greedily per prompt")
    log.add_argument("--logits-dtype", default="float32", choices=["float32", "float16"],
                     help="dtype the router logits are stored in (float16 halves the size)")
    log.add_argument("--shard-tokens", type=int, default=65536, help="tokens per .npz shard (columnar format)")
    log.add_argument("--no-loss", action="store_true", help="do not compute the language-model loss per sample")
    log.add_argument("--device", default="cpu", help="device of the model (cpu, cuda, cuda:N)")
    log.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="model dtype (default: the checkpoint's / float32)")
    log.add_argument("--no-progress", action="store_true", help="no progress bar")
    log.set_defaults(func=cmd_routing_log)

    an = sub.add_parser(
        "routing-analyze", help="KDE models, p-values and plots of router-logit logs",
        description="Train per-layer KDE models of router logits on the train datasets, compute p-values of the "
                    "test datasets and draw the seed pipeline's plots (basic, per-expert, kde, pvalue).")
    an.add_argument("logs", nargs="+", help="routing log files (.json) or directories (json logs or columnar)")
    an.add_argument("--out", default="routing_analysis", help="output directory (kde_models/, plots/, summary.json)")
    an.add_argument("--prefix", default=None, help="file-name prefix (default: from the model name)")
    an.add_argument("--train", default=None, help="comma-separated train datasets (default: the first one)")
    an.add_argument("--test", default=None, help="comma-separated test datasets (default: the others)")
    an.add_argument("--layers", default=None, help="comma-separated MoE layer indices (default: all)")
    an.add_argument("--max-tokens", type=int, default=200_000, help="tokens read per dataset (0 = all)")
    an.add_argument("--kernel", default="gaussian", help="main kernel (p-values, trimmed models)")
    an.add_argument("--kernels", default="gaussian,tophat,epanechnikov,linear", help="kernels to compare")
    an.add_argument("--trims", default="1,2,4", help="trimmed variants: experts dropped from each end")
    an.add_argument("--bandwidth", default="scott", help="scott, silverman or a number")
    an.add_argument("--max-fit-points", type=int, default=20_000,
                    help="logits sampled per layer to fit a KDE (more: slower, smoother)")
    an.add_argument("--tail", default="upper", choices=["upper", "lower", "two-sided"],
                    help="which tail of the logit distribution a p-value measures")
    an.add_argument("--kde-models", default=None, help="use the models in this directory instead of training")
    an.add_argument("--no-kde-training", action="store_true", help="do not train or save KDE models")
    an.add_argument("--no-basic-plots", action="store_true", help="skip the per-layer histogram / selection plots")
    an.add_argument("--per-expert-plots", action="store_true", help="also per-expert plots (bounded)")
    an.add_argument("--per-expert-max", type=int, default=16, help="experts per layer in per-expert plots")
    an.add_argument("--no-kde-plots", action="store_true", help="skip the KDE density / kernel comparison plots")
    an.add_argument("--no-pvalue-plots", action="store_true", help="skip the p-value plots")
    an.add_argument("--no-plots", action="store_true", help="no plots at all")
    an.add_argument("--dpi", type=int, default=300, help="resolution of the PNG figures")
    an.add_argument("--seed", type=int, default=0, help="seed of the KDE point sampling")
    an.add_argument("--no-progress", action="store_true", help="no progress bar")
    an.set_defaults(func=cmd_routing_analyze)


def cmd_routing_log(args: argparse.Namespace) -> int:
    from moe_trace.routing.pipeline import load_model, load_prompts, load_tokenizer, model_vocab_size, run_logging

    for name in ("max_samples", "max_tokens", "per_dataset"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_length < 1 or args.generate < 0:
        raise ConfigError("--max-length must be >= 1 and --generate >= 0")
    if args.format == "columnar" and args.out.endswith(".json"):
        raise ConfigError("--format columnar writes a directory: give --out a directory, not a .json file")
    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    if args.format == "json" and args.out.endswith(".json"):
        output_file(args.out, "--out")
    else:
        output_dir(args.out, "--out")
    check_device(args.device)
    if args.text_field and not any(Path(p).is_dir() or Path(p).suffix in (".json", ".jsonl") for p in args.prompts or []):
        raise ConfigError(f"--text-field {args.text_field!r} names a field of .jsonl/.json rows or dataset columns, "
                          "but no --prompts source is one (a text file has one prompt per line)")
    prompts = []
    for p in args.prompts or [None]:
        prompts += load_prompts(p, text_field=args.text_field, limit=args.per_dataset)
    if args.model:
        model = load_model(args.model, device=args.device, dtype=args.dtype)
        label = args.model
    else:
        model = load_model("tiny" + (f":{args.family}" if args.family else ""), device=args.device, dtype=args.dtype)
        label = f"tiny random-weight {args.family or 'olmoe'}"
    tok = load_tokenizer(args.tokenizer, model_vocab_size(model))
    datasets = sorted({d for d, _ in prompts})
    print(f"moe-trace routing-log: {label}, {len(prompts)} prompts ({', '.join(datasets)}), format {args.format}")
    stats = run_logging(model, prompts, args.out, tokenizer=tok, format=args.format, max_samples=args.max_samples,
                        max_tokens=args.max_tokens, max_length=args.max_length, generate=args.generate,
                        logits_dtype=args.logits_dtype, compute_loss=not args.no_loss,
                        progress=not args.no_progress, shard_tokens=args.shard_tokens,
                        model_name=args.model or f"tiny-{args.family or 'olmoe'}")
    print(f"logged {stats['samples_written']} samples, {stats['tokens_recorded']} tokens"
          + (" (cap reached)" if stats["full"] else "") + f" in {stats['seconds']:.1f}s")
    for p in stats["paths"]:
        print(f"wrote {p}")
    print(f"next: moe-trace routing-analyze {args.out}")
    return 0


def cmd_routing_analyze(args: argparse.Namespace) -> int:
    from moe_trace.routing.pipeline import AnalysisConfig, run_analysis

    for name, low in (("max_tokens", 0), ("max_fit_points", 2), ("per_expert_max", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}"
                              + (" (0 = all)" if name == "max_tokens" else "") + f", got {getattr(args, name)}")
    output_dir(args.out, "--out")
    bw: str | float = args.bandwidth
    if bw not in ("scott", "silverman"):
        try:
            bw = float(bw)
        except ValueError:
            raise ConfigError(f"--bandwidth must be scott, silverman or a number, not {args.bandwidth!r}") from None
    cfg = AnalysisConfig(
        output_dir=args.out, prefix=args.prefix, train_datasets=_csv(args.train), test_datasets=_csv(args.test),
        layers=_csv(args.layers, int), max_tokens_per_dataset=args.max_tokens or None, main_kernel=args.kernel,
        kernels=tuple(_csv(args.kernels) or ()), trims=tuple(_csv(args.trims, int) or ()), bandwidth=bw,
        max_fit_points=args.max_fit_points, kde_models_dir=args.kde_models, pvalue_tail=args.tail, seed=args.seed,
        run_kde_training=not args.no_kde_training and not args.kde_models,
        run_basic_plots=not (args.no_basic_plots or args.no_plots),
        run_per_expert_plots=args.per_expert_plots and not args.no_plots,
        per_expert_max_experts=args.per_expert_max,
        run_kde_plots=not (args.no_kde_plots or args.no_plots),
        run_pvalue_plots=not (args.no_pvalue_plots or args.no_plots), dpi=args.dpi,
        progress=not args.no_progress)
    s = run_analysis(args.logs, cfg)
    log = s["log"]
    print(f"moe-trace routing-analyze: {log['samples']} samples, {log['num_layers']} layers, "
          f"{log['num_experts']} experts, top-{log['top_k']}; split {s['split']}")
    print(f"train: {s['train']}  test: {', '.join(s['test'])}")
    for li, e in s["layers"].items():
        pv = e.get("pvalue") or {}
        parts = [f"{n}: KS D={v['ks_statistic']:.3f} p={v['ks_pvalue']:.3g}" for n, v in pv.items()
                 if v.get("n")]
        if parts:
            print(f"  layer {li}: p-values vs uniform  " + "; ".join(parts))
    if s.get("layers_without_logits"):
        print(f"layers without logits (no KDE): {s['layers_without_logits']}")
    out = Path(args.out)
    for kind, fs in s["files"].items():
        print(f"wrote {len(fs)} {kind} file(s)")
    print(f"wrote {out / 'summary.json'} in {s['seconds']:.1f}s")
    return 0
