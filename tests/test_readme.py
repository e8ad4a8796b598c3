"""README stays true: its Python quickstart runs, and the test command it documents is the one CI runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def readme_commands() -> list[str]:
    """The set-up commands of README's "Two commands" section (demo, tests)."""
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S) if "pip install" in b]


def test_ci_runs_the_readme_commands_verbatim():
    """The README's set-up commands are CI: .ci/run runs each of them as one line, unchanged."""
    cmds = readme_commands()
    assert len(cmds) == 2 and "moe-trace demo" in cmds[0] and cmds[1].endswith("python -m pytest -q")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for cmd in cmds:
        assert "\n" not in cmd and cmd in ci_lines, f".ci/run does not run README's command {cmd!r}"
    # every pip install that CI and the README do (beyond the local torch wheel) uses the one constraints file
    for line in cmds + [l for l in ci_lines if "pip install" in l and not l.startswith("#")]:
        for part in line.split("&&"):
            if "pip install" in part and "torch==" not in part:
                assert re.search(r"-c \.ci/constraints(-transformers4)?\.txt", part), f"unpinned install: {part.strip()!r}"


def _constraints(path: str = ".ci/constraints.txt") -> dict[str, str]:
    pins = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exactly (==): {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_dependency_within_pyproject_bounds():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
             if not r.startswith("moe-trace")]
    pins = _constraints()
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pins[name]), f"pin {name}=={pins[name]} is outside pyproject's {req}"
    assert pins["torch"] == "2.13.0" and pins["transformers"].startswith("5.")
    tf4 = _constraints(".ci/constraints-transformers4.txt")  # the second CI virtualenv
    assert tf4["torch"] == "2.13.0" and tf4["transformers"].startswith("4.57.")


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI=true: the installed packages are CI's pins")
def test_ci_installed_exactly_the_pins():
    from importlib.metadata import PackageNotFoundError, version

    wrong = {}
    for name, pinned in _constraints().items():
        try:
            got = version(name)
        except PackageNotFoundError:
            continue  # a pin for a package this platform does not need
        if got.split("+")[0] != pinned.split("+")[0]:
            wrong[name] = (pinned, got)
    assert not wrong, f"installed versions differ from .ci/constraints.txt: {wrong}"


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


def readme_family_count(version: str) -> int | None:
    """The number README states for `version` ("all N MoE families of transformers X.Y" / "the N of transformers X.Y")."""
    text = " ".join((ROOT / "README.md").read_text().split())
    for m in re.finditer(r"(?:all|the) (\d+) (?:MoE families )?of transformers (\d+\.\d+)", text):
        if m.group(2) == version:
            return int(m.group(1))
    return None


def test_readme_states_the_computed_family_count():
    """README's family count is the number of MoE families the pinned transformers ships (found in its
    own source tree by moe_trace.models.families), not a number written by hand."""
    import transformers

    from moe_trace.models.families import transformers_moe_families

    pinned = _constraints()["transformers"]
    installed = ".".join(transformers.__version__.split(".")[:2])
    stated = readme_family_count(".".join(pinned.split(".")[:2]))
    assert stated is not None, f"README names no family count for the pinned transformers {pinned}"
    if installed != ".".join(pinned.split(".")[:2]):
        pytest.skip(f"transformers {transformers.__version__} is not the pinned {pinned}")
    assert stated == len(transformers_moe_families())
