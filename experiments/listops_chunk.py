"""The delta-rule families' ListOps step at two chunk sizes: one forward + backward of the
ListOps classifier (cpu protocol: d 64, 4 layers) at B 32 x T 300, one thread, best of 3,
chunks alternating. Why `gam bench listops` runs them with a chunk of 32: docs/results.md
(Long Range Arena ListOps)."""

import argparse

import torch

from gam.bench.listops import PROTOCOLS, build_classifier
from gam.bench.measure import time_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["gam-delta", "gated-deltanet"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randint(0, 16, (32, 300))  # (B, T) token ids
    lengths = torch.full((32,), 300)
    for name in args.models:
        models = {c: build_classifier(name, PROTOCOLS["cpu"], {"delta_chunk_size": c})
                  for c in args.chunks}
        best: dict[int, float] = {}
        for _ in range(3):
            for c, model in models.items():
                ms = time_fn(lambda m=model: m(x, lengths).sum().backward(), "cpu", warmup=0,
                             repeats=1)["min_ms"]
                best[c] = min(best.get(c, ms), ms)
        print(name, ", ".join(f"chunk {c}: {ms / 1e3:.2f} s" for c, ms in best.items()))


if __name__ == "__main__":
    main()
