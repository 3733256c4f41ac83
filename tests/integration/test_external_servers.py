"""The thin client paths to a ClickHouse server and an OPA server. They run only when the
server's URL is given (neither server is installable on the CI machine)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from myelin.settings import Settings
from myelin.warehouse import DATABASE, ServerWarehouse, open_warehouse
from services.governance.logic import policy_version
from services.governance.policy_engines import OpaEngine, load_policies
from tests.helpers import RECENT_DAY_MS


@pytest.mark.clickhouse_server
@pytest.mark.skipif(
    not os.environ.get("MYELIN_CLICKHOUSE_URL"), reason="needs MYELIN_CLICKHOUSE_URL"
)
def test_clickhouse_server_uses_the_same_ddl_and_sql() -> None:
    wh = open_warehouse(Settings.from_env())
    assert isinstance(wh, ServerWarehouse)
    try:
        wh.command(f"TRUNCATE TABLE {DATABASE}.dead_letters")
        row = pa.table(
            {
                "event_id": ["x"],
                # inside the table's retention (a row of 1970 would expire at once)
                "ts": pa.array([RECENT_DAY_MS], pa.timestamp("ms", tz="UTC")),
                "reason": ["r"],
                "message": ["m"],
                "producer_id": ["p"],
                "payload": [""],
                "stream_seq": pa.array([1], pa.uint64()),
            }
        )
        wh.insert_arrow(f"{DATABASE}.dead_letters", row)
        wh.insert_arrow(f"{DATABASE}.dead_letters", row)
        n = wh.query_arrow(f"SELECT count() AS n FROM {DATABASE}.dead_letters FINAL").to_pylist()
        assert n == [{"n": 1}]
    finally:
        wh.close()


@pytest.mark.opa_server
@pytest.mark.skipif(not os.environ.get("MYELIN_OPA_URL"), reason="needs MYELIN_OPA_URL")
async def test_opa_server_gives_the_same_decisions(settings: Settings) -> None:
    sources = load_policies(settings.policy_dir)
    engine = OpaEngine(os.environ["MYELIN_OPA_URL"], sources, policy_version(sources))
    try:
        doc = await engine.evaluate("myelin.promote", {"alias": "gold", "model": {"metrics": {}}})
        assert doc["allow"] is False
        assert any("unknown alias gold" in r for r in doc["reasons"])
    finally:
        await engine.close()
