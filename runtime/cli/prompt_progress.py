"""A progress bar for a prompt's evaluation (`run`, and each of `chat`'s replies): on the real model a long prompt takes minutes
on a CPU, and the terminal stayed silent until the first token.

Shown on stderr when it is a terminal, and only for a prompt still being evaluated after
`delay` seconds; it counts positions (model.n_past, read between the prompt's batches), starts
from the positions reused, and is cleared before the text is written.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class PromptProgress:
    def __init__(self, model, n_prompt: int = 0, file=None, delay: float = 2.0, disable: bool | None = None):
        """disable None: shown only when `file` is a terminal (tqdm's rule). A chat calls `start`
        before each prompt."""
        self.model, self.n_prompt = model, n_prompt
        self.file = sys.stderr if file is None else file
        self.delay, self.disable = delay, disable
        self.bar: tqdm | None = None

    @property
    def may_show(self) -> bool:
        """Whether a bar can appear at all (tqdm's rule: disable None shows on a terminal only)."""
        if self.disable is not None:
            return not self.disable
        isatty = getattr(self.file, "isatty", None)
        return bool(isatty and isatty())

    def start(self, n_prompt: int) -> None:
        """A new prompt of n_prompt tokens (the last bar cleared)."""
        self.close()
        self.n_prompt, self.bar = n_prompt, None

    def __call__(self) -> None:
        """Between two of the prompt's batches."""
        done = self.model.n_past
        if self.bar is None:  # before the first batch: what is already there was reused
            self.bar = tqdm(total=self.n_prompt, initial=done, desc="prompt", unit="tok", file=self.file,
                            delay=self.delay, leave=False, disable=self.disable, dynamic_ncols=True)
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Clear the bar (before the text is written); again, nothing."""
        if self.bar is not None:
            self.bar.close()
