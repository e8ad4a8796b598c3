"""`moe-trace routing-log` / `routing-analyze` end to end on the tiny model, prompt loading, plots."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moe_trace.cli.main import main
from moe_trace.errors import ConfigError
from moe_trace.routing import AnalysisConfig, LogitKDE, load_logs, load_prompts, run_analysis


@pytest.fixture(scope="module")
def json_logs(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "logs"
    assert main(["routing-log", "--out", str(out), "--max-samples", "8", "--max-length", "40",
                 "--no-progress"]) == 0
    return out


def test_routing_log_writes_the_bundled_prompts(json_logs, capsys):
    files = list(json_logs.glob("*_internal_routing.json"))
    assert [f.name for f in files] == ["tiny-olmoe_prompts_internal_routing.json"]
    doc = json.loads(files[0].read_text())
    assert doc["num_layers"] == 3 and doc["num_experts"] == 8 and doc["top_k"] == 2
    assert len(doc["samples"]) == 8
    assert all(s["loss"] is not None for s in doc["samples"])


def test_routing_analyze_end_to_end(json_logs, tmp_path, capsys):
    out = tmp_path / "an"
    rc = main(["routing-analyze", str(json_logs), "--out", str(out), "--layers", "0", "--dpi", "40",
               "--per-expert-plots", "--per-expert-max", "1", "--kernels", "gaussian,tophat,epanechnikov,linear",
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "split by sample" in text and "layer 0: p-values vs uniform" in text
    s = json.loads((out / "summary.json").read_text())
    assert s["train"] == "prompts:train" and s["test"] == ["prompts:test"]
    assert s["layers"]["0"]["pvalue"]["prompts:train"]["n"] > 0
    plots = {p.relative_to(out / "plots").as_posix() for p in (out / "plots").rglob("*.png")}
    for sub in ("basic/expert_weights_sum", "basic/expert_choice_counts", "basic/router_softmax",
                "basic/router_raw_logits", "kde/kde_cumulative_density", "kde/trimmed_comparison",
                "kde/kernel_comparison", "pvalue/pvalue_basic", "pvalue/pvalue_vs_uniform", "pvalue/pvalue_by_kth",
                "pvalue/pvalue_by_popularity"):
        assert f"{sub}/layer_000.png" in plots, sub
    assert len([p for p in plots if p.startswith("per_expert/per_expert_softmax/layer_000/")]) == 1
    models = sorted(p.name for p in (out / "kde_models").glob("*.npz"))
    assert "tiny-olmoe_distribution_model_layer_0.npz" in models
    assert "tiny-olmoe_distribution_model_layer_0_trimmed_2.npz" in models
    assert {f"tiny-olmoe_distribution_model_layer_0_{k}.npz" for k in ("gaussian", "tophat", "epanechnikov",
                                                                        "linear")} <= set(models)
    m = LogitKDE.load(out / "kde_models" / "tiny-olmoe_distribution_model_layer_0.npz")
    assert m.layer == 0 and m.kernel == "gaussian"

    # reuse the saved models: p-values only, no plots, no training
    out2 = tmp_path / "an2"
    assert main(["routing-analyze", str(json_logs), "--out", str(out2), "--kde-models", str(out / "kde_models"),
                 "--no-plots", "--no-progress"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["layers"]["0"]["pvalue"] == s["layers"]["0"]["pvalue"]
    assert not (out2 / "kde_models").exists() and not (out2 / "plots").exists()


def test_columnar_logging_with_two_datasets(tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    rows = [{"dataset": "news", "text": f"Stocks moved {i} points on day {i} of trading."} for i in range(4)]
    rows += [{"dataset": "code", "text": f"def f{i}(x):\n    return x * {i} + 1"} for i in range(4)]
    src.write_text("\n".join(json.dumps(r) for r in rows))
    logs = tmp_path / "col"
    assert main(["routing-log", "--prompts", str(src), "--format", "columnar", "--out", str(logs),
                 "--max-tokens", "200", "--logits-dtype", "float16", "--generate", "2", "--no-progress"]) == 0
    log = load_logs(logs)
    assert log.datasets == ["news", "code"]
    assert int(log.sample_num_tokens.sum()) == 200 == log.layers[0].num_tokens
    out = tmp_path / "an"
    assert main(["routing-analyze", str(logs), "--out", str(out), "--train", "news", "--test", "code",
                 "--no-plots", "--trims", "1", "--kernels", "gaussian", "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["split"] == "by dataset" and s["test"] == ["code"]
    assert set(s["layers"]["2"]["pvalue"]) == {"news", "code"}


def test_cli_errors(tmp_path, capsys):
    assert main(["routing-analyze", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["routing-analyze", str(tmp_path / "empty")]) == 2
    assert main(["routing-log", "--max-samples", "0"]) == 2
    assert main(["routing-log", "--format", "columnar", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["routing-log", "--prompts", str(tmp_path / "nope.txt")]) == 2


def test_analysis_config_toggles_and_errors(json_logs, tmp_path):
    cfg = AnalysisConfig(output_dir=str(tmp_path / "o"), run_basic_plots=False, run_kde_plots=False,
                         run_pvalue_plots=False, run_kde_training=False, progress=False)
    s = run_analysis(json_logs, cfg)
    assert s["files"] == {} and s["layers"]["0"]["tokens_train"] > 0
    with pytest.raises(ConfigError):
        run_analysis(json_logs, AnalysisConfig(output_dir=str(tmp_path / "o"), kernels=("box",)))
    with pytest.raises(ConfigError):
        run_analysis(json_logs, AnalysisConfig(output_dir=str(tmp_path / "o"), train_datasets=["nope"]))


def test_plots_are_300_dpi_png(tmp_path):
    from PIL import Image

    from moe_trace.routing import plots as P

    p = P.plot_choice_counts(np.arange(8), 0, P.layer_file(tmp_path, "choice_counts", 0))
    assert p == tmp_path / "basic" / "expert_choice_counts" / "layer_000.png"
    with Image.open(p) as im:
        assert im.format == "PNG"
        assert tuple(round(v) for v in im.info["dpi"]) == (300, 300)


def test_load_prompts(tmp_path):
    bundled = load_prompts()
    assert len(bundled) >= 25 and {d for d, _ in bundled} == {"prompts"}
    t = tmp_path / "mine.txt"
    t.write_text("first\n\n  second  \nthird\n")
    assert load_prompts(t) == [("mine", "first"), ("mine", "second"), ("mine", "third")]
    assert load_prompts(t, limit=2, dataset="x") == [("x", "first"), ("x", "second")]
    j = tmp_path / "q.jsonl"
    j.write_text('{"question": "why?", "dataset": "qa"}\n"plain string"\n{"body": "b"}\n')
    with pytest.raises(ConfigError):
        load_prompts(j)
    j.write_text('{"question": "why?", "dataset": "qa"}\n"plain string"\n')
    assert load_prompts(j) == [("qa", "why?"), ("q", "plain string")]
    j2 = tmp_path / "b.jsonl"
    j2.write_text('{"body": "b"}\n')
    assert load_prompts(j2, text_field="body") == [("b", "b")]
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(ConfigError):
        load_prompts(d)  # not a saved dataset (or `datasets` missing): a clear error either way


def test_byte_tokenizer_fallback():
    from moe_trace.routing import ByteTokenizer

    assert ByteTokenizer(256).encode("aé") == [97, 195, 169]
    assert ByteTokenizer(100).encode("a") == [97 % 100]
