"""The offline / warm store: ClickHouse, embedded (chdb) or a server (clickhouse-connect).

One small interface, two implementations, the same DDL and SQL on both. In embedded
mode chdb locks its data directory, so exactly one process (the warehouse service) opens
it; everyone else reaches it with :data:`~myelin.subjects.RPC_WAREHOUSE_QUERY`.
Tables are ReplacingMergeTree keyed on deterministic ids, so a replayed batch is not
double-counted: read with ``FINAL`` (or argMax) for exact counts. In ``events`` the rows
of one event (its copies on the stream, and the late-marked row of a copy) collapse to the
one that counted: the first copy on the stream, late-marked if a view found it late
(``keep_rank``, see :func:`keep_rank`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from myelin import retention
from myelin.settings import Settings
from myelin.sql_guard import QueryRejected, WarehouseError, read_only_query

__all__ = ["QueryRejected", "WarehouseError"]

DATABASE = "myelin"


_TTL_CLAUSE = re.compile(r"\bTTL (.+?)(?= SETTINGS |$)")


def _ttl(table: str) -> str:
    """The TTL clause a table is created with, from the declared retention."""
    r = retention.rule(f"table:{table}")
    return f"TTL toDateTime({r.column}) + INTERVAL {r.days} DAY" if r.days else ""


DDL: tuple[str, ...] = (
    f"CREATE DATABASE IF NOT EXISTS {DATABASE}",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.events (
        event_id String,
        type LowCardinality(String),
        schema_version UInt16,
        entity_id String,
        event_time DateTime64(3, 'UTC'),
        ingest_time DateTime64(3, 'UTC'),
        producer_id LowCardinality(String),
        trace_id String,
        partition UInt16,
        stream_seq UInt64,
        late UInt8,
        data String,
        keep_rank UInt64
    ) ENGINE = ReplacingMergeTree(keep_rank)
    PARTITION BY toYYYYMM(event_time)
    ORDER BY (type, entity_id, event_time, event_id)
    {_ttl("events")}""",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.feature_values (
        view LowCardinality(String),
        view_hash LowCardinality(String),
        entity_id String,
        as_of DateTime64(3, 'UTC'),
        stream_seq UInt64,
        trace_id String,
        values Map(LowCardinality(String), Float64)
    ) ENGINE = ReplacingMergeTree
    ORDER BY (view, view_hash, entity_id, as_of, stream_seq)
    {_ttl("feature_values")}""",
    # The ledger: one row per request and entity (OIP: per request), a request id once per
    # model (a client's retry collapses under FINAL); partitioned by month with a min-max
    # index on ts for time ranges.
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.inferences (
        request_id String,
        row UInt32,
        ts DateTime64(3, 'UTC'),
        api LowCardinality(String),
        model LowCardinality(String),
        model_version LowCardinality(String),
        alias LowCardinality(String),
        entity_id String,
        score Float64,
        features Map(LowCardinality(String), Float64),
        feature_age_ms Int64,
        feature_status LowCardinality(String),
        latency_us UInt32,
        trace_id String,
        source_trace_id String,
        route LowCardinality(String),
        read_us UInt32,
        score_us UInt32,
        inputs String,
        outputs String,
        INDEX ts_range ts TYPE minmax GRANULARITY 1
    ) ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(ts)
    ORDER BY (model, request_id, route, row)
    {_ttl("inferences")}""",
    # DriftDetected records, one row per column (input feature or __score__) of a breach
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.drift_events (
        drift_id String,
        ts DateTime64(3, 'UTC'),
        model LowCardinality(String),
        model_version LowCardinality(String),
        window_start DateTime64(3, 'UTC'),
        window_end DateTime64(3, 'UTC'),
        samples UInt64,
        feature LowCardinality(String),
        psi Float64,
        js Float64,
        wasserstein Float64,
        ks Float64,
        breached Array(LowCardinality(String)),
        thresholds Map(LowCardinality(String), Float64)
    ) ENGINE = ReplacingMergeTree
    ORDER BY (model, model_version, drift_id, feature)
    {_ttl("drift_events")}""",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.audit (
        decision_id String,
        ts DateTime64(3, 'UTC'),
        action LowCardinality(String),
        subject String,
        allow UInt8,
        reasons Array(String),
        policy_version LowCardinality(String),
        input String,
        trace_id String,
        cached UInt8
    ) ENGINE = ReplacingMergeTree
    ORDER BY (action, ts, decision_id)
    {_ttl("audit")}""",
    f"""CREATE TABLE IF NOT EXISTS {DATABASE}.dead_letters (
        event_id String,
        ts DateTime64(3, 'UTC'),
        reason LowCardinality(String),
        message String,
        producer_id LowCardinality(String),
        payload String,
        stream_seq UInt64,
        detail Map(String, String)
    ) ENGINE = ReplacingMergeTree
    ORDER BY (reason, ts, stream_seq)
    {_ttl("dead_letters")}""",
    # tables made by earlier versions gain the columns added since (no-op on new ones)
    f"ALTER TABLE {DATABASE}.dead_letters ADD COLUMN IF NOT EXISTS detail Map(String, String)",
)


_RANK_TOP = (1 << 62) - 1


def keep_rank(stream_seq: int, late: bool) -> int:
    """The version raw history keeps the highest of, among the rows of one event: the
    earliest copy on the stream wins (the one the pipeline applied; a resent copy was a
    duplicate), and of one copy the row a view marked late."""
    return ((_RANK_TOP - min(stream_seq, _RANK_TOP)) << 1) | int(late)


# Raw history made by builds that versioned rows by ``late`` alone (a late resent copy then
# replaced the copy that counted) is moved into the current table once, at start.
_EVENTS_V1_MIGRATION = (
    f"RENAME TABLE {DATABASE}.events TO {DATABASE}.events_v1",
    "<create events>",
    f"""INSERT INTO {DATABASE}.events
        SELECT event_id, type, schema_version, entity_id, event_time, ingest_time, producer_id,
               trace_id, partition, stream_seq, late, data,
               bitOr(bitShiftLeft({_RANK_TOP} - least(stream_seq, {_RANK_TOP}), 1), late)
        FROM {DATABASE}.events_v1""",
    f"DROP TABLE {DATABASE}.events_v1",
)


# A ledger keyed on (model, request_id, row): a shadow's score of a request collapsed into
# the champion's. The columns are the same; only the key gains the route.
_INFERENCES_V2_MIGRATION = (
    f"RENAME TABLE {DATABASE}.inferences TO {DATABASE}.inferences_v2",
    "<create inferences>",
    f"INSERT INTO {DATABASE}.inferences SELECT * FROM {DATABASE}.inferences_v2",
    f"DROP TABLE {DATABASE}.inferences_v2",
)


# A ledger keyed on (model, ts, request_id, row), without the per-stage and tensor columns.
_INFERENCES_V1_MIGRATION = (
    f"RENAME TABLE {DATABASE}.inferences TO {DATABASE}.inferences_v1",
    "<create inferences>",
    f"""INSERT INTO {DATABASE}.inferences
        SELECT request_id, row, ts, api, model, model_version, alias, entity_id, score,
               features, feature_age_ms, feature_status, latency_us, trace_id,
               source_trace_id, alias, 0, 0, '', ''
        FROM {DATABASE}.inferences_v1""",
    f"DROP TABLE {DATABASE}.inferences_v1",
)


def _table(wh: Warehouse, name: str) -> dict[str, str]:
    rows = wh.query_arrow(
        f"SELECT engine_full, sorting_key FROM system.tables "
        f"WHERE database = '{DATABASE}' AND name = '{name}'"
    ).to_pylist()
    return {k: str(v) for k, v in rows[0].items()} if rows else {}


def migrate(wh: Warehouse) -> bool:
    """Bring tables made by earlier builds up to date; True if anything was moved."""
    moved = False
    plans = (
        ("events", "engine_full", "ReplacingMergeTree(late)", _EVENTS_V1_MIGRATION),
        ("inferences", "sorting_key", "model, ts, request_id, row", _INFERENCES_V1_MIGRATION),
        ("inferences", "sorting_key", "model, request_id, row", _INFERENCES_V2_MIGRATION),
    )
    for table, field, old, steps in plans:
        current = _table(wh, table)
        if old not in current.get(field, ""):
            continue
        # re-created with the TTL the old table had (none, from earlier builds): changing
        # a retention is governance's to allow (the warehouse's retention step), not this
        m = _TTL_CLAUSE.search(current.get("engine_full", ""))
        keep = f"TTL {m.group(1)}" if m else ""
        create = next(stmt for stmt in DDL if f".{table} (" in stmt).replace(_ttl(table), keep)
        for stmt in steps:
            wh.command(create if stmt == f"<create {table}>" else stmt)
        moved = True
    return moved


@dataclass(frozen=True)
class RawResult:
    """A result as the engine formatted it, with what it read (the HTTP summary)."""

    data: bytes
    rows_read: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0


class Warehouse(Protocol):
    def command(self, sql: str) -> None: ...

    def query_raw(
        self, sql: str, fmt: str, params: dict[str, str], database: str | None
    ) -> RawResult: ...

    def insert_arrow(self, table: str, data: pa.Table) -> None: ...

    def query_arrow(self, sql: str) -> pa.Table: ...

    def close(self) -> None: ...


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def read_only_sql(sql: str) -> str:
    """An analyst's query made safe to run on the shared engine (see
    :mod:`myelin.sql_guard`), or :class:`QueryRejected` with the reason. The server chooses
    the result format here (JSON rows or Arrow), so a FORMAT clause is refused."""
    q = read_only_query(sql)
    if q.fmt is not None:
        raise QueryRejected(f"FORMAT {q.fmt}: the result format is chosen by the caller's request")
    return q.sql


class ChdbWarehouse:
    """chdb in this process. Thread-safe: one query at a time (chdb is one engine)."""

    def __init__(self, path: Path) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self._session: Any = session.Session(str(path))  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._closed = False

    def command(self, sql: str) -> None:
        with self._lock:
            self._run(sql, "CSV")

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        cols = ", ".join(f"`{c}`" for c in data.column_names)
        with self._lock:
            # one thread: an insert burst must not take both cores from the feature pipeline
            self._run(
                f"INSERT INTO {table} ({cols}) SELECT {cols} FROM Python(myelin_arrow_input) "
                "SETTINGS max_threads = 1, max_insert_threads = 1",
                "CSV",
                data,
            )

    def query_raw(
        self, sql: str, fmt: str, params: dict[str, str], database: str | None
    ) -> RawResult:
        with self._lock:
            if database:
                self._run(f"USE {quote_identifier(database)}", "CSV")
            try:
                r = self._run(sql, fmt, params=params)
            finally:
                if database:
                    self._run("USE default", "CSV")
        return RawResult(bytes(r.bytes()), int(r.rows_read()), int(r.bytes_read()), r.elapsed())

    def query_arrow(self, sql: str) -> pa.Table:
        with self._lock:
            result = self._run(sql, "ArrowTable")
        if not isinstance(result, pa.Table):
            raise WarehouseError("chdb returned no Arrow table")
        return result

    def _run(
        self,
        sql: str,
        fmt: str,
        arrow: pa.Table | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        # chdb's Python() table function looks the table up by name in this very frame.
        myelin_arrow_input = arrow  # noqa: F841
        try:
            return self._session.query(sql, fmt, params=params)
        except Exception as exc:  # noqa: BLE001 - chdb raises plain errors; mapped to WarehouseError
            raise WarehouseError(str(exc).strip().splitlines()[0][:2000]) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._session.close()


class ServerWarehouse:
    """A ClickHouse server through clickhouse-connect; same DDL and SQL as chdb."""

    def __init__(self, url: str) -> None:
        import clickhouse_connect

        self._client = clickhouse_connect.get_client(dsn=url)
        self._lock = threading.Lock()

    def command(self, sql: str) -> None:
        with self._lock:
            self._client.command(sql)

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        if data.num_rows == 0:
            return
        with self._lock:
            self._client.insert_arrow(table, data)

    def query_arrow(self, sql: str) -> pa.Table:
        with self._lock:
            result: pa.Table = self._client.query_arrow(sql)
        return result

    def query_raw(
        self, sql: str, fmt: str, params: dict[str, str], database: str | None
    ) -> RawResult:
        # query parameters go to the server as param_<name> (server-side binding); without
        # {name:Type} placeholders clickhouse-connect would format them in client-side
        binds = params if params and "{" in sql else None
        with self._lock:
            default_db = self._client.database
            self._client.database = database or default_db
            try:
                data = self._client.raw_query(sql, parameters=binds, fmt=fmt)
            except Exception as exc:  # noqa: BLE001 - the server's error, with its code
                raise WarehouseError(str(exc).strip()[:2000]) from None
            finally:
                self._client.database = default_db
        return RawResult(bytes(data))

    def close(self) -> None:
        self._client.close()


def open_warehouse(settings: Settings) -> Warehouse:
    """The server when ``MYELIN_CLICKHOUSE_URL`` is set, else chdb under the state dir."""
    url = settings.clickhouse_url.get()
    wh: Warehouse = ServerWarehouse(url) if url else ChdbWarehouse(settings.warehouse_dir)
    for stmt in DDL:
        wh.command(stmt)
    migrate(wh)
    return wh


def arrow_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(
        sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")
    ) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def ipc_to_arrow(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_all()
