"""The dashboard's trace download: only files the store lists for a run, never a joined path."""
from __future__ import annotations

import pytest

from tb_plugin.data import RunNameError, RunStore, UnknownRunError, trace_download


def test_trace_download_serves_listed_files_only(tmp_path):
    import moe_trace
    from moe_trace.models import build_tiny_model, example_inputs

    model = build_tiny_model("olmoe")
    with moe_trace.profile(model, mode="kineto", logdir=tmp_path / "run") as run:
        model.generate(**example_inputs(model), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert run.trace_files  # written in the background: this waits for it
    (tmp_path / "run" / "secret.txt").write_text("no")
    store = RunStore(str(tmp_path))
    (f,) = (tmp_path / "run").glob("*.pt.trace.json.gz")
    path, name = trace_download(store, "run", f.name)
    assert path == str(f) and name == f.name
    for bad in ("secret.txt", "../run/" + f.name, "/etc/passwd"):
        with pytest.raises(UnknownRunError):
            trace_download(store, "run", bad)
    with pytest.raises(RunNameError):
        trace_download(store, "run", "")
    with pytest.raises(UnknownRunError):
        trace_download(store, "nope", f.name)
