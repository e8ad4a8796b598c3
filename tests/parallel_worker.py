"""One rank of a transformers tensor-/expert-parallel run, profiled with moe-trace (used by
tests/test_parallel_transformers.py).

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_worker.py CKPT tp|ep OUT

transformers initialises the process group itself from the torchrun environment (gloo on CPU).
Both ranks get the same prompt; plain forward-pre-hooks on every experts module (independent of
moe-trace) record the `top_k_index` each call receives. Writes OUT/rank{r}.json with the generated
tokens, the reference bincounts per layer and phase, `run.report().to_dict()` and the run's settings;
the kineto traces go to OUT/traces.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)  # tiny tensors, 2 processes on a small box

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402

BATCH, PROMPT, NEW = 2, 6, 4


def distributed_config(mode: str):
    from transformers.distributed import DistributedConfig

    if mode == "tp":
        return DistributedConfig(tp_plan="auto")
    if mode == "ep":  # EP needs TP (or FSDP) beside it; dense modules TP-sharded, experts EP-sharded
        return DistributedConfig(tp_size=2, ep_size=2)
    raise SystemExit(f"unknown mode {mode!r}; use tp or ep")


def prompt(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)  # the same prompt on every rank (and in the test's single process)
    return torch.randint(3, vocab, (BATCH, PROMPT), generator=g)


class ReferenceHooks:
    """Forward-pre-hooks on the experts modules that keep every `top_k_index` they receive."""

    def __init__(self, experts_modules):
        self.calls: list[list[torch.Tensor]] = [[] for _ in experts_modules]
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(experts_modules)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            self.calls[i].append(idx.detach().to("cpu", copy=True))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def bincounts(self, num_experts: int) -> dict:
        """Per layer: [E] assignment counts over the whole run and per phase (first call = prefill)."""
        out = {"all": [], "prefill": [], "decode": [], "calls": [], "tokens": []}
        for calls in self.calls:
            def count(cs):
                n = torch.zeros(num_experts, dtype=torch.int64)
                for idx in cs:
                    idx = idx.reshape(-1).long()
                    assert int(idx.min()) >= 0 and int(idx.max()) < num_experts, idx  # global expert ids
                    n += torch.bincount(idx, minlength=num_experts)
                return n.tolist()
            out["all"].append(count(calls))
            out["prefill"].append(count(calls[:1]))
            out["decode"].append(count(calls[1:]))
            out["calls"].append(len(calls))
            out["tokens"].append(sum(int(c.shape[0]) for c in calls))
        return out


def main():
    ckpt, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    from transformers import OlmoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = OlmoeForCausalLM.from_pretrained(ckpt, distributed_config=distributed_config(mode)).eval()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = int(model.config.num_experts)  # global; under EP experts.num_experts is the local count
    experts = [layer.mlp.experts for layer in model.model.layers]
    ids = prompt(model.config.vocab_size)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
               pad_token_id=0)
    ref = ReferenceHooks(experts)
    try:
        with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=out / "traces") as run:
            tokens = model.generate(ids, **gen)
    finally:
        ref.remove()
    report = run.report().to_dict()
    result = {
        "rank": rank,
        "world_size": world,
        "mode": mode,
        "num_experts": num_experts,
        "local_num_experts": [int(getattr(e, "num_experts", -1)) for e in experts],
        "tokens": tokens.tolist(),
        "reference": ref.bincounts(num_experts),
        "report": report,
        "settings": run.run_data.settings,
        "run_data": run.run_data.to_dict(),  # for Report(parts, ranks) in the test
        "trace_files": [str(p) for p in run.trace_files],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not hang the other rank in a collective
