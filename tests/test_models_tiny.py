"""The model zoo: tiny random-weight models of every MoE family, the 4.x-layout legacy model and
the reference-size configs. The per-family matrix is marked slow (about a minute on 2 CPU cores)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from moe_trace.errors import ConfigError
from moe_trace.models import (
    DEFAULT_FAMILY,
    build_legacy_model,
    build_reference_model,
    build_tiny_model,
    example_inputs,
    family_info,
    list_families,
    list_references,
    load_checkpoint,
    reference_config,
    save_tiny_checkpoint,
    tiny_config,
)

N_NEW = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core box OpenMP spinning made the
    matrix ~15x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def expert_modules(model, family: str) -> list[str]:
    """Modules that hold the routed experts: the family's experts class (stacked weights),
    else (doge) its MoE block."""
    classes = family_info(family)["moe_classes"]
    wanted = set(classes["experts"] or classes["block"])
    return [name for name, m in model.named_modules() if type(m).__name__ in wanted]


def greedy(model, inputs, n: int = N_NEW):
    torch.manual_seed(0)  # diffusion_gemma draws its canvas from the global RNG
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    seq = out if torch.is_tensor(out) else out.sequences
    if model.config.is_encoder_decoder:  # the decoder's sequence: its start token, then the new ones
        return seq[:, 1:]
    return seq[:, inputs["input_ids"].shape[1]:]


# ---------------------------------------------------------------------------------------------
# fast


def test_family_list():
    fams = list_families()
    assert fams == sorted(fams) and len(fams) == len(set(fams)) >= 75
    assert DEFAULT_FAMILY == "olmoe" and DEFAULT_FAMILY in fams
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_vl_moe", "nemotron3_5_transcribe"} <= set(fams)


def test_unknown_family_lists_valid_names():
    with pytest.raises(ConfigError) as exc:
        build_tiny_model("no_such_family")
    assert "--list-families" in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # the closest names, not all ~70 (issue 16)
        build_tiny_model("mixtrl")
    assert "closest: mixtral" in str(exc.value) and len(str(exc.value)) < 200
    with pytest.raises(ConfigError):
        tiny_config("no_such_family")


def test_default_family_generates_exactly_n_and_is_deterministic():
    model = build_tiny_model()
    assert not model.training
    assert len(expert_modules(model, DEFAULT_FAMILY)) == 3
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == 8
    inputs = example_inputs(model, batch=2, prompt_len=6)
    assert inputs["input_ids"].shape == (2, 6) and inputs["attention_mask"].all()
    assert int(inputs["input_ids"].min()) > 2  # avoids pad/bos/eos
    a = greedy(model, inputs, n=7)
    assert a.shape == (2, 7)
    b = greedy(build_tiny_model(seed=0), inputs, n=7)
    assert torch.equal(a, b)
    other = build_tiny_model(seed=1)
    assert not torch.equal(other.model.layers[0].mlp.experts.gate_up_proj, experts.gate_up_proj)
    # the caller's RNG state is left alone
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    build_tiny_model()
    assert torch.equal(torch.rand(1), x)


def test_overrides_go_to_the_text_config():
    cfg = tiny_config("olmoe", num_experts_per_tok=4, num_hidden_layers=6)
    assert cfg.num_experts_per_tok == 4 and cfg.num_hidden_layers == 6
    # family-specific field names are reached through the generic ones
    assert tiny_config("aria_text", num_experts_per_tok=3).moe_topk == 3
    assert tiny_config("dbrx", num_experts=16).ffn_config.moe_num_experts == 16
    # per-layer lists follow num_hidden_layers
    q = tiny_config("qwen3_vl_moe", num_hidden_layers=5).text_config
    assert q.num_hidden_layers == 5
    hyb = tiny_config("qwen3_next", num_hidden_layers=6)
    assert len(hyb.layer_types) == 6 and "full_attention" in hyb.layer_types
    model = build_tiny_model("olmoe", num_hidden_layers=6, num_experts=16)
    assert len(expert_modules(model, "olmoe")) == 6
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 16
    with pytest.raises(ConfigError, match="zaya"):
        tiny_config("zaya", num_experts_per_tok=2)


def test_fixups_afmoe_router_and_deepseek_v4_hash_table():
    afmoe = build_tiny_model("afmoe")
    routers = [p for n, p in afmoe.named_parameters() if n.endswith("router.gate.weight")]
    assert len(routers) == 2 and all(bool(p.any()) for p in routers)
    ds4 = build_tiny_model("deepseek_v4")
    tables = [b for n, b in ds4.named_buffers() if n.endswith("tid2eid")]
    assert tables
    for t in tables:
        assert t.unique().numel() > 2  # not all expert 0
        assert all(len(set(row.tolist())) == row.numel() for row in t)  # k distinct experts


def test_save_and_load_default_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny_checkpoint("olmoe", tmp_path / "olmoe")
    assert (path / "config.json").is_file()
    model = build_tiny_model("olmoe")
    inputs = example_inputs(model)
    ref = greedy(model, inputs)
    for loaded in (load_checkpoint(path), AutoModelForCausalLM.from_pretrained(str(path)).eval()):
        assert type(loaded).__name__ == "OlmoeForCausalLM"
        assert torch.equal(greedy(loaded, inputs), ref)
    with pytest.raises(ConfigError):
        load_checkpoint(tmp_path / "missing")


@pytest.mark.parametrize("naming,names", [("mixtral", ["w1", "w2", "w3"]),
                                          ("qwen", ["gate_proj", "up_proj", "down_proj"])])
def test_legacy_model_layout_and_generate(naming, names, tmp_path):
    model = build_legacy_model(seed=0, expert_naming=naming)
    assert not model.training
    blocks = [m for m in model.modules() if hasattr(m, "gate") and isinstance(getattr(m, "experts", None), nn.ModuleList)]
    assert len(blocks) == 3
    block = blocks[0]
    assert isinstance(block.gate, nn.Linear) and block.gate.bias is None
    assert block.gate.weight.shape == (8, 64) and len(block.experts) == 8
    assert [n for n, _ in block.experts[0].named_children()] == names
    assert all(isinstance(c, nn.Linear) for c in block.experts[0].children())
    out = block(torch.randn(2, 3, 64))
    assert isinstance(out, tuple) and out[0].shape == (2, 3, 64) and out[1].shape == (6, 8)

    inputs = example_inputs(model)
    cached = greedy(model, inputs, n=6)
    uncached = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, uncached[:, 6:])
    assert torch.equal(greedy(build_legacy_model(seed=0, expert_naming=naming), inputs, n=6), cached)
    logits = model(**inputs, output_router_logits=True).router_logits
    assert len(logits) == 3 and logits[0].shape == (12, 8)

    model.save_pretrained(tmp_path)
    assert torch.equal(greedy(load_checkpoint(tmp_path), inputs, n=6), cached)


def test_legacy_model_sizes():
    model = build_legacy_model(num_experts=4, top_k=1, hidden_size=32, intermediate_size=16, num_layers=2,
                               vocab_size=100)
    block = model.model.layers[0].block_sparse_moe
    assert block.gate.weight.shape == (4, 32) and block.top_k == 1
    assert block.experts[0].w1.weight.shape == (16, 32)
    assert len(model.model.layers) == 2 and model.lm_head.weight.shape == (100, 32)


def test_reference_configs_on_meta():
    assert list_references() == ["mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b"]
    olmoe = reference_config("olmoe-1b-7b")
    assert (olmoe.hidden_size, olmoe.intermediate_size, olmoe.num_experts, olmoe.num_experts_per_tok,
            olmoe.num_hidden_layers, olmoe.num_attention_heads, olmoe.vocab_size) == (2048, 1024, 64, 8, 16, 16, 50304)
    qwen = reference_config("qwen3-30b-a3b")
    assert (qwen.hidden_size, qwen.moe_intermediate_size, qwen.num_experts, qwen.num_experts_per_tok,
            qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads, qwen.head_dim,
            qwen.vocab_size) == (2048, 768, 128, 8, 48, 32, 4, 128, 151936)
    mix = reference_config("mixtral-8x7b", num_hidden_layers=2)
    assert (mix.hidden_size, mix.intermediate_size, mix.num_local_experts, mix.num_experts_per_tok,
            mix.num_hidden_layers, mix.num_key_value_heads, mix.vocab_size) == (4096, 14336, 8, 2, 2, 8, 32000)
    model = build_reference_model("olmoe-1b-7b", device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert next(model.parameters()).dtype == torch.bfloat16
    n = sum(p.numel() for p in model.parameters())
    assert 6.8e9 < n < 7.0e9  # OLMoE-1B-7B has 6.92 B parameters
    with pytest.raises(ConfigError, match="olmoe-1b-7b"):
        reference_config("gpt-5")


def test_json_recipes_are_complete():
    from moe_trace.models import tiny

    data = json.loads(tiny._DATA_FILE.read_text())
    for fam, e in data["families"].items():
        assert e["family"] == fam
        for key in ("model_class", "config_class", "text_kwargs", "auto_class", "moe_classes", "fixups"):
            assert key in e, (fam, key)
        tk = e["text_kwargs"]
        assert tk["vocab_size"] == 256
    wrappers = [f for f, e in data["families"].items() if "wrapper" in e]
    assert len(wrappers) == 13


# ---------------------------------------------------------------------------------------------
# slow: every family


@pytest.mark.slow
@pytest.mark.parametrize("family", list_families())
def test_every_family_builds_routes_and_generates(family):
    model = build_tiny_model(family, seed=0)
    assert not model.training
    found = expert_modules(model, family)
    assert len(found) >= 2, f"{family}: expected >= 2 expert modules, found {found}"
    # routing is not degenerate: where the experts module receives top_k_index, the tokens of
    # the prompt spread over several experts (catches zero-initialised routers / hash tables)
    seen = []

    def record(module, args, kwargs):
        idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if torch.is_tensor(idx) and not idx.is_floating_point():
            seen.append(idx.flatten())

    wanted = set(family_info(family)["moe_classes"]["experts"])
    handles = [m.register_forward_pre_hook(record, with_kwargs=True)
               for m in model.modules() if type(m).__name__ in wanted]
    inputs = example_inputs(model, batch=2, prompt_len=6)
    a = greedy(model, inputs)
    for h in handles:
        h.remove()
    if seen:  # doge, jetmoe and llama4 pass no index tensor to their experts
        assert torch.cat(seen).unique().numel() >= 4, f"{family}: degenerate routing"
    assert a.shape == (2, N_NEW)
    b = greedy(build_tiny_model(family, seed=0), inputs)
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["afmoe", "deepseek_v4", "mistral4", "qwen3_vl_moe", "nemotron3_5_transcribe"])
def test_checkpoint_round_trip(family, tmp_path):
    import transformers

    path = save_tiny_checkpoint(family, tmp_path / family)
    model = build_tiny_model(family)
    inputs = example_inputs(model)
    ref = greedy(model, inputs)
    auto_cls = getattr(transformers, family_info(family)["auto_class"])
    for loaded in (load_checkpoint(path), auto_cls.from_pretrained(str(path)).eval()):
        assert type(loaded).__name__ == family_info(family)["model_class"]
        sd, ref_sd = loaded.state_dict(), model.state_dict()
        assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
        assert torch.equal(greedy(loaded, inputs), ref)
