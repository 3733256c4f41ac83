"""Read-only SQL for the shared warehouse engine: what every door that takes an analyst's
SQL (``myelin sql``, the NATS query RPC, the ClickHouse HTTP interface) runs through.

ClickHouse's own ``readonly = 1`` does the heavy lifting (no writes, no DDL, no reading
local files through table functions, no changing settings); this module adds what it does
not cover and gives each refusal a clear reason:

- one statement per request (chdb runs ``SELECT 1; DROP ...`` as two);
- ``INTO OUTFILE`` is refused: the engine writes that file even under ``readonly = 1``;
- the query's own trailing ``SETTINGS`` and ``FORMAT`` clauses are lifted out, so the
  caller's settings and ``readonly`` go into one clause, ``readonly`` last (a setting that
  would lift it is refused by the engine, never applied);
- ``readonly = 2`` (settings may change, data may not) for a query that calls no function
  at all (no ``(`` outside literals): nothing in it can reach outside the database, e.g.
  the ``system.settings`` probe clients send to learn which settings they may change.
  Any other query runs at ``readonly = 1``, where the engine also refuses the table
  functions that read files or URLs (``readonly = 2`` would let ``file()`` through).

Structure is found on a *scrubbed* copy of the text (string literals, quoted identifiers
and comments blanked out, same length), so a ``;`` or ``FORMAT`` inside a string is data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from myelin.errors import MyelinError

READ_ONLY_START = re.compile(
    r"^[\s(]*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE
)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_VALUE = r"(?:'[^']*'|-?[0-9][0-9.eE+-]*|[A-Za-z_][A-Za-z0-9_]*)"
_PAIR = rf"({_IDENT})\s*=\s*({_VALUE})"
_TRAILING_FORMAT = re.compile(rf"\bFORMAT\s+({_IDENT})\s*$", re.IGNORECASE)
_TRAILING_SETTINGS = re.compile(rf"\bSETTINGS\s+({_PAIR}(?:\s*,\s*{_PAIR})*)\s*$", re.IGNORECASE)
_ONE_PAIR = re.compile(_PAIR)
_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
SETTING_NAME = re.compile(rf"^{_IDENT}$")
MAX_QUERY_CHARS = 256 * 1024  # ClickHouse's own max_query_size default
# Settings a query may not change: whatever names a file, directory, URL, schema or
# template (``format_schema``, ``output_format_schema`` and ``format_template_*`` read or
# write files even under readonly = 1), credentials, other storages, or lifts a guard.
# Everything else (result shape, limits within LIMITS, time zones, planning switches, what
# stock clients such as clickhouse-connect send) may.
_FORBIDDEN_IN_NAME = (
    "schema",
    "template",
    "path",
    "file",
    "dir",
    "url",
    "cert",
    "key",
    "password",
    "secret",
    "credential",
    "user",
    "access",
    "s3",
    "azure",
    "hdfs",
    "kafka",
    "remote",
    "backup",
    "introspection",
    "ddl",
)
# Caps every query runs under; a caller may ask for less, never for more (0 = unlimited is
# refused: one analyst query shares the engine with the warehouse's drains).
LIMITS = {
    "max_execution_time": 20,
    "max_memory_usage": 4_000_000_000,
    "max_result_bytes": 256 * 1024 * 1024,
}
# Output formats served: text, JSON, columnar and binary row formats. Not the ones that
# read a schema or template file, nor chdb's in-process Python objects.
_ALLOWED_FORMAT = re.compile(
    r"^(TabSeparated\w*|TSV\w*|CSV\w*|CustomSeparated\w*|JSON\w*|NDJSON|Native|RowBinary\w*|"
    r"Arrow|ArrowStream|Parquet|ORC|Avro|BSONEachRow|Pretty\w*|Values|Vertical|Markdown|XML|"
    r"TSKV|LineAsString|RawBLOB|Null|MySQLDump|SQLInsert|Npy|Prometheus)$"
)


class WarehouseError(MyelinError):
    code = "warehouse_error"


class QueryRejected(WarehouseError):
    """Not served: the reason says what to change. ``ch_code`` is ClickHouse's error code
    for the same refusal (the HTTP interface reports it)."""

    code = "query_rejected"
    ch_code = 164  # READONLY


class QueryTooLarge(QueryRejected):
    ch_code = 62  # SYNTAX_ERROR: ClickHouse's answer to a query over max_query_size


class UnknownSetting(QueryRejected):
    ch_code = 115  # UNKNOWN_SETTING


class FormatRefused(QueryRejected):
    ch_code = 73  # UNKNOWN_FORMAT


def check_format(fmt: str) -> str:
    """``fmt`` if this interface serves it, else :class:`FormatRefused`."""
    if not _ALLOWED_FORMAT.match(fmt):
        raise FormatRefused(
            f"output format {fmt!r} is not served here (formats that read schema or template "
            "files, and in-process objects, are not): use e.g. TabSeparated, CSV, "
            "JSONEachRow, Native, ArrowStream or Parquet"
        )
    return fmt


def _check_setting(name: str, value: str) -> str:
    """The value to write for setting ``name``, or :class:`UnknownSetting`."""
    lowered = name.lower()
    if not SETTING_NAME.match(name):
        raise UnknownSetting(f"{name!r} is not a setting name")
    if any(w in lowered for w in _FORBIDDEN_IN_NAME):
        raise UnknownSetting(
            f"setting {name} may not be changed here: no setting that names a file, URL, "
            "schema, template, credential or other storage"
        )
    cap = LIMITS.get(lowered)
    if cap is not None:
        try:
            asked = float(value.strip("'"))
        except ValueError:
            raise UnknownSetting(f"setting {name} needs a number, got {value}") from None
        if asked <= 0 or asked > cap:
            return str(cap)  # 0 (unlimited) or more than the cap: the cap
    return value


# Quote characters ClickHouse's lexer also accepts (typographic quotes as string and
# identifier quotes): refused, so that what this module calls a literal is what the
# engine calls one.
_CURLY = "\u2018\u2019\u201c\u201d"


def scrub(sql: str) -> str:
    """``sql`` with the inside of string literals, quoted identifiers and comments replaced
    by ``_`` (quotes kept), the same length: its structure, with no data in the way.
    Block comments nest, as in ClickHouse; an unterminated one runs to the end."""
    out = list(sql)
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # a doubled quote inside
                        j += 2
                        continue
                    break
                j += 1
            end = min(j, n)
            out[i + 1 : end] = "_" * (end - i - 1)
            i = end + 1
        elif sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            end = n if j < 0 else j
            out[i:end] = " " * (end - i)
            i = end
        elif sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out[i:j] = " " * (j - i)
            i = j
        else:
            i += 1
    return "".join(out)


def quote_literal(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class ReadOnlyQuery:
    """A query as the engine runs it: ``sql`` ends with one ``SETTINGS`` clause whose last
    setting is ``readonly`` (1, or 2 for a query with no function call); ``fmt`` is the
    output format its text named, if any."""

    sql: str
    fmt: str | None = None
    settings: dict[str, str] = field(default_factory=dict)  # as written into the clause


def read_only_query(sql: str, settings: Mapping[str, str] | None = None) -> ReadOnlyQuery:
    """``sql`` made safe to run on the shared engine, or :class:`QueryRejected` with the
    reason. ``settings``: more settings by name (raw values, quoted here), applied after
    the query's own."""
    if len(sql) > MAX_QUERY_CHARS:
        raise QueryTooLarge(
            f"the query is {len(sql)} characters; at most {MAX_QUERY_CHARS} are served"
        )
    clean = scrub(sql)
    if any(q in clean for q in _CURLY) or "$" in clean:
        raise QueryRejected(
            "typographic quotes and $ (heredoc strings) are not served outside string "
            "literals: use plain 'single quotes'"
        )
    end = len(clean.rstrip().rstrip(";").rstrip())
    text, clean = sql[:end], clean[:end]
    if not clean.strip():
        raise QueryRejected("empty query: send the SQL in the 'query' parameter or the body")
    if ";" in clean:
        raise QueryRejected("one statement per query: remove the ';' separated parts")
    if not READ_ONLY_START.match(clean):
        raise QueryRejected(
            "only read-only queries (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS) are "
            "served: the warehouse is written by its drains"
        )
    if _OUTFILE.search(clean):
        raise QueryRejected("INTO OUTFILE is not served: read the result from the response")
    fmt: str | None = None
    merged: dict[str, str] = {}
    for _ in range(2):  # SETTINGS ... FORMAT x, FORMAT x SETTINGS ..., or one of them
        if fmt is None and (m := _TRAILING_FORMAT.search(clean)):
            fmt = m.group(1)
        elif m := _TRAILING_SETTINGS.search(clean):
            own = {
                p.group(1): text[m.start(1) + p.start(2) : m.start(1) + p.end(2)]
                for p in _ONE_PAIR.finditer(m.group(1))
            }
            merged = own | merged
        else:
            break
        text, clean = text[: m.start()].rstrip(), clean[: m.start()].rstrip()
    for name, raw in (settings or {}).items():
        if not SETTING_NAME.match(name):
            raise UnknownSetting(f"{name!r} is not a setting name")
        merged[name] = quote_literal(raw)
    if fmt is not None:
        check_format(fmt)
    level = "1" if "(" in clean else "2"
    if merged.pop("readonly", level).strip("'") != level:
        raise QueryRejected(
            f"readonly is {level} for this query on this interface: remove the readonly setting"
        )
    merged = {k: _check_setting(k, v) for k, v in merged.items()}
    for name, cap in LIMITS.items():
        merged.setdefault(name, str(cap))
    clause = ", ".join([*(f"{k} = {v}" for k, v in merged.items()), f"readonly = {level}"])
    return ReadOnlyQuery(f"{text}\nSETTINGS {clause}", fmt, merged)
