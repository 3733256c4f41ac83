"""Pure logic of the security pieces: permissions generated from the topology, bearer
token parsing, subject-key sealing and wrapping, erasure's SQL conditions, and the
reading of the server's refused-connection advisories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from myelin import access, redis_users
from myelin.api_tokens import TokenBook, digest
from myelin.pii import Tokenizer
from myelin.settings import Settings
from myelin.subject_keys import (
    SubjectKeyError,
    is_token,
    key_name,
    open_token,
    seal,
    unwrap,
    wrap,
)
from services.governance.auth_audit import refusal_record
from services.warehouse.erasure import conditions

S = Settings(state_dir=Path("/nonexistent"))


def test_each_service_publishes_only_to_its_own_streams() -> None:
    ingest = access.grants("ingest", S)
    assert "myelin.events.>" in ingest.publish and "myelin.dlq.>" in ingest.publish
    assert not any(p.startswith(("myelin.features", "myelin.inferences")) for p in ingest.publish)
    inference = access.grants("inference", S)
    assert "myelin.inferences.>" in inference.publish
    assert "myelin.events.>" not in inference.publish
    # requests only under one's own name; replies only to one's own inbox
    assert "myelin.rpc.*.*.ingest" in ingest.publish
    assert ingest.subscribe[0] == "_INBOX_ingest.>"
    assert not any(p.endswith(".operator") for p in ingest.publish)


def test_only_governance_may_write_what_serves() -> None:
    for identity in access.DEV_IDENTITIES:
        g = access.grants(identity, S)
        denied = set(g.publish_deny)
        if identity in ("governance", "admin"):
            assert "$KV.myelin_models.*.aliases" not in denied
        elif identity != access.AUTH_AUDIT:
            assert {"$KV.myelin_models.*.aliases", "$KV.myelin_models.*.routes"} <= denied
    assert "$KV.myelin_models.*.aliases" in access.grants("governance", S).publish


def test_features_cannot_touch_the_warehouse_consumer_of_events() -> None:
    g = access.grants("features", S)
    assert "$JS.API.CONSUMER.MSG.NEXT.MYELIN_EVENTS.*" in g.publish  # its own, any name
    assert "$JS.API.CONSUMER.MSG.NEXT.MYELIN_EVENTS.warehouse-events" in g.publish_deny
    assert "$JS.ACK.MYELIN_EVENTS.warehouse-events.>" in g.publish_deny
    assert "$JS.API.CONSUMER.DELETE.MYELIN_EVENTS.warehouse-events" in g.publish_deny


def test_endpoint_rights() -> None:
    assert access.may_call("producer", "myelin.rpc.ingest.publish")
    assert access.may_call("producer-acme", "myelin.rpc.ingest.publish")
    assert not access.may_call("producer", "myelin.rpc.governance.promote")
    assert not access.may_call("retrainer", "myelin.rpc.governance.promote")
    assert access.may_call("retrainer", "myelin.rpc.governance.routes")
    assert access.may_call("anyone", "myelin.rpc.health.ingest")
    assert access.may_call("admin", "myelin.rpc.anything.new")
    assert not access.may_call("operator", "myelin.rpc.anything.new")  # unlisted: nobody's
    assert access.requester("operator", "mallory") == "operator"
    assert access.requester("anonymous", "mallory") == "mallory"
    assert access.role_of("operator") == "privacy_officer" and access.role_of("ingest") == "none"


def test_the_server_config_lists_public_keys_and_a_system_account() -> None:
    text = access.nats_authorization({"ingest": "UINGEST", "auth-audit": "UAUDIT"}, S)
    assert text.startswith("authorization {") and "nkey: UINGEST" in text
    sys_part = text[text.index("accounts {") :]
    assert "nkey: UAUDIT" in sys_part and "system_account: SYS" in text
    assert 'deny: [">"]' in sys_part and access.AUTH_ERRORS in sys_part


@pytest.mark.parametrize(
    ("header", "who"),
    [
        ("Bearer tok-1", "producer"),
        ("bearer   tok-1  ", "producer"),
        ("Bearer tok-2", None),
        ("Basic tok-1", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
        ("Bearer tok-1\x00", None),
        ("Bearer " + "x" * 10_000, None),
    ],
)
def test_bearer_tokens(header: str | None, who: str | None) -> None:
    book = TokenBook({digest("tok-1"): "producer"})
    assert book.identify(header) == who


def test_a_token_book_that_does_not_map_digests_to_identities_is_refused(tmp_path: Path) -> None:
    from myelin.errors import ConfigError

    bad = tmp_path / "tokens.json"
    for content in ("[1, 2]", '{"abc": 3}', "not json", '{"abc": "Not An Identity"}'):
        bad.write_text(content)
        with pytest.raises(ConfigError):
            TokenBook.load(Settings(api_tokens_file=str(bad)))
    assert TokenBook.load(Settings()) is None


def test_subject_tokens_are_deterministic_per_subject_and_open_only_with_its_key() -> None:
    k1, k2 = AESSIV.generate_key(256), AESSIV.generate_key(256)
    t = seal(k1, "u1", "a@b.example")
    assert t == seal(k1, "u1", "a@b.example") and t != seal(k2, "u2", "a@b.example")
    assert is_token(t) and t.startswith(f"pii:subject:{key_name('u1')}:")
    assert open_token(k1, t) == "a@b.example"
    with pytest.raises(SubjectKeyError):
        open_token(k2, t)  # another subject's key
    with pytest.raises(SubjectKeyError):
        open_token(k1, "pii:subject:not-a-token")
    assert not is_token("pii:a@b.example")  # a value that merely starts so is sealed


def test_a_wrapped_key_opens_under_its_pii_key_even_after_rotation() -> None:
    old = Tokenizer({"k1": b"1" * 32}, "k1")
    rotated = Tokenizer({"k1": b"1" * 32, "k2": b"2" * 32}, "k2")
    name, key = key_name("u1"), AESSIV.generate_key(256)
    blob = wrap(old, name, key)
    assert unwrap(rotated, name, blob) == key
    with pytest.raises(SubjectKeyError, match="lacks"):
        unwrap(Tokenizer({"k2": b"2" * 32}, "k2"), name, blob)
    with pytest.raises(SubjectKeyError):
        unwrap(rotated, key_name("u2"), blob)  # bound to its own key name


def test_pii_tokenizer_tokenizes_a_value_that_only_looks_like_a_token() -> None:
    tok = Tokenizer({"k1": b"1" * 32}, "k1")
    real = tok.token("a@b.example")
    assert tok.token(real) == real  # idempotent on a real token
    assert tok.token("pii:a@b.example") != "pii:a@b.example"


def test_erasure_conditions_quote_the_subject() -> None:
    c = conditions("jos\u00e9'); DROP TABLE x; --", ["user_id", "account"])
    assert c["events"] == "entity_id = 'jos\u00e9\\'); DROP TABLE x; --'"
    assert '"user_id":"jos\u00e9\\\'); DROP TABLE x; --"' in c["dead_letters"]
    assert " OR " in c["dead_letters"]  # one per key field
    assert conditions("u1", [])["dead_letters"] == "0"  # no contracts: nothing matched
    backslash = conditions("a\\b", ["user_id"])
    assert backslash["events"] == "entity_id = 'a\\\\b'"


def test_a_refused_connection_advisory_becomes_an_audit_record() -> None:
    adv = {
        "type": "io.nats.server.advisory.v1.client_disconnect",
        "client": {"host": "10.0.0.7", "port": 5555, "name": "x", "lang": "go", "version": "1"},
        "reason": "Authentication Failure",
    }
    rec = refusal_record(json.dumps(adv).encode())
    assert rec.action == "unauthenticated" and rec.subject == "nats" and not rec.allow
    assert "10.0.0.7:5555 (x)" in rec.reasons[0] and "Authentication Failure" in rec.reasons[0]
    assert json.loads(rec.input_json)["host"] == "10.0.0.7"
    # a sparse advisory still reads
    assert refusal_record(b"{}").reasons[0].startswith("a NATS connection from :0")


def test_redis_credentials_go_into_the_url_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MYELIN_REDIS_URL", raising=False)
    secret = tmp_path / "features.pass"
    secret.write_text("p@ss/w:rd\n")
    for url, expected in (
        ("redis://127.0.0.1:6390/0", "redis://features:p%40ss%2Fw%3Ard@127.0.0.1:6390/0"),
        ("redis://[::1]:6390/2", "redis://features:p%40ss%2Fw%3Ard@[::1]:6390/2"),
        (
            "rediss://old:creds@db.example:6380/0",
            "rediss://features:p%40ss%2Fw%3Ard@db.example:6380/0",
        ),
    ):
        s = Settings(
            state_dir=tmp_path,
            redis_url=url,
            redis_username="features",
            redis_password_file=str(secret),
        )
        assert redis_users.client_url(s) == expected
    # no credential of its own and none written by myelin up: the URL as it is
    bare = Settings(state_dir=tmp_path, redis_url="redis://127.0.0.1:6390/0")
    assert redis_users.client_url(bare, "ingest") == "redis://127.0.0.1:6390/0"


def test_development_redis_passwords_are_not_used_against_an_operators_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Settings(state_dir=tmp_path, redis_url="redis://u:theirs@10.0.0.5:6379/0")
    redis_users.ensure_dev_users(s)  # a leftover from an earlier `myelin up`
    monkeypatch.setenv("MYELIN_REDIS_URL", s.redis_url)
    assert redis_users.client_url(s, "admin") == "redis://u:theirs@10.0.0.5:6379/0"
    monkeypatch.delenv("MYELIN_REDIS_URL")
    assert redis_users.client_url(s, "admin").startswith("redis://admin:")


def test_the_redis_acl_holds_digests_and_no_reader_may_administer(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    lines = redis_users.ensure_dev_users(s)
    assert lines[0] == "user default off"
    for identity in redis_users.RULES:
        password = redis_users.dev_password_file(s, identity).read_text().strip()
        assert not any(password in line for line in lines)
        assert redis_users.dev_password_file(s, identity).stat().st_mode & 0o777 == 0o600
    inference = next(line for line in lines if line.startswith("user inference "))
    assert "-@all +@read" in inference and "@connection" not in inference
    assert redis_users.ensure_dev_users(s) == lines  # kept across restarts
