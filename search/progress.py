"""Study progress for a person: a live bar on a terminal, plain lines otherwise, nothing if quiet.

Shows trials done of the budget, feasible count, the best feasible objective with its
per-task scores, throughput (trials/min) and the ETA.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from tqdm import tqdm


@dataclass(frozen=True)
class ProgressState:
    done: int
    budget: int
    feasible: int
    failed: int
    best_objective: float | None = None
    best_scores: dict[str, float] = field(default_factory=dict)


class Progress:
    """Report progress; ``quiet`` silences it. Plain lines when ``stream`` is not a TTY."""

    def __init__(self, budget: int, *, quiet: bool = False, stream: TextIO | None = None,
                 already_done: int = 0) -> None:
        self._stream = stream or sys.stdout
        self._quiet = quiet
        self._started = time.monotonic()
        self._start_done = already_done
        self._bar: tqdm | None = None
        if not quiet and self._stream.isatty():
            self._bar = tqdm(total=budget, initial=already_done, file=self._stream, unit="trial",
                             dynamic_ncols=True)

    def message(self, text: str) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def update(self, state: ProgressState) -> None:
        if self._quiet:
            return
        per_min = self.rate(state.done)
        best = "none feasible" if state.best_objective is None else (
            f"best {state.best_objective:.4f} ("
            + ", ".join(f"{t} {v:.3f}" for t, v in state.best_scores.items()) + ")"
        )
        if self._bar is not None:
            self._bar.n = state.done
            self._bar.set_postfix_str(
                f"feasible {state.feasible} failed {state.failed} {best} {per_min:.1f} trials/min",
                refresh=False,
            )
            self._bar.refresh()
            return
        left = state.budget - state.done
        eta = f", eta {left / per_min:.1f} min" if per_min > 0 and left > 0 else ""
        print(
            f"trial {state.done}/{state.budget}: feasible {state.feasible}, failed {state.failed}, "
            f"{best}, {per_min:.1f} trials/min{eta}",
            file=self._stream, flush=True,
        )

    def rate(self, done: int) -> float:
        """Trials per minute in this run."""
        minutes = (time.monotonic() - self._started) / 60.0
        ran = done - self._start_done
        return ran / minutes if minutes > 0 and ran > 0 else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
