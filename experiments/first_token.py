"""Can a ListOps classifier carry the first token of a sequence to its last one?

A diagnostic for `gam bench listops` (issue 25: why S4D stays at the majority class): random
token sequences of 100-300 tokens from the ListOps vocabulary, label = the first token (mod 10),
the ListOps classifier of the cpu protocol (d 64, 4 layers, read out at the last token or the
mean), AdamW lr 2e-3 without decay, batch 32, one length per batch. The Transformer reads
position 0 by attention; an LTI convolution (S4D) must hold one token among hundreds at a lag
that changes with the length. Results: docs/results.md (Long Range Arena ListOps)."""

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from gam.bench.listops import PROTOCOLS, READOUTS, build_classifier


def batch(data: torch.Generator, size: int = 32
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B, T), lengths (B,), labels (B,)): one random length, no padding."""
    length = int(torch.randint(100, 300, (1,), generator=data))
    x = torch.randint(1, 16, (size, length), generator=data)
    return x, torch.full((size,), length), (x[:, 0] - 1) % 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["s4d", "transformer"])
    parser.add_argument("--readout", choices=READOUTS, default="last")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocol = replace(PROTOCOLS["cpu"], readout=args.readout)
    for name in args.models:
        torch.manual_seed(0)
        model = build_classifier(name, protocol)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95),
                                      weight_decay=0.0)
        data = torch.Generator().manual_seed(1)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            x, n, y = batch(data)
            loss = F.cross_entropy(model(x, n), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0:
                with torch.no_grad():
                    x, n, y = batch(data, 256)
                    accuracy = (model(x, n).argmax(-1) == y).float().mean().item()
                print(f"{name} ({args.readout}) step {step}: loss {loss.item():.3f}, accuracy "
                      f"{100 * accuracy:.1f}% ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
