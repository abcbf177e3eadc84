"""`traits-agent config [--check] [--json]`: the effective configuration and where each value
came from.

The output is TOML (valid: the sources are comments), with every path absolute, so it can be
read by a human, diffed, or saved as a starting config. Sources: `default` (built in), `env`
(a built-in default that an environment variable moved, e.g. `$RUNTIME_DIRECTORY`), `file`
(the config file set it), `flag` (a command-line flag). The API key is never shown: only
where it would come from.

`--check` validates and prints one line: exit 0 when good, 2 (one line naming the key) when
not — for packaging hooks and CI.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from traits_agent import paths
from traits_agent.cli.common import PROG
from traits_agent.config import Config, find_config_file, load_config, resolve_api_key

#: the built-in defaults an environment variable moves (systemd's directories)
ENV_DEFAULTS = {
    ("listen", "unix"): "RUNTIME_DIRECTORY",
    ("listen", "forward_unix"): "RUNTIME_DIRECTORY",
    ("control", "socket"): "RUNTIME_DIRECTORY",
    ("queue", "dir"): "STATE_DIRECTORY",
}


def cmd_config(args: argparse.Namespace) -> int:
    path = find_config_file(args.config)
    config = load_config(path)
    key_source = _key_source(config)  # raises ConfigError for a bad key file: exit 2
    if args.check:
        print(f"{path or 'built-in defaults'}: ok")
        return 0
    rows = effective(config, _file_data(path), os.environ)
    origin = _file_origin(args.config, path)
    if args.json:
        print(
            json.dumps(
                {
                    "config_file": str(path) if path else None,
                    "config_file_source": origin,
                    "api_key": key_source,
                    "values": {
                        f"{section}.{key}": {"value": value, "source": source}
                        for section, key, value, source in rows
                    },
                },
                indent=2,
            )
        )
        return 0
    print(render(rows, path, origin, key_source))
    return 0


def effective(
    config: Config, file_data: dict[str, Any], env: Any
) -> list[tuple[str, str, Any, str]]:
    """(section, key, value, source) for every setting, in the config's own order."""
    rows = []
    for section_field in fields(Config):
        if section_field.name == "source":
            continue
        section = getattr(config, section_field.name)
        given = file_data.get(section_field.name) or {}
        for f in fields(section):
            value = getattr(section, f.name)
            if f.name in given:
                source = "file"
            elif env.get(ENV_DEFAULTS.get((section_field.name, f.name), "")):
                source = f"env ${ENV_DEFAULTS[(section_field.name, f.name)]}"
            else:
                source = "default"
            rows.append((section_field.name, f.name, value, source))
    return rows


def render(
    rows: list[tuple[str, str, Any, str]], path: Path | None, origin: str, key_source: str
) -> str:
    """The TOML view: `key = value  # source`, sections in order, notes as comments."""
    lines = [
        f"# {PROG} effective configuration",
        f"# config file: {path} ({origin})" if path else f"# config file: none ({origin})",
        f"# api key: {key_source}",
    ]
    current = None
    for section, key, value, source in rows:
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        text = f"{key} = {_toml(key, value)}"
        note = source
        if (section, key) == ("api", "endpoint"):
            from traits_agent.config import ENDPOINTS

            note += f"; {ENDPOINTS.get(value, value)}"
        lines.append(f"{text:<52} # {note}")
    return "\n".join(lines)


def _toml(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key.endswith("_mode"):
        return f"0o{value:o}"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _file_data(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _file_origin(flag: str | None, path: Path | None) -> str:
    if flag:
        return "flag --config"
    if os.environ.get("TRAITS_AGENT_CONFIG"):
        return "env $TRAITS_AGENT_CONFIG"
    if path is None:
        return (
            f"default: neither {paths.default_config_path()} nor {paths.SYSTEM_CONFIG_PATH} "
            "exists; built-in defaults"
        )
    return "default lookup"


def _key_source(config: Config) -> str:
    """Where the API key comes from, never the key."""
    key = resolve_api_key(config)
    if key is None:
        return (
            "none (set $TRAITS_API_KEY, [api] key_file or a systemd credential; "
            "`run --fake-api` needs none)"
        )
    if os.environ.get("TRAITS_API_KEY"):
        return "env $TRAITS_API_KEY (not shown)"
    if config.api.key_file:
        return f"file {config.api.key_file} (not shown)"
    return "systemd credential $CREDENTIALS_DIRECTORY/api_key (not shown)"
