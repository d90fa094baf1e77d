"""The errors of etcd discovery and registration.

:class:`EtcdError` (etcd could not be reached, or answered with an error) is a
:class:`~tai_lb.discovery.SourceError`, so the discovery watcher keeps a service's last good set
through it; the watch's two ways of ending that call for a new watch rather than a failure,
:class:`WatchCompacted` and :class:`WatchIdle`, are kinds of it.
"""

from __future__ import annotations

from ..base import SourceError

__all__ = ["EtcdError", "WatchCompacted", "WatchIdle"]


class EtcdError(SourceError):
    """etcd could not be reached, or answered with an error."""


class WatchCompacted(EtcdError):
    """The watch's start revision has been compacted away: list again."""


class WatchIdle(EtcdError):
    """The watch was silent for its idle time: establish it again (not a failure)."""

