"""The right to be forgotten, on a stack as ``myelin up`` runs it: after one erasure request
the subject's PII tokens in the immutable streams can no longer be opened (its key is
overwritten on disk), its online state is gone from Redis (and from Redis's append-only
file), its rows are gone from every ClickHouse table, and the erasure is audited without
naming the subject. Another subject's data is untouched throughout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from myelin import access, bus, redis_users, sql_client
from myelin.api_tokens import client_headers
from myelin.errors import RemoteError
from myelin.online import PREFIX
from myelin.pii import load_tokenizer
from myelin.settings import Settings
from myelin.stack.supervisor import Stack
from myelin.subject_keys import STREAM, SubjectKeys, key_name, open_token
from myelin.subjects import RPC_GOVERNANCE_ERASE, RPC_WAREHOUSE_QUERY
from tests.helpers import audit_records, wait_caught_up

pytestmark = pytest.mark.e2e
GONE, KEPT = "u-forget-me", "u-keep-me"
EMAIL = {GONE: "forget.me@mail.example", KEPT: "keep.me@mail.example"}


def _events(now: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for user in (GONE, KEPT):
        for i in range(3):
            out.append(
                {
                    "event_id": f"{user}-p{i}",
                    "type": "purchase",
                    "schema_version": 2,
                    "event_time": now - 60_000 + i,
                    "data": {
                        "user_id": user,
                        "item_id": f"i{i}",
                        "amount": 5.0 + i,
                        "email": EMAIL[user],
                    },
                }
            )
            out.append(
                {
                    "event_id": f"{user}-c{i}",
                    "type": "click",
                    "schema_version": 1,
                    "event_time": now - 50_000 + i,
                    "data": {"user_id": user, "item_id": f"i{i}"},
                }
            )
        # rejected (a negative amount): dead-lettered with the subject's id in its payload
        out.append(
            {
                "event_id": f"{user}-bad",
                "type": "purchase",
                "schema_version": 2,
                "event_time": now - 40_000,
                "data": {"user_id": user, "item_id": "i", "amount": "lots", "email": EMAIL[user]},
            }
        )
    return out


def _files_with(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def _rows(nc: Any, subject: str) -> dict[str, int]:
    q = (
        f"SELECT (SELECT count() FROM myelin.events WHERE entity_id = '{subject}') AS events, "
        f"(SELECT count() FROM myelin.feature_values WHERE entity_id = '{subject}') AS fv, "
        f"(SELECT count() FROM myelin.dead_letters WHERE position(payload, '\"{subject}\"') > 0)"
        " AS dlq"
    )
    [row] = await sql_client.query_rows(nc, q)
    return {k: int(v) for k, v in row.items()}


async def _read(nc: Any, sql: str, *, purpose: str) -> list[dict[str, Any]]:
    raw = await bus.request(
        nc, RPC_WAREHOUSE_QUERY, {"sql": sql, "reveal_pii": True, "purpose": purpose}, timeout=30
    )
    rows: list[dict[str, Any]] = msgspec.json.decode(raw)["data"]
    return rows


async def _online(redis: aioredis.Redis, subject: str) -> int:
    n = 0
    async for key in redis.scan_iter(match=f"{PREFIX}:entities:*"):
        n += int(await redis.hexists(key, subject))
    return n


async def _aof_rewritten(redis: aioredis.Redis) -> None:
    for _ in range(200):
        info = await redis.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("Redis did not finish rewriting its append-only file")


async def test_an_erased_subject_is_unreadable_everywhere_and_others_are_kept(
    settings: Settings,
) -> None:
    s = settings
    services = ("governance", "warehouse", "features", "ingest")
    async with Stack(s, log=lambda _m: None, services=services):
        url = f"http://127.0.0.1:{s.ingest_http_port}/v1/events"
        async with (
            aiohttp.ClientSession(headers=client_headers(s)) as http,
            http.post(url, json=_events(int(time.time() * 1000))) as r,
        ):
            body = await r.json()
            assert r.status == 207 and body["accepted"] == 12 and body["rejected"] == 2, body
        nc = await bus.connect(s, "test")  # the operator, as the command line
        features = await bus.connect(s, "test-features", identity="features")
        admin = await bus.connect(s, "test-admin", identity=access.ADMIN)
        redis = aioredis.Redis.from_url(redis_users.client_url(s, "admin"))
        try:
            await wait_caught_up(nc, s)
            js = admin.jetstream()
            keys = SubjectKeys(js, load_tokenizer("", "", s.state_dir))
            # before: each subject has a key, its tokens open to its e-mail, it is everywhere
            token_of = {}
            for user in (GONE, KEPT):
                [row] = await sql_client.query_rows(
                    nc,
                    "SELECT JSONExtractString(data, 'email') AS t FROM myelin.events FINAL "
                    f"WHERE entity_id = '{user}' AND type = 'purchase' LIMIT 1",
                )
                token_of[user] = row["t"]
                key = await keys.find(user)
                assert key is not None and open_token(key, row["t"]) == EMAIL[user]
                assert await _online(redis, user) >= 1
                assert all((await _rows(nc, user)).values()), user
            assert token_of[GONE] != token_of[KEPT]
            # a PII read opens them only as pii_read allows: a role, and a stated purpose
            sql = "SELECT entity_id, data FROM myelin.events FINAL WHERE type = 'purchase'"
            rows = await _read(nc, sql, purpose="DSR-1 verification")
            assert {EMAIL[r["entity_id"]] in r["data"] for r in rows} == {True}
            for who, purpose, reason in (
                (nc, "", "needs a stated purpose"),
                (features, "curiosity", "role none may not read personal data"),
            ):
                with pytest.raises(RemoteError) as err:
                    await _read(who, sql, purpose=purpose)
                assert err.value.code == "pii_read_denied" and reason in err.value.message
            plain = await sql_client.query_rows(nc, sql)  # no reveal asked: tokens only
            assert plain and not any("@mail.example" in r["data"] for r in plain)
            wrapped = (await js.get_last_msg(STREAM, f"$KV.{STREAM[3:]}.{key_name(GONE)}")).data
            assert wrapped and _files_with(s.state_dir / "nats", wrapped)  # the grep finds it

            # a wrong identity may not ask; the operator may, with a reason
            with pytest.raises(RemoteError) as err:
                await bus.request(nc, RPC_GOVERNANCE_ERASE, {"subject": GONE}, timeout=30)
            assert err.value.code == "erasure_denied" and "needs a reason" in err.value.message
            raw = await bus.request(
                nc, RPC_GOVERNANCE_ERASE, {"subject": GONE, "reason": "DSR-1"}, timeout=120
            )
            report = msgspec.json.decode(raw)
            assert report["subject_hash"] == key_name(GONE)
            assert report["key_messages_erased"] == 1
            assert report["online_entries_deleted"] >= 1
            assert report["warehouse_rows_deleted"]["events"] == 6
            assert report["warehouse_rows_deleted"]["dead_letters"] == 1

            # after: no key (on disk neither), no online state, no rows; the other kept
            assert await keys.find(GONE) is None
            assert not _files_with(s.state_dir / "nats", wrapped), "the key is still on disk"
            assert await _online(redis, GONE) == 0 and await _online(redis, KEPT) >= 1
            assert await _rows(nc, GONE) == {"events": 0, "fv": 0, "dlq": 0}
            assert all((await _rows(nc, KEPT)).values())
            key = await keys.find(KEPT)
            assert key is not None and open_token(key, token_of[KEPT]) == EMAIL[KEPT]
            # the erased subject's tokens, wherever a copy of them is, open no more
            [row] = await _read(
                nc, f"SELECT '{token_of[GONE]}' AS gone, '{token_of[KEPT]}' AS kept", purpose="x"
            )
            assert row == {"gone": token_of[GONE], "kept": EMAIL[KEPT]}
            await _aof_rewritten(redis)
            assert not _files_with(s.state_dir / "redis", GONE.encode())
            assert _files_with(s.state_dir / "redis", KEPT.encode())
            # no store ever held an e-mail in the clear
            assert not _files_with(s.state_dir / "nats", b"@mail.example")

            # audited: the decision and what was done, by hash only
            records = await audit_records(s, "erasure")
            done = [r for r in records if r.policy_version == ""]
            decisions = [r for r in records if r.policy_version]
            assert [r.allow for r in decisions] == [False, True]
            assert len(done) == 1 and done[0].subject == key_name(GONE)
            assert msgspec.json.decode(done[0].input_json)["requester"] == "operator"
            assert all(GONE not in r.input_json and GONE not in r.subject for r in records)
        finally:
            await redis.aclose()
            await admin.close()
            await features.close()
            await nc.close()
