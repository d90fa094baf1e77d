"""File discovery: endpoints listed in a JSON or YAML file, watched for changes.

The file holds a list of endpoints (``"host:port"`` strings or mappings, as in configuration)
or a mapping with an ``endpoints`` list.  It is re-read by path whenever its modification time,
size or inode changes, so an editor's atomic rename is picked up; a half-written file fails to
parse, which keeps the last good set until the next read succeeds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

from ..endpoint import Endpoint
from ..exceptions import ConfigError
from .base import Provider, SourceError

__all__ = ["YAML_SUFFIXES", "FileProvider", "parse_endpoint_list"]

log = logging.getLogger(__name__)

#: file names read as YAML (with PyYAML, the ``yaml`` extra); any other is read as JSON
YAML_SUFFIXES = (".yaml", ".yml")


def parse_endpoint_list(data: Any, source: str, provider: Provider) -> list[Endpoint]:
    """Endpoints from a list (or ``{"endpoints": [...]}``), skipping malformed entries."""
    if isinstance(data, Mapping):
        data = data.get("endpoints")
    if not isinstance(data, list):
        raise SourceError(f"{source}: expected a list of endpoints or {{\"endpoints\": [...]}}")
    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        try:
            endpoint = Endpoint.from_value(item, path=f"[{index}]")
        except ConfigError as error:
            provider.skipped += 1
            log.warning("tai-lb: %s: skipping a malformed endpoint: %s", source, error)
            continue
        if endpoint.address in seen:
            provider.skipped += 1
            log.warning("tai-lb: %s: skipping duplicate endpoint %s", source, endpoint.address)
            continue
        seen.add(endpoint.address)
        endpoints.append(endpoint)
    return endpoints


class FileProvider(Provider):
    """Reads a JSON or YAML endpoint file when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skipped = 0
        self._signature: Optional[tuple[int, int, int]] = None

    def fetch(self) -> Optional[list[Endpoint]]:
        """The file's endpoints if it changed since the last successful read, else None."""
        try:
            info = os.stat(self.path)
        except OSError as error:
            raise SourceError(f"{self.path}: {error.strerror or error}") from None
        signature = (info.st_mtime_ns, info.st_size, info.st_ino)
        if signature == self._signature:
            return None
        try:
            with open(self.path, "rb") as file:
                text = file.read().decode("utf-8")
            if self.path.endswith(YAML_SUFFIXES):
                import yaml  # noqa: PLC0415 - PyYAML is an optional extra

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError, ImportError) as error:
            raise SourceError(f"{self.path}: cannot be read as an endpoint list: "
                              f"{error}") from None
        except Exception as error:  # PyYAML's errors; a half-written file lands here too
            raise SourceError(f"{self.path}: not valid YAML: {error}") from None
        endpoints = parse_endpoint_list(data, self.path, self)
        self._signature = signature
        return endpoints
