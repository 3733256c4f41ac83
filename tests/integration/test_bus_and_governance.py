from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.errors import RemoteError, Retryable
from myelin.records import AuditRecord
from myelin.settings import Settings
from myelin.subjects import AUDIT_STREAM, EVENTS_STREAM, RPC_GOVERNANCE_DECIDE
from services.governance.app import GovernanceApp
from services.governance.logic import policy_version
from services.governance.policy_engines import RegoEngine, load_policies

pytestmark = pytest.mark.integration


async def test_provision_is_idempotent_and_publish_dedupes(nc: NATS, settings: Settings) -> None:
    js = bus.jetstream(nc, settings)
    await bus.provision(js, settings)  # second time: no error
    info = await js.stream_info(EVENTS_STREAM)
    assert info.config.duplicate_window == settings.duplicate_window_s
    pub = bus.Publisher(js, settings)
    msgs = [bus.OutMsg("myelin.events.0", b"x", f"id-{i}") for i in range(10)]
    first = await pub.publish_batch(msgs)
    again = await pub.publish_batch(msgs)
    assert all(r.ok and not r.duplicate for r in first)
    assert all(r.ok and r.duplicate for r in again)
    assert (await js.stream_info(EVENTS_STREAM)).state.messages == 10


async def test_request_without_responder_is_retryable(nc: NATS) -> None:
    with pytest.raises(Retryable, match="no service answers"):
        await bus.request(nc, "myelin.rpc.nobody", {}, timeout=1)


async def test_a_reply_too_large_for_nats_is_a_typed_error_not_a_timeout(nc: NATS) -> None:
    """On main the server dropped the reply (MaxPayloadError, in the responder's log only)
    and the caller waited out its timeout: `myelin sql` with a large result timed out."""

    async def huge(_data: bytes, _headers: dict[str, str]) -> str:
        return "x" * (nc.max_payload + 1)

    sub = await bus.serve(nc, "myelin.rpc.test.huge", huge)
    try:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(RemoteError) as err:
            await bus.request(nc, "myelin.rpc.test.huge", {}, timeout=20)
        assert asyncio.get_running_loop().time() - t0 < 5
        assert err.value.code == "reply_too_large" and "LIMIT" in err.value.message
    finally:
        await sub.unsubscribe()


async def test_a_jetstream_refusal_is_permanent_not_retried(nc: NATS, settings: Settings) -> None:
    """A message JetStream refuses for what it is (headers over 64 KiB) comes back as a
    poison result at once, instead of a retryable one after every retry."""
    pub = bus.Publisher(bus.jetstream(nc, settings), settings)
    t0 = asyncio.get_running_loop().time()
    [result] = await pub.publish_batch(
        [bus.OutMsg("myelin.events.0", b"x", "big-header", {"X-Big": "y" * 70_000})]
    )
    assert not result.ok and isinstance(result.error, bus.PublishRefused)
    assert asyncio.get_running_loop().time() - t0 < 2
    with pytest.raises(bus.PublishRefused):
        bus.raise_unless_stored([result], "EVENTS")


@pytest.mark.parametrize(
    ("package", "doc", "allow", "reason"),
    [
        (
            "myelin.serve",
            {
                "model": {
                    "provenance": {"training_window": [1, 2], "feature_views": ["v@h"]},
                    "metrics": {"auc": 0.7},
                    "labels": {},
                }
            },
            True,
            None,
        ),
        (
            "myelin.serve",
            {
                "model": {
                    "provenance": {"training_window": [1, 2], "feature_views": ["v@h"]},
                    "metrics": {"auc": 0.51},
                    "labels": {},
                }
            },
            False,
            "below the serving floor",
        ),
        (
            "myelin.serve",
            {"model": {"provenance": {}, "metrics": {"auc": 0.9}, "labels": {}}},
            False,
            "no provenance",
        ),
        (
            "myelin.promote",
            {"alias": "gold", "model": {"metrics": {"auc": 0.9}}},
            False,
            "unknown alias gold",
        ),
        (
            "myelin.promote",
            {"alias": "champion", "model": {"metrics": {"auc": 0.55}}},
            False,
            "at least 0.6",
        ),
        ("myelin.backfill", {"requester": "ops", "range_days": 3}, True, None),
        ("myelin.backfill", {"requester": "", "range_days": 3}, False, "needs a requester"),
        ("myelin.pii_read", {"role": "privacy_officer", "purpose": ""}, False, "stated purpose"),
        ("myelin.pii_read", {"role": "analyst", "purpose": "x"}, False, "role analyst"),
        (
            "myelin.serve_view",
            {"requester": "ops", "lag_messages": 3, "behind_served_messages": 0},
            True,
            None,
        ),
        (
            "myelin.serve_view",
            {"requester": "ops", "lag_messages": 5000, "behind_served_messages": 4990},
            False,
            "5000 messages behind the stream",
        ),
        (
            "myelin.serve_view",
            {"requester": "", "lag_messages": 0, "behind_served_messages": 0},
            False,
            "needs a requester",
        ),
    ],
)
async def test_rego_policies(
    settings: Settings, package: str, doc: dict[str, object], allow: bool, reason: str | None
) -> None:
    sources = load_policies(settings.policy_dir)
    engine = RegoEngine(sources, policy_version(sources))
    result = await engine.evaluate(package, doc)
    assert result["allow"] is allow
    if reason:
        assert any(reason in r for r in result["reasons"]), result


async def test_governance_service_decides_and_audits(nc: NATS, settings: Settings) -> None:
    app = GovernanceApp(settings)
    await app.start()
    try:
        req = {
            "action": "backfill",
            "subject": "user_activity",
            "input": {"range_days": 400},
            "trace_id": "ab" * 16,
        }
        first = msgspec.json.decode(await bus.request(nc, RPC_GOVERNANCE_DECIDE, req))
        second = msgspec.json.decode(await bus.request(nc, RPC_GOVERNANCE_DECIDE, req))
        assert first["allow"] is False
        assert sorted(first["reasons"]) == [
            "backfill needs a requester",
            "backfill ranges are limited to 90 days",
        ]
        assert first["cached"] is False and second["cached"] is True
        with pytest.raises(RemoteError) as err:
            await bus.request(
                nc, RPC_GOVERNANCE_DECIDE, {"action": "launch", "subject": "x", "input": {}}
            )
        assert err.value.code == "poison"
        js = bus.jetstream(nc, settings)
        for _ in range(50):
            if (await js.stream_info(AUDIT_STREAM)).state.messages >= 2:
                break
            await asyncio.sleep(0.05)
        sub = await js.pull_subscribe("myelin.audit.>", stream=AUDIT_STREAM)
        msgs = await sub.fetch(10, timeout=2)
        records = [msgspec.msgpack.decode(m.data, type=AuditRecord) for m in msgs]
        assert [r.decision_id for r in records] == [first["decision_id"], second["decision_id"]]
        assert records[0].policy_version == app.status()["policy_version"]
        assert records[0].trace_id == "ab" * 16
        assert '"range_days":400' in records[0].input_json
    finally:
        await app.stop()
