"""`moe-trace sweep`, `moe-trace sweep-plot` and `moe-trace compare`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_trace.errors import ConfigError

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, metavar="PATH", help="a local checkpoint directory")
    src.add_argument("--family", default=None, metavar="NAME",
                     help="a built-in tiny random-weight model (default: olmoe; `moe-trace demo --list-families`)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts, one per line (or a JSON list of strings); default: two random 8-token prompts")
    p.add_argument("--device", default=None, help="cuda / cpu / cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=_DTYPES, help="model dtype (default: the checkpoint's / fp32)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting and prompt (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the first sample (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> None:
    from moe_trace.experiments.sweep import KNOBS

    sw = sub.add_parser("sweep", help="latency and routing of generate() across the values of one knob",
                        description="Run model.generate for every value of a knob, timing prefill (first forward) "
                                    "and decode (the rest) separately, with routing metrics from moe_trace.profile. "
                                    "Writes OUT/sweep_KNOB.json ({summary, all_samples}) and PNG figures.")
    sw.add_argument("knob", help=f"one of: {', '.join(KNOBS)}")
    sw.add_argument("--values", nargs="+", required=True, help="the knob's values, e.g. 1 2 4 8 (or 1,2,4,8)")
    _model_args(sw)
    sw.add_argument("--selector", default=None,
                    help="routing for the non-top-k knobs, e.g. kneedle, cumsum:0.8 (default: the model's own)")
    sw.add_argument("--out", default="results/sweep", metavar="DIR", help="output directory (default results/sweep)")
    sw.add_argument("--no-plots", action="store_true", help="skip the figures")
    sw.add_argument("--block-order", default=None, metavar="I,J,...",
                    help="active-layers: an importance order of block indices (most important first); value N "
                         "keeps its first N blocks. Values may also be block sets written 0+2+5")
    sw.set_defaults(func=cmd_sweep)

    pl = sub.add_parser("sweep-plot", help="redraw the figures of a sweep JSON file")
    pl.add_argument("json_file", help="a sweep_*.json written by `moe-trace sweep`")
    pl.add_argument("--out", default=None, metavar="DIR", help="figure directory (default: next to the JSON, figures/)")
    pl.set_defaults(func=cmd_sweep_plot)

    cmp = sub.add_parser("compare", help="compare named routing configurations on the same prompts",
                         description="Each --config NAME=SPEC is a routing configuration: SPEC is 'model' (the "
                                     "model as is), a selector (kneedle, cumsum:0.8, topk:1, ...) or key=value "
                                     "pairs separated by ';' (selector=..., top_k=N, active_layers=N, "
                                     "max_new_tokens=N). The first config is the baseline.")
    cmp.add_argument("--config", action="append", required=True, metavar="NAME=SPEC",
                     help="a configuration (repeat the option); e.g. base=model knee=kneedle top1=topk:1")
    _model_args(cmp)
    cmp.add_argument("--out", default=None, metavar="FILE", help="also write the table as CSV")
    cmp.add_argument("--json", default=None, metavar="FILE",
                     help="also write the comparison as JSON (schema moe-trace/compare/1); put it under a "
                          "TensorBoard --logdir and the MoE tab lists it as a run")
    cmp.add_argument("--plot", default=None, metavar="PNG",
                     help="also draw total latency, k and FLOPs per token of each config into this PNG")
    cmp.set_defaults(func=cmd_compare, repeats=1)


# ---------------------------------------------------------------------------------------------
def _values(raw: list[str]) -> list[str]:
    out = []
    for r in raw:
        out += [x for x in r.split(",") if x.strip()]
    return out


def _read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    prompts: list[str]
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not a JSON list of prompts ({exc})") from None
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise ConfigError(f"{path}: a JSON prompts file must be a list of strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def _load(args: argparse.Namespace):
    """(model, tokenizer or None, label)."""
    import torch

    from moe_trace.models import DEFAULT_FAMILY, build_tiny_model, load_checkpoint

    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    from moe_trace.checks import device as check_device

    device = str(check_device(args.device)) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    prompts = _read_prompts(args.prompts)
    tokenizer = None
    if args.model:
        if not Path(args.model).is_dir():
            raise ConfigError(f"--model {args.model}: not a checkpoint directory")
        model = load_checkpoint(args.model, dtype=dtype, device=device)
        label = args.model
        if prompts is not None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.model)
            except Exception:
                tokenizer = None  # no tokenizer saved: prompts are mapped byte-wise to token ids
    else:
        family = args.family or DEFAULT_FAMILY
        model = build_tiny_model(family, device=device, **({"dtype": dtype} if dtype is not None else {}))
        label = f"tiny:{family}"
    return model, tokenizer, prompts, label


def cmd_sweep(args: argparse.Namespace) -> int:
    from moe_trace.experiments.selectors import resolve_selector
    from moe_trace.experiments.sweep import normalize_knob, run_sweep

    from moe_trace.checks import output_dir

    output_dir(args.out, "--out")
    knob = normalize_knob(args.knob)           # bad knob / selector: fail before loading anything
    resolve_selector(args.selector)
    values = _values(args.values)
    model, tokenizer, prompts, label = _load(args)
    import warnings

    order = None
    if args.block_order:
        try:
            order = [int(x) for x in args.block_order.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--block-order {args.block_order!r}: expected block indices, e.g. 3,0,2,1") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # printed below, once
        result = run_sweep(model, knob, values, prompts, tokenizer=tokenizer, repeats=args.repeats,
                           warmup=args.warmup, max_new_tokens=args.max_new_tokens, selector=args.selector,
                           out_dir=args.out, plots=not args.no_plots, progress=not args.no_progress,
                           model_name=label, block_order=order)
    df = result.to_dataframe()
    cols = ["value", "n", "prefill_ms_mean", "prefill_ms_std", "decode_ms_mean", "decode_ms_std", "total_ms_mean",
            "total_ms_ci95_low", "total_ms_ci95_high", "k_mean_mean", "active_experts_mean_mean", "flops_per_token_mean"]
    print(f"sweep {knob} on {label} ({result['experiment']['device']}, timing {result['experiment']['timing']})")
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for w in result["warnings"] if "warnings" in result else []:
        print(f"moe-trace: warning: {w}")
    if result.fit:
        for phase in ("prefill", "decode"):
            f = result.fit.get(phase)
            if f:
                print(f"  fit {phase}: {f['slope']:.4g} ms/GFLOP + {f['intercept']:.4g} ms (r2 {f['r2']:.3f})")
    for key, path in result.paths.items():
        print(f"wrote {path}")
    return 0


def cmd_sweep_plot(args: argparse.Namespace) -> int:
    from moe_trace.experiments.plots import plot_sweep
    from moe_trace.experiments.sweep import SweepResult

    from moe_trace.checks import output_dir

    out = output_dir(args.out if args.out else Path(args.json_file).parent / "figures", "--out")
    result = SweepResult.load(args.json_file)
    for p in plot_sweep(result, out):
        print(f"wrote {p}")
    return 0


def _parse_config(text: str) -> tuple[str, object]:
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise ConfigError(f"--config {text!r}: expected NAME=SPEC, e.g. knee=kneedle or base=model")
    if spec.lower() in ("model", "none", "baseline", "default"):
        return name, None
    if "=" not in spec:
        return name, spec
    cfg: dict[str, object] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k, v = k.strip().replace("-", "_"), v.strip()
        if k in ("top_k", "active_layers", "max_new_tokens"):
            try:
                cfg[k] = int(v)
            except ValueError:
                raise ConfigError(f"--config {text!r}: {k} must be an integer, got {v!r}") from None
        else:
            cfg[k] = v
    return name, cfg


def cmd_compare(args: argparse.Namespace) -> int:
    from moe_trace.experiments.benchmark import SimpleBenchmark

    from moe_trace.checks import output_file

    for opt in ("out", "plot", "json"):
        if getattr(args, opt):
            output_file(getattr(args, opt), f"--{opt}")
    configs = dict(_parse_config(c) for c in args.config)
    if len(configs) != len(args.config):
        raise ConfigError("--config names must be unique")
    if args.out:
        from moe_trace.checks import output_file

        output_file(args.out, "--out")  # before the runs, not after them
    model, tokenizer, prompts, label = _load(args)
    bench = SimpleBenchmark(model, tokenizer, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                            warmup=args.warmup, progress=not args.no_progress)
    from moe_trace.experiments.sweep import prepare_inputs

    df = bench.run(configs, prompts if prompts is not None else prepare_inputs(model))
    import shutil

    from moe_trace.experiments.benchmark import format_compare

    print(f"compare on {label}")
    print(f"(the first config is the base; means over {args.repeats} repeat(s) per prompt)")
    print(format_compare(df, width=min(shutil.get_terminal_size((80, 24)).columns, 120)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out)
        print(f"wrote {args.out}")
    if args.json:
        import time

        from moe_trace.experiments.benchmark import compare_document

        doc = compare_document(df, {"model": label, "device": str(next(model.parameters()).device),
                                    "repeats": args.repeats, "warmup": args.warmup,
                                    "max_new_tokens": args.max_new_tokens,
                                    "configs": {c.partition("=")[0].strip(): c.partition("=")[2].strip()
                                                for c in args.config},
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False))
        print(f"wrote {args.json}")
    if args.plot:
        from moe_trace.experiments.plots import plot_compare

        print(f"wrote {plot_compare(df, args.plot)}")
    return 0
