"""The capture package's structure: one-way imports, the options dataclass, the observer protocol."""
from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import moe_trace
from moe_trace.capture.options import ProfileOptions
from moe_trace.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1] / "moe_trace"
ALLOWED = {
    "capture": {"analysis", "trace", "selectors", "errors", "checks", "capture", "routing.logger"},
    "selectors": {"errors", "selectors"},
    "routing/logger.py": {"errors", "checks", "routing.logfile"},
    "routing/logfile.py": {"errors"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                pkg = list(path.relative_to(ROOT).parent.parts)
                pkg = pkg[: len(pkg) - (node.level - 1)]
                out.add(".".join(pkg + ([node.module] if node.module else [])))
                continue
            mod = node.module or ""
            if mod.startswith("moe_trace."):
                out.add(mod[len("moe_trace."):])
        elif isinstance(node, ast.Import):
            out |= {a.name[len("moe_trace."):] for a in node.names if a.name.startswith("moe_trace.")}
    return out


@pytest.mark.parametrize("where", sorted(ALLOWED))
def test_imports_go_one_way(where):
    files = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    allowed = ALLOWED[where]
    for f in files:
        for mod in _imports(f):
            ok = any(mod == a or mod.startswith(a + ".") for a in allowed)
            assert ok, f"{f.relative_to(ROOT)} imports moe_trace.{mod}, which sits above it (docs/design.md)"


def test_profile_signature_is_the_options_dataclass():
    names = [f.name for f in dataclasses.fields(ProfileOptions)]
    assert names[0] == "mode"
    doc = inspect.getdoc(moe_trace.profile)
    for n in names[1:]:
        assert n in doc, f"profile() docstring does not name option {n}"
    with pytest.raises(ConfigError, match="unknown option.*logdri"):
        moe_trace.profile(torch.nn.Linear(2, 2), logdri="x")
    with pytest.raises(ConfigError, match="unknown mode"):
        moe_trace.profile(torch.nn.Linear(2, 2), "fast")


def test_old_selector_import_path_reexports_the_package():
    import moe_trace.experiments.selectors as old
    import moe_trace.selectors as new

    for name in new.__all__:
        assert getattr(old, name) is getattr(new, name)


def test_only_the_session_hooks_the_model_and_observers_get_every_step(tmp_path):
    from moe_trace.experiments.sweep import ForwardTimer
    from moe_trace.routing.logger import RouterLogger

    seen = []

    class Spy:
        def on_step_start(self, step):
            seen.append(("start", step.index, step.phase, step.batch, step.positions))

        def on_forward_end(self, step, output):
            seen.append(("end", step.index, hasattr(output, "logits")))

        def on_step_end(self, step, phase):
            seen.append(("step_end", step, phase))

    from tests.conftest import prompt, tiny_olmoe

    tiny_model = tiny_olmoe()
    ids = prompt(2, 5)
    tiny_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    timer = ForwardTimer(tiny_model)
    model_hooks = []
    with torch.no_grad(), moe_trace.profile(tiny_model, observers=[Spy(), timer],
                                            log_router_logits={"path": str(tmp_path / "logs"), "max_tokens": 0}) as run:
        model_hooks = len(tiny_model._forward_pre_hooks)
        logger = next(o for o in run.observers.items if isinstance(o, RouterLogger))
        assert not logger._hooks  # the logger does not hook the model: the session hands it the steps
        tiny_model.generate(**tiny_inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert model_hooks == 1
    b, s = tiny_inputs["input_ids"].shape
    assert seen[:3] == [("start", 0, "prefill", b, s), ("end", 0, True), ("step_end", 0, "prefill")]
    assert [e for e in seen if e[0] == "start"][1:] == [("start", 1, "decode", b, 1), ("start", 2, "decode", b, 1)]
    assert len(timer.marks) == 3
    assert not tiny_model._forward_hooks and not tiny_model._forward_pre_hooks
