"""Retry timing, as pure functions of the attempt number (no clocks, no sleeping here).

Full jitter (a uniform draw between 0 and the capped exponential) spreads many agents that lost
the API at the same moment, so they do not return in lockstep when it comes back (AWS
architecture blog, "Exponential Backoff And Jitter"). `Retry-After` from the server wins over our
own guess, clamped so a broken header can neither hammer the API nor park us for a day.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: bounds for a server's Retry-After, in seconds
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 900.0


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    initial_s: float = 0.5
    max_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the draw for retry number `attempt` (0-based)."""
        return min(self.max_s, self.initial_s * (2 ** min(attempt, 62)))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        return self.rng.uniform(0.0, self.ceiling(attempt))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), clamped; None if absent
    or unparseable."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, seconds))
