"""Where a training step's time goes: ``python -m gam.bench.profile_step MODEL {fp32,bf16}``.

Runs two warm-up and two profiled training steps (forward, backward, AdamW) of a paper-size
model at batch 8 x 256 on one thread and prints torch.profiler's table of operators by self
time. Used for the throughput notes in docs/results.md.
"""

from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gam.models.registry import build_model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name, dtype = (args + ["gam", "bf16"][len(args):])[:2]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(name, "paper")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    idx = torch.randint(0, 10000, (8, 256))
    tgt = torch.randint(0, 10000, (8, 256))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            _, loss = model(idx, tgt, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
