"""transformers' own tensor parallel and expert parallel, on CPU: 2 processes under torchrun (gloo).

tests/parallel_worker.py loads a tiny OLMoE checkpoint with a DistributedConfig (TP: tp_plan="auto";
EP: tp_size=2, ep_size=2), profiles a greedy generate in kineto mode and writes each rank's tokens,
report, settings and an independent reference (plain forward-pre-hooks on the experts modules, which
see global expert ids on every rank). Both ranks of a TP/EP pair process the SAME batch, so:

- each rank's counts equal its reference and the single-process run's counts;
- a report combining the ranks (`analyze(logdir)`, `Report(parts, ranks)`) counts the batch once,
  not once per rank; per-device rows stay one per rank;
- under EP (or with `ep_size=N` asked for) `expert_parallel` gives the assignments per EP rank under
  contiguous placement, checked here against sums of the reference bincounts over expert slices.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moe_trace
from moe_trace.analysis import Report, RunData

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_worker.py"
E = 8  # experts of the tiny OLMoE
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_torchrun(ckpt: Path, mode: str, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    t0 = time.perf_counter()
    for attempt in range(2):  # a second try only if the free port was taken in between
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(WORKER), str(ckpt), mode, str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun stops its workers (they run in sessions of their own, a SIGKILL to
            # torchrun would leave them waiting in a collective forever)
            proc.terminate()
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = "", "(torchrun ignored SIGTERM for 30 s; killed)"
            pytest.fail(f"torchrun {mode} did not finish in {TIMEOUT_S} s:\n{stderr[-4000:]}")
        if proc.returncode == 0 or "address already in use" not in stderr.lower() or attempt:
            break
    tail = (stdout[-3000:] + "\n" + stderr[-6000:]).strip()
    assert proc.returncode == 0, f"torchrun {mode} failed (rc {proc.returncode}):\n{tail}"
    for r in (0, 1):
        assert (out / f"rank{r}.json").is_file(), f"rank {r} wrote no result:\n{tail}"
    print(f"torchrun {mode}: {time.perf_counter() - t0:.1f} s")


def _single_process(ckpt: Path) -> dict:
    """Tokens, counts and reference bincounts of the same generate in one plain process."""
    from moe_trace.models import load_checkpoint
    from tests.parallel_worker import NEW, ReferenceHooks, prompt

    model = load_checkpoint(ckpt)  # OlmoeForCausalLM, plain (no distributed_config)
    ids = prompt(model.config.vocab_size)
    ref = ReferenceHooks([layer.mlp.experts for layer in model.model.layers])
    try:
        with torch.no_grad(), moe_trace.profile(model, mode="stats") as run:
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                    min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        ref.remove()
    return {"tokens": tokens.tolist(), "reference": ref.bincounts(E), "report": run.report().to_dict(),
            "settings": run.run_data.settings}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"single": ..., "tp": {"out", "ranks"}, "ep": {...}}: one checkpoint, one single-process run,
    one torchrun per mode (the whole module shares them)."""
    from moe_trace.models import save_tiny_checkpoint

    base = tmp_path_factory.mktemp("parallel")
    ckpt = save_tiny_checkpoint("olmoe", base / "ckpt")
    result = {"single": _single_process(ckpt)}
    for mode in ("tp", "ep"):
        out = base / mode
        out.mkdir()
        _run_torchrun(ckpt, mode, out)
        result[mode] = {"out": out, "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]}
    return result


# -- helpers ------------------------------------------------------------------------------------

def _counts(report: dict, phase: str | None = None) -> list[list[int]]:
    return [(l if phase is None else l["phases"][phase])["expert_counts"] for l in report["layers"]]


def _expected_ep(reference: dict, n: int) -> dict:
    """Assignments per EP rank under contiguous placement (rank r: experts [r*E/n, (r+1)*E/n)),
    computed from the reference bincounts (global expert ids), not from moe-trace."""
    width = E // n

    def loads(per_layer):  # [L][E] -> [L][n]
        return [[sum(c[r * width:(r + 1) * width]) for r in range(n)] for c in per_layer]

    def imbalance(row):
        return max(row) / (sum(row) / len(row))

    layer_loads = loads(reference["all"])
    total = [sum(col) for col in zip(*layer_loads)]
    phases = {}
    for p in ("prefill", "decode"):
        t = [sum(col) for col in zip(*loads(reference[p]))]
        phases[p] = {"assignments": t, "imbalance": imbalance(t)}
    return {"experts": [[r * width, (r + 1) * width] for r in range(n)], "assignments": total,
            "share": [a / sum(total) for a in total], "imbalance": imbalance(total),
            "per_layer_imbalance": [imbalance(row) for row in layer_loads], "phases": phases}


def _check_expert_parallel(ep: dict | None, reference: dict, n: int, source: str) -> None:
    assert ep, f"no expert_parallel block (expected ep_size {n}, source {source!r})"
    want = _expected_ep(reference, n)
    assert ep["ep_size"] == n and ep["source"] == source
    assert [r["ep_rank"] for r in ep["ranks"]] == list(range(n))
    assert [r["experts"] for r in ep["ranks"]] == want["experts"]
    assert [r["assignments"] for r in ep["ranks"]] == want["assignments"]
    assert [r["share"] for r in ep["ranks"]] == pytest.approx(want["share"])
    assert sum(r["share"] for r in ep["ranks"]) == pytest.approx(1.0)
    assert ep["imbalance"] == pytest.approx(want["imbalance"])
    assert ep["per_layer_imbalance"] == pytest.approx(want["per_layer_imbalance"])
    for p in ("prefill", "decode"):
        assert ep["phases"][p]["assignments"] == want["phases"][p]["assignments"], p
        assert ep["phases"][p]["imbalance"] == pytest.approx(want["phases"][p]["imbalance"]), p


# -- tests --------------------------------------------------------------------------------------

def test_single_process_reference(runs):
    single = runs["single"]
    ref = single["reference"]
    assert _counts(single["report"]) == ref["all"]
    assert _counts(single["report"], "prefill") == ref["prefill"]
    assert _counts(single["report"], "decode") == ref["decode"]
    assert single["settings"].get("parallel") is None
    assert not single["report"].get("expert_parallel")
    assert sum(map(sum, ref["all"])) > 0 and len(single["tokens"]) == 2


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_each_rank_matches_reference_and_single_process(runs, mode):
    single = runs["single"]
    for r, d in enumerate(runs[mode]["ranks"]):
        assert d["rank"] == r and d["world_size"] == 2
        assert d["tokens"] == single["tokens"], f"rank {r} generated other tokens than one process"
        ref, rep = d["reference"], d["report"]
        assert ref == single["reference"], f"rank {r}: the experts modules saw other routing than one process"
        assert _counts(rep) == ref["all"], f"rank {r}: report counts differ from the reference hooks"
        for p in ("prefill", "decode"):
            assert _counts(rep, p) == ref[p], (r, p)
            assert rep["phases"][p]["forward_calls"] == single["report"]["phases"][p]["forward_calls"], (r, p)
            assert rep["phases"][p]["tokens"] == single["report"]["phases"][p]["tokens"], (r, p)
        assert [l["tokens"] for l in rep["layers"]] == ref["tokens"]
        assert [l["num_experts"] for l in rep["layers"]] == [E] * len(rep["layers"])  # global, also under EP
        assert [l["excluded"] for l in rep["layers"]] == [0] * len(rep["layers"])
        assert _counts(rep) == _counts(single["report"])
        assert [dev["device"] for dev in rep["devices"]] == ["cpu"]


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_settings_parallel(runs, mode):
    for r, d in enumerate(runs[mode]["ranks"]):
        par = d["settings"].get("parallel")
        assert par is not None, f"rank {r}: settings['parallel'] missing under {mode}"
        assert d["report"]["settings"].get("parallel") == par
        want = {"tp_size": 2, "ep_size": 2 if mode == "ep" else 1, "fsdp_size": 1, "dist_rank": r, "world_size": 2,
                "batch_group": 0, "ep_rank": r if mode == "ep" else None,
                "experts_per_ep_rank": 4 if mode == "ep" else None}
        assert {k: par.get(k) for k in want} == want
        if mode == "ep":  # what transformers did to the module: the local expert count
            assert d["local_num_experts"] == [4] * len(d["local_num_experts"])


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_analyze_counts_the_batch_group_once(runs, mode):
    single, ranks = runs["single"], runs[mode]["ranks"]
    traces = runs[mode]["out"] / "traces"
    files = sorted(p.name for p in traces.glob("*.pt.trace.json.gz"))
    assert len(files) == 2 and files[0].startswith("rank0_") and files[1].startswith("rank1_"), files
    combined = moe_trace.analyze(traces).to_dict()
    # the ranks of one torchrun job share one run id, without a collective (trace/format.py job_token)
    from moe_trace.trace import read_metadata

    ids = {read_metadata(traces / f)["moe_trace"].get("run_id") for f in files}
    assert len(ids) == 1 and None not in ids and combined["run_id"] in ids, ids
    one = ranks[0]["report"]
    # one rank's counts, not the sum over both ranks (which hold the same batch)
    assert _counts(combined) == _counts(one) == ranks[0]["reference"]["all"], \
        "analyze() over the TP/EP ranks did not count their shared batch once"
    for p in ("prefill", "decode"):
        assert _counts(combined, p) == ranks[0]["reference"][p]
        assert combined["phases"][p]["forward_calls"] == one["phases"][p]["forward_calls"]
        assert combined["phases"][p]["tokens"] == one["phases"][p]["tokens"]
    assert [l["tokens"] for l in combined["layers"]] == [l["tokens"] for l in one["layers"]]
    assert combined["totals"]["tokens"] == one["totals"]["tokens"] == single["report"]["totals"]["tokens"]
    # per-device rows: one per rank, each with that rank's own work
    assert [d["device"] for d in combined["devices"]] == ["rank0/cpu", "rank1/cpu"]
    for row, d in zip(combined["devices"], ranks):
        assert row["tokens"] == d["report"]["devices"][0]["tokens"]
        assert row["layers"] == len(d["report"]["layers"])
        assert row["experts_ms"] is not None and row["router_ms"] is not None  # kineto ranges per rank
    if mode == "tp":
        assert not combined.get("expert_parallel")
    else:
        _check_expert_parallel(combined.get("expert_parallel"), ranks[0]["reference"], 2, "run")


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_report_of_parts_counts_the_batch_group_once(runs, mode):
    ranks = runs[mode]["ranks"]
    parts = [RunData.from_dict(d["run_data"]) for d in ranks]
    rep = Report(parts, ranks=[0, 1]).to_dict()
    assert _counts(rep) == ranks[0]["reference"]["all"]
    assert [d["device"] for d in rep["devices"]] == ["rank0/cpu", "rank1/cpu"]
    # the same parts as two data-parallel ranks (different batch groups) add up: the check above
    # would catch a report that summed the TP/EP pair
    for r, part in enumerate(parts):
        part.settings = dict(part.settings, parallel=dict(part.settings["parallel"], batch_group=r))
    dp = Report(parts, ranks=[0, 1]).to_dict()
    assert _counts(dp) == [[2 * x for x in c] for c in ranks[0]["reference"]["all"]]


def test_rank_reports_expert_parallel(runs):
    assert all(not d["report"].get("expert_parallel") for d in runs["tp"]["ranks"])
    for d in runs["ep"]["ranks"]:
        _check_expert_parallel(d["report"].get("expert_parallel"), d["reference"], 2, "run")


def test_what_if_placement_on_the_tp_run(runs):
    ranks = runs["tp"]["ranks"]
    rep = moe_trace.analyze(runs["tp"]["out"] / "traces", ep_size=4).to_dict()
    assert _counts(rep) == ranks[0]["reference"]["all"]
    _check_expert_parallel(rep.get("expert_parallel"), ranks[0]["reference"], 4, "what-if")
    parts = [RunData.from_dict(d["run_data"]) for d in ranks]
    _check_expert_parallel(Report(parts, ranks=[0, 1], ep_size=4).to_dict().get("expert_parallel"),
                           ranks[0]["reference"], 4, "what-if")
