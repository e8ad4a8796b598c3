"""Reports of tensor / expert parallel runs, on synthetic parts (CI has no GPUs): ranks that hold the
same batch count once, and the load per expert-parallel rank equals sums over each rank's experts."""
from __future__ import annotations

import numpy as np
import pytest

from moe_trace.analysis import LayerCounts, LayerInfo, Report, RunData
from moe_trace.errors import ConfigError

E = 8


def part(rank: int, counts: list[list[int]], batch_group: int | None, ep_size: int = 1) -> RunData:
    layers = [LayerInfo(index=i, name=f"l{i}", family="olmoe", num_experts=E, top_k=2, hidden_size=4,
                        expert_dim=2, device=f"cuda:{rank}") for i in range(len(counts))]
    run = RunData.empty({"family": "olmoe"}, layers)
    for i, c in enumerate(counts):
        c = np.asarray(c, dtype=np.int64)
        tokens = int(c.sum()) // 2
        run.counts["decode"][i] = LayerCounts(tokens=tokens, calls=1, expert_counts=c, k_hist=np.array([0, 0, tokens]))
    run.forward_tokens["decode"] = int(np.asarray(counts[0]).sum()) // 2
    run.forward_calls["decode"] = 1
    if batch_group is not None:
        run.settings["parallel"] = {"tp_size": 2, "ep_size": ep_size, "fsdp_size": 1, "dist_rank": rank,
                                    "world_size": 2, "batch_group": batch_group,
                                    "ep_rank": rank if ep_size > 1 else None,
                                    "experts_per_ep_rank": E // ep_size if ep_size > 1 else None}
    return run


COUNTS = [[5, 1, 0, 2, 4, 4, 0, 0], [1, 1, 1, 1, 6, 2, 2, 2]]


def test_ranks_holding_one_batch_count_once_and_data_parallel_ranks_add():
    tp = Report([part(0, COUNTS, 0), part(1, COUNTS, 0)], ranks=[0, 1]).to_dict()
    assert [l["expert_counts"] for l in tp["layers"]] == COUNTS
    assert tp["phases"]["decode"]["tokens"] == 8 and tp["notes"] == []
    assert [d["device"] for d in tp["devices"]] == ["rank0/cuda:0", "rank1/cuda:1"]  # every rank's row stays
    dp = Report([part(0, COUNTS, 0), part(1, COUNTS, 1)], ranks=[0, 1]).to_dict()
    assert [l["expert_counts"] for l in dp["layers"]] == [[2 * x for x in c] for c in COUNTS]
    assert dp["phases"]["decode"]["tokens"] == 16
    other = [list(reversed(c)) for c in COUNTS]
    odd = Report([part(0, COUNTS, 0), part(1, other, 0)], ranks=[0, 1])
    assert "counted different routing" in odd.to_dict()["notes"][0] and "note:" in str(odd)


def test_expert_parallel_load_per_rank():
    d = Report([part(0, COUNTS, 0, ep_size=2), part(1, COUNTS, 0, ep_size=2)], ranks=[0, 1]).to_dict()
    ep = d["expert_parallel"]
    per_layer = np.array([[sum(c[:4]), sum(c[4:])] for c in COUNTS])    # independent: slices by hand
    total = per_layer.sum(0)
    assert ep["ep_size"] == 2 and ep["source"] == "run"
    assert [r["experts"] for r in ep["ranks"]] == [[0, 4], [4, 8]]
    assert [r["assignments"] for r in ep["ranks"]] == total.tolist()
    assert sum(r["share"] for r in ep["ranks"]) == pytest.approx(1.0)
    assert ep["imbalance"] == pytest.approx(total.max() / total.mean())
    assert ep["per_layer_imbalance"] == pytest.approx([row.max() / row.mean() for row in per_layer])
    assert ep["phases"]["decode"]["assignments"] == total.tolist() and ep["phases"]["prefill"]["imbalance"] is None


def test_what_if_placement_and_bad_ep_size():
    r = Report(part(0, COUNTS, None), ep_size=4)
    ep = r.to_dict()["expert_parallel"]
    assert ep["source"] == "what-if" and [x["experts"] for x in ep["ranks"]] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert [x["assignments"] for x in ep["ranks"]] == [sum(sum(c[j:j + 2]) for c in COUNTS) for j in (0, 2, 4, 6)]
    assert "expert parallel (what-if, 4 ranks)" in str(r)
    assert Report(part(0, COUNTS, None)).to_dict()["expert_parallel"] is None
    with pytest.raises(ConfigError, match="does not divide"):
        Report(part(0, COUNTS, None), ep_size=3).to_dict()
    with pytest.raises(ConfigError, match="positive integer"):
        Report(part(0, COUNTS, None), ep_size=0)
