"""Inbound adapter: who is calling over gRPC. Every call carries
``authorization: Bearer <token>`` (what gRPC's access-token call credentials send); the
token names an identity (:mod:`myelin.api_tokens`), which must be one that may score
(:data:`myelin.access.GRPC_CALLERS`). A refusal is ``UNAUTHENTICATED`` or
``PERMISSION_DENIED`` with a message that says what to send, and an audit record.

Probes pass without a token, as a load balancer or a Kubernetes gRPC probe sends none:
``grpc.health.v1.Health`` and OIP's ``ServerLive`` / ``ServerReady``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from myelin import access
from myelin.api_tokens import TokenBook

OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
Refusal = Callable[[str, str, str, str], Awaitable[None]]  # action, caller, method, reason


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in details.invocation_metadata or ():
        out[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return out


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


def _refuse(code: grpc.StatusCode, message: str) -> Handler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenBook, audit_refusal: Refusal) -> None:
        self._tokens = tokens
        self._refusal = audit_refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = details.method
        if method in OPEN_METHODS:
            return await continuation(details)
        header = _metadata(details).get("authorization")
        who = self._tokens.identify(header)
        if who is None:
            said = "no" if header is None else "an unknown"
            reason = f"{said} bearer token for {method}"
            await self._refusal(access.UNAUTHENTICATED_ACTION, "", method, reason)
            return _refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{reason}: send metadata 'authorization: Bearer <token>' over TLS "
                "(myelin up writes an application's token to .myelin/security/tokens/app.token "
                "and the CA to trust to .myelin/security/tls/ca.pem)",
            )
        if not access.may_score(who):
            reason = f"identity {who!r} may not call {method}"
            await self._refusal(access.FORBIDDEN_ACTION, who, method, reason)
            return _refuse(grpc.StatusCode.PERMISSION_DENIED, reason)
        return await continuation(details)
