"""Issue 26's passkey probes: does a checkpoint copy the key? The loss (nats, summed over the
key's tokens) of the key at its first statement (unpredictable: log 10^5 = 11.5 for a uniform
five-digit key), at its second statement seven tokens later ("... Remember it. 12345 is the
pass key."), and in the answer after the question, averaged over 4 prompts at each of the
depths 0.1, 0.5 and 0.9. Copying shows as the second and answer losses falling below the
first. Works on a run that is still training (its latest saved weights).

    python experiments/passkey_copy_nats.py RUN_DIR [--length 512]

Results: docs/results.md "Long context" (the packed probes)."""

import argparse

import numpy as np
import torch

from gam.data.passkey import KEY_SENTENCE, PasskeyGenerator
from gam.training.evaluate import token_losses
from gam.training.run import load_run


def key_nats(losses: torch.Tensor, start: int, n: int) -> float:
    """Summed loss of the ``n`` tokens at ``start`` (target i is token i + 1)."""
    return float(losses[start - 1:start - 1 + n].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--length", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per depth (default 4)")
    args = parser.parse_args()
    model, tokenizer, _ = load_run(args.run_dir)
    generator = PasskeyGenerator(tokenizer)
    rng = np.random.default_rng(0)

    def encode(text: str) -> list[int]:  # each piece on its own, as the samples are built
        return tokenizer.encode(text, add_special_tokens=False).ids

    head = len(encode(KEY_SENTENCE.split("{key}")[0].rstrip()))  # " The pass key is"
    for depth in (0.1, 0.5, 0.9):
        rows = []
        for _ in range(args.prompts):
            key = generator.random_key(rng)
            sample = generator.sample(args.length - generator.answer_tokens(key), depth, key)
            ids = sample.ids + sample.answer_ids
            x = torch.tensor([ids[:-1]])
            y = torch.tensor([ids[1:]])
            with torch.no_grad():
                losses = token_losses(model, x, y)[0]
            key_ids = encode(" " + key)
            first = sample.key_position + head
            second = next(j for j in range(first + len(key_ids), len(ids))
                          if ids[j:j + len(key_ids)] == key_ids)
            rows.append((key_nats(losses, first, len(key_ids)),
                         key_nats(losses, second, len(key_ids)),
                         key_nats(losses, len(sample.ids), len(key_ids))))
        first, second, answer = np.mean(rows, axis=0)
        print(f"depth {depth}: key nats first {first:.2f}, second {second:.2f}, "
              f"answer {answer:.2f}")


if __name__ == "__main__":
    main()
