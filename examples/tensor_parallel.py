"""transformers' tensor parallel (tp) or expert parallel (ep) under torchrun, one trace per rank.

    python examples/tensor_parallel.py [ep|tp]          # starts torchrun itself: 2 CPU processes (gloo),
                                                        # a tiny OLMoE checkpoint saved to a temp dir
    torchrun --nproc-per-node 2 examples/tensor_parallel.py ep /path/to/checkpoint   # your GPUs (NCCL)

Every rank profiles in kineto mode into one directory; `moe_trace.analyze(dir)` then counts the batch
once (tensor-parallel ranks hold the same batch) and, under EP, shows the load per expert-parallel rank.
"""
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import moe_trace


def launch(mode: str) -> int:
    """Not under torchrun: save a tiny checkpoint and run this file on 2 CPU processes."""
    from moe_trace.models import save_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="tp_example_"))
    save_tiny_checkpoint("olmoe", tmp / "ckpt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, mode, str(tmp / "ckpt"), str(tmp / "traces")]
    rc = subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if rc == 0:
        report = moe_trace.analyze(tmp / "traces")        # all ranks' traces, the shared batch counted once
        print(report)
    return rc


def rank_main(mode: str, ckpt: str, logdir: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    config = DistributedConfig(tp_plan="auto") if mode == "tp" else DistributedConfig(tp_size=2, ep_size=2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, distributed_config=config).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=logdir):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "ep"
    if mode not in ("tp", "ep"):
        sys.exit(f"usage: {sys.argv[0]} [tp|ep] [CHECKPOINT [LOGDIR]]")
    if "LOCAL_RANK" in os.environ:                        # started by torchrun
        rank_main(mode, sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "runs/parallel")
    else:
        sys.exit(launch(mode))
