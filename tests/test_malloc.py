"""`traits_agent.malloc.tune`, measured where it acts: the page faults a process takes to
allocate, fill and free big blocks over and over, as the agent does for every batch body."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from traits_agent import malloc

ROUNDS = 50
PROBE = f"""
import json, resource, sys
from traits_agent import malloc
done = malloc.tune()
def churn():
    a = b"x" * (1 << 20)  # filled, so every page of each block is touched
    b = b"y" * (1 << 20)
    del a, b
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({ROUNDS}):
    churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"tuned": done, "faults_per_round": faults / {ROUNDS}}}))
"""

glibc = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="mallopt is glibc's")


def probe(**env: str) -> dict:
    """Run PROBE in a fresh interpreter whose only glibc malloc tunables are `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@glibc
def test_big_blocks_are_reused_not_faulted_in_again() -> None:
    """Tuned, two 1 MiB blocks allocated, filled and freed 50 times fault nothing in after the
    first round; with glibc held at its starting thresholds (the environment's tunables,
    which `tune` leaves alone) every round faults both blocks in again (512 pages)."""
    tuned = probe()
    assert tuned["tuned"] == {
        "mmap_threshold": malloc.MMAP_THRESHOLD,
        "trim_threshold": malloc.TRIM_THRESHOLD,
    }
    assert tuned["faults_per_round"] < 5
    held = probe(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    assert held["tuned"] == {}
    assert held["faults_per_round"] > 400


@glibc
def test_the_environment_wins_per_threshold() -> None:
    """An operator's MALLOC_TRIM_THRESHOLD_ is theirs; the other threshold is still set."""
    assert probe(MALLOC_TRIM_THRESHOLD_="131072")["tuned"] == {
        "mmap_threshold": malloc.MMAP_THRESHOLD
    }
