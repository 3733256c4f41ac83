from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.contracts.registry import default_registry
from myelin.contracts.schema import ContractSpec, FieldSpec
from myelin.contracts.store import ContractConflict, ContractRejected, ContractStore
from myelin.settings import Settings
from myelin.subjects import RPC_INGEST_PUBLISH
from services.ingest.app import IngestApp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def purchase_v2() -> ContractSpec:
    return next(s for s in default_registry().specs() if s.type == "purchase" and s.version == 2)


def v3(*, drop: str = "", add: FieldSpec | None = None) -> ContractSpec:
    base = purchase_v2()
    fields = [f for f in base.fields if f.name != drop] + ([add] if add else [])
    return msgspec.structs.replace(base, version=3, fields=fields)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "myelin.cli", "contracts", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_offline_check_has_ci_exit_codes(tmp_path: Path) -> None:
    bad, good, broken = tmp_path / "bad.json", tmp_path / "good.json", tmp_path / "broken.json"
    bad.write_bytes(msgspec.json.encode(v3(drop="amount")))
    good.write_bytes(
        msgspec.json.encode(v3(add=FieldSpec("coupon", "string", required=False, default="")))
    )
    broken.write_text('{"type": "purchase"}')
    r = cli("check", str(bad))
    assert r.returncode == 1
    assert "amount: field_removed" in r.stderr and "v2 readers require 'amount'" in r.stderr
    assert "v1: amount: field_removed" in r.stderr  # transitive: checked against v1 too
    r = cli("check", str(good))
    assert r.returncode == 0 and "compatible (FULL_TRANSITIVE)" in r.stdout
    r = cli("check", str(broken))
    assert r.returncode == 2 and "invalid contract" in r.stderr


async def test_registry_refuses_precisely_and_ingest_follows_it(
    nc: NATS, settings: Settings
) -> None:
    store = ContractStore(bus.jetstream(nc, settings))
    assert {(s.type, s.version) for s in await store.specs()} == {
        ("impression", 1),
        ("click", 1),
        ("purchase", 1),
        ("purchase", 2),
    }
    with pytest.raises(ContractRejected) as err:
        await store.register(v3(add=FieldSpec("coupon", "string")))
    assert [(p.field, p.change, p.against_version) for p in err.value.problems] == [
        ("coupon", "field_added_without_default", 1),
        ("coupon", "field_added_without_default", 2),
    ]
    assert "give it a default" in err.value.message
    retyped = msgspec.structs.replace(
        v3(),
        fields=[FieldSpec("amount", "string") if f.name == "amount" else f for f in v3().fields],
    )
    with pytest.raises(ContractRejected, match="type float cannot be read as string"):
        await store.register(retyped)

    app = IngestApp(settings)
    await app.start()
    try:
        event: dict[str, Any] = {
            "event_id": "v3-1",
            "type": "purchase",
            "schema_version": 3,
            "event_time": int(time.time() * 1000),
            "data": {"user_id": "u", "item_id": "i", "amount": 1, "coupon": "SPRING"},
        }
        res = msgspec.json.decode(await bus.request(nc, RPC_INGEST_PUBLISH, [event]))
        assert res["results"][0]["reason"] == "unknown_version"
        good = v3(add=FieldSpec("coupon", "string", required=False, default=""))
        await store.register(good)
        await store.register(good)  # idempotent
        with pytest.raises(ContractConflict, match="immutable"):
            await store.register(v3(add=FieldSpec("coupon", "string", required=False, default="X")))
        for _ in range(60):  # ingest picks the new version up without a restart
            res = msgspec.json.decode(
                await bus.request(nc, RPC_INGEST_PUBLISH, [{**event, "event_id": "v3-2"}])
            )
            if res["accepted"] == 1:
                break
            await asyncio.sleep(0.1)
        assert res["accepted"] == 1, json.dumps(res)
    finally:
        await app.stop()
