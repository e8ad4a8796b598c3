"""Readable objects and a clean CLI: tables instead of reprs, help with defaults on every option, one-line
errors instead of tracebacks, README lists every command, compare fits 80 columns."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_trace
from moe_trace.cli.main import build_parser, main
from moe_trace.models import build_tiny_model, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_shows_its_default():
    for name, parser in _commands().items():
        text = parser.format_help().split("options:", 1)[1]
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"moe-trace {name} {a.option_strings or a.dest}: no help text"
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                flag = a.option_strings[-1]
                at = re.search(r"\n  (-\S+, )?" + re.escape(flag) + r"[ \n]", text).start()
                block = re.split(r"\n  -", text[at + 1:], maxsplit=1)[0]
                assert "default" in block, f"moe-trace {name} {flag}: --help does not show its default"


def test_readme_table_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `moe-trace ([a-z-]+)", readme, flags=re.M))
    listed |= set(re.findall(r"`moe-trace ([a-z-]+)[^`]*` / `moe-trace ([a-z-]+)", readme)[0]) if "/ `moe-trace" in readme else set()
    assert set(_commands()) <= listed, f"README's command table lacks {sorted(set(_commands()) - listed)}"


def _one_line_error(argv, capsys, needle):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-trace: error:") and "\n" not in err and needle in err, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_cuda_on_a_cpu_box_is_one_line(capsys):
    _one_line_error(["demo", "--device", "cuda"], capsys, "CUDA is not available")


def test_list_families_into_head_has_no_broken_pipe():
    proc = subprocess.run(f"{sys.executable} -m moe_trace demo --list-families | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == moe_trace.models.list_families()[0]


def test_cuda_graphs_help_does_not_run_the_benchmark():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_graphs.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--compile-control" in proc.stdout and "control_capture:" not in proc.stdout


def test_detect_returns_a_list_that_prints_as_a_table():
    layers = moe_trace.detect(build_tiny_model("olmoe"))
    assert isinstance(layers, list) and all(isinstance(l, moe_trace.LayerInfo) for l in layers)
    lines = repr(layers).splitlines()
    assert lines[0].split()[:3] == ["idx", "name", "family"] and len(lines) == 2 + len(layers)
    assert str(layers) == repr(layers) and "LayerInfo(" not in repr(layers)


def test_inspect_params_and_flops_per_token(tmp_path, capsys):
    ckpt = save_tiny_checkpoint("qwen2_moe", tmp_path / "q")
    assert main(["inspect", str(ckpt), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = build_tiny_model("qwen2_moe")
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert got["total_params"] == total
    assert got["active_params"] == total - experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
    # a one-token decode step routes exactly top_k experts per layer: the report's FLOPs per decode token
    ids = torch.tensor([[5, 6, 7]])
    with moe_trace.profile(model) as run, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    dec = run.report().to_dict()["phases"]["decode"]
    assert got["moe_flops_per_token"] == dec["flops_per_token"]
    assert main(["inspect", str(ckpt)]) == 0
    assert "active per token" in capsys.readouterr().out


def test_inspect_unknown_model_type_names_the_closest(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen2_mo", "num_experts": 8}))
    err = _one_line_error(["inspect", str(cfg)], capsys, "closest: qwen2_moe")
    assert len(err) < 400


def test_inspect_rejects_top_k_above_num_experts(tmp_path, capsys):
    ckpt = save_tiny_checkpoint("olmoe", tmp_path / "o")
    data = json.loads((ckpt / "config.json").read_text())
    data["num_experts_per_tok"] = data["num_experts"] + 4
    (ckpt / "config.json").write_text(json.dumps(data))
    err = _one_line_error(["inspect", str(ckpt)], capsys, "top_k=12")
    assert "num_experts=8" in err


def test_compare_fits_80_columns_with_one_format_per_row(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["compare", "--config", "base=model", "--config", "knee=kneedle", "--config", "top1=topk:1",
                 "--config", "top4=topk:4", "--max-new-tokens", "2", "--no-progress", "--warmup", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert max(len(l) for l in out) <= 80
    assert out[2].split() == ["base", "knee", "top1", "top4"]                 # run names, not A/B
    krow = next(l for l in out if l.startswith("k (mean"))
    assert [v for v in krow.split()[-4:]] == ["2.00", krow.split()[-3], "1.00", "4.00"]
    for l in out[3:]:
        cells = re.findall(r"  (\S+)", l[23:])
        shapes = {re.sub(r"\d", "9", c).lstrip("+-") for c in cells if c != "-"}
        decimals = {len(c.split(".")[1].rstrip("%")) if "." in c else 0 for c in cells if re.match(r"^[+-]?\d", c)}
        assert len(decimals) <= 1, f"mixed number formats in row {l!r}"


def test_sweep_out_under_a_file_is_one_error_before_any_work(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(["sweep", "top-k", "--values", "1", "2", "--out", str(f / "sub")], capsys, "is a file")
