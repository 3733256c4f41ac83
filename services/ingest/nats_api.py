"""Inbound adapter: the same batch contract over NATS request-reply.

Errors are typed replies: ``batch_too_large``, ``malformed_json``, ``overloaded``
(with ``retry_after``) and so on; per-event outcomes are in the result.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS

from myelin import bus, slis, telemetry
from myelin.errors import MyelinError
from myelin.subjects import RPC_INGEST_PUBLISH
from services.ingest.ingestor import BatchResult, Ingestor
from services.ingest.logic import BatchRefused


class BatchRefusedError(MyelinError):
    pass


async def serve_ingest(nc: NATS, ingestor: Ingestor) -> Any:
    # behind an authenticating server the caller's identity names the producer
    authenticated = bus.authenticated(nc)

    async def handle(data: bytes, headers: dict[str, str]) -> BatchResult:
        with (
            slis.timed("ingest_nats") as sli,
            telemetry.tracer("myelin.ingest").start_as_current_span("ingest batch"),
        ):
            try:
                return await ingestor.ingest(
                    data,
                    per_event=headers.get("Myelin-Mode") == "per_event",
                    producer=headers[bus.CALLER] if authenticated else "",
                )
            except BatchRefused as refused:
                sli["outcome"] = "rejected"
                err = BatchRefusedError(refused.message)
                err.code = refused.reason.value
                raise err from None

    return await bus.serve(nc, RPC_INGEST_PUBLISH, handle, queue="ingest", concurrency=16)
