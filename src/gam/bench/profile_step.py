"""Where a training step's time goes: ``python -m gam.bench.profile_step MODEL {fp32,bf16}
[PRESET]``.

Runs two warm-up and two profiled training steps (forward, backward, AdamW) of a model
(preset ``paper`` by default) at batch 8 x max_seq_len, on one thread
(``GAM_PROFILE_THREADS=2`` for two), on the CPU (``GAM_PROFILE_DEVICE=cuda`` for a GPU: the
table then has the GPU kernels' times too), with ``gam train``'s step
(``gam.training.step.train_step``: chunked loss, clipping, fused AdamW; allocator tuning as
gam train does), and prints torch.profiler's table of operators by self time. Used for the
throughput notes in docs/results.md.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gam.models.registry import build_model
from gam.runtime import resolve_device, synchronize, tune_cpu_allocator
from gam.training.config import TrainConfig
from gam.training.optim import build_optimizer
from gam.training.step import train_step


def profiler_activities(device: torch.device) -> tuple[list[ProfilerActivity], str]:
    """What to record and how to sort the table: on CUDA the GPU's kernels too, by their time
    (the host's time there is mostly launching); on a CPU the host's operators."""
    if device.type == "cuda":
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA], "self_cuda_time_total"
    return [ProfilerActivity.CPU], "self_cpu_time_total"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name, dtype, preset = (args + ["gam", "bf16", "paper"][len(args):])[:3]
    torch.set_num_threads(int(os.environ.get("GAM_PROFILE_THREADS", "1")))
    tune_cpu_allocator()  # as gam train and gam bench throughput do
    torch.manual_seed(0)
    device = resolve_device(os.environ.get("GAM_PROFILE_DEVICE", "cpu"))
    model = build_model(name, preset).to(device)
    config = TrainConfig()
    opt = build_optimizer(model, config)
    vocab, seq_len = model.config.vocab_size, model.config.max_seq_len
    idx = torch.randint(0, vocab, (8, seq_len), device=device)
    tgt = torch.randint(0, vocab, (8, seq_len), device=device)

    def step() -> None:
        train_step(model, opt, idx, tgt, dtype=dtype, grad_clip=config.grad_clip)

    for _ in range(2):
        step()
    activities, sort = profiler_activities(device)
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        synchronize(device)
    print(prof.key_averages().table(sort_by=sort, row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
