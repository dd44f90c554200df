"""Progress for long loops: a tqdm bar on a terminal, plain lines otherwise (logs, notebooks, CI)."""
from __future__ import annotations

import sys
import time


class Progress:
    """``update(n)`` as work gets done; ``write(msg)`` prints a line without breaking the bar. On a terminal
    a tqdm bar; elsewhere, with ``every`` set, a line ``N of TOTAL UNITs, R UNITs/s, about T left`` at most every
    ``every`` seconds (None: no progress lines, only what is written). Disabled (``enabled=False``: not the main
    process) it prints nothing."""

    def __init__(self, total: int | None, unit: str, *, enabled: bool = True, initial: int = 0,
                 every: float | None = None):
        self.unit, self.enabled, self.every, self.total = unit, enabled, every, total
        self.n, self.t0 = initial, time.perf_counter()
        self.last, self.bar = self.t0, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and self.every is not None and now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        """``N of TOTAL UNITs, R UNITs/s, about T left`` (the time left with a known total, at the rate so far)."""
        now = time.perf_counter() if now is None else now
        rate = self.n / max(now - self.t0, 1e-9)
        text = f"{self.n}{f' of {self.total}' if self.total else ''} {self.unit}s, {rate:.1f} {self.unit}s/s"
        if self.total and rate > 0 and self.n < self.total:
            left = (self.total - self.n) / rate
            text += f", about {left:.0f} s left" if left < 90 else f", about {left / 60:.1f} min left"
        return text

    def write(self, msg: str) -> None:
        """A line of output: above the bar on a terminal, on stdout otherwise."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def set_postfix(self, **values: str) -> None:
        """Values shown at the end of the bar (a terminal only)."""
        if self.bar is not None:
            self.bar.set_postfix(**values)

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
