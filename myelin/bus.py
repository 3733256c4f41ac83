"""Publish / consume / request-reply helpers over NATS JetStream.

- Every publish has a timeout and is retried with the same ``Nats-Msg-Id``, so a retry
  after a lost ack is deduplicated by the stream, never stored twice.
- Request-reply carries a typed :class:`Reply`; errors come back as data and are raised
  on the caller's side as :class:`~myelin.errors.RemoteError`.
- Trace context rides in the ``traceparent`` header: every publish carries the caller's
  current trace (a message's own ``traceparent`` wins).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError, TooManyStalledMsgsError

from myelin import access, nats_identity, telemetry
from myelin.errors import BAD_INPUT, MyelinError, Overloaded, Poison, RemoteError, Retryable
from myelin.settings import Settings
from myelin.subjects import (
    ARTIFACTS_BUCKET,
    StreamSpec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MSG_ID = "Nats-Msg-Id"
#: The header a request handler reads its caller's identity from: set by :func:`serve`
#: from the subject's last token (which the server lets only that identity publish to);
#: a caller's own value of it is overwritten.
CALLER = "Myelin-Caller"

_identities: weakref.WeakKeyDictionary[NATS, str] = weakref.WeakKeyDictionary()


def identity_of(nc: NATS) -> str:
    """The identity ``nc`` connected as (``anonymous`` without a credential)."""
    return _identities.get(nc, nats_identity.ANONYMOUS)


def authenticated(nc: NATS) -> bool:
    """Whether the server ``nc`` reached requires every client to authenticate: only then
    does a subject's identity token mean anything (a server that takes anyone lets anyone
    publish under any name, credential or not)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    return identity_of(nc) != nats_identity.ANONYMOUS and bool(info.get("auth_required"))


def auth_options(settings: Settings, identity: str | None = None) -> tuple[str, dict[str, Any]]:
    """The identity a connection takes and the ``nats.connect`` options that prove it
    (:func:`myelin.nats_identity.resolve`)."""
    cred = nats_identity.resolve(settings, identity)
    if cred is None:
        return nats_identity.ANONYMOUS, {}
    return cred.identity, {
        "nkeys_seed": str(cred.seed_file),
        "inbox_prefix": nats_identity.inbox_prefix(cred.identity),
    }


def remember_identity(nc: NATS, identity: str) -> NATS:
    _identities[nc] = identity
    return nc


async def connect(
    settings: Settings, name: str, *, reconnect: bool = True, identity: str | None = None
) -> NATS:
    """Connect with unlimited reconnects (services must outlive a NATS restart), as
    ``identity`` when its development credential exists, else as the process's own
    (:mod:`myelin.nats_identity`).

    Connection trouble is logged as one line per event (nats-py's default callback prints
    a traceback for every failed reconnect attempt, twice a second for a whole outage)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats (%s): %s: %s", name, type(exc).__name__, exc)

    async def on_disconnected() -> None:
        log.warning("nats (%s): disconnected; reconnecting", name)

    async def on_reconnected() -> None:
        log.warning("nats (%s): reconnected", name)

    who, auth = auth_options(settings, identity)
    nc = await nats.connect(
        servers(settings),
        **auth,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        name=f"myelin-{name}",
        # 0 would make nats-py retry a refused first connection forever
        max_reconnect_attempts=-1 if reconnect else 1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=reconnect,
    )
    return remember_identity(nc, who)


def servers(settings: Settings) -> list[str]:
    """``MYELIN_NATS_URL`` may name several servers of a cluster, comma-separated; the
    client learns the others from the one it reaches."""
    return [u.strip() for u in settings.nats_url.split(",") if u.strip()]


def jetstream(nc: NATS, settings: Settings) -> JetStreamContext:
    return nc.jetstream(
        timeout=settings.publish_timeout_s, publish_async_max_pending=settings.publish_window
    )


async def ensure_stream(js: JetStreamContext, spec: StreamSpec, replicas: int = 1) -> None:
    """Create the stream, or update it to the spec; safe to call any number of times.
    ``replicas``: copies kept by a JetStream cluster (1 on a single server). An existing
    stream keeps its retention (max age): changing that is governed (the warehouse's
    retention step asks governance first)."""
    config = api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        duplicate_window=spec.duplicate_window_s,
        max_age=spec.max_age_s,
        discard=api.DiscardPolicy.OLD,
        num_replicas=replicas,
    )
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    config.max_age = info.config.max_age
    await js.update_stream(config)


async def provision(js: JetStreamContext, settings: Settings) -> None:
    """Streams, KV buckets and object stores the platform needs (:mod:`myelin.topology`),
    each with ``MYELIN_STREAM_REPLICAS`` copies (3 on a three-node JetStream cluster);
    idempotent."""
    from myelin import topology

    replicas = settings.stream_replicas
    for spec in topology.streams(settings):
        await ensure_stream(js, spec, replicas)
    for b in topology.buckets(settings):
        await provision_kv_bucket(
            js, b.name, history=b.history, replicas=replicas, ttl_s=b.ttl_s, erasable=b.erasable
        )
    try:
        await js.object_store(ARTIFACTS_BUCKET)
    except (NotFoundError, BadRequestError):
        await js.create_object_store(
            bucket=ARTIFACTS_BUCKET, config=api.ObjectStoreConfig(replicas=replicas)
        )
    from myelin.contracts.registry import default_registry
    from myelin.contracts.store import ContractStore

    # The contracts that ship in code are published to the registry (idempotent; a changed
    # built-in version is refused, as any incompatible or conflicting registration is).
    await ContractStore(js).publish(default_registry().specs())


def _kv_stream_config(
    bucket: str, *, history: int = 1, replicas: int = 1, ttl_s: float = 0.0, erasable: bool = False
) -> api.StreamConfig:
    """The stream behind a KV bucket, as nats-py would create it but for two things:
    rollup headers are refused (with them, anyone allowed to write one key could publish
    ``Nats-Rollup: all`` and wipe the whole bucket), and an ``erasable`` bucket lets single
    messages be deleted, securely (what erasing a subject's key needs)."""
    return api.StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        allow_rollup_hdrs=False,
        deny_delete=not erasable,
        deny_purge=False,  # the purge API is the admin's alone (myelin.access)
        discard=api.DiscardPolicy.NEW,
        max_msgs_per_subject=history,
        max_age=ttl_s or None,
        duplicate_window=min(ttl_s, 120.0) if ttl_s else 120.0,
        max_consumers=-1,
        max_msgs=-1,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


async def provision_kv_bucket(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 1,
    replicas: int = 1,
    ttl_s: float = 0.0,
    erasable: bool = False,
) -> None:
    """Create the bucket (:func:`_kv_stream_config`); one made by an earlier build, which
    took rollup headers, is changed to refuse them."""
    config = _kv_stream_config(
        bucket, history=history, replicas=replicas, ttl_s=ttl_s, erasable=erasable
    )
    try:
        info = await js.stream_info(f"KV_{bucket}")
    except NotFoundError:
        await js.add_stream(config)
        return
    if info.config.allow_rollup_hdrs:
        info.config.allow_rollup_hdrs = False
        await js.update_stream(info.config)


async def kv_bucket(
    js: JetStreamContext, bucket: str, history: int = 1, replicas: int = 1, ttl_s: float = 0.0
) -> Any:
    """A KV bucket, created on first use (idempotent across processes); ``provision``
    creates every bucket of the platform first, with the deployment's replicas."""
    try:
        return await js.key_value(bucket)
    except (NotFoundError, BadRequestError):
        await provision_kv_bucket(js, bucket, history=history, replicas=replicas, ttl_s=ttl_s)
        return await js.key_value(bucket)


def decode_request(decoder: msgspec.json.Decoder[T], data: bytes, what: str) -> T:
    """A request body, or a :class:`Poison` error that says what was wrong with it."""
    try:
        return decoder.decode(data or b"{}")
    except BAD_INPUT as exc:
        raise Poison(f"bad {what} request: {exc}") from None


async def kv_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key of a KV bucket, from its stream's subject index in one request.

    nats-py's ``kv.keys()`` uses a watcher that can come back empty under load, which
    would look like "no keys"."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subj[len(prefix) :] for subj in (info.state.subjects or {}))


@dataclass(frozen=True, slots=True)
class OutMsg:
    subject: str
    payload: bytes
    msg_id: str
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class PubResult:
    ok: bool
    duplicate: bool = False
    seq: int = 0
    error: MyelinError | None = None


# JetStream refuses a message whose headers exceed 64 KiB; an asynchronous publish of one
# is never answered, so it would cost a whole publish timeout to find out.
MAX_HEADER_BYTES = 64 * 1024


def _header_bytes(headers: dict[str, str]) -> int:
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())  # NATS/1.0 + k: v CRLF


def _oversized_headers(m: OutMsg, headers: dict[str, str]) -> PublishRefused:
    return PublishRefused(
        f"the headers of a message on {m.subject} are {_header_bytes(headers):,} bytes; "
        f"JetStream takes at most {MAX_HEADER_BYTES:,}",
        subject=m.subject,
    )


class PublishRefused(Poison):
    """JetStream refused a message for what it is: retrying the same message cannot help."""

    code = "publish_refused"


def raise_unless_stored(results: Sequence[PubResult], what: str) -> None:
    """For sinks whose batch is retried by its consumer: a refusal is raised as it is
    (poison: never retried), anything else as :class:`Retryable`."""
    for r in results:
        if not r.ok:
            if isinstance(r.error, Poison):
                raise r.error
            raise Retryable(f"{what} unavailable: {r.error}")


class Publisher:
    """Publishes batches through an async window with timeouts and same-id retries."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self._js = js
        self._timeout = settings.publish_timeout_s
        self._retries = settings.publish_retries

    async def publish_batch(self, msgs: Sequence[OutMsg]) -> list[PubResult]:
        """Publish every message; the result list is aligned with ``msgs``.

        A message whose window slot cannot be had within the timeout gets an
        :class:`Overloaded` result: the caller must push back, nothing is dropped silently.
        """
        futures: dict[asyncio.Future[api.PubAck], int] = {}
        results: list[PubResult | None] = [None] * len(msgs)
        traced = dict(telemetry.inject({MSG_ID: ""}))  # the caller's trace, once per batch
        for i, m in enumerate(msgs):
            traced[MSG_ID] = m.msg_id
            headers = {**traced, **m.headers} if m.headers else dict(traced)
            if m.headers and _header_bytes(headers) > MAX_HEADER_BYTES:
                results[i] = PubResult(ok=False, error=_oversized_headers(m, headers))
                continue
            try:
                fut = await self._js.publish_async(
                    m.subject, m.payload, wait_stall=self._timeout, headers=headers
                )
            except TooManyStalledMsgsError:
                results[i] = PubResult(
                    ok=False, error=Overloaded("JetStream publish window is full", retry_after=1.0)
                )
                continue
            futures[fut] = i
        retry: list[int] = []
        if futures:
            # One wait for the whole window (not one timer per message).
            done, pending = await asyncio.wait(futures, timeout=self._timeout)
            for fut in pending:
                fut.cancel()  # frees its window slot; the message is retried below, same id
                retry.append(futures[fut])
            for fut in done:
                i = futures[fut]
                exc = fut.exception()
                if exc is None:
                    ack = fut.result()
                    results[i] = PubResult(ok=True, duplicate=bool(ack.duplicate), seq=ack.seq or 0)
                else:
                    log.debug("async publish failed, retrying: %r", exc)
                    retry.append(i)
        for i in sorted(retry):
            results[i] = await self._publish_with_retry(msgs[i])
        return [r if r is not None else PubResult(ok=False) for r in results]

    async def publish(self, msg: OutMsg) -> PubResult:
        return await self._publish_with_retry(msg)

    async def _publish_with_retry(self, m: OutMsg) -> PubResult:
        headers = {**telemetry.inject({MSG_ID: m.msg_id}), **(m.headers or {})}
        if _header_bytes(headers) > MAX_HEADER_BYTES:
            return PubResult(ok=False, error=_oversized_headers(m, headers))
        delay = 0.05
        last: Exception | None = None
        for _ in range(self._retries + 1):
            try:
                ack = await self._js.publish(
                    m.subject, m.payload, timeout=self._timeout, headers=headers
                )
                return PubResult(ok=True, duplicate=bool(ack.duplicate), seq=ack.seq or 0)
            except (BadRequestError, nats.errors.MaxPayloadError) as exc:
                # Refused for what the message is (e.g. headers over 64 KiB, a payload over
                # max_payload): the same message is refused every time.
                return PubResult(
                    ok=False,
                    error=PublishRefused(
                        f"JetStream refused the message on {m.subject}: {exc}",
                        subject=m.subject,
                        bytes=len(m.payload),
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - transient: timeout, reconnect, no responders
                last = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return PubResult(
            ok=False, error=Overloaded(f"publish failed after retries: {last!r}", retry_after=2.0)
        )


# ---------------------------------------------------------------- request-reply


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    details: dict[str, Any] = {}


class Reply(msgspec.Struct, frozen=True, omit_defaults=True):
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: ErrorBody | None = None


_reply_decoder = msgspec.json.Decoder(Reply)
_json = msgspec.json.Encoder()

Handler = Callable[[bytes, dict[str, str]], Awaitable[Any]]


async def serve(
    nc: NATS, subject: str, handler: Handler, *, queue: str = "", concurrency: int = 1
) -> Any:
    """Answer requests on ``subject`` with ``handler``; errors become typed replies.

    Requests arrive on ``<subject>.<caller identity>``; the handler finds the caller in
    its headers under :data:`CALLER`.

    Up to ``concurrency`` requests are handled at once; past that a request is answered
    at once with a typed ``overloaded`` error (``retry_after``), so back-pressure reaches the
    caller instead of piling up in client memory (the subscription's buffer is bounded too).
    """
    inflight: set[asyncio.Task[None]] = set()

    # On a server without authentication nobody is authenticated: every caller is let in,
    # as anonymous (the subject's token is only a claim there).
    enforce = authenticated(nc)
    refusals: set[asyncio.Task[None]] = set()

    def caller_of(msg: Msg) -> str:
        return msg.subject.rsplit(".", 1)[-1] if enforce else nats_identity.ANONYMOUS

    async def handle(msg: Msg) -> None:
        headers = dict(msg.headers or {})
        headers[CALLER] = caller_of(msg)
        with telemetry.tracer("myelin.bus").start_as_current_span(
            subject, context=telemetry.extract(headers)
        ):
            try:
                result = await handler(msg.data, headers)
                body = Reply(ok=True, result=msgspec.Raw(_json.encode(result)))
            except MyelinError as exc:
                body = Reply(ok=False, error=ErrorBody(exc.code, exc.message, dict(exc.details)))
            except Exception as exc:
                log.exception("handler for %s failed", subject)
                body = Reply(ok=False, error=ErrorBody("internal", f"{type(exc).__name__}: {exc}"))
        if msg.reply:
            data = _json.encode(body)
            if len(data) > nc.max_payload:
                # The server would drop it and the caller would only see a timeout.
                data = _json.encode(
                    Reply(
                        ok=False,
                        error=ErrorBody(
                            "reply_too_large",
                            f"the reply to {subject} is {len(data):,} bytes; NATS carries at most "
                            f"{nc.max_payload:,}: ask for less (e.g. add a LIMIT)",
                            {"bytes": len(data), "max_payload": nc.max_payload},
                        ),
                    )
                )
            await msg.respond(data)

    async def refuse(msg: Msg, caller: str) -> None:
        # answered at once, before taking a slot: refused callers cannot crowd out the
        # rightful ones; the audit record is written on the side (a flood of refusals is
        # recorded up to a bound, then counted in the log, never waited on)
        exc = Forbidden(
            f"identity {caller!r} may not call {subject}", caller=caller, endpoint=subject
        )
        if msg.reply:
            await msg.respond(
                _json.encode(
                    Reply(ok=False, error=ErrorBody(exc.code, exc.message, dict(exc.details)))
                )
            )
        if len(refusals) < MAX_PENDING_REFUSAL_AUDITS:
            task = asyncio.create_task(audit_refusal(nc, caller, subject))
            refusals.add(task)
            task.add_done_callback(refusals.discard)
        else:
            log.warning("refused %s to %s; too many refusals to audit each", subject, caller)

    async def on_msg(msg: Msg) -> None:
        if enforce:
            caller = caller_of(msg)
            if not access.may_call(caller, subject):
                await refuse(msg, caller)
                return
        if concurrency <= 1:
            await handle(msg)
            return
        if len(inflight) >= concurrency:
            busy = Overloaded(f"{subject}: {concurrency} requests in progress", retry_after=0.25)
            if msg.reply:
                await msg.respond(
                    _json.encode(
                        Reply(
                            ok=False, error=ErrorBody(busy.code, busy.message, dict(busy.details))
                        )
                    )
                )
            return
        task = asyncio.create_task(handle(msg))
        inflight.add(task)
        task.add_done_callback(inflight.discard)

    sub = await nc.subscribe(
        f"{subject}.*",
        queue=queue,
        cb=on_msg,
        pending_msgs_limit=10_000,
        pending_bytes_limit=256 * 1024 * 1024,
    )
    await nc.flush()  # the server knows the subscription before we report ready
    return sub


MAX_PENDING_REFUSAL_AUDITS = 64


class Forbidden(MyelinError):
    """The caller's identity may not use this endpoint (:mod:`myelin.access`)."""

    code = "forbidden"


async def audit_refusal(
    nc: NATS,
    caller: str,
    endpoint: str,
    *,
    action: str = access.FORBIDDEN_ACTION,
    reason: str = "",
) -> None:
    """An audit record of a refused request (a refusal is never silent): ``forbidden``
    (an identity that may not) or ``unauthenticated`` (no identity at all). The refusal
    stands if the audit trail is down; that is logged."""
    from myelin.audit import platform_record  # myelin.audit publishes through this module

    record = platform_record(
        action,
        endpoint,
        [reason or f"identity {caller!r} may not call {endpoint}"],
        {"caller": caller, "endpoint": endpoint},
    )
    try:
        await nc.jetstream().publish(
            f"myelin.audit.{record.action}",
            msgspec.msgpack.encode(record),
            timeout=2.0,
            headers={MSG_ID: f"audit-{record.decision_id}"},
        )
    except Exception as exc:  # noqa: BLE001 - the refusal is what matters to the caller
        log.warning(
            "refused %s to %s, but its audit record was not stored: %r", endpoint, caller, exc
        )


def caller_subject(nc: NATS, subject: str) -> str:
    """Where a request to the endpoint ``subject`` from ``nc`` goes."""
    return f"{subject}.{identity_of(nc)}"


async def request(nc: NATS, subject: str, payload: Any, *, timeout: float = 5.0) -> msgspec.Raw:
    """Send a request and return the raw JSON result, or raise :class:`RemoteError`.
    It goes to ``<subject>.<this connection's identity>`` (see :func:`serve`)."""
    subject = caller_subject(nc, subject)
    data = payload if isinstance(payload, bytes) else _json.encode(payload)
    headers = dict(telemetry.inject({}))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.02
    while True:
        # No responders is retried until the timeout: a service that is starting or
        # restarting (or whose subscription is not yet seen) answers moments later.
        left = deadline - loop.time()
        try:
            msg = await nc.request(subject, data, timeout=max(left, 0.001), headers=headers)
            break
        except nats.errors.NoRespondersError:
            if loop.time() + pause >= deadline:
                raise Retryable(
                    f"no service answers on {subject}; is it running?", subject=subject
                ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            raise Retryable(
                f"{subject} did not answer within {timeout}s", subject=subject
            ) from None
    reply = _reply_decoder.decode(msg.data)
    if not reply.ok:
        err = reply.error or ErrorBody("unknown", "error reply without body")
        raise RemoteError(err.code, err.message, **err.details)
    return reply.result
