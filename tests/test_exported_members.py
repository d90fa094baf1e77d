"""``tai_lb.__all__`` and the real public exports agree (as httpx's test of the same name)."""

from __future__ import annotations

import tai_lb


def test_all_matches_public_names() -> None:
    exported = set(tai_lb.__all__)
    public = {
        name for name, value in vars(tai_lb).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("tai_lb")
    }
    public.add("__version__")
    assert exported == public


def test_every_exported_name_resolves_and_has_a_docstring() -> None:
    for name in tai_lb.__all__:
        value = getattr(tai_lb, name)
        if callable(value):
            assert value.__doc__, f"tai_lb.{name} has no docstring"


def test_spec_names_are_exported() -> None:
    for name in ("LoadBalancer", "ServiceRegistry", "Endpoint", "LoadBalancerError", "ConfigError",
                 "ConnectionPool", "NoEndpointAvailable", "PoolExhausted", "UnknownService"):
        assert name in tai_lb.__all__
