from __future__ import annotations

import pytest

from myelin.errors import ConfigError
from myelin.settings import Secret, Settings
from myelin.training import training_set_sql
from myelin.warehouse import QueryRejected, read_only_sql


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYELIN_CLICKHOUSE_URL", "http://user:hunter2@db:8123")
    s = Settings.from_env()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.clickhouse_url)
    assert s.clickhouse_url.get().endswith("@db:8123")
    assert s.to_env()["MYELIN_CLICKHOUSE_URL"].endswith("@db:8123")
    assert not Secret("")


def test_defaults_bind_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MYELIN_HOST", "MYELIN_NATS_URL", "MYELIN_REDIS_URL"):
        monkeypatch.delenv(k, raising=False)
    s = Settings.from_env()
    assert s.host == "127.0.0.1"
    assert s.nats_url.startswith("nats://127.0.0.1:") and s.redis_url.startswith(
        "redis://127.0.0.1:"
    )


def test_bad_number_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYELIN_PARTITIONS", "many")
    with pytest.raises(ConfigError, match="MYELIN_PARTITIONS must be an integer"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("sql", "msg"),
    [
        ("", "empty"),
        ("DROP TABLE myelin.events", "read-only"),
        ("INSERT INTO t VALUES (1)", "read-only"),
        ("SELECT 1; DROP TABLE x", "one statement"),
        ("SELECT 1 SETTINGS readonly = 0", "readonly is 2"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", "OUTFILE"),
        ("SELECT 1 FORMAT JSON", "FORMAT"),
    ],
)
def test_analyst_sql_is_read_only(sql: str, msg: str) -> None:
    with pytest.raises(QueryRejected, match=msg):
        read_only_sql(sql)


def test_analyst_sql_gets_readonly_setting() -> None:
    assert read_only_sql(" select 1; ").endswith(", readonly = 2")
    assert read_only_sql("select now()").endswith(", readonly = 1")


def test_training_sql_refuses_odd_names() -> None:
    with pytest.raises(ValueError, match="identifiers"):
        training_set_sql("v'; DROP", ["a"], "SELECT 1")


def test_replay_times_parse_iso_and_epoch_and_refuse_anything_else() -> None:
    from myelin.cli import _time_ms
    from myelin.errors import MyelinError

    assert _time_ms("2026-11-25T10:00:00Z") == 1_795_600_800_000
    assert _time_ms("2026-11-25T10:00:00") == 1_795_600_800_000  # no zone: UTC
    assert _time_ms("1700000000000") == 1_700_000_000_000
    assert _time_ms("") == 0
    with pytest.raises(MyelinError, match="not a time"):
        _time_ms("yesterday")
