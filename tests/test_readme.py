"""README stays true: its Python quickstart runs, and the test command it documents is the one CI runs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quickstart_runs(tmp_path, monkeypatch):
    (code,) = [b for b in readme_blocks("python") if "moe_trace.profile" in b]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["report"]
    d = report.to_dict()
    assert d["model"]["family"] == "olmoe" and d["phases"]["decode"]["forward_calls"] == 15
    assert (tmp_path / "report.json").exists() and (tmp_path / "layers.csv").exists()
    assert len(namespace["df"]) == 3 * d["model"]["num_moe_layers"]


def test_ci_runs_the_documented_test_command():
    test_cmd = [b for b in readme_blocks("bash") if "pytest" in b][0].split("&&")[-1].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text().replace("python3 -m", "python -m")


def test_docs_links_exist():
    for link in re.findall(r"\]\((docs/[^)]+)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).exists(), f"README links to missing {link}"


def test_cli_demo_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_trace", "demo", "--logdir", str(tmp_path / "demo"),
                          "--mode", "stats", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "moe-trace report: olmoe" in out.stdout
    assert (tmp_path / "demo" / "report.json").exists()


def test_cli_bad_input_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_trace", "inspect", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("moe-trace: error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
