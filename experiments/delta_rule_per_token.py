"""The chunked delta rule's time per token at T 2,048 and 8,192 (fwd+bwd, B 4, 8 heads of
d_k = d_v = 64, one thread, best of 3), with a per-op profile (``--profile``). Run it once with
glibc's allocator defaults (``GAM_MALLOC_TUNING=0``) and once tuned (the default,
``gam.runtime.tune_cpu_allocator``) to see the page-fault cost of blocks above 32 MiB. Results:
docs/results.md (the allocator and long sequences)."""

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gam.bench.measure import time_fn
from gam.models.ops.delta_rule import delta_rule_chunked
from gam.runtime import tune_cpu_allocator

B, H, D = 4, 8, 64


def inputs(T: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = F.normalize(torch.randn(B, T, H, D), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, D, requires_grad=True)
    beta = torch.rand(B, T, H, requires_grad=True)
    log_decay = (-0.1 * torch.rand(B, T, H)).requires_grad_()
    return q, k, v, beta, log_decay


def fwd_bwd(args: tuple[torch.Tensor, ...]) -> None:
    o, _ = delta_rule_chunked(*args)
    o.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--profile", action="store_true", help="self CPU time per op per token")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"allocator tuned: {tune_cpu_allocator()}")
    per_op = {}
    for T in args.lengths:
        x = inputs(T)
        best_ms = time_fn(lambda x=x: fwd_bwd(x), "cpu", warmup=0, repeats=3)["min_ms"]
        print(f"T {T}: {best_ms * 1e3 / T:.0f} us per token", flush=True)
        if args.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fwd_bwd(x)
            per_op[T] = {e.key: e.self_cpu_time_total / T for e in prof.key_averages()}
    if per_op:
        last = per_op[args.lengths[-1]]
        print("op, self us per token at T " + " / ".join(str(T) for T in args.lengths))
        for key in sorted(last, key=last.get, reverse=True)[:12]:
            print(f"  {key:50s} " + " / ".join(f"{per_op[T].get(key, 0):.1f}" for T in per_op))


if __name__ == "__main__":
    main()
