"""Identity and permissions on NATS, as ``myelin up`` runs it (security on by default).

- a client without a credential is refused at the door;
- every endpoint that changes state refuses a caller whose identity may not use it, with
  a ``forbidden`` reply and an audit record naming the caller and the endpoint;
- a compromised ingest credential can neither read features nor move or add a model, nor
  answer or read other identities' requests: the server refuses each attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import msgspec
import nats
import nats.errors
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.client import Client as NATS

from myelin import access, bus, grpc_client, nats_identity, online, redis_users
from myelin.api_tokens import TOKEN_IDENTITIES, client_token
from myelin.contracts.envelope import StreamEvent
from myelin.errors import RemoteError
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.grpc_client import ca_file
from myelin.models import ModelRegistry, card_digest
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from myelin.subjects import (
    EVENTS_STREAM,
    FEATURES_STREAM,
    MODELS_BUCKET,
    RPC_FEATURES_CHECK,
    RPC_FEATURES_ERASE,
    RPC_FEATURES_REPLAY,
    RPC_FEATURES_VIEWS,
    RPC_GOVERNANCE_DECIDE,
    RPC_GOVERNANCE_ERASE,
    RPC_GOVERNANCE_PROMOTE,
    RPC_GOVERNANCE_ROLLBACK,
    RPC_GOVERNANCE_ROUTES,
    RPC_INGEST_PUBLISH,
    RPC_WAREHOUSE_ERASE,
    RPC_WAREHOUSE_QUERY,
    RPC_WAREHOUSE_REWIND,
)
from tests.helpers import audit_records

pytestmark = pytest.mark.e2e

# every endpoint that changes state (or reads what only some may read), with a request
# its rightful caller could send, and an identity that may not call it
ATTEMPTS: list[tuple[str, dict[str, object], str]] = [
    (RPC_INGEST_PUBLISH, {"events": []}, "inference"),
    (RPC_GOVERNANCE_DECIDE, {"action": "serve", "subject": "x", "input": {}}, "producer"),
    (RPC_GOVERNANCE_PROMOTE, {"name": "ctr", "alias": "champion", "version": 1}, "ingest"),
    (RPC_GOVERNANCE_ROUTES, {"name": "ctr", "canary": 1, "canary_share": 0.5}, "producer"),
    (RPC_GOVERNANCE_ROLLBACK, {"name": "ctr"}, "retrainer"),
    (RPC_WAREHOUSE_REWIND, {"from_seq": 1}, "producer"),
    (RPC_WAREHOUSE_QUERY, {"sql": "SELECT 1"}, "ingest"),
    (RPC_FEATURES_REPLAY, {"requester": "x"}, "inference"),
    (RPC_FEATURES_VIEWS, {"op": "register", "view": "x"}, "ingest"),
    (RPC_FEATURES_CHECK, {}, "producer"),
    (RPC_GOVERNANCE_ERASE, {"subject": "u1", "reason": "DSR-1"}, "producer"),
    (RPC_FEATURES_ERASE, {"subject": "u1"}, "operator"),  # only through governance
    (RPC_WAREHOUSE_ERASE, {"subject": "u1"}, "operator"),
]


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    services = ("governance", "warehouse", "features", "ingest")
    async with Stack(settings, log=lambda _m: None, services=services) as s:
        yield s


class Client:
    """A connection as one identity, keeping what the server said to it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, settings: Settings, identity: str) -> NATS:
        seed = nats_identity.dev_seed_file(settings, identity)

        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = bus.remember_identity(
            await nats.connect(
                settings.nats_url,
                nkeys_seed=str(seed),
                inbox_prefix=nats_identity.inbox_prefix(identity),
                allow_reconnect=False,
                error_cb=on_error,
            ),
            identity,
        )
        return self.nc

    async def refused(self, what: str) -> bool:
        """Whether the server reported a permissions violation on a subject that starts
        with ``what`` (nats-py reports it in lower case)."""
        for _ in range(50):
            if any(
                f'permissions violation for {how} to "{what.lower()}' in e
                for e in self.errors
                for how in ("publish", "subscription")
            ):
                return True
            await asyncio.sleep(0.05)
        return False


@contextlib.asynccontextmanager
async def as_identity(settings: Settings, identity: str) -> AsyncIterator[Client]:
    c = Client()
    await c.connect(settings, identity)
    try:
        yield c
    finally:
        assert c.nc is not None
        with contextlib.suppress(nats.errors.Error):
            await c.nc.close()


async def _refused_connect(url: str, **options: Any) -> str:
    """The error a refused connection ends with (nats-py leaves its socket open then)."""
    nc = NATS()

    async def quiet(_exc: Exception) -> None:
        pass

    try:
        await nc.connect(
            url, allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet, **options
        )
    except nats.errors.Error as exc:
        return str(exc)
    finally:
        await nc.close()
    raise AssertionError("the server let an unauthenticated client in")


async def test_a_client_without_credentials_is_refused_and_credentials_are_private(
    stack: Stack,
) -> None:
    s = stack.settings
    assert "authorization violation" in (await _refused_connect(s.nats_url)).lower()
    # a seed the server does not know is refused the same way
    stranger = s.state_dir / "stranger.nk"
    nats_identity.write_private(stranger, nats_identity.new_seed())
    refusal = await _refused_connect(s.nats_url, nkeys_seed=str(stranger))
    assert "authorization violation" in refusal.lower()
    # both refusals are on the audit trail (governance hears the server's advisories)
    for _ in range(100):
        nats_door = [
            r for r in await audit_records(s, access.UNAUTHENTICATED_ACTION) if r.subject == "nats"
        ]
        if len(nats_door) >= 2:
            break
        await asyncio.sleep(0.1)
    assert len(nats_door) == 2, nats_door
    assert all("was refused" in r.reasons[0] and not r.allow for r in nats_door)
    assert {msgspec.json.decode(r.input_json)["host"] for r in nats_door} == {"127.0.0.1"}
    # and what proves an identity is its owner's to read
    root = nats_identity.security_dir(stack.settings)
    assert (root / "nats").stat().st_mode & 0o777 == 0o700
    for identity in access.DEV_IDENTITIES:
        path = nats_identity.dev_seed_file(stack.settings, identity)
        assert path.stat().st_mode & 0o777 == 0o600, path
    conf = stack.settings.state_dir / "nats" / "nats.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    text = conf.read_text()
    assert "authorization" in text
    for identity in access.DEV_IDENTITIES:  # public keys only, never a seed
        seed = nats_identity.dev_seed_file(stack.settings, identity).read_text().strip()
        assert seed.startswith("SU") and seed not in text
        assert nats_identity.public_key(seed.encode()) in text


async def test_every_mutating_endpoint_refuses_the_wrong_identity_and_audits_it(
    stack: Stack,
) -> None:
    s = stack.settings
    for endpoint, body, identity in ATTEMPTS:
        assert not access.may_call(identity, endpoint), (endpoint, identity)
        async with as_identity(s, identity) as c:
            assert c.nc is not None
            with pytest.raises(RemoteError) as err:
                await bus.request(c.nc, endpoint, body, timeout=10.0)
            assert err.value.code == "forbidden", (endpoint, err.value)
            assert err.value.message == f"identity {identity!r} may not call {endpoint}"
    # the retrainer may list views, not change them
    async with as_identity(s, "retrainer") as c:
        assert c.nc is not None
        with pytest.raises(RemoteError) as err:
            await bus.request(c.nc, RPC_FEATURES_VIEWS, {"op": "register"}, timeout=10.0)
        assert err.value.code == "forbidden"
        assert "may not call myelin.rpc.features.views (register)" in err.value.message
    records = await audit_records(s, access.FORBIDDEN_ACTION)
    seen = {(msgspec.json.decode(r.input_json)["caller"], r.subject) for r in records}
    for endpoint, _body, identity in ATTEMPTS:
        assert (identity, endpoint) in seen, f"no audit record of {identity} at {endpoint}"
    assert all(not r.allow for r in records)
    # the same door, the right identity: an answer, not a refusal
    async with as_identity(stack.settings, access.OPERATOR) as c:
        assert c.nc is not None
        result = msgspec.json.decode(
            await bus.request(c.nc, RPC_FEATURES_VIEWS, {"op": "list"}, timeout=10.0)
        )
        assert isinstance(result, dict | list)


async def test_a_compromised_ingest_credential_cannot_read_features_or_move_a_model(
    stack: Stack,
) -> None:
    s = stack.settings
    async with as_identity(s, "ingest") as c:
        nc = c.nc
        assert nc is not None
        js = nc.jetstream(timeout=1.0)
        # read the feature values: no message read, no consumer on the stream
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
            await js.get_last_msg(FEATURES_STREAM, "myelin.features.>")
        assert await c.refused(f"$JS.API.STREAM.MSG.GET.{FEATURES_STREAM}"), c.errors
        with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
            await js.pull_subscribe("myelin.features.>", stream=FEATURES_STREAM)
        assert await c.refused(f"$JS.API.CONSUMER.CREATE.{FEATURES_STREAM}")
        # move a model: neither its aliases nor its routes, nor a new version
        for key in ("ctr.aliases", "ctr.routes", "ctr.v99"):
            subject = f"$KV.{MODELS_BUCKET}.{key}"
            with pytest.raises((nats.errors.TimeoutError, nats.errors.Error)):
                await js.publish(subject, b'{"champion": 99}')
            assert await c.refused(subject), subject
        # nor through the registry owner (refused and audited, as above)
        with pytest.raises(RemoteError) as err:
            await bus.request(
                nc, RPC_GOVERNANCE_PROMOTE, {"name": "ctr", "alias": "champion", "version": 1}
            )
        assert err.value.code == "forbidden"
        # pose as another identity: its requests, its replies, its endpoints
        await nc.publish(f"{RPC_GOVERNANCE_PROMOTE}.operator", b"{}")
        assert await c.refused(f"{RPC_GOVERNANCE_PROMOTE}.operator")
        await nc.subscribe(f"{RPC_GOVERNANCE_PROMOTE}.*")
        assert await c.refused(f"{RPC_GOVERNANCE_PROMOTE}.*")
        await nc.subscribe("_INBOX_operator.>")
        assert await c.refused("_INBOX_operator.>")
    # what it may do, it still does: read the contracts it validates against
    async with as_identity(s, "ingest") as c:
        assert c.nc is not None
        assert await bus.kv_keys(c.nc.jetstream(timeout=5.0), "myelin_contracts")


async def test_redis_lets_in_only_its_acl_users_each_with_its_own_rights(stack: Stack) -> None:
    """The online store: nobody without a Redis credential (ingest, a stranger) gets in;
    inference may read it but not write it; features writes it (the stack is ready, so
    the features service authenticated)."""
    s = stack.settings
    conf = s.state_dir / "redis" / "redis.conf"
    assert conf.stat().st_mode & 0o777 == 0o600
    assert "user default off" in conf.read_text()
    for identity in redis_users.RULES:
        password = redis_users.dev_password_file(s, identity).read_text().strip()
        assert password not in conf.read_text()  # its SHA-256 only
    # no credential: ingest has none, and the default user is off
    assert not redis_users.dev_password_file(s, "ingest").exists()
    assert redis_users.client_url(s, "ingest") == s.redis_url
    anonymous = aioredis.Redis.from_url(s.redis_url)
    try:
        with pytest.raises(redis.exceptions.RedisError, match=r"(?i)auth"):
            await anonymous.hgetall(online.view_key("user_activity"))
    finally:
        await anonymous.aclose()
    admin = aioredis.Redis.from_url(redis_users.client_url(s, "admin"))
    reader = aioredis.Redis.from_url(redis_users.client_url(s, "inference"))
    writer = aioredis.Redis.from_url(redis_users.client_url(s, "features"))
    try:
        await admin.hset("acl-probe", "k", "v")
        assert await reader.hget("acl-probe", "k") == b"v"  # inference reads
        with pytest.raises(redis.exceptions.NoPermissionError):
            await reader.hset("acl-probe", "k", "overwritten")  # but never writes
        with pytest.raises(redis.exceptions.NoPermissionError):
            await reader.delete("acl-probe")
        for command in (("CLIENT", "LIST"), ("CLIENT", "PAUSE", "10")):  # nor stall the writer
            with pytest.raises(redis.exceptions.NoPermissionError):
                await reader.execute_command(*command)  # type: ignore[no-untyped-call]
        await writer.hset("acl-probe", "k", "w")  # features writes
        with pytest.raises(redis.exceptions.NoPermissionError):
            await writer.config_get("*")  # but does not administer
        assert await admin.hget("acl-probe", "k") == b"w"
    finally:
        await admin.delete("acl-probe")
        for c in (admin, reader, writer):
            await c.aclose()


def test_permissions_cover_every_identity() -> None:
    s = Settings(state_dir=Path("/nonexistent"))
    for identity in access.DEV_IDENTITIES:
        g = access.grants(identity, s)
        assert g.subscribe, identity
        if identity not in ("admin", "governance", access.AUTH_AUDIT):
            assert f"$KV.{MODELS_BUCKET}.*.aliases" in g.publish_deny, identity
    with pytest.raises(ValueError, match="no permissions"):
        access.grants("mallory", s)
    # every endpoint with callers is tried by the refusal test (a new one cannot be missed)
    assert {endpoint for endpoint, _body, _who in ATTEMPTS} == set(access.ENDPOINT_CALLERS)


# ------------------------------------------------------------ the HTTP and gRPC doors


@pytest.fixture
async def doors(settings: Settings) -> AsyncIterator[Stack]:
    async with Stack(
        settings, log=lambda _m: None, services=("governance", "ingest", "inference")
    ) as s:
        yield s


def _click(event_id: str) -> dict[str, object]:
    return {
        "event_id": event_id,
        "type": "click",
        "schema_version": 1,
        "event_time": int(time.time() * 1000) - 1000,
        "producer_id": "mallory",  # what the body claims; the token says otherwise
        "data": {"user_id": "u1", "item_id": "i1"},
    }


async def test_http_ingest_needs_a_producer_token_and_stamps_its_identity(doors: Stack) -> None:
    s = doors.settings
    url = f"http://127.0.0.1:{s.ingest_http_port}/v1/events"
    tokens = {i: client_token(s, i) for i in TOKEN_IDENTITIES}
    async with aiohttp.ClientSession() as http:
        for headers, status, error in (
            ({}, 401, "unauthenticated"),
            ({"Authorization": "Bearer not-a-token"}, 401, "unauthenticated"),
            ({"Authorization": f"Basic {tokens['producer']}"}, 401, "unauthenticated"),
            ({"Authorization": f"Bearer {tokens['app']}"}, 403, "forbidden"),
        ):
            async with http.post(url, json=[_click("refused-1")], headers=headers) as r:
                body = await r.json()
                assert (r.status, body["error"]) == (status, error), (headers, body)
                if status == 401:
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "Authorization: Bearer <token>" in body["message"]
        ok = {"Authorization": f"Bearer {tokens['producer']}"}
        async with http.post(url, json=[_click("stamped-1")], headers=ok) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["accepted"] == 1
    unauthenticated = await audit_records(s, access.UNAUTHENTICATED_ACTION)
    assert len([r for r in unauthenticated if r.subject == "POST /v1/events"]) == 3
    forbidden = await audit_records(s, access.FORBIDDEN_ACTION)
    assert any(msgspec.json.decode(r.input_json)["caller"] == "app" for r in forbidden)
    # nothing refused was stored; the accepted event carries the token's producer
    nc = await bus.connect(s, "test-events", reconnect=False, identity=access.ADMIN)
    try:
        sub = await nc.jetstream().pull_subscribe("myelin.events.>", stream=EVENTS_STREAM)
        stored = [
            e
            for m in await sub.fetch(10, timeout=5)
            for e in msgspec.msgpack.decode(m.data, type=list[StreamEvent])
        ]
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert [(e.event_id, e.producer_id) for e in stored] == [("stamped-1", "producer")]


async def test_grpc_needs_tls_and_an_application_token(doors: Stack) -> None:
    s = doors.settings
    target = f"127.0.0.1:{s.inference_grpc_port}"
    ca = ca_file(s)
    assert ca is not None
    # plaintext to a TLS port: no answer at all
    async with grpc.aio.insecure_channel(target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await oip_grpc.GRPCInferenceServiceStub(ch).ServerMetadata(
                oip.ServerMetadataRequest(), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    async with grpc.aio.secure_channel(target, tls) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        # probes need no token, as a load balancer sends none
        assert (await stub.ServerLive(oip.ServerLiveRequest(), timeout=5)).live
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in (err.value.details() or "")
        producer = (("authorization", f"Bearer {client_token(s, 'producer')}"),)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=5, metadata=producer)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (
            "identity 'producer' may not call /inference.GRPCInferenceService/ServerMetadata"
        )
    # the application's channel (TLS, its token on every call) gets answers
    async with grpc_client.channel(s) as ch:
        meta = await oip_grpc.GRPCInferenceServiceStub(ch).ServerMetadata(
            oip.ServerMetadataRequest(), timeout=5
        )
        assert meta.name
    methods = {r.subject for r in await audit_records(s, access.UNAUTHENTICATED_ACTION)}
    assert "/inference.GRPCInferenceService/ServerMetadata" in methods
    callers = {
        (msgspec.json.decode(r.input_json)["caller"], r.subject)
        for r in await audit_records(s, access.FORBIDDEN_ACTION)
    }
    assert ("producer", "/inference.GRPCInferenceService/ServerMetadata") in callers


async def test_a_card_rewritten_after_approval_is_not_served(settings: Settings) -> None:
    """The operator may add model versions, not change what governance approved: a
    version card rewritten after its promotion (here, a better AUC claimed) is refused
    by inference, whatever the serve policy would say of the new card."""
    from tests.helpers import register, tiny_model

    async with Stack(settings, log=lambda _m: None, services=("governance", "inference")) as stack:
        nc = await bus.connect(settings, "test")  # the operator
        try:
            version = await register(nc, settings, tiny_model())
            reg = ModelRegistry(nc, bus.jetstream(nc, settings))
            mv = await reg.get("ctr", version)
            assert (await reg.approved("ctr")) == {version: card_digest(mv)}
            forged = msgspec.structs.replace(mv, metrics={**mv.metrics, "auc": 0.99})
            kv = await nc.jetstream().key_value(MODELS_BUCKET)
            await kv.put(f"ctr.v{version}", msgspec.json.encode(forged))  # allowed: a card
        finally:
            await nc.close()
        await stack.restart_service("inference")  # it reads the card again
        async with grpc_client.channel(settings) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await oip_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
                    oip.ModelMetadataRequest(name="ctr"), timeout=10
                )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        assert "changed after governance approved it" in (err.value.details() or "")
