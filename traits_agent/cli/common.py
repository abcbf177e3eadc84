"""What every command shares: the program name, usage errors, and finding the config."""

from __future__ import annotations

import argparse

from traits_agent.config import Config, find_config_file, load_config

PROG = "traits-agent"


class UsageError(Exception):
    """Bad usage that argparse did not catch; exit 2."""


def config_from(args: argparse.Namespace) -> Config:
    """The config named by `--config`, else the lookup chain (see `find_config_file`)."""
    return load_config(find_config_file(getattr(args, "config", None)))
