"""Running `traits-agent` as a real command against a real agent process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import AgentProcess, write_config
from traits_agent.fakeapi import FakeAPI


def cli(
    *args: str, config: Path | None = None, stdin: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`traits-agent ARGS... [--config CONFIG]` as a subprocess; text output captured."""
    argv = [sys.executable, "-m", "traits_agent", *args]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


async def start_agent(workdir: Path, api: FakeAPI | str, *, args=(), **sections) -> AgentProcess:
    endpoint = api if isinstance(api, str) else api.url
    agent = AgentProcess(workdir, write_config(workdir, endpoint, **sections), args=args)
    await agent.start()
    return agent
