"""`moe-trace demo` and `moe-trace inspect`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_trace.errors import ConfigError, NoMoELayersError


def register(sub) -> None:
    demo = sub.add_parser("demo", help="profile generation of a small random-weight MoE model (no download)",
                          description="Build a tiny random-weight MoE model (OLMoE-shaped by default) on the CPU, "
                                      "generate with profiling on, print the report and write it under --logdir.")
    demo.add_argument("--family", default=None, help="model family of the built-in tiny model (default: olmoe; "
                                                     "`moe-trace demo --list-families` lists them)")
    demo.add_argument("--model", default=None, help="a local checkpoint directory instead of a built-in model")
    demo.add_argument("--list-families", action="store_true", help="list the built-in families and exit")
    demo.add_argument("--logdir", default="runs/demo", help="where to write report.json, layers.csv and traces")
    demo.add_argument("--mode", default="kineto", choices=["stats", "timing", "kineto"],
                      help="stats: routing counters; timing: + router/experts/shared ms; kineto: + a trace")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per prompt")
    demo.add_argument("--batch", type=int, default=2, help="prompts per generate (random token ids)")
    demo.add_argument("--prompt-len", type=int, default=8, help="tokens per prompt")
    demo.add_argument("--device", default="cpu", help="device of the model (cpu, cuda, cuda:N)")
    demo.set_defaults(func=cmd_demo)

    insp = sub.add_parser("inspect", help="list the MoE layers of a local checkpoint or config (no weights loaded)")
    insp.add_argument("path", help="a checkpoint directory or a config.json file")
    insp.add_argument("--json", action="store_true", help="print the layer records as JSON")
    insp.set_defaults(func=cmd_inspect)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import moe_trace
    from moe_trace.models import DEFAULT_FAMILY, build_tiny_model, example_inputs, list_families, load_checkpoint

    if args.list_families:
        print("\n".join(list_families()))
        return 0
    if args.max_new_tokens < 1 or args.batch < 1 or args.prompt_len < 2:
        raise ConfigError("--max-new-tokens and --batch must be >= 1 and --prompt-len >= 2")
    from moe_trace.checks import device as check_device

    check_device(args.device)
    if args.model:
        model = load_checkpoint(args.model).to(args.device).eval()
        label = args.model
    else:
        family = args.family or DEFAULT_FAMILY
        model = build_tiny_model(family, device=args.device)
        label = f"tiny random-weight {family}"
    inputs = example_inputs(model, batch=args.batch, prompt_len=args.prompt_len)
    logdir = Path(args.logdir)
    print(f"moe-trace demo: {label}, batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.max_new_tokens} new tokens, mode {args.mode}")
    with moe_trace.profile(model, mode=args.mode, logdir=logdir) as run, torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                       do_sample=False)
    report = run.report()
    print(report)
    report.to_json(logdir / "report.json")
    report.to_csv(logdir / "layers.csv")
    print(f"wrote {logdir / 'report.json'} and {logdir / 'layers.csv'}")
    for f in run.trace_files:
        print(f"wrote trace {f}  (view: tensorboard --logdir {logdir.parent}  or open it in ui.perfetto.dev)")
    return 0


def build_on_meta(path: str):
    """Instantiate the model of a checkpoint directory or config file on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path} does not exist: give a checkpoint directory or a config.json file")
    _check_model_type(p / "config.json" if p.is_dir() else p, path)
    try:
        config = AutoConfig.from_pretrained(str(p)) if p.is_dir() else _config_from_file(p)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read a transformers config from {path}: {exc}") from None
    import transformers

    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
        cls = getattr(transformers, auto, None)
        if cls is None:
            continue
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"{auto}: {exc}")
    raise ConfigError(f"no transformers model class builds config {type(config).__name__}: " + "; ".join(errors))


def _check_model_type(cfg_file: Path, path: str) -> None:
    """An unknown `model_type` is one line naming the closest known ones (not transformers' full list)."""
    import difflib

    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # the config reader below gives the error
    if not isinstance(model_type, str):
        return
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type in CONFIG_MAPPING_NAMES:
        return
    close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=5, cutoff=0.5)
    raise ConfigError(f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}"
                      + (f"; closest: {', '.join(close)}" if close else "")
                      + " (fix the config's model_type, or upgrade transformers if the family is newer)")


def param_summary(model, layers) -> dict:
    """Total parameters, parameters active per token (k of E routed experts per MoE layer), and the MoE
    layers' analytic FLOPs per token (router + k experts + shared; the report's convention)."""
    import numpy as np

    from moe_trace.analysis.metrics import flops
    from moe_trace.analysis.rundata import LayerCounts
    from moe_trace.capture import find_bindings

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    moe_flops = 0
    for b in find_bindings(model):
        info = b.info
        k = min(info.top_k, info.num_experts)
        counts = LayerCounts(tokens=1, calls=1, expert_counts=np.array([1] * k + [0] * (info.num_experts - k)),
                             k_hist=np.array([0] * k + [1]))
        moe_flops += flops(info, counts)["total"]
        if not info.dense_experts:
            seen = {id(t): t.numel() for m in b.experts for t in m.parameters()}
            inactive += sum(seen.values()) * (info.num_experts - k) // max(info.num_experts, 1)
    return {"total_params": int(total), "active_params": int(total - inactive),
            "moe_flops_per_token": int(moe_flops), "approx_flops_per_token": int(2 * (total - inactive))}


def _config_from_file(p: Path):
    from transformers import AutoConfig

    data = json.loads(p.read_text())
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ValueError("the file has no 'model_type'")
    return AutoConfig.for_model(model_type, **data)


def cmd_inspect(args: argparse.Namespace) -> int:
    import moe_trace
    from moe_trace.capture import format_layers

    model = build_on_meta(args.path)
    try:
        layers = moe_trace.detect(model)
    except NoMoELayersError as exc:
        raise NoMoELayersError(f"{args.path}: {exc}") from None
    for l in layers:
        if l.top_k > l.num_experts:
            raise ConfigError(f"{args.path}: layer {l.name} routes top_k={l.top_k} of only num_experts="
                              f"{l.num_experts} experts; fix the config (top_k must be <= num_experts)")
    summary = param_summary(model, layers)
    if args.json:
        print(json.dumps({"layers": [l.to_dict() for l in layers], **summary}, indent=2))
    else:
        print(format_layers(layers))
        print(f"parameters: {_count(summary['total_params'])} total, {_count(summary['active_params'])} active per "
              f"token; FLOPs per token: {_count(summary['moe_flops_per_token'])} in the MoE layers (router + "
              f"top-k experts + shared), ~{_count(summary['approx_flops_per_token'])} for the whole model "
              "(2 x active parameters)")
    return 0


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)
