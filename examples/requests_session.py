"""A balanced ``requests.Session`` routing around a backend that dies.

Run it with ``python examples/requests_session.py``: it needs nothing but tai-lb.  It starts three
HTTP backends on 127.0.0.1 (alpha, bravo, charlie) and balances the service ``users`` over them
with ``peak_ewma``, up to 3 attempts per request, and an HTTP health check of ``/healthz`` every
0.2 s.  Then it:

1. sends 90 GETs to ``http://users/api/users/<n>`` and counts which backend served each
   (``peak_ewma`` favours whichever answers fastest, so the split is uneven and changes from
   run to run);
2. kills the busiest of them (its listener and every open connection) and keeps sending until
   the health check has taken it out: a request that picked it in the meantime was refused, and
   was retried on another backend, so no request failed; it prints the decision trace of one;
3. sends 90 more GETs, none of which is even tried on the dead backend, and prints a summary of
   ``lb.status()``.

It exits 0 when no request failed and no attempt went to the dead backend once it was out.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, Optional

import requests
from _backends import start_backends  # the examples' demo HTTP backends

import tai_lb

REQUESTS = 90


def send(session: requests.Session, count: int) -> Counter[str]:
    """``count`` GETs through the balanced session; how many each backend served."""
    served: Counter[str] = Counter()
    for n in range(count):
        response = session.get(f"http://users/api/users/{n}", timeout=5)
        response.raise_for_status()
        served[response.json()["backend"]] += 1
    return served


def summary(status: dict[str, Any], names: dict[str, str]) -> list[str]:
    """A few lines of ``lb.status()`` (the whole dict is JSON: print it with json.dumps)."""
    users = status["services"]["users"]
    lines = [f"users: {users['endpoints_pickable']} of {users['endpoints_total']} endpoints "
             f"pickable, {users['requests']} attempts, {users['errors']} errors, "
             f"{users['retries']} retries, p50 {users['p50_ms']} ms"]
    for address, endpoint in users["endpoints"].items():
        lines.append(f"  {names[address]:<8} {address:<17} health={endpoint['health']:<9} "
                     f"requests={endpoint['requests']:<4} failures={endpoint['failures']:<3} "
                     f"errors_by_kind.connect={endpoint['errors_by_kind']['connect']}")
    return lines


def out_of_picks(lb: tai_lb.LoadBalancer, address: str) -> bool:
    """True once the route that picks use now leaves ``address`` out."""
    route = lb.route("users", wait=False)
    return all(stats.endpoint.address != address for stats in route.candidates)


def main() -> int:
    backends = start_backends("alpha", "bravo", "charlie")
    names = {backend.address: backend.name for backend in backends}
    print("backends:     " + ", ".join(f"{b.name} {b.address}" for b in backends))
    lb = tai_lb.LoadBalancer.from_config({"services": {"users": {
        "endpoints": [backend.address for backend in backends],
        "strategy": "peak_ewma",
        "retries": {"attempts": 3},
        "health_check": {"path": "/healthz", "interval": 0.2, "timeout": 1,
                         "unhealthy_threshold": 2, "healthy_threshold": 1},
    }}})
    with lb:  # close() stops the health check threads and closes the pools
        session = lb.session()
        before = send(session, REQUESTS)
        print("before:       " + ", ".join(f"{b.name} {before[b.name]}" for b in backends))

        victim = max(backends, key=lambda backend: before[backend.name])
        victim.kill()
        print(f"killed:       {victim.name}, the busiest")
        retried: Optional[tai_lb.DecisionTrace] = None
        meanwhile = 0
        deadline = time.monotonic() + 10
        while retried is None or not out_of_picks(lb, victim.address):
            if time.monotonic() > deadline:
                print(f"{victim.name} was never met, or never taken out", file=sys.stderr)
                return 1
            response = session.get(f"http://users/api/users/{meanwhile}", timeout=5)
            response.raise_for_status()  # a refused attempt was retried: this is a 200
            meanwhile += 1
            trace = tai_lb.trace_of(response)
            if retried is None and trace is not None and len(trace.attempts) > 1:
                retried = trace
        print(f"meanwhile:    {meanwhile} requests, all answered, until the health check "
              f"took {victim.name} out")
        print(f"a request that picked {victim.name}, from its decision trace:")
        print("  " + str(retried).replace("\n", "\n  "))

        tried = lb.stats("users")[victim.address].requests
        after = send(session, REQUESTS)
        tried = lb.stats("users")[victim.address].requests - tried
        print("after:        " + ", ".join(f"{b.name} {after[b.name]}" for b in backends
                                           if b is not victim)
              + f"; attempts to {victim.name}: {tried}")
        print()
        print("\n".join(summary(lb.status(), names)))
        session.close()
    for backend in backends:
        backend.kill()

    print()
    print(f"every request answered; routed around {victim.name}: {'yes' if tried == 0 else 'NO'}")
    return 0 if tried == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
