"""Fail early (bad output paths before anything runs), clean up always (hooks, temp dirs), and an
incomplete run is still written and marked."""
from __future__ import annotations

import gzip
import json
import os
import tempfile

import pytest
import torch

import moe_trace
from moe_trace.errors import ConfigError
from moe_trace.models import build_tiny_model


@pytest.fixture
def model():
    return build_tiny_model("olmoe").eval()


def _ids():
    return torch.randint(3, 200, (2, 5))


def _hooks(m):
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


class Counting:
    """Counts model forwards that ran (so 'nothing ran' is checked, not assumed)."""

    def __init__(self, m):
        self.n = 0
        self.h = m.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_bad_logdir_is_a_config_error_before_anything_runs(model, tmp_path, where):
    f = tmp_path / "afile"
    f.write_text("x")
    logdir = f if where == "file" else f / "sub"
    c = Counting(model)
    before = _hooks(model)
    with pytest.raises(ConfigError, match="logdir"):
        with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=logdir):
            model(_ids())
    assert c.n == 0 and _hooks(model) == before
    assert not torch._C._autograd._profiler_enabled()


@pytest.mark.parametrize("arg", ["file.json", "dir", {"path": "dir", "format": "columnar"}])
def test_bad_router_log_path_is_a_config_error_before_anything_runs(model, tmp_path, arg):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    if isinstance(arg, dict):
        arg = dict(arg, path=str(blocker / arg["path"]))
    else:
        arg = str(blocker / arg)
    c = Counting(model)
    before = _hooks(model)
    for _ in range(2):  # twice: nothing accumulates
        with pytest.raises(ConfigError, match="log_router_logits"):
            with torch.no_grad(), moe_trace.profile(model, log_router_logits=arg):
                model(_ids())
    assert c.n == 0 and _hooks(model) == before


def test_attached_logger_hooks_are_removed_when_writing_fails(model, tmp_path, monkeypatch):
    from moe_trace.routing.logger import RouterLogger

    before = _hooks(model)
    lg = RouterLogger(tmp_path / "logs").attach(model)
    with pytest.raises(OSError, match="disk full"):
        with torch.no_grad(), moe_trace.profile(model, observers=[lg]) as run:
            model(_ids())
            monkeypatch.setattr(lg, "_write", lambda rec: (_ for _ in ()).throw(OSError("disk full")))
    # writing failed inside close(): raised after cleanup; the report survives and every hook is gone
    assert _hooks(model) == before
    assert run.report().to_dict()["phases"]["prefill"]["tokens"] == 10


def test_writing_failure_keeps_the_report_and_removes_every_hook(model, tmp_path, monkeypatch):
    from moe_trace.routing import logger as L

    before = _hooks(model)
    monkeypatch.setattr(L.RouterLogger, "_write", lambda self, rec: (_ for _ in ()).throw(OSError("disk full")))
    for _ in range(2):
        with pytest.raises(OSError, match="disk full"):
            with torch.no_grad(), moe_trace.profile(model, log_router_logits=str(tmp_path / "l")) as run:
                model(_ids())
        assert _hooks(model) == before
        assert run.report().to_dict()["phases"]["prefill"]["tokens"] == 10


def _temp_dirs():
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("moe_trace_")}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temp root of this test's own (other processes share /tmp)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_kineto_leaves_no_temp_dir(model, tmp_path, private_tmp):
    before = _temp_dirs()
    assert before == set()
    with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=tmp_path / "a") as a:
        model(_ids())
    with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=tmp_path / "b",
                                            schedule={"wait": 0, "warmup": 0, "active": 1, "repeat": 1}) as b:
        model(_ids())
        model(_ids())
    assert a.trace_files and b.trace_files  # the writer thread removes its temp dir when it is done
    assert _temp_dirs() == before


def test_body_raising_still_writes_what_was_recorded_marked_incomplete(model, tmp_path, private_tmp):
    before = _temp_dirs()
    logdir = tmp_path / "logs"
    with pytest.raises(KeyError):
        with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=logdir) as run:
            model(_ids())
            model(_ids()[:, -1:])
            raise KeyError("user bug")
    assert len(run.trace_files) == 1  # waits for the writer thread, which removes its temp dir
    assert _temp_dirs() == before
    rep = run.report().to_dict()
    assert rep["settings"]["incomplete"] is True
    assert any("incomplete run" in n and "KeyError" in n for n in rep["notes"])
    with gzip.open(run.trace_files[0], "rt") as f:
        meta = json.load(f)["moe_trace"]
    assert meta["run"]["settings"]["incomplete"] is True
    back = moe_trace.analyze(logdir).to_dict()
    assert back["notes"] == rep["notes"] and back["phases"]["decode"]["tokens"] == 2
    assert "incomplete run" in str(moe_trace.analyze(logdir))
