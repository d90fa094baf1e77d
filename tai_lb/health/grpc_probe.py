"""The ``grpc`` health check: one standard ``grpc.health.v1`` Health/Check call per probe.

``grpc`` and ``grpc_health`` (the ``grpc`` extra: grpcio and grpcio-health-checking) are imported
on the first gRPC probe, never by the core.  Each probe opens its own channel to the endpoint's
address and closes it before it returns, so no channel outlives a probe: none is left behind when
an endpoint leaves or the balancer closes, and a channel that broke is never reused.  A channel
costs a TCP (and TLS) handshake per probe, once an interval, which is what the HTTP and TCP
probes cost too.

Over ``https`` the channel uses TLS, with the endpoint's ``tls_name`` (or the service name) as
the name the certificate must carry, and ``verify`` as a CA bundle path when it is one; gRPC
cannot skip the certificate check, so ``verify: false`` fails the probe with a message that says
so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .probes import HealthTarget

__all__ = ["grpc_probe"]


def grpc_probe(target: HealthTarget) -> tuple[bool, str]:
    """Ask the endpoint of ``target`` whether it serves ``config.service``; returns (passed,
    detail): SERVING passes, any other status or an RPC error fails.  Raises only when grpc is
    not installed or the settings cannot be used (the caller turns that into a failed probe)."""
    import grpc  # noqa: PLC0415 - grpcio is an optional extra
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415 - the same

    config = target.config
    endpoint = target.endpoint
    channel: Any
    if target.scheme == "https":
        if config.verify is False:
            return False, "grpc checks cannot skip certificate verification (verify: false)"
        roots = None
        if isinstance(config.verify, str):
            with open(config.verify, "rb") as bundle:
                roots = bundle.read()
        name = endpoint.tls_name or target.service
        channel = grpc.secure_channel(endpoint.address,
                                      grpc.ssl_channel_credentials(root_certificates=roots),
                                      options=[("grpc.ssl_target_name_override", name),
                                               ("grpc.default_authority", name)])
    else:
        channel = grpc.insecure_channel(endpoint.address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=config.service),
                                  timeout=config.timeout)
        except grpc.RpcError as error:
            # The error of a call is also a grpc.Call, with its status code and details.
            code = error.code() if hasattr(error, "code") else None
            details = error.details() if hasattr(error, "details") else str(error)
            detail = f"gRPC {getattr(code, 'name', code)}" + (f": {details}" if details else "")
            return False, detail[:200]
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return response.status == health_pb2.HealthCheckResponse.SERVING, status
    finally:
        channel.close()
