"""tai-lb: threaded client-side load balancing and service discovery for ``requests``.

>>> import tai_lb
>>> lb = tai_lb.LoadBalancer.from_config({"services": {"users": {"endpoints": ["127.0.0.1:8001"]}}})
>>> with lb.pick("users") as lease:
...     lease.endpoint.address
'127.0.0.1:8001'
"""

from __future__ import annotations

import logging

from .adapter import LoadBalancedAdapter
from .balancer import LoadBalancer
from .config import KeySource, LoadBalancerConfig, ServiceConfig, load_config
from .connpool import ConnectionPool
from .discovery.etcd import EtcdRegistrar
from .endpoint import Endpoint, Labels
from .exceptions import (
    ConfigError,
    HTTPPoolExhausted,
    LoadBalancerError,
    NoEndpointAvailable,
    PoolExhausted,
    UnknownService,
)
from .health import HealthCheckConfig
from .lease import Lease
from .pool import PoolConfig
from .rebalance import RebalanceConfig
from .registry import ServiceRegistry, ServiceSnapshot, Subscription, TopologyChange
from .retry import RetryBudget, RetryConfig, RetryPolicy
from .routing.affinity import AffinityConfig
from .routing.locality import LocalityConfig
from .routing.slow_start import SlowStartConfig
from .routing.subsets import SubsetConfig
from .stats import EndpointStats
from .strategies import Strategy
from .trace import Attempt, DecisionTrace, trace_of

__version__ = "0.1.0"

__all__ = [
    "AffinityConfig",
    "Attempt",
    "ConfigError",
    "ConnectionPool",
    "DecisionTrace",
    "Endpoint",
    "EndpointStats",
    "EtcdRegistrar",
    "HTTPPoolExhausted",
    "HealthCheckConfig",
    "KeySource",
    "Labels",
    "Lease",
    "LoadBalancedAdapter",
    "LoadBalancer",
    "LoadBalancerConfig",
    "LoadBalancerError",
    "LocalityConfig",
    "NoEndpointAvailable",
    "PoolConfig",
    "PoolExhausted",
    "RebalanceConfig",
    "RetryBudget",
    "RetryConfig",
    "RetryPolicy",
    "ServiceConfig",
    "ServiceRegistry",
    "ServiceSnapshot",
    "SlowStartConfig",
    "Strategy",
    "Subscription",
    "SubsetConfig",
    "TopologyChange",
    "UnknownService",
    "__version__",
    "load_config",
    "trace_of",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
