"""When the supervisor restarts a crashed child, and when it stops trying.

Pure logic: the caller passes the time, and the random source can be seeded, so the
policy is tested without processes or clocks.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from myelin.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RestartDecision:
    crash: int  # crashes inside the window, this one included
    give_up: bool
    delay_s: float  # how long to wait before the restart (0 when giving up)


class CrashPolicy:
    """Exponential backoff with jitter, and a limit of ``max_crashes`` crashes within
    ``window_s`` seconds: one more than that and the supervisor gives up.

    The backoff follows the number of crashes still inside the window, so a child that
    has been stable for a window starts again from ``backoff_s``."""

    def __init__(
        self,
        max_crashes: int = 5,
        window_s: float = 300.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if max_crashes < 0:
            raise ConfigError(f"max_crashes must be >= 0, got {max_crashes}")
        if window_s <= 0:
            raise ConfigError(f"the crash window must be > 0 s, got {window_s}")
        if backoff_s < 0 or max_backoff_s < backoff_s:
            raise ConfigError(
                f"backoff must satisfy 0 <= backoff_s <= max_backoff_s, got {backoff_s} and {max_backoff_s}"
            )
        if not 0 <= jitter < 1:
            raise ConfigError(f"jitter is a fraction in [0, 1), got {jitter}")
        self.max_crashes = max_crashes
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._crashes: deque[float] = deque()

    def _forget_before(self, now: float) -> None:
        while self._crashes and self._crashes[0] <= now - self.window_s:
            self._crashes.popleft()

    def crashes(self, now: float) -> int:
        """Crashes inside the window that ends at ``now``."""
        self._forget_before(now)
        return len(self._crashes)

    def record(self, now: float) -> RestartDecision:
        """A crash at ``now``: restart after ``delay_s``, or give up."""
        self._forget_before(now)
        self._crashes.append(now)
        n = len(self._crashes)
        if n > self.max_crashes:
            return RestartDecision(crash=n, give_up=True, delay_s=0.0)
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (n - 1))
        # Jitter only shortens the wait: children that crashed together (say, when NATS
        # went away) do not all come back in the same instant, and the cap still holds.
        delay *= 1 - self.jitter * self._rng.random()
        return RestartDecision(crash=n, give_up=False, delay_s=delay)
