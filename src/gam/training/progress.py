"""Progress output of a training run: a tqdm bar on a terminal, plain log lines otherwise,
nothing when quiet or not rank 0."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """tqdm bar on a terminal; plain log lines otherwise; nothing when quiet or not rank 0."""

    def __init__(self, active: bool, quiet: bool, progress: bool | None, total: int,
                 initial: int) -> None:
        self.active = active and not quiet
        use_bar = progress if progress is not None else sys.stderr.isatty()
        self.bar = None
        if self.active and use_bar:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def step(self, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
