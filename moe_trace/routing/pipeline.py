"""The two pipelines behind `moe-trace routing-log` and `moe-trace routing-analyze`.

`run_logging(model, prompts, out, ...)` runs every prompt through the model under
`moe_trace.profile(model, observers=[RouterLogger(...)])`, one sample per prompt, and writes
routing logs (JSON or columnar).

`run_analysis(logs, AnalysisConfig(...))` reads logs and runs the stages of the seed pipeline,
each switchable like its CONFIG toggles:

1. KDE training (`run_kde_training`): per layer, the main-kernel model, one model per kernel and
   trimmed variants, on the *train* datasets; saved as `.npz` under `kde_models/`.
2. basic plots (`run_basic_plots`), 3. per-expert plots (`run_per_expert_plots`, bounded),
4. KDE plots (`run_kde_plots`), 5. p-value plots (`run_pvalue_plots`) of the *test* datasets.

Train/test split: by dataset (`train_datasets`, default the first dataset in the logs;
`test_datasets`, default the others). With a single dataset, even-numbered samples train and
odd-numbered ones test. A `summary.json` records the split, KS tests of the test p-values
against U(0,1) per layer, and every file written.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moe_trace.checks import output_dir, output_file
from moe_trace.errors import ConfigError

from . import kde as K
from .logfile import RoutingLog, load_logs, safe_name

BUNDLED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts.txt"
TEXT_FIELDS = ("text", "prompt", "content", "question", "sentence", "ctx", "input")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def load_prompts(path: str | os.PathLike | None = None, *, text_field: str | None = None,
                 dataset: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """`[(dataset, text)]` from a text file (one prompt per non-empty line), a JSONL / JSON file
    (strings or objects with a text field; an object's `dataset` field names its dataset) or a
    directory saved with `datasets.Dataset.save_to_disk` (needs the optional `datasets` package;
    nothing is downloaded). Default: the bundled prompt file. `limit` = prompts per dataset."""
    p = Path(path) if path is not None else BUNDLED_PROMPTS
    if not p.exists():
        raise ConfigError(f"prompt source {p} does not exist")
    name = dataset or (p.name if p.is_dir() else p.stem)
    out: list[tuple[str, str]] = []
    if p.is_dir():
        out = _load_hf_dataset(p, text_field, name)
    elif p.suffix in (".jsonl", ".json"):
        try:
            if p.suffix == ".jsonl":
                rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            else:
                rows = json.loads(p.read_text(encoding="utf-8"))
                if isinstance(rows, dict):
                    rows = rows.get("prompts") or rows.get("data") or rows.get("samples") or []
        except ValueError as exc:
            raise ConfigError(f"{p}: not valid JSON ({exc})") from exc
        for r in rows:
            if isinstance(r, str):
                out.append((name, r))
            elif isinstance(r, dict):
                t = _text_of(r, text_field)
                if t is None:
                    raise ConfigError(f"{p}: a row has no text field ({text_field or ', '.join(TEXT_FIELDS)}); "
                                      "name it with --text-field")
                out.append((str(dataset or r.get("dataset") or name), t))
    else:
        out = [(name, line.strip()) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = [(d, t) for d, t in out if t.strip()]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for d, t in out:
            if seen.get(d, 0) < limit:
                kept.append((d, t))
                seen[d] = seen.get(d, 0) + 1
        out = kept
    if not out:
        raise ConfigError(f"{p}: no prompts found")
    return out


def _text_of(row: dict, field_name: str | None) -> str | None:
    if field_name:
        v = row.get(field_name)
        return None if v is None else str(v)
    for f in TEXT_FIELDS:
        if isinstance(row.get(f), str):
            return row[f]
    return None


def _load_hf_dataset(p: Path, text_field: str | None, name: str) -> list[tuple[str, str]]:
    try:
        import datasets  # optional
    except ImportError as exc:
        raise ConfigError(f"{p} is a directory: reading a saved dataset needs the optional `datasets` package "
                          "(pip install datasets); or pass a .txt / .jsonl file") from exc
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - any failure means "not a saved dataset"
        raise ConfigError(f"{p}: not a dataset saved with save_to_disk ({exc})") from exc
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    out = []
    for split, d in splits:
        dname = name if split is None else f"{name}/{split}"
        for row in d:
            t = _text_of(row, text_field)
            if t is None:
                raise ConfigError(f"{p}: rows have no text field; columns: {d.column_names}; use --text-field")
            out.append((dname, t))
    return out


class ByteTokenizer:
    """A tokenizer that needs no files: UTF-8 bytes modulo the vocabulary size."""

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])


def load_tokenizer(path: str | os.PathLike | None, vocab_size: int):
    """A local HF tokenizer (`AutoTokenizer.from_pretrained(path, local_files_only=True)`) or, with
    no path, `ByteTokenizer(vocab_size)`."""
    if path is None:
        return ByteTokenizer(vocab_size)
    try:
        from transformers import AutoTokenizer

        return _HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"cannot load a tokenizer from {path} ({exc}); give a local tokenizer directory") from exc


def load_model(spec: str = "tiny", device: str = "cpu", dtype: str | None = None):
    """`"tiny"` / `"tiny:FAMILY"` (random-weight demo model) or a local checkpoint directory."""
    import torch

    td = {None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in td:
        raise ConfigError(f"dtype must be one of float32, float16, bfloat16, not {dtype!r}")
    if spec == "tiny" or spec.startswith("tiny:"):
        family = spec.split(":", 1)[1] if ":" in spec else None
        model = build_demo_model(family)
        return model.to(device=device, **({"dtype": td[dtype]} if dtype else {}))
    if not Path(spec).is_dir():
        raise ConfigError(f"--model {spec!r}: give 'tiny', 'tiny:FAMILY' or a local checkpoint directory "
                          "(nothing is downloaded)")
    try:
        from moe_trace.models.tiny import load_checkpoint

        return load_checkpoint(spec, dtype=td[dtype], device=device)
    except ImportError:
        from transformers import AutoModelForCausalLM

        kw = {"dtype": td[dtype]} if dtype else {}
        return AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **kw).to(device).eval()


def build_demo_model(family: str | None = None):
    """The built-in demo model (`moe_trace.models.build_tiny_model`), or a tiny OLMoE when that
    module is unavailable."""
    try:
        try:
            from moe_trace.models import build_tiny_model
        except ImportError:
            from moe_trace.models.tiny import build_tiny_model
        return build_tiny_model(family) if family else build_tiny_model()
    except ImportError:
        if family not in (None, "olmoe"):
            raise ConfigError(f"tiny model family {family!r} needs moe_trace.models") from None
        import torch
        from transformers import OlmoeConfig, OlmoeForCausalLM

        cfg = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = OlmoeForCausalLM(cfg)
        with torch.no_grad():  # random routers otherwise start at zero
            for name, prm in model.named_parameters():
                if name.endswith("gate.weight"):
                    prm.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        return model.eval()


def model_vocab_size(model) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return int(getattr(cfg, "vocab_size", 256) or 256)


# ---------------------------------------------------------------------------------------------
# stage 1: logging
# ---------------------------------------------------------------------------------------------
def run_logging(model, prompts: Sequence[tuple[str, str]], out: str | os.PathLike, *, tokenizer=None,
                format: str = "json", max_samples: int | None = None, max_tokens: int | None = None,
                max_length: int = 256, generate: int = 0, logits_dtype: str = "float32", flush_every: int = 8,
                model_name: str | None = None, compute_loss: bool = True, progress: bool = False,
                shard_tokens: int = 65536) -> dict[str, Any]:
    """Run each prompt (one sample, batch 1) through `model` under `moe_trace.profile` with a
    `RouterLogger`; with `generate > 0`, `generate` new tokens are decoded greedily after the
    prompt (their routing is logged too; no loss then). Returns the logger's stats plus `report`
    (the profile's `Report`) and `seconds`."""
    import torch
    from tqdm.auto import tqdm

    from moe_trace.capture import profile

    from .logger import RouterLogger

    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be an integer >= 1, got {shard_tokens!r}")
    if format == "json" and str(out).endswith(".json"):
        output_file(out, "routing log file")
    else:
        output_dir(out, "routing log directory")
    tok = tokenizer or ByteTokenizer(model_vocab_size(model))
    vocab = model_vocab_size(model)
    if model_name is None:
        cfg = getattr(model, "config", None)
        model_name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or type(model).__name__
    logger = RouterLogger(out, format=format, max_samples=max_samples, max_tokens=max_tokens,
                          logits_dtype=logits_dtype, flush_every=flush_every, model_name=model_name,
                          shard_tokens=shard_tokens)
    device = next(model.parameters()).device
    counters: dict[str, int] = {}
    t0 = time.perf_counter()
    skipped = 0
    with torch.inference_mode(), profile(model, observers=[logger]) as run:
        for ds, text in tqdm(prompts, desc="routing-log", unit="prompt", disable=not progress):
            if logger.full:
                break
            ids = [i for i in tok.encode(text)[:max_length] if 0 <= i < vocab]
            if not ids:
                skipped += 1
                continue
            sid = counters.get(ds, 0)
            counters[ds] = sid + 1
            logger.begin_sample(sid, dataset=ds)
            x = torch.tensor([ids], dtype=torch.long, device=device)
            mask = torch.ones_like(x)
            if generate > 0:
                gen_kw = {"max_new_tokens": generate, "min_new_tokens": generate, "do_sample": False}
                pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
                if pad is None:
                    gen_kw["pad_token_id"] = 0
                model.generate(input_ids=x, attention_mask=mask, **gen_kw)
            else:
                kw = {"labels": x} if compute_loss and len(ids) > 1 else {}
                out_ = model(input_ids=x, attention_mask=mask, **kw)
                loss = getattr(out_, "loss", None)
                if loss is not None:
                    logger.record_loss_value(loss)
    stats = logger.stats()
    stats.update({"report": run.report(), "seconds": time.perf_counter() - t0, "skipped_prompts": skipped,
                  "datasets": dict(counters)})
    return stats


# ---------------------------------------------------------------------------------------------
# stages 2-6: analysis
# ---------------------------------------------------------------------------------------------
@dataclass
class AnalysisConfig:
    """Settings and stage toggles of `run_analysis` (the seed pipeline's CONFIG)."""

    output_dir: str = "routing_analysis"
    prefix: str | None = None  # file-name prefix; default from the logs' model name
    train_datasets: list[str] | None = None  # default: the first dataset in the logs
    test_datasets: list[str] | None = None  # default: every other dataset
    layers: list[int] | None = None  # MoE layer indices; default all
    max_tokens_per_dataset: int | None = 200_000  # tokens read per dataset (bounded memory)
    # KDE
    main_kernel: str = "gaussian"
    kernels: tuple[str, ...] = K.DEFAULT_KERNELS
    trims: tuple[int, ...] = K.DEFAULT_TRIMS
    bandwidth: str | float = "scott"
    max_fit_points: int = 20_000
    grid_size: int = 2048
    kde_models_dir: str | None = None  # load these models instead of training
    pvalue_tail: str = "upper"
    seed: int = 0
    # stage toggles
    run_kde_training: bool = True
    run_basic_plots: bool = True
    run_per_expert_plots: bool = False  # many files: bounded by the two limits below
    run_kde_plots: bool = True
    run_pvalue_plots: bool = True
    per_expert_max_experts: int = 16  # the most chosen experts of each layer
    per_expert_max_layers: int | None = 4
    kth_max: int | None = None  # p-value by k-th best: default 2 * top_k
    dpi: int = 300
    progress: bool = True

    def validate(self) -> None:
        for k in (self.main_kernel, *self.kernels):
            if k not in K.KERNELS:
                raise ConfigError(f"unknown kernel {k!r}; valid: {', '.join(K.KERNELS)}")
        if self.pvalue_tail not in K.TAILS:
            raise ConfigError(f"pvalue_tail must be one of {K.TAILS}")
        if any(int(t) < 0 for t in self.trims):
            raise ConfigError("trims must be >= 0")
        bw = self.bandwidth
        if isinstance(bw, bool) or not (bw in ("scott", "silverman") or (isinstance(bw, (int, float)) and bw > 0)):
            raise ConfigError(f"bandwidth must be 'scott', 'silverman' or a number > 0, not {bw!r}")
        if self.dpi < 10:
            raise ConfigError("dpi must be >= 10")
        for name, low in (("max_tokens_per_dataset", 1), ("max_fit_points", 2), ("grid_size", 2),
                          ("per_expert_max_experts", 1), ("per_expert_max_layers", 1), ("kth_max", 1)):
            v = getattr(self, name)
            if v is None and name in ("max_tokens_per_dataset", "per_expert_max_layers", "kth_max"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}"
                                  + (" (or None)" if name in ("max_tokens_per_dataset", "per_expert_max_layers",
                                                              "kth_max") else "") + f", got {v!r}")


@dataclass
class _Split:
    how: str
    train_name: str
    train: np.ndarray  # sample mask
    tests: dict[str, np.ndarray] = field(default_factory=dict)


def split_samples(log: RoutingLog, train: Sequence[str] | None, test: Sequence[str] | None) -> _Split:
    names = log.datasets
    for d in [*(train or []), *(test or [])]:
        if d not in names:
            raise ConfigError(f"dataset {d!r} is not in the logs (datasets: {', '.join(names)})")
    if train is None and test is None and len(names) == 1:
        even = np.arange(log.num_samples) % 2 == 0
        if log.num_samples < 2:
            raise ConfigError("a single-sample log cannot be split into train and test; log more samples")
        return _Split("by sample (one dataset: even samples train, odd samples test)", f"{names[0]}:train",
                      even, {f"{names[0]}:test": ~even})
    train = list(train) if train else [names[0]]
    test = list(test) if test else [d for d in names if d not in train]
    if not test:
        raise ConfigError("no test dataset left: name --test datasets or log more than one dataset")
    return _Split("by dataset", "+".join(train), log.sample_mask(train),
                  {d: log.sample_mask([d]) for d in test})


def run_analysis(logs, config: AnalysisConfig | None = None, log: RoutingLog | None = None) -> dict[str, Any]:
    """Run the enabled stages on `logs` (paths) and return the summary (also `summary.json`)."""
    from tqdm.auto import tqdm

    from . import plots as P

    cfg = config or AnalysisConfig()
    cfg.validate()
    out = output_dir(cfg.output_dir, "output_dir")  # before reading the logs: fail in a second
    t0 = time.perf_counter()
    if log is None:
        log = load_logs(logs, layers=cfg.layers, max_tokens_per_dataset=cfg.max_tokens_per_dataset)
    out.mkdir(parents=True, exist_ok=True)
    prefix = safe_name(cfg.prefix or (log.config.rstrip("/").split("/")[-1] if log.config else "moe"))
    plot_root = out / "plots"
    split = split_samples(log, cfg.train_datasets, cfg.test_datasets)
    layers = [l for l in log.layers if l.logits is not None and l.num_tokens]
    no_logits = [l.layer for l in log.layers if l.logits is None]
    files: dict[str, list[str]] = {}
    summary: dict[str, Any] = {"log": log.summary(), "sources": log.sources, "split": split.how,
                               "train": split.train_name, "test": list(split.tests), "prefix": prefix,
                               "config": _jsonable(asdict(cfg)), "layers": {}, "files": files,
                               "layers_without_logits": no_logits}
    bar = dict(disable=not cfg.progress, leave=False)

    def rows_of(l, sample_mask):
        return sample_mask[l.rows]

    def add(kind: str, p) -> None:
        files.setdefault(kind, []).append(str(p))

    # -- stage 2: KDE models ------------------------------------------------------------------
    need_models = cfg.run_kde_training or cfg.run_kde_plots or cfg.run_pvalue_plots
    models = K.ModelSet(main_kernel=cfg.main_kernel)
    if cfg.kde_models_dir:
        models = K.ModelSet.load(cfg.kde_models_dir, main_kernel=cfg.main_kernel)
    elif need_models and layers:
        for l in tqdm(layers, desc="KDE training", **bar):
            tr = l.logits[rows_of(l, split.train)]
            if not len(tr):
                raise ConfigError(f"layer {l.layer} has no tokens of the train set {split.train_name}")
            for m in K.fit_layer_models(tr, l.layer, kernels=cfg.kernels, trims=cfg.trims,
                                        main_kernel=cfg.main_kernel, bandwidth=cfg.bandwidth,
                                        max_points=cfg.max_fit_points, grid_size=cfg.grid_size, seed=cfg.seed,
                                        train=split.train_name, config=log.config):
                models.add(m)
        if cfg.run_kde_training:
            for p in models.save(out / "kde_models", prefix):
                add("kde_models", p)
    for l in layers:
        summary["layers"][str(l.layer)] = {
            "tokens_train": int(rows_of(l, split.train).sum()),
            "tokens_test": {n: int(rows_of(l, m).sum()) for n, m in split.tests.items()},
            "expert_counts": l.expert_counts().tolist(),
        }
        mm = models.main(l.layer)
        if mm is not None:
            summary["layers"][str(l.layer)]["bandwidth"] = mm.bandwidth

    title = f"{prefix}: "
    # -- stage 3: basic plots --------------------------------------------------------------------
    if cfg.run_basic_plots:
        for l in tqdm(log.layers, desc="basic plots", **bar):
            add("basic", P.plot_weight_sums(l.weights, l.layer, P.layer_file(plot_root, "weights_sum", l.layer),
                                            cfg.dpi, title))
            add("basic", P.plot_choice_counts(l.expert_counts(), l.layer,
                                              P.layer_file(plot_root, "choice_counts", l.layer), cfg.dpi, title))
            if l.logits is not None and l.num_tokens:
                add("basic", P.plot_softmax(l.logits, l.layer, P.layer_file(plot_root, "softmax", l.layer),
                                            cfg.dpi, title))
                add("basic", P.plot_raw_logits(l.logits, l.layer, P.layer_file(plot_root, "raw_logits", l.layer),
                                               cfg.dpi, title))

    # -- stage 4: per-expert plots ---------------------------------------------------------------
    if cfg.run_per_expert_plots:
        sel = layers[: cfg.per_expert_max_layers] if cfg.per_expert_max_layers is not None else layers
        jobs = []
        for l in sel:
            experts = np.argsort(-l.expert_counts(), kind="stable")[: cfg.per_expert_max_experts]
            jobs += [(l, int(e)) for e in sorted(experts)]
        sm_cache: dict[int, np.ndarray] = {}
        for l, e in tqdm(jobs, desc="per-expert plots", **bar):
            if l.layer not in sm_cache:
                sm_cache.clear()
                sm_cache[l.layer] = P.softmax(l.logits)
            add("per_expert", P.plot_value_hist(
                sm_cache[l.layer][:, e], l.layer, P.layer_file(plot_root, "per_expert_softmax", l.layer, e),
                f"softmax probability of expert {e}", f"expert {e} softmax", dpi=cfg.dpi, log=True, title=title,
                color="tab:purple"))
            add("per_expert", P.plot_value_hist(
                l.logits[:, e], l.layer, P.layer_file(plot_root, "per_expert_raw_logits", l.layer, e),
                f"raw logit of expert {e}", f"expert {e} raw logit", dpi=cfg.dpi, title=title))

    # -- stage 5: KDE plots ----------------------------------------------------------------------
    if cfg.run_kde_plots:
        for l in tqdm(layers, desc="KDE plots", **bar):
            mm = models.main(l.layer)
            if mm is None:
                continue
            sets = {split.train_name: l.logits[rows_of(l, split.train)]}
            sets.update({n: l.logits[rows_of(l, m)] for n, m in split.tests.items()})
            add("kde", P.plot_kde_cumulative(mm, sets, l.layer, P.layer_file(plot_root, "kde_cumulative", l.layer),
                                             cfg.dpi, title))
            trims = models.trims(l.layer)
            tm = {t: models.get(l.layer, t) for t in trims}
            add("kde", P.plot_trimmed_comparison(sets, [t for t in trims if t] or list(cfg.trims), l.layer,
                                                 P.layer_file(plot_root, "trimmed", l.layer), tm, cfg.dpi, title))
            km = {k: models.get(l.layer, 0, k) for k in models.kernels(l.layer)}
            if km:
                add("kde", P.plot_kernel_comparison(km, sets[split.train_name], l.layer,
                                                    P.layer_file(plot_root, "kernels", l.layer), cfg.dpi, title))

    # -- stage 6: p-values -----------------------------------------------------------------------
    if cfg.run_pvalue_plots or models.models:
        for l in tqdm(layers, desc="p-values", **bar):
            mm = models.main(l.layer)
            if mm is None:
                continue
            entry = summary["layers"][str(l.layer)]
            pv: dict[str, np.ndarray] = {}
            ks: dict[str, dict] = {}
            for n, m in {split.train_name: split.train, **split.tests}.items():
                lg = l.logits[rows_of(l, m)]
                pv[n] = mm.pvalue(lg, tail=cfg.pvalue_tail)
                ks[n] = K.ks_uniform(pv[n])
            entry["pvalue"] = ks
            trimmed = {}
            for t in models.trims(l.layer):
                if t == 0:
                    continue
                tmod = models.get(l.layer, t)
                trimmed[str(t)] = {n: K.ks_uniform(tmod.pvalue(K.trim_logits(l.logits[rows_of(l, m)], t),
                                                               tail=cfg.pvalue_tail))
                                   for n, m in split.tests.items()}
            if trimmed:
                entry["pvalue_trimmed"] = trimmed
            if not cfg.run_pvalue_plots:
                continue
            test_mask = np.zeros(log.num_samples, dtype=bool)
            for m in split.tests.values():
                test_mask |= m
            test_lg = l.logits[rows_of(l, test_mask)]
            add("pvalue", P.plot_pvalue_basic(pv, l.layer, P.layer_file(plot_root, "pvalue_basic", l.layer),
                                              cfg.dpi, title))
            add("pvalue", P.plot_pvalue_vs_uniform(pv, l.layer, P.layer_file(plot_root, "pvalue_uniform", l.layer),
                                                   ks, cfg.dpi, title))
            kmax = min(l.num_experts, cfg.kth_max or 2 * max(1, l.top_k))
            add("pvalue", P.plot_pvalue_by_kth(K.kth_best_pvalues(mm, test_lg, kmax, cfg.pvalue_tail), l.layer,
                                               P.layer_file(plot_root, "pvalue_kth", l.layer), l.top_k,
                                               cfg.dpi, title))
            train_counts = l.subset(rows_of(l, split.train)).expert_counts()
            add("pvalue", P.plot_pvalue_by_popularity(mm.pvalue(test_lg, tail=cfg.pvalue_tail), train_counts,
                                                      l.layer, P.layer_file(plot_root, "pvalue_popularity", l.layer),
                                                      cfg.dpi, title))

    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    return summary


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o
