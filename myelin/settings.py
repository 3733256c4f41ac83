"""One typed settings object, loaded once from ``MYELIN_*`` environment variables.

Secrets are held in :class:`Secret` so that ``repr`` and logs never show them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from myelin.errors import ConfigError


class Secret:
    """A string that never prints itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"MYELIN_{name}", default)


def _int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"MYELIN_{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"MYELIN_{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Every knob of the platform. Each service reads the part it needs."""

    state_dir: Path = field(default_factory=lambda: Path(".myelin"))
    host: str = "127.0.0.1"
    nats_url: str = ""
    nats_port: int = 4222
    # the seed file of this process's NATS identity (myelin.nats_identity; '' : see there)
    nats_nkey_file: str = ""
    # governance's credential in the server's system account, to audit refused connections
    nats_auth_audit_nkey_file: str = ""
    # the HTTP / gRPC doors' token digests (myelin.api_tokens; '': no authentication)
    api_tokens_file: str = ""
    api_token: Secret = field(default_factory=lambda: Secret(""))  # a client's own token
    # TLS of the gRPC door (both '': plaintext) and the CA clients trust
    grpc_tls_cert_file: str = ""
    grpc_tls_key_file: str = ""
    tls_ca_file: str = ""
    redis_url: str = ""
    redis_cluster: bool = False  # MYELIN_REDIS_URL names a node of a Redis Cluster
    # a Redis ACL user and the file holding its password (myelin.redis_users)
    redis_username: str = ""
    redis_password_file: str = ""
    redis_port: int = 6390
    clickhouse_url: Secret = field(default_factory=lambda: Secret(""))
    opa_url: str = ""
    ingest_http_port: int = 8080
    ingest_workers: int = 1  # ingest processes sharing the HTTP port (SO_REUSEPORT) and NATS queue
    inference_grpc_port: int = 8001
    warehouse_http_port: int = 8123  # the ClickHouse HTTP interface (0: off)
    ops_http_port: int = 8090  # the live ops page (0: off)
    health_http_port: int = 0  # /livez and /readyz for probes (0: off; set per pod)
    partitions: int = 8
    max_event_bytes: int = 64 * 1024
    max_batch_bytes: int = 16 * 1024 * 1024
    max_batch_events: int = 10_000
    publish_window: int = 4096
    publish_timeout_s: float = 5.0
    publish_retries: int = 5
    duplicate_window_s: float = 20 * 60.0
    # one effect per event id (ingest's recent ids, the features' per-bucket id guard);
    # off only as a control in fault tests, where resent events must then count twice
    dedupe: bool = True
    features_batch: int = 200  # messages per fetch (a message holds up to 100 events)
    # features processes sharing the partitions (each holds its share, by leases in NATS KV)
    features_workers: int = 1
    features_lease_s: float = 3.0  # a dead worker's partitions move after this long
    features_ack_wait_s: float = 10.0
    ingest_ack_wait_s: float = 30.0  # the JetStream inbox consumer's ack wait
    # after a short fetch, keep gathering for up to this long: fewer, larger batches (the
    # per-batch cost is a Redis transaction and a FEATURES publish) for a little latency
    features_linger_s: float = 0.0
    # the features service freezes live objects out of garbage collection after each
    # batch; a full collection reclaims stray reference cycles this often (0: never)
    gc_full_every_s: float = 3600.0
    warehouse_linger_s: float = 1.0  # how long drains gather rows before one insert
    online_ttl_s: int = 7 * 24 * 3600
    model_alias: str = "champion"
    # the policies that ship with the package (``myelin/policies``), wherever it is run from
    policy_dir: Path = field(default_factory=lambda: Path(__file__).parent / "policies")
    policy_cache_ttl_s: float = 30.0
    # the inference ledger keeps an OIP tensor's values up to this size, its hash beyond
    ledger_tensor_cap_bytes: int = 16 * 1024
    # copies of every stream, KV bucket and object store (3 on a 3-node JetStream cluster)
    stream_replicas: int = 1
    # inference counts served values per drift bin in windows this long (myelin.drift)
    drift_window_s: float = 60.0
    # retraining (myelin.retraining, services/retrainer)
    trainer: str = ""  # MODULE:FUNCTION (myelin.trainers); '' is the scikit-learn default
    retrain_every_s: float = 0.0  # retrain every champion on a schedule (0: on drift only)
    retrain_min_rows: int = 200  # fewer training rows than this fail the job
    retrain_holdout_share: float = 0.2  # the newest rows, scored for challenger and champion
    retrain_canary_share: float = 0.1  # the traffic a challenger gets when it leaves shadow
    retrain_stale_s: float = 120.0  # a running job silent this long (crashed) is taken over
    retrain_retry_s: float = 600.0  # a failed job runs again on a trigger after this long
    retrain_wait_s: float = 300.0  # for the warehouse to store everything up to the bound
    ort_intra_threads: int = 1
    ort_inter_threads: int = 1
    pii_keys: Secret = field(default_factory=lambda: Secret(""))
    pii_active_kid: str = ""
    hot_keys: str = ""  # comma-separated partition keys to spread over salt_buckets partitions
    salt_buckets: int = 4
    max_future_skew_s: float = 300.0
    max_event_age_s: float = 30 * 86400.0
    otlp_endpoint: str = ""
    trace_console: bool = False
    metrics_port: int = (
        0  # Prometheus /metrics on this port (0: off); `myelin up` gives one per process
    )

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        state_dir = Path(_env("STATE_DIR", str(d.state_dir))).absolute()
        nats_port = _int("NATS_PORT", d.nats_port)
        redis_port = _int("REDIS_PORT", d.redis_port)
        host = _env("HOST", d.host)
        return cls(
            state_dir=state_dir,
            host=host,
            nats_port=nats_port,
            nats_url=_env("NATS_URL", f"nats://127.0.0.1:{nats_port}"),
            nats_nkey_file=_env("NATS_NKEY_FILE", ""),
            nats_auth_audit_nkey_file=_env("NATS_AUTH_AUDIT_NKEY_FILE", ""),
            api_tokens_file=_env("API_TOKENS_FILE", ""),
            api_token=Secret(_env("API_TOKEN", "")),
            grpc_tls_cert_file=_env("GRPC_TLS_CERT_FILE", ""),
            grpc_tls_key_file=_env("GRPC_TLS_KEY_FILE", ""),
            tls_ca_file=_env("TLS_CA_FILE", ""),
            redis_port=redis_port,
            redis_url=_env("REDIS_URL", f"redis://127.0.0.1:{redis_port}/0"),
            redis_cluster=_env("REDIS_CLUSTER", "0").lower() in ("1", "true", "yes"),
            redis_username=_env("REDIS_USERNAME", ""),
            redis_password_file=_env("REDIS_PASSWORD_FILE", ""),
            clickhouse_url=Secret(_env("CLICKHOUSE_URL", "")),
            opa_url=_env("OPA_URL", ""),
            ingest_http_port=_int("INGEST_HTTP_PORT", d.ingest_http_port),
            ingest_workers=_int("INGEST_WORKERS", d.ingest_workers),
            inference_grpc_port=_int("INFERENCE_GRPC_PORT", d.inference_grpc_port),
            warehouse_http_port=_int("WAREHOUSE_HTTP_PORT", d.warehouse_http_port),
            ops_http_port=_int("OPS_HTTP_PORT", d.ops_http_port),
            health_http_port=_int("HEALTH_HTTP_PORT", d.health_http_port),
            partitions=_int("PARTITIONS", d.partitions),
            max_event_bytes=_int("MAX_EVENT_BYTES", d.max_event_bytes),
            max_batch_bytes=_int("MAX_BATCH_BYTES", d.max_batch_bytes),
            max_batch_events=_int("MAX_BATCH_EVENTS", d.max_batch_events),
            publish_window=_int("PUBLISH_WINDOW", d.publish_window),
            publish_timeout_s=_float("PUBLISH_TIMEOUT_S", d.publish_timeout_s),
            publish_retries=_int("PUBLISH_RETRIES", d.publish_retries),
            duplicate_window_s=_float("DUPLICATE_WINDOW_S", d.duplicate_window_s),
            dedupe=_env("DEDUPE", "1").lower() not in ("0", "false", "no", ""),
            features_batch=_int("FEATURES_BATCH", d.features_batch),
            features_workers=_int("FEATURES_WORKERS", d.features_workers),
            features_lease_s=_float("FEATURES_LEASE_S", d.features_lease_s),
            features_ack_wait_s=_float("FEATURES_ACK_WAIT_S", d.features_ack_wait_s),
            ingest_ack_wait_s=_float("INGEST_ACK_WAIT_S", d.ingest_ack_wait_s),
            features_linger_s=_float("FEATURES_LINGER_S", d.features_linger_s),
            gc_full_every_s=_float("GC_FULL_EVERY_S", d.gc_full_every_s),
            warehouse_linger_s=_float("WAREHOUSE_LINGER_S", d.warehouse_linger_s),
            online_ttl_s=_int("ONLINE_TTL_S", d.online_ttl_s),
            model_alias=_env("MODEL_ALIAS", d.model_alias),
            policy_dir=Path(_env("POLICY_DIR", str(d.policy_dir))).absolute(),
            policy_cache_ttl_s=_float("POLICY_CACHE_TTL_S", d.policy_cache_ttl_s),
            ledger_tensor_cap_bytes=_int("LEDGER_TENSOR_CAP_BYTES", d.ledger_tensor_cap_bytes),
            drift_window_s=_float("DRIFT_WINDOW_S", d.drift_window_s),
            stream_replicas=_int("STREAM_REPLICAS", d.stream_replicas),
            trainer=_env("TRAINER", d.trainer),
            retrain_every_s=_float("RETRAIN_EVERY_S", d.retrain_every_s),
            retrain_min_rows=_int("RETRAIN_MIN_ROWS", d.retrain_min_rows),
            retrain_holdout_share=_float("RETRAIN_HOLDOUT_SHARE", d.retrain_holdout_share),
            retrain_canary_share=_float("RETRAIN_CANARY_SHARE", d.retrain_canary_share),
            retrain_stale_s=_float("RETRAIN_STALE_S", d.retrain_stale_s),
            retrain_retry_s=_float("RETRAIN_RETRY_S", d.retrain_retry_s),
            retrain_wait_s=_float("RETRAIN_WAIT_S", d.retrain_wait_s),
            ort_intra_threads=_int("ORT_INTRA_THREADS", d.ort_intra_threads),
            ort_inter_threads=_int("ORT_INTER_THREADS", d.ort_inter_threads),
            pii_keys=Secret(_env("PII_KEYS", "")),
            pii_active_kid=_env("PII_ACTIVE_KID", ""),
            hot_keys=_env("HOT_KEYS", ""),
            salt_buckets=_int("SALT_BUCKETS", d.salt_buckets),
            max_future_skew_s=_float("MAX_FUTURE_SKEW_S", d.max_future_skew_s),
            max_event_age_s=_float("MAX_EVENT_AGE_S", d.max_event_age_s),
            otlp_endpoint=_env("OTLP_ENDPOINT", ""),
            trace_console=_env("TRACE_CONSOLE", "") in ("1", "true", "yes"),
            metrics_port=_int("METRICS_PORT", d.metrics_port),
        )

    @property
    def warehouse_dir(self) -> Path:
        return self.state_dir / "chdb"

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = value.get()
            elif isinstance(value, bool):
                value = "1" if value else ""
            env[f"MYELIN_{f.name.upper()}"] = str(value)
        return env
