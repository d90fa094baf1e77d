"""Reading a configuration file: JSON, TOML or YAML by its extension, into a mapping."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from ._settings import shown
from .discovery.base import read_regular_file
from .exceptions import ConfigError

__all__ = ["read_config_file"]


def read_config_file(path: str) -> Mapping[str, Any]:
    """Read a configuration file by its extension: ``.json``, ``.toml``, ``.yaml`` or ``.yml``."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".json", ".toml", ".yaml", ".yml"):
        raise ConfigError("", f"{path}: a configuration file must end in .json, .toml, .yaml or "
                              f".yml, got {shown(extension or 'no extension')}")
    try:
        raw, _ = read_regular_file(path)  # never blocks: a FIFO or a directory is refused
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        message = error.strerror if isinstance(error, OSError) else None
        raise ConfigError("", f"{path}: cannot read the configuration file: "
                              f"{message or error}") from None
    try:
        if extension == ".json":
            data = json.loads(raw.decode("utf-8"))
        elif extension == ".toml":
            data = _toml_loads(raw.decode("utf-8"))
        else:
            data = _yaml_loads(raw.decode("utf-8"), path)
    except ConfigError:
        raise
    except Exception as error:  # each parser has its own error type; all mean "malformed"
        raise ConfigError("", f"{path}: not valid {extension[1:].upper()}: {error}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{path}: the top level must be a mapping, got "
                              f"{type(data).__name__}")
    return data


def _toml_loads(text: str) -> Mapping[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415 - only needed for TOML files
    else:  # pragma: no cover - exercised by the 3.9 run
        import tomli as tomllib  # noqa: PLC0415
    data: Mapping[str, Any] = tomllib.loads(text)
    return data


def _yaml_loads(text: str, path: str) -> Any:
    try:
        import yaml  # noqa: PLC0415 - PyYAML is an optional extra
    except ImportError:  # pragma: no cover - the test extra installs PyYAML
        raise ConfigError("", f"{path}: reading YAML needs PyYAML: pip install "
                              "'tai-lb[yaml]'") from None
    return yaml.safe_load(text)
