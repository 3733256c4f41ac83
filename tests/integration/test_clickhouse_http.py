"""The ClickHouse HTTP interface in front of the embedded warehouse (real chdb), used by the
stock clients: clickhouse-connect, plain HTTP as curl sends it, and the platform's own
server path (``ServerWarehouse``, i.e. what runs against a ClickHouse server) pointed at it.
Hostile input: raw bytes, oversized bodies, writes, file reads, multiple statements."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import clickhouse_connect
import msgspec
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from myelin.stack.process import free_port
from myelin.warehouse import ServerWarehouse, Warehouse
from services.warehouse.http_interface import MAX_BODY_BYTES, serve_clickhouse_http
from services.warehouse.sink import WarehouseSink, events_table
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
COUNTS = "SELECT entity_id, count() AS n FROM myelin.events GROUP BY entity_id ORDER BY entity_id"


@pytest.fixture
async def endpoint(warehouse: Warehouse) -> AsyncIterator[str]:
    """The interface on a free loopback port, over the test session's chdb, holding 10
    events (u0: 4, u1: 3, u2: 3)."""
    sink = WarehouseSink(warehouse)
    t = int(time.time() * 1000)
    evs = [stream_event(f"h{i}", f"u{i % 3}", t + i, typ="purchase") for i in range(10)]
    await sink.insert("events", events_table([(i + 1, e) for i, e in enumerate(evs)]))
    port = free_port()
    runner = await serve_clickhouse_http(sink, "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        sink._pool.shutdown(wait=True)  # the engine is the session's: not closed here


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The sync client off the event loop (the server runs on it)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_clickhouse_connect_queries_the_embedded_warehouse(endpoint: str) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    c = await call(clickhouse_connect.get_client, host=host, port=int(port))
    try:
        assert c.server_version.count(".") >= 2  # the engine's own version()
        assert (await call(c.query, COUNTS)).result_rows == [("u0", 4), ("u1", 3), ("u2", 3)]
        table = await call(c.query_arrow, COUNTS)
        assert table.column("n").to_pylist() == [4, 3, 3]
        df = await call(c.query_df, COUNTS)
        assert df["entity_id"].tolist() == ["u0", "u1", "u2"]
        # server-side parameters ({name:Type} -> param_name)
        one = await call(
            c.query,
            "SELECT count() FROM myelin.events WHERE entity_id = {user:String}",
            parameters={"user": "u1"},
        )
        assert one.result_rows == [(3,)]
        assert await call(c.command, "SELECT 40 + 2") == 42
        # settings ride along per query: this one makes the engine refuse a long result
        with pytest.raises(DatabaseError, match=r"TOO_MANY_ROWS|Limit for result exceeded"):
            await call(
                c.query,
                COUNTS,
                settings={"max_result_rows": 1, "result_overflow_mode": "throw"},
            )
        # the next query is not affected by the previous one's settings
        assert len((await call(c.query, COUNTS)).result_rows) == 3
    finally:
        c.close()


async def test_writes_and_file_reads_are_refused_and_nothing_changes(
    endpoint: str, tmp_path: Path
) -> None:
    host, port = endpoint.removeprefix("http://").split(":")
    c = await call(clickhouse_connect.get_client, host=host, port=int(port))
    try:
        for sql in (
            "DROP TABLE myelin.events",
            "INSERT INTO myelin.events (event_id) VALUES ('x')",
            "ALTER TABLE myelin.events DELETE WHERE 1",
            "SELECT 1; DROP TABLE myelin.events",
        ):
            with pytest.raises(DatabaseError, match=r"read-only|one statement"):
                await call(c.command, sql)
        with pytest.raises(DatabaseError, match=r"readonly|READONLY"):
            await call(c.query, "SELECT * FROM file('/etc/hostname', 'LineAsString')")
        # the client learns from the engine's system.settings that readonly cannot change
        with pytest.raises(DatabaseError, match="Setting readonly is readonly"):
            await call(c.query, "SELECT 1", settings={"readonly": 0})
        target = tmp_path / "out.csv"
        with pytest.raises(DatabaseError, match="OUTFILE"):
            await call(c.query, f"SELECT 1 INTO OUTFILE '{target}'")
        assert not target.exists()
        with pytest.raises(DatabaseError):
            await call(c.insert, "myelin.events", [["x"]], column_names=["event_id"])
        assert (await call(c.query, COUNTS)).result_rows == [("u0", 4), ("u1", 3), ("u2", 3)]
    finally:
        c.close()


async def test_plain_http_as_curl_sends_it(endpoint: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{endpoint}/ping") as r:
            assert r.status == 200 and await r.text() == "Ok.\n"
        async with http.get(f"{endpoint}/", params={"query": "SELECT 1"}) as r:
            assert r.status == 200 and await r.text() == "1\n"
            assert r.headers["X-ClickHouse-Format"] == "TabSeparated"
            assert "elapsed_ns" in msgspec.json.decode(r.headers["X-ClickHouse-Summary"])
        # the query in the body, a FORMAT clause, a ';' inside a string is data
        body = (
            "SELECT entity_id, count() AS n, 'a;b' AS s FROM myelin.events "
            "GROUP BY entity_id ORDER BY entity_id FORMAT JSONEachRow;"
        )
        async with http.post(f"{endpoint}/", data=body) as r:
            rows = [msgspec.json.decode(line) for line in (await r.read()).splitlines()]
            first = rows[0]  # UInt64 may come quoted, as the engine's JSON setting says
            assert (first["entity_id"], int(first["n"]), first["s"]) == ("u0", 4, "a;b")
        # the parameter's text and the body are one query, as ClickHouse joins them
        async with http.post(
            f"{endpoint}/",
            params={"query": "SELECT count()", "default_format": "CSV"},
            data="FROM myelin.events",
        ) as r:
            assert await r.text() == "10\n"
        async with http.get(
            f"{endpoint}/",
            params={"query": "SELECT 1", "enable_http_compression": "1"},
            headers={"Accept-Encoding": "gzip"},
        ) as r:
            assert r.headers.get("Content-Encoding") == "gzip" and await r.text() == "1\n"
        # the database parameter: unqualified names resolve in it, for this query only
        async with http.get(
            f"{endpoint}/", params={"query": "SELECT count() FROM events", "database": "myelin"}
        ) as r:
            assert await r.text() == "10\n"
        async with http.get(f"{endpoint}/", params={"query": "SELECT currentDatabase()"}) as r:
            assert await r.text() == "default\n"


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        (b"\xff\xfe SELECT 1", 400, "62", "not UTF-8"),
        (b"SELEKT 1", 403, "164", "read-only"),
        (b"SELECT FROM WHERE", 400, "62", "SYNTAX_ERROR"),
        (b"SELECT * FROM myelin.nope", 404, "60", "UNKNOWN_TABLE"),
        (b"SELECT 1 FORMAT NoSuchFormat", 404, "73", "not served here"),
        (b"SELECT '\x00'", 200, None, ""),
        (b"", 403, "164", "empty query"),
        (b"SELECT 1" + b" " * MAX_BODY_BYTES, 400, "62", "over"),
    ],
)
async def test_hostile_bodies_get_clickhouse_errors(
    endpoint: str, body: bytes, status: int, code: str | None, says: str
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{endpoint}/", data=io.BytesIO(body)) as r,
    ):
        text = await r.text(errors="replace")
        assert r.status == status, text
        assert r.headers.get("X-ClickHouse-Exception-Code") == code
        if code is not None:
            assert text.startswith(f"Code: {code}.") and says in text


async def test_bad_parameters_get_clear_errors(endpoint: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{endpoint}/", params={"query": "SELECT 1", "no such setting!": "1"}
        ) as r:
            assert r.status == 400 and "not a setting name" in await r.text()
        async with http.get(f"{endpoint}/", params={"query": "SELECT 1", "max_threadz": "1"}) as r:
            assert r.status == 400 and "UNKNOWN_SETTING" in await r.text()
        async with http.get(
            f"{endpoint}/", params={"query": "SELECT {n:UInt8}", "param_n": "abc"}
        ) as r:
            assert r.status >= 400 and (await r.text()).startswith("Code: ")
        async with http.get(f"{endpoint}/", params={"query": "SELECT 1", "readonly": "0"}) as r:
            assert r.status == 403 and "readonly is 2 for this query" in await r.text()
        async with http.put(f"{endpoint}/", data=b"SELECT 1") as r:
            assert r.status == 405


async def test_the_server_path_runs_the_same_queries_through_the_interface(
    endpoint: str, warehouse: Warehouse
) -> None:
    """``ServerWarehouse`` (what ``MYELIN_CLICKHOUSE_URL`` selects) against this interface:
    the bytes it gets are the engine's own."""
    server = await call(ServerWarehouse, endpoint)
    try:
        sql = f"{COUNTS}\nSETTINGS readonly = 1"  # as the guard passes it on
        via_http = await call(server.query_raw, sql, "CSV", {}, None)
        direct = await call(warehouse.query_raw, sql, "CSV", {}, None)
        assert via_http.data == direct.data == b'"u0",4\n"u1",3\n"u2",3\n'
        bound = await call(
            server.query_raw,
            "SELECT count() FROM events WHERE entity_id = {user:String}",
            "TabSeparated",
            {"user": "u2"},
            "myelin",
        )
        assert bound.data == b"3\n"
    finally:
        server.close()


async def test_lexer_tricks_and_file_settings_change_nothing_on_the_engine(
    endpoint: str, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    host_file = Path("/etc/hostname")
    hostname = (await asyncio.to_thread(host_file.read_text)).strip()
    attacks: list[tuple[dict[str, str], str]] = [
        (
            {},
            "SELECT 1 /* /* */ ' */ ; CREATE TABLE default.pwn (x Int32) ENGINE = Memory; SELECT 3 -- '",
        ),
        ({}, "SELECT * FROM /* /* */ ' */ file('/etc/hostname', 'LineAsString') -- '"),
        ({}, "SELECT $$'$$, 2 -- '"),
        ({"output_format_schema": str(victim)}, "SELECT toInt32(1) AS x FORMAT Protobuf"),
        ({"format_template_resultset": "/etc/passwd"}, "SELECT 1 FORMAT Template"),
        ({}, "SELECT 1 FORMAT DataFrame"),
    ]
    async with aiohttp.ClientSession() as http:
        for params, sql in attacks:
            async with http.post(f"{endpoint}/", params=params, data=sql.encode()) as r:
                text = await r.text()
                assert r.status in (400, 403, 404), (sql, r.status, text)
                assert "root:" not in text and (not hostname or hostname not in text), text
        async with http.get(
            f"{endpoint}/", params={"query": "EXISTS TABLE default.pwn", "default_format": "CSV"}
        ) as r:
            assert await r.text() == "0\n"
        # limits: "unlimited" is capped, a smaller limit is kept
        q = "SELECT getSetting('max_memory_usage'), getSetting('max_execution_time') FORMAT CSV"
        async with http.get(
            f"{endpoint}/",
            params={"query": q, "max_memory_usage": "0", "max_execution_time": "5"},
        ) as r:
            assert await r.text() == "4000000000,5\n"
    assert victim.read_text() == "untouched"


async def test_a_body_sent_in_chunks_is_read_whole(endpoint: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"SELECT 4", b"0 + ", b"2"):
            yield part
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as http, http.post(f"{endpoint}/", data=chunks()) as r:
        assert r.status == 200 and await r.text() == "42\n"
