"""Issue 13 speed profile: one block's forward + backward (B 8 x 256, paper size, one thread,
CPU time, best of 7) for gam, gam-delta and gam-delta-matched in fp32 and bf16, with the delta
path alone and the fp32 delta-rule core alone. Results: docs/results.md (gam-delta, speed)."""

import time

import torch
import torch.nn.functional as F

from gam import build_model
from gam.models.ops.delta_rule import delta_rule_chunked

B, T, C = 8, 256, 512


def best_ms(fn, *args, repeats: int = 7, **kwargs) -> float:
    for _ in range(2):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn(*args, **kwargs)
        times.append(time.process_time() - t0)
    return min(times) * 1e3


def fwd_bwd(module, x: torch.Tensor, bf16: bool, cast_input: bool = False) -> None:
    """cast_input: the input in bf16 under bf16, as the block hands it to its delta path."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = module(x.to(torch.bfloat16) if bf16 and cast_input else x)
    y.float().sum().backward()


def core(q, k, v, beta, g) -> None:
    o, _ = delta_rule_chunked(q, k, v, beta, g, None, 64)
    o.sum().backward()


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name in ("gam", "gam-delta", "gam-delta-matched"):
        block = build_model(name, "paper").blocks[0]
        x = torch.randn(B, T, C, requires_grad=True)
        for dtype in ("fp32", "bf16"):
            bf16 = dtype == "bf16"
            print(name, dtype, "block", round(best_ms(fwd_bwd, block, x, bf16), 1))
            if hasattr(block, "delta"):
                ms = best_ms(fwd_bwd, block.delta, x, bf16, cast_input=True)
                print(name, dtype, "delta path", round(ms, 1))
        if hasattr(block, "delta"):
            H, d = block.delta.n_heads, block.delta.head_dim
            q = F.normalize(torch.randn(B, T, H, d), dim=-1).requires_grad_()
            k = F.normalize(torch.randn(B, T, H, d), dim=-1).requires_grad_()
            v = torch.randn(B, T, H, d, requires_grad=True)
            beta = torch.rand(B, T, H).requires_grad_()
            g = (-0.1 * torch.rand(B, T, H)).requires_grad_()

            print(name, "fp32 core", round(best_ms(core, q, k, v, beta, g), 1))


if __name__ == "__main__":
    main()
