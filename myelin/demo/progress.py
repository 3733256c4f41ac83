"""A progress line for long steps: a bar on a terminal, a line per 10% elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, unit: str = "", out: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.out = out or sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self._tty = self.out.isatty()
        self._last_decile = -1

    def update(self, n: int) -> None:
        self.done += n
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        if self._tty:
            bar = "#" * int(frac * 30)
            self.out.write(
                f"\r  {self.label:<22} [{bar:<30}] {frac:4.0%} {self.done:>9,}/{self.total:,} "
                f"{self.unit} {rate:,.0f}/s "
            )
            self.out.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                print(
                    f"  {self.label}: {frac:4.0%} ({self.done:,}/{self.total:,} {self.unit}, {rate:,.0f}/s)",
                    file=self.out,
                    flush=True,
                )

    def close(self) -> float:
        elapsed = time.perf_counter() - self.t0
        if self._tty:
            self.out.write("\n")
            self.out.flush()
        return elapsed
