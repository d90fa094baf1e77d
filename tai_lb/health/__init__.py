"""Active health checks: probes on a small, fixed set of named daemon threads.

One scheduler thread keeps every endpoint's next check time; a bounded pool of worker threads
runs the probes (HTTP GET of a path, TCP connect, a ``grpc.health.v1`` call, or a function).  A
probe that hangs ties up one worker and never delays the others, and an endpoint is never probed
twice at once.  An endpoint turns unhealthy after ``unhealthy_threshold`` failed checks in a row
and healthy again after ``healthy_threshold`` passed ones (HAProxy's fall and rise).

A new endpoint is healthy until proven otherwise and is probed at once.  A client-side balancer
usually learns of an endpoint from configuration or discovery, both of which list instances that
are meant to serve; holding traffic back until a first probe passes would make every process
start cold and every discovery update wait an interval, while retries already cover an endpoint
that turns out dead.  ``grace`` gives slow starters time: failed checks in the first ``grace``
seconds after an endpoint appears are recorded but do not count.

Traffic-proven health: an endpoint that answered real traffic successfully within the last
interval may skip its probe (the success counts as a passed check), but only ``max_skips`` times
in a row, and never while it has failed probes in a row: operators drain an instance by failing
its health endpoint while it still serves, so a failing probe always counts and a busy endpoint
that fails its health endpoint is out within ``interval x (max_skips + unhealthy_threshold)``.

One prober per host: with ``share``, the processes of a host share each endpoint's checks
through a file (:mod:`tai_lb.health.sharing`): one of them probes per interval, every one adopts
the result.
"""

from __future__ import annotations

from .checker import HealthChecker
from .probes import EndpointHealth
from .probes import probe as probe
from .settings import HealthCheckConfig
from .settings import ProbeFunction as ProbeFunction

__all__ = ["EndpointHealth", "HealthCheckConfig", "HealthChecker"]
