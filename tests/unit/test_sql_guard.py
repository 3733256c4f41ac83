"""The read-only guard every SQL door shares (pure: the engine's side is tested in
tests/integration/test_clickhouse_http.py)."""

from __future__ import annotations

import pytest

from myelin.sql_guard import (
    LIMITS,
    MAX_QUERY_CHARS,
    FormatRefused,
    QueryRejected,
    QueryTooLarge,
    UnknownSetting,
    check_format,
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
        "output_format_json_quote_64bit_integers = 'it\\'s', max_execution_time = 20, "
        "max_memory_usage = 4000000000, max_result_bytes = 268435456, readonly = 2"
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


@pytest.mark.parametrize(
    "sql",
    [
        # block comments nest in ClickHouse: the first */ does not end this one
        "SELECT 1 /* /* */ ' */ ; CREATE TABLE default.pwn (x Int32) ENGINE = Memory; SELECT 3 -- '",
        "SELECT $$'$$, 2 -- '",  # a heredoc string
        "SELECT \u2018'\u2019, 2 -- '",  # typographic quotes are string quotes too
        "SELECT \u201cx\u201d FROM t",
    ],
)
def test_what_the_engine_lexes_differently_is_refused(sql: str) -> None:
    with pytest.raises(QueryRejected):
        read_only_query(sql)


def test_a_function_hidden_behind_a_nested_comment_still_means_readonly_1() -> None:
    q = read_only_query("SELECT * FROM /* /* */ ' */ file('/etc/hostname', 'LineAsString') -- '")
    assert q.sql.endswith("readonly = 1")


@pytest.mark.parametrize(
    "name",
    ["output_format_schema", "format_template_resultset", "format_schema", "user_files_path"],
)
def test_settings_that_name_files_are_refused(name: str) -> None:
    with pytest.raises(UnknownSetting, match="may not be changed here"):
        read_only_query("SELECT 1", {name: "/etc/passwd"})
    with pytest.raises(UnknownSetting):
        read_only_query(f"SELECT 1 SETTINGS {name} = '/tmp/x'")


def test_limits_apply_to_every_query_and_may_only_shrink() -> None:
    q = read_only_query("SELECT 1", {"max_memory_usage": "0", "max_execution_time": "5"})
    assert q.settings["max_memory_usage"] == str(LIMITS["max_memory_usage"])  # 0: unlimited
    assert q.settings["max_execution_time"] == "'5'"
    assert q.settings["max_result_bytes"] == str(LIMITS["max_result_bytes"])
    big = read_only_query("SELECT 1", {"max_execution_time": "100000"})
    assert big.settings["max_execution_time"] == str(LIMITS["max_execution_time"])


@pytest.mark.parametrize("fmt", ["Template", "Protobuf", "CapnProto", "DataFrame", "ArrowTable"])
def test_formats_that_read_files_or_make_objects_are_refused(fmt: str) -> None:
    with pytest.raises(FormatRefused):
        read_only_query(f"SELECT 1 FORMAT {fmt}")
    with pytest.raises(FormatRefused):
        check_format(fmt)
    assert check_format("JSONEachRow") == "JSONEachRow"
