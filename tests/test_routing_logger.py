"""RouterLogger: the observer contract, sample boundaries, caps, both log formats, the profile() path."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_trace.analysis import LayerInfo
from moe_trace.errors import ConfigError
from moe_trace.routing.logfile import load_logs
from moe_trace.routing.logger import RouterLogger, per_sample_loss

E, K = 8, 2


def _layers(n=3):
    return [LayerInfo(index=i, name=f"model.layers.{i}.mlp", family="olmoe", num_experts=E, top_k=K, hidden_size=64,
                      expert_dim=32) for i in range(n)]


def _route(rows, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, E, generator=g)
    w, idx = logits.softmax(-1).topk(K, dim=-1)
    return logits, w, idx


def _drive(logger, layers, plan, seed=0):
    """plan: list of (sample_id | None, dataset, [(phase, rows), ...]); returns what was routed."""
    sent = {}
    step = 0
    for sid, ds, steps in plan:
        if sid is not None:
            logger.begin_sample(sid, dataset=ds)
        for phase, rows in steps:
            for l in layers:
                lg, w, idx = _route(rows, seed + 1000 * step + l.index)
                logger.on_route(l, phase, step, lg, w, idx)
                sent.setdefault((sid, ds, l.index), []).append((lg, w, idx))
            logger.on_step_end(step, phase)
            step += 1
    return sent


@pytest.mark.parametrize("fmt", ["json", "columnar"])
def test_round_trip_exact(tmp_path, fmt):
    layers = _layers()
    logger = RouterLogger(tmp_path / "logs", layers=layers, format=fmt, flush_every=2, model_name="org/tiny",
                          shard_tokens=10)
    plan = [(0, "lambada", [("prefill", 5), ("decode", 1), ("decode", 1)]),
            (1, "lambada", [("prefill", 3)]),
            (0, "wikitext", [("prefill", 4), ("decode", 1)])]
    sent = _drive(logger, layers, plan)
    logger.record_loss_value(torch.tensor(2.5))
    logger.close()
    log = load_logs(tmp_path / "logs")
    assert log.datasets == ["lambada", "wikitext"]
    assert log.sample_id.tolist() == [0, 1, 0]
    assert log.sample_num_tokens.tolist() == [7, 3, 5]
    assert np.isnan(log.sample_loss[0]) and log.sample_loss[2] == 2.5
    assert (log.num_layers, log.num_experts, log.top_k, log.config) == (3, E, K, "org/tiny")
    for l in log.layers:
        for row, (sid, ds) in enumerate([(0, "lambada"), (1, "lambada"), (0, "wikitext")]):
            chunks = sent[(sid, ds, l.layer)]
            m = l.rows == row
            np.testing.assert_array_equal(l.logits[m], torch.cat([c[0] for c in chunks]).numpy())
            np.testing.assert_array_equal(l.weights[m], torch.cat([c[1] for c in chunks]).numpy())
            np.testing.assert_array_equal(l.indices[m], torch.cat([c[2] for c in chunks]).numpy())
    if fmt == "columnar":
        assert len(list((tmp_path / "logs").glob("routing_shard_*.npz"))) == 2  # shard_tokens=10
        for f in (tmp_path / "logs").glob("*.npz"):
            with np.load(f, allow_pickle=False) as z:
                assert z["L000_indices"].dtype == np.int16
    else:
        files = sorted(p.name for p in (tmp_path / "logs").iterdir())
        assert files == ["tiny_lambada_internal_routing.json", "tiny_wikitext_internal_routing.json"]


def test_json_layout_is_the_seed_format(tmp_path):
    layers = _layers(2)
    logger = RouterLogger(tmp_path / "one.json", layers=layers, model_name="deepseek-ai/DeepSeek-V2-Lite")
    _drive(logger, layers, [(0, "lambada", [("prefill", 4)])])
    logger.record_loss_value(2.341)
    logger.close()
    doc = json.loads((tmp_path / "one.json").read_text())
    assert {"config", "strategy", "num_experts", "top_k", "dataset", "num_layers", "samples"} <= set(doc)
    assert (doc["config"], doc["strategy"], doc["num_experts"], doc["top_k"], doc["dataset"], doc["num_layers"]) == \
        ("deepseek-ai/DeepSeek-V2-Lite", "topk_baseline", E, K, "lambada", 2)
    s = doc["samples"][0]
    assert (s["sample_id"], s["num_tokens"], s["loss"]) == (0, 4, pytest.approx(2.341))
    lay = s["layers"][1]
    assert lay["layer"] == 1 and lay["router_logits_shape"] == [4, E]
    assert np.asarray(lay["router_logits_sample"]).shape == (4, E)
    assert np.asarray(lay["selected_experts"]).shape == (4, K)
    assert np.asarray(lay["expert_weights"]).shape == (4, K)


def test_json_without_orjson_and_truncated_logs(tmp_path, monkeypatch):
    import sys

    layers = _layers(2)
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "orjson", None)  # the stdlib fallback
        logger = RouterLogger(tmp_path / "l.json", layers=layers)
        sent = _drive(logger, layers, [(0, "d", [("prefill", 3)]), (1, "d", [("prefill", 2)])])
        logger.close()
        log = load_logs(tmp_path / "l.json")
    np.testing.assert_array_equal(log.layers[1].logits[:3], sent[(0, "d", 1)][0][0].numpy())
    # a log cut short keeps its complete samples
    text = (tmp_path / "l.json").read_bytes()
    (tmp_path / "cut.json").write_bytes(text[: text.index(b'"sample_id":1') + 20])
    with pytest.warns(UserWarning, match="ends early"):
        cut = load_logs(tmp_path / "cut.json")
    assert cut.sample_id.tolist() == [0]


def test_reads_a_seed_pipeline_log(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6))
    doc = {"config": "x", "strategy": "topk_baseline", "num_experts": 6, "top_k": 2, "dataset": "hellaswag",
           "num_layers": 1, "samples": [{"sample_id": 0, "num_tokens": 3, "loss": 1.0, "layers": [
               {"layer": 0, "router_logits_shape": [3, 6], "router_logits_sample": logits.tolist(),
                "selected_experts": np.argsort(-logits, 1)[:, :2].tolist(), "expert_weights": [[0.6, 0.4]] * 3}]}]}
    (tmp_path / "x_hellaswag_internal_routing.json").write_text(json.dumps(doc))
    log = load_logs(tmp_path)
    assert log.datasets == ["hellaswag"] and log.num_experts == 6 and log.top_k == 2
    np.testing.assert_allclose(log.layers[0].logits, logits, rtol=1e-6)


def test_caps_stop_recording(tmp_path):
    layers = _layers(2)
    logger = RouterLogger(tmp_path / "a", layers=layers, max_tokens=10, format="columnar")
    _drive(logger, layers, [(0, "d", [("prefill", 6)]), (1, "d", [("prefill", 6)]), (2, "d", [("prefill", 6)])])
    assert logger.full
    logger.close()
    log = load_logs(tmp_path / "a")
    assert log.sample_num_tokens.tolist() == [6, 4]  # the step crossing the cap is cut exactly
    assert all(l.num_tokens == 10 for l in log.layers)

    logger = RouterLogger(tmp_path / "b", layers=layers, max_samples=2)
    for sid in range(4):
        if logger.full:
            break
        _drive(logger, layers, [(sid, "d", [("prefill", 3), ("decode", 1)])], seed=sid)
    logger.close()
    assert load_logs(tmp_path / "b").sample_id.tolist() == [0, 1]
    assert logger.stats()["samples_written"] == 2

    with pytest.raises(ConfigError):
        RouterLogger(tmp_path / "c", max_tokens=-1)
    with pytest.raises(ConfigError):
        RouterLogger(tmp_path / "c.json", format="columnar")


def test_samples_are_written_incrementally(tmp_path):
    layers = _layers(1)
    logger = RouterLogger(tmp_path / "inc", layers=layers, flush_every=1)
    _drive(logger, layers, [(i, "d", [("prefill", 4)]) for i in range(5)])
    assert logger.samples_written == 4  # all but the open one, before close()
    logger.close()
    assert logger.samples_written == 5
    assert load_logs(tmp_path / "inc").num_samples == 5


def test_on_route_never_syncs(tmp_path, monkeypatch):
    layers = _layers(2)
    logger = RouterLogger(tmp_path / "s", layers=layers, flush_every=100, logits_dtype="float16")
    logger.begin_sample(0)
    batches = [_route(5, s) for s in range(2)]

    def boom(*a, **k):
        raise AssertionError("host sync inside on_route")

    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, boom)
        mp.setattr(torch.cuda, "synchronize", boom)
        for l, (lg, w, idx) in zip(layers, batches):
            logger.on_route(l, "prefill", 0, lg, w, idx)
    # copies, not views: later in-place changes of the router outputs do not leak into the log
    for lg, w, idx in batches:
        lg.zero_()
    logger.on_step_end(0, "prefill")
    logger.close()
    log = load_logs(tmp_path / "s")
    np.testing.assert_allclose(log.layers[1].logits, _route(5, 1)[0].numpy(), atol=2e-3)  # float16 logits


def test_batch_rows_split_by_sequence(tmp_path):
    layers = _layers(1)
    logger = RouterLogger(tmp_path / "b", layers=layers)
    logger.begin_sample([10, 11], dataset="d")
    lg, w, idx = _route(6, 0)  # 2 sequences x 3 positions, sequence-major
    logger.on_route(layers[0], "prefill", 0, lg, w, idx)
    logger.on_step_end(0, "prefill")
    lg2, w2, idx2 = _route(2, 1)  # one decode row per sequence
    logger.on_route(layers[0], "decode", 1, lg2, w2, idx2)
    logger.on_step_end(1, "decode")
    logger.close()
    log = load_logs(tmp_path / "b")
    assert log.sample_id.tolist() == [10, 11] and log.sample_num_tokens.tolist() == [4, 4]
    l = log.layers[0]
    np.testing.assert_array_equal(l.logits[l.rows == 1], torch.cat([lg[3:], lg2[1:]]).numpy())


def test_from_arg():
    layers = _layers(1)
    lg = RouterLogger.from_arg({"path": "x", "max_tokens": 5, "format": "columnar", "labels": False}, layers)
    assert (lg.max_tokens, lg.format, lg.record_loss, len(lg.layers)) == (5, "columnar", False, 1)
    assert RouterLogger.from_arg(lg, layers) is lg
    assert str(RouterLogger.from_arg("some/dir").path) == "some/dir"
    with pytest.raises(ConfigError):
        RouterLogger.from_arg({"pth": "x"})
    with pytest.raises(ConfigError):
        RouterLogger.from_arg(3)


def test_per_sample_loss_matches_hf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, :2] = -100
    got = per_sample_loss(logits, labels)
    for b in range(2):
        ref = torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100)
        assert got[b].item() == pytest.approx(ref.item(), rel=1e-6)


# -- the real capture path ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from moe_trace.routing.pipeline import build_demo_model

    return build_demo_model()


def _ids(batch, length, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_profile_log_router_logits_matches_report(tmp_path, tiny_model):
    import moe_trace

    ids = _ids(2, 6)
    with torch.no_grad(), moe_trace.profile(tiny_model, log_router_logits={"path": str(tmp_path / "p"),
                                                                           "format": "columnar"}) as run:
        tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                            do_sample=False, pad_token_id=0)
        tiny_model(_ids(1, 5, seed=2))
    rep = run.report().to_dict()
    log = load_logs(tmp_path / "p")
    # each prefill starts new samples; the batch of 2 is split by sequence (batch size from the decode step)
    assert log.sample_id.tolist() == [0, 1, 2]
    assert log.sample_num_tokens.tolist() == [6 + 3, 6 + 3, 5]
    assert log.config == "olmoe"
    for i, l in enumerate(log.layers):
        assert l.expert_counts().tolist() == rep["layers"][i]["expert_counts"]


def test_run_logging_counts_equal_report(tmp_path, tiny_model):
    from moe_trace.routing.pipeline import load_prompts, run_logging

    prompts = load_prompts(None)[:5]
    stats = run_logging(tiny_model, prompts, tmp_path / "r", max_length=24)
    rep = stats["report"].to_dict()
    log = load_logs(tmp_path / "r")
    assert log.num_samples == 5 and np.isfinite(log.sample_loss).all()
    for i, l in enumerate(log.layers):
        assert l.expert_counts().tolist() == rep["layers"][i]["expert_counts"]
        assert l.num_tokens == rep["layers"][i]["tokens"]


def test_attached_logger_drops_padding_and_logs_per_sample_loss(tmp_path, tiny_model):
    import moe_trace

    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding of the second sequence
    logger = RouterLogger(tmp_path / "a").attach(tiny_model)
    with torch.no_grad(), moe_trace.profile(tiny_model, observers=[logger]):
        out = tiny_model(input_ids=ids, attention_mask=mask, labels=ids)
    log = load_logs(tmp_path / "a")
    assert log.sample_num_tokens.tolist() == [6, 4]
    ref = per_sample_loss(out.logits, ids)
    np.testing.assert_allclose(log.sample_loss, ref.numpy(), rtol=1e-5)
    assert logger._hooks == []  # removed at close


@pytest.mark.parametrize("fmt", ["json", "columnar"])
def test_without_logits_and_phase_filter(tmp_path, fmt):
    layers = _layers(2)
    logger = RouterLogger(tmp_path / "n", layers=layers, format=fmt, record_logits=False, phases=("decode",))
    _drive(logger, layers, [(0, "d", [("prefill", 4), ("decode", 1), ("decode", 1)])])
    logger.close()
    log = load_logs(tmp_path / "n")
    assert log.sample_num_tokens.tolist() == [2]  # prefill not logged
    assert all(l.logits is None and l.indices.shape == (2, K) for l in log.layers)
    assert log.layers[0].expert_counts().sum() == 2 * K
