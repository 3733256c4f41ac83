"""The read-only guard every SQL door shares (pure: the engine's side is tested in
tests/integration/test_clickhouse_http.py)."""

from __future__ import annotations

import pytest

from myelin.sql_guard import (
    MAX_QUERY_CHARS,
    QueryRejected,
    QueryTooLarge,
    UnknownSetting,
    read_only_query,
    scrub,
)


def test_scrub_blanks_literals_identifiers_and_comments_keeping_length() -> None:
    sql = "SELECT 'a;b', `x;y`, \"c\" -- FORMAT JSON;\n/* ; */ FROM t # x;"
    out = scrub(sql)
    assert len(out) == len(sql)
    assert ";" not in out and "FORMAT" not in out
    assert out.startswith("SELECT '___', `___`, \"_\"")


def test_scrub_handles_escaped_and_doubled_quotes() -> None:
    assert scrub(r"SELECT 'it\'s;' , 'a''b;'") == "SELECT '______' , '_____'"


@pytest.mark.parametrize(
    ("sql", "fmt", "body"),
    [
        ("SELECT 1", None, "SELECT 1"),
        ("select 1 format JSONEachRow;", "JSONEachRow", "select 1"),
        ("SELECT 1 FORMAT CSV SETTINGS max_threads = 1", "CSV", "SELECT 1"),
        ("SELECT 1 SETTINGS max_threads=1 FORMAT CSV", "CSV", "SELECT 1"),
        ("SELECT ';' AS `FORMAT JSON`", None, "SELECT ';' AS `FORMAT JSON`"),
        ("(SELECT 1) UNION ALL (SELECT 2)", None, "(SELECT 1) UNION ALL (SELECT 2)"),
    ],
)
def test_trailing_format_and_settings_are_lifted(sql: str, fmt: str | None, body: str) -> None:
    q = read_only_query(sql)
    assert q.fmt == fmt
    assert q.sql.split("\nSETTINGS ")[0] == body
    assert q.sql.endswith(f"readonly = {1 if '(' in scrub(body) else 2}")


@pytest.mark.parametrize(
    ("sql", "level"),
    [
        ("SELECT name, value, readonly FROM system.settings LIMIT 10000", 2),
        ("SELECT '(' FROM t", 2),  # a parenthesis in a literal calls nothing
        ("SELECT count() FROM t", 1),
        ("SELECT * FROM file ('/etc/passwd', 'LineAsString')", 1),
        ("SELECT * FROM (SELECT 1)", 1),
    ],
)
def test_readonly_2_only_for_a_query_that_calls_no_function(sql: str, level: int) -> None:
    assert read_only_query(sql).sql.endswith(f"readonly = {level}")


def test_settings_merge_with_readonly_last_and_values_quoted() -> None:
    q = read_only_query(
        "SELECT 1 SETTINGS max_threads = 2, max_result_rows = 9",
        {"max_result_rows": "5", "output_format_json_quote_64bit_integers": "it's"},
    )
    assert q.sql == (
        "SELECT 1\nSETTINGS max_threads = 2, max_result_rows = '5', "
        "output_format_json_quote_64bit_integers = 'it\\'s', readonly = 2"
    )


@pytest.mark.parametrize(
    ("sql", "settings", "error", "msg"),
    [
        ("", {}, QueryRejected, "empty"),
        (" ;; ", {}, QueryRejected, "empty|one statement"),
        ("SELECT 1; SELECT 2", {}, QueryRejected, "one statement"),
        ("INSERT INTO t VALUES (1)", {}, QueryRejected, "read-only"),
        ("ALTER TABLE t DELETE WHERE 1", {}, QueryRejected, "read-only"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", {}, QueryRejected, "OUTFILE"),
        ("SELECT 1 SETTINGS readonly = 0", {}, QueryRejected, "readonly is 2"),
        ("SELECT count() FROM t", {"readonly": "2"}, QueryRejected, "readonly is 1"),
        ("SELECT 1", {"max_threads = 1, readonly": "0"}, UnknownSetting, "not a setting"),
        ("SELECT " + "1" * MAX_QUERY_CHARS, {}, QueryTooLarge, "characters"),
    ],
)
def test_refusals_say_why(
    sql: str, settings: dict[str, str], error: type[Exception], msg: str
) -> None:
    with pytest.raises(error, match=msg):
        read_only_query(sql, settings)
