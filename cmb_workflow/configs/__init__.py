"""Default settings (default.yml) and their merging with a user YAML and command-line flags."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def defaults() -> dict:
    return yaml.safe_load(resources.files(__package__).joinpath("default.yml").read_text())


def load_config(user_yaml=None, overrides: dict | None = None) -> dict:
    """Defaults, then the user's YAML, then flags (None means 'not given on the command line')."""
    config = defaults()
    if user_yaml:
        path = Path(user_yaml)
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: config must be a mapping of setting: value")
        _merge(config, user, source=str(path))
    _merge(config, {k: v for k, v in (overrides or {}).items() if v is not None},
           source="command line")
    return config


def _merge(config: dict, update: dict, *, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        if key not in config:
            raise ConfigError(f"{source}: unknown setting {prefix + key!r}")
        if isinstance(config[key], dict) and isinstance(value, dict):
            _merge(config[key], value, source=source, prefix=f"{prefix}{key}.")
        else:
            config[key] = value
