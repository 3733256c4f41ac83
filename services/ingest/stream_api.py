"""Inbound adapter: raw events published straight to ``myelin.ingest.<producer>`` by any
NATS client (a JSON event or a JSON array per message). They get the same validation,
tokenization and dead-lettering as the HTTP and request-reply paths; the producer's
JetStream ack means the event is safely in the inbox stream."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg

from myelin.errors import Overloaded
from myelin.subjects import ingest_subject
from services.ingest.ingestor import Ingestor
from services.ingest.logic import BatchRefused, parse_batch


def inbox_handler(
    ingestor: Ingestor, authenticated: bool
) -> Callable[[list[Msg]], Awaitable[None]]:
    """``authenticated``: the server lets a producer publish only to its own subject, so
    the subject's last token names the producer (else each envelope's ``producer_id``)."""

    async def handle(msgs: list[Msg]) -> None:
        by_producer: dict[str, list[Msg]] = {}
        for m in msgs:
            producer = m.subject[len(INGEST_PREFIX) :].split(".", 1)[0] if authenticated else ""
            by_producer.setdefault(producer, []).append(m)
        for producer, group in by_producer.items():
            await _ingest(group, producer)

    async def _ingest(msgs: list[Msg], producer: str) -> None:
        items: list[msgspec.Raw] = []
        for m in msgs:
            body = m.data.strip()
            if body[:1] == b"{":
                body = b"[" + body + b"]"
            try:
                items += parse_batch(body, ingestor.validator.limits)
            except BatchRefused as refused:
                # dead-lettered, with its reason; the inbox message is done
                await ingestor.reject_batch(body, refused)
        if not items:
            return
        result = await ingestor.ingest_items(items, per_event=True, producer=producer)
        if result.retry:  # JetStream pushed back: the PullLoop retries this batch, in order
            raise Overloaded(
                f"{result.retry} events not stored yet", retry_after=result.retry_after_s
            )

    return handle


INGEST_PREFIX = ingest_subject("")
