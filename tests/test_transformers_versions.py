"""transformers versions: the supported range is checked at detect() with one clear error; families
a version cannot run are refused naming the version that can. Runs on 4.57 too (marker tf4)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import transformers

import moe_trace
from moe_trace.capture import versions
from moe_trace.models import build_tiny_model

pytestmark = pytest.mark.tf4


@pytest.fixture
def fake_version(monkeypatch):
    def set_(v):
        monkeypatch.setattr(versions, "installed", lambda: v)
        versions._check.cache_clear()
    yield set_
    versions._check.cache_clear()


@pytest.mark.parametrize("v", ["4.44.2", "4.56.1", "6.0.0", "7.1.0.dev0"])
def test_unsupported_version_is_one_clear_error_at_detect(fake_version, olmoe, v):
    fake_version(v)
    with pytest.raises(moe_trace.UnsupportedTransformersError) as exc:
        moe_trace.detect(olmoe)
    msg = str(exc.value)
    assert v in msg and ">=4.57,<6" in msg and "\n" not in msg


@pytest.mark.parametrize("v", ["4.57.0", "4.57.6", "5.0.0", "5.24.0", "5.99.0rc1"])
def test_supported_versions_pass(fake_version, olmoe, v):
    fake_version(v)
    assert len(moe_trace.detect(olmoe)) == 3


def test_pyproject_promises_the_checked_range():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"transformers>=4\.57,<6"', text)
    assert versions.SUPPORTED == ">=4.57,<6" and versions.MINIMUM == (4, 57)


def test_family_too_new_for_4x_names_the_version(fake_version):
    if not hasattr(transformers, "DogeForCausalLM"):
        pytest.skip("no Doge in this transformers")
    model = build_tiny_model("doge")
    fake_version("4.57.6")
    with pytest.raises(moe_trace.UnsupportedTransformersError, match=r"doge .*needs transformers >= 5\.0"):
        moe_trace.detect(model)


def test_cli_reports_an_unsupported_version_in_one_line(tmp_path):
    code = ("import sys; import moe_trace.capture.versions as v; v.installed = lambda: '4.40.0'; "
            "from moe_trace.cli.main import main; sys.exit(main(['demo', '--logdir', %r, '--max-new-tokens', '2']))"
            % str(tmp_path / "d"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith("moe-trace: error:") and "Traceback" not in out.stderr
    assert "4.40.0" in out.stderr and ">=4.57,<6" in out.stderr


def test_readme_states_the_family_count_of_transformers_4():
    """On transformers 4.x (the second CI virtualenv) README's "the N of transformers 4.57" is computed."""
    if versions.major() >= 5:
        pytest.skip("counted by tests/test_readme.py on the pinned 5.x")
    from moe_trace.models.families import transformers_moe_families
    from tests.test_readme import readme_family_count

    minor = ".".join(transformers.__version__.split(".")[:2])
    assert readme_family_count(minor) == len(transformers_moe_families())
