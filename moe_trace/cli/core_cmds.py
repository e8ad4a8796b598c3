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
    demo.add_argument("--mode", default="kineto", choices=["stats", "timing", "kineto"])
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--prompt-len", type=int, default=8)
    demo.add_argument("--device", default="cpu")
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
    if args.json:
        print(json.dumps([l.to_dict() for l in layers], indent=2))
    else:
        print(format_layers(layers))
    return 0
