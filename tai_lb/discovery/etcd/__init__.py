"""etcd v3 discovery and self-registration, through etcd's JSON gateway with urllib3.

Layout (SPEC): one key per instance, ``<prefix>/<service>/<instance-id>``, whose value is JSON
``{"address": "host:port", "weight": 1, "zone": ..., "version": ..., "labels": {...}}``.

:class:`EtcdProvider` lists a service's keys at one revision, then watches from the next
revision on a thread of its own, so a change reaches the registry as soon as etcd reports it.
When the watch is lost (etcd restarted, the connection cut, the revision compacted) it lists
again, after a jittered, growing delay, and the registry receives exactly the differences.
:class:`EtcdRegistrar` puts this instance's key under a lease and keeps the lease alive.

The gateway is etcd's HTTP/1.1 + JSON front of its gRPC API (paths under ``/v3/``, etcd 3.4
and later; keys and values base64-encoded). The ``etcd3`` package is not used: it fails to
import with current protobuf releases.
"""

from __future__ import annotations

from .client import RECONNECT_CAP as RECONNECT_CAP
from .client import RECONNECT_FIRST as RECONNECT_FIRST
from .client import Backoff, EtcdClient, interrupt
from .errors import EtcdError, WatchCompacted, WatchIdle
from .provider import WATCH_HEALTHY as WATCH_HEALTHY
from .provider import EtcdConfig, EtcdProvider, EtcdSettings
from .provider import service_prefix as service_prefix
from .registrar import EtcdRegistrar
from .watch import WATCH_IDLE as WATCH_IDLE
from .watch import WatchStream

__all__ = ["Backoff", "EtcdClient", "EtcdConfig", "EtcdError", "EtcdProvider", "EtcdRegistrar",
           "EtcdSettings", "WatchCompacted", "WatchIdle", "WatchStream", "interrupt"]
