"""File discovery: endpoints listed in a JSON or YAML file, watched for changes.

The file holds a list of endpoints (``"host:port"`` strings or mappings, as in configuration)
or a mapping with an ``endpoints`` list.  It is re-read by path whenever its modification time,
change time, size or inode changes, so an editor's atomic rename is picked up; a half-written
file fails to parse, which keeps the last good set until the next read succeeds.  A file that
failed is not read again until it changes.  The path is never waited on: anything but a regular
file (a FIFO, a directory, a device) is a failed read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

from ..endpoint import Endpoint
from ..exceptions import ConfigError
from .base import Provider, Skipped, SourceError, read_regular_file

__all__ = ["YAML_SUFFIXES", "FileProvider", "parse_endpoint_list"]

log = logging.getLogger(__name__)

#: file names read as YAML (with PyYAML, the ``yaml`` extra); any other is read as JSON
YAML_SUFFIXES = (".yaml", ".yml")


def parse_endpoint_list(data: Any, source: str, provider: Provider) -> list[Endpoint]:
    """Endpoints from a list (or ``{"endpoints": [...]}``), skipping malformed entries.

    Each skipped entry is counted in ``provider.skipped``; one warning per call gives their
    number and the first few reasons, however many there are.
    """
    if isinstance(data, Mapping):
        data = data.get("endpoints")
    if not isinstance(data, list):
        raise SourceError(f"{source}: expected a list of endpoints or {{\"endpoints\": [...]}}")
    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    skipped = Skipped()
    for index, item in enumerate(data):
        try:
            endpoint = Endpoint.from_value(item, path=f"[{index}]")
        except ConfigError as error:
            reason = str(error)
        else:
            if endpoint.address not in seen:
                seen.add(endpoint.address)
                endpoints.append(endpoint)
                continue
            reason = f"[{index}]: duplicate endpoint {endpoint.address}"
        skipped.add(reason)
    skipped.report(log, provider, source, "malformed or duplicate endpoint(s)")
    return endpoints


class FileProvider(Provider):
    """Reads a JSON or YAML endpoint file when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skipped = 0
        self.reads = 0
        self._signature: Optional[tuple[int, int, int, int]] = None
        # The signature of a file that failed to read or parse, and why: it is not read again
        # (nor its error logged again) until it changes.
        self._failed: Optional[tuple[tuple[int, int, int, int], str]] = None

    def fetch(self) -> Optional[list[Endpoint]]:
        """The file's endpoints if it changed since the last successful read, else None."""
        try:
            info = os.stat(self.path)
        except OSError as error:
            raise SourceError(f"{self.path}: {error.strerror or error}") from None
        signature = _signature(info)
        if signature == self._signature:
            return None
        if self._failed is not None and self._failed[0] == signature:
            raise SourceError(self._failed[1])
        try:
            self.reads += 1
            try:
                raw, info = read_regular_file(self.path)
            except OSError as error:
                raise SourceError(f"{self.path}: {error.strerror or error}") from None
            signature = _signature(info)  # what was read, if the file changed since stat()
            endpoints = parse_endpoint_list(self._load(raw), self.path, self)
        except SourceError as error:
            self._failed = (signature, str(error))
            raise
        self._signature, self._failed = signature, None
        return endpoints

    def _load(self, raw: bytes) -> Any:
        """The parsed file; :class:`SourceError` saying what is wrong with it."""
        yaml_file = self.path.endswith(YAML_SUFFIXES)
        try:
            text = raw.decode("utf-8")
            if not yaml_file:
                return json.loads(text)
            import yaml  # noqa: PLC0415 - PyYAML is an optional extra

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as error:  # a half-written file lands here too
                raise SourceError(f"{self.path}: not valid YAML: {error}") from None
        except RecursionError:
            raise SourceError(f"{self.path}: cannot be read as an endpoint list: nested too "
                              f"deep") from None
        except (UnicodeDecodeError, ValueError, ImportError) as error:
            kind = "YAML" if yaml_file else "JSON"
            raise SourceError(f"{self.path}: not valid {kind}: {error}") from None
        except SourceError:
            raise
        except Exception as error:  # anything else a parser may raise on a strange file
            raise SourceError(f"{self.path}: cannot be read as an endpoint list: "
                              f"{error}") from None

    def snapshot(self) -> dict[str, Any]:
        """The path and the number of times the file was read."""
        return {"path": self.path, "reads": self.reads}


def _signature(info: os.stat_result) -> tuple[int, int, int, int]:
    # ctime too: a chmod that makes a failing file readable changes nothing else.
    return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)
