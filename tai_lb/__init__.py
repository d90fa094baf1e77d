"""tai-lb: threaded client-side load balancing and service discovery for ``requests``.

>>> import tai_lb
>>> lb = tai_lb.LoadBalancer.from_config({"services": {"users": {"endpoints": ["127.0.0.1:8001"]}}})
>>> with lb.pick("users") as lease:
...     lease.endpoint.address
'127.0.0.1:8001'
"""

from __future__ import annotations

import logging

from .balancer import LoadBalancer
from .config import KeySource, LoadBalancerConfig, ServiceConfig, load_config
from .endpoint import Endpoint, Labels
from .exceptions import (
    ConfigError,
    LoadBalancerError,
    NoEndpointAvailable,
    PoolExhausted,
    UnknownService,
)
from .lease import Lease
from .registry import ServiceRegistry, ServiceSnapshot, Subscription, TopologyChange
from .stats import EndpointStats
from .strategies import Strategy

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Endpoint",
    "EndpointStats",
    "KeySource",
    "Labels",
    "Lease",
    "LoadBalancer",
    "LoadBalancerConfig",
    "LoadBalancerError",
    "NoEndpointAvailable",
    "PoolExhausted",
    "ServiceConfig",
    "ServiceRegistry",
    "ServiceSnapshot",
    "Strategy",
    "Subscription",
    "TopologyChange",
    "UnknownService",
    "__version__",
    "load_config",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
