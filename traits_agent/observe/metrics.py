"""Counters the whole agent shares: what came in, what was rejected and why, what left.

A counter is named like its Prometheus export (`received_events`, `rejected_events` with a
`reason` label, ...). Every place that drops or rejects something increments a counter here in
the same breath as it logs, so `status` and `/metrics` never disagree with the logs.
"""

from __future__ import annotations

from collections.abc import Iterator

LabelKey = tuple[tuple[str, str], ...]

#: the disk queue's own drop counters (DiskQueue attribute → `reason` label of `dropped_items`
#: in status and /metrics), written once for the status model and the drop log
QUEUE_DROPS = (
    ("dropped_oldest", "drop_oldest"),
    ("dropped_newest", "drop_newest"),
    ("dropped_write_error", "write_error"),
)

#: upload latency buckets, seconds (loopback fake API to a slow transatlantic API)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense (`le` upper bounds)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Counters:
    """Monotonic counters keyed by name and a small set of string labels."""

    def __init__(self) -> None:
        self._values: dict[str, dict[LabelKey, int]] = {}
        self.histograms: dict[str, dict[LabelKey, Histogram]] = {}

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record `value` (seconds) in the histogram `name` for these labels."""
        series = self.histograms.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        hist = series.get(key)
        if hist is None:
            hist = series[key] = Histogram()
        hist.observe(value)

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        series = self._values.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0) + amount

    def get(self, name: str, **labels: str) -> int:
        """The value for exactly these labels (0 if never incremented)."""
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def total(self, name: str, **match: str) -> int:
        """Sum over every series of `name` whose labels include `match`."""
        return sum(
            value
            for key, value in self._values.get(name, {}).items()
            if all(item in key for item in match.items())
        )

    def by_label(self, name: str, label: str, **match: str) -> dict[str, int]:
        """{label value: sum} over the series of `name` matching `match`."""
        out: dict[str, int] = {}
        for key, value in self._values.get(name, {}).items():
            labels = dict(key)
            if label in labels and all(labels.get(k) == v for k, v in match.items()):
                out[labels[label]] = out.get(labels[label], 0) + value
        return out

    def series(self) -> Iterator[tuple[str, dict[str, str], int]]:
        for name, by_key in sorted(self._values.items()):
            for key, value in sorted(by_key.items()):
                yield name, dict(key), value
