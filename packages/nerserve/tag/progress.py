"""Progress on standard error while a job runs, and its summary at the end.

On a terminal: a tqdm bar (rows, estimated tokens/s, ETA). Elsewhere (a log file, a CI job) a plain
line every few seconds, as a bar's carriage returns would make one endless line. The summary gives
rows, tokens, wall time, retries by reason and errors by kind (rows the engine failed on get a line of
their own, as the one kind that is not the row's own fault); its last line counts the answered rows and
the error rows, which together are every row of the input."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import TextIO

from .rows import FAILED, Outcome, error_kind


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


class Progress:
    """Counts of this run (`earlier`: rows a previous run already wrote), drawn as it goes."""

    def __init__(
        self, total: int | None, earlier: int, stream: TextIO | None = None, every_s: float = 5.0, command: str = "tag"
    ) -> None:
        self.command = command  # the subcommand the lines name: tag, eval
        self.stream = stream or sys.stderr
        self.total, self.earlier = total, earlier
        self.rows = self.tokens = self.answered = 0
        self.errors: Counter[str] = Counter()
        self.started = time.monotonic()
        self.every_s = every_s
        self.shown_at = self.started
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=earlier, unit="row", file=self.stream, dynamic_ncols=True)

    def update(self, outcomes: Sequence[Outcome], tokens: int) -> None:
        """A chunk of rows written."""
        errors = [outcome for outcome in outcomes if isinstance(outcome, str)]
        self.errors.update(error_kind(error) for error in errors)
        self.rows += len(outcomes)
        self.answered += len(outcomes) - len(errors)
        self.tokens += tokens
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(len(outcomes))
            if now - self.shown_at >= 0.5:
                self.bar.set_postfix_str(f"{self.rate():,.0f} tok/s", refresh=False)
                self.shown_at = now
        elif now - self.shown_at >= self.every_s:
            self.shown_at = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def rate(self) -> float:
        return self.tokens / max(1e-9, time.monotonic() - self.started)

    def line(self) -> str:
        """`tag: 12,000/50,000 rows (24%), ~8,100 tokens/s, ETA 1m05s` (the plain progress line)."""
        done = self.earlier + self.rows
        elapsed = max(1e-9, time.monotonic() - self.started)
        if not self.total:
            return f"{self.command}: {done:,} rows, ~{self.rate():,.0f} tokens/s"
        eta = (self.total - done) / max(1e-9, self.rows / elapsed)
        share = 100 * done / self.total
        rate = f"~{self.rate():,.0f} tokens/s, ETA {_duration(eta)}"
        return f"{self.command}: {done:,}/{self.total:,} rows ({share:.0f}%), {rate}"

    def summary(self, retries: Counter[str], output: str) -> list[str]:
        """The closing lines; tokens are estimated (rows.estimated_tokens), as the client has no tokenizer."""
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.started
        earlier = f" (+{self.earlier:,} from an earlier run)" if self.earlier else ""
        retried = ", ".join(f"{reason} x{count}" for reason, count in sorted(retries.items())) or "none"
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(self.errors.items())) or "none"
        total_errors = sum(self.errors.values())
        lines = [
            f"nerserve {self.command}: {self.rows:,} rows{earlier} in {elapsed:.2f} s, ~{self.tokens:,} tokens "
            f"(~{self.rate():,.0f} tokens/s); retries: {retried}; errors by kind: {errors}"
        ]
        if self.errors[FAILED]:
            lines.append(
                f"note: {self.errors[FAILED]:,} rows failed in the engine (HTTP 500 for that text alone, after "
                "retries): kept as those rows' errors, kind failed; the server's log has the cause"
            )
        lines.append(f"done: {self.answered:,} rows answered, {total_errors:,} rows with an error -> {output}")
        return lines
