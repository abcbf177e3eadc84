"""`traits-agent run`: load the config and the key, set up logging, run the agent."""

from __future__ import annotations

import argparse
import sys

from traits_agent.cli.common import PROG, config_from
from traits_agent.config import resolve_api_key
from traits_agent.errors import ConfigError, TraitsAgentError

FAKE_API_KEY = "fake-api-key"


def first_run_hint(config_flag: str | None) -> str:
    """What a newcomer at a terminal wants next: how to send an event, where to look."""
    cfg = f" --config {config_flag}" if config_flag else ""
    return (
        f"\nThe agent is ready. In another terminal:\n"
        f'  {PROG} send{cfg} level_ups \'{{"user_id": "1001", "level": 10}}\'   '
        f"# send a test event\n"
        f"  {PROG} status{cfg}      # what it did with it\n"
        f"  {PROG} top{cfg}         # a live view\n"
        f"Ctrl-C stops the agent (the queue stays on disk).\n"
    )


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses
    import functools

    import trio

    from traits_agent import agent, malloc
    from traits_agent.observe import log

    malloc.tune()
    config = config_from(args)
    if args.log_level or args.log_format:
        config = dataclasses.replace(
            config,
            log=dataclasses.replace(
                config.log,
                level=args.log_level or config.log.level,
                format=args.log_format or config.log.format,
            ),
        )
    key: str | None = resolve_api_key(config)
    if key is None:
        if not args.fake_api:
            raise ConfigError(
                "api key",
                "no API key: set $TRAITS_API_KEY, [api] key_file, or systemd LoadCredential="
                "api_key (or try `traits-agent run --fake-api`)",
            )
        key = FAKE_API_KEY
    log.add_secret(key)
    log.setup(config.log.level, config.log.format)
    hint = sys.stderr.isatty() and (
        config.log.format == "console" or (config.log.format == "auto" and sys.stdout.isatty())
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(agent.run, config, key, fake_api=args.fake_api))
            if hint:
                print(first_run_hint(args.config), file=sys.stderr, flush=True)

    try:
        trio.run(main)
    except (OSError, TraitsAgentError, BaseExceptionGroup) as e:
        # a start-up failure (address in use, queue locked, directory not writable, an
        # inherited socket of the wrong kind) arrives wrapped by the nurseries it passed
        # through: name the first cause in one line
        cause = _first_cause(e, (OSError, TraitsAgentError))
        if cause is None:
            raise
        import structlog

        structlog.get_logger("traits_agent").error("agent_failed", error=str(cause))
        print(f"{PROG}: {cause}", file=sys.stderr)
        return cause.exit_status if isinstance(cause, TraitsAgentError) else 1
    return 0


def _first_cause(
    error: BaseException, kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first leaf of `error` (an exception group, maybe nested) when every leaf is one of
    `kinds`; None when something else is in there (that is a bug: let the traceback show)."""
    if isinstance(error, BaseExceptionGroup):
        matched, rest = error.split(kinds)
        if rest is not None or matched is None:
            return None
        leaf: BaseException = matched
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        return leaf
    return error if isinstance(error, kinds) else None
