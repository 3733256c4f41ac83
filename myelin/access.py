"""Who may touch what: NATS permissions per identity, generated from the topology, and
who may call each request-reply endpoint.

Two layers, on purpose:

- **The data plane is locked by the NATS server.** Each identity may publish only to its
  own streams' subjects, create and read only its own consumers, read and write only its
  own KV keys and objects (:func:`grants`). A refusal there is the server's
  ``Permissions Violation``. Only governance, the registry owner, may write a model's
  ``aliases`` and ``routes`` keys: a promotion cannot bypass its decision.
- **Endpoints authorize their caller.** Any identity may send a request under its own
  name (``myelin.rpc.<service>.<op>.<identity>``, which the server enforces), and the
  endpoint checks :data:`ENDPOINT_CALLERS`; a refusal is a ``forbidden`` reply and an
  audit record (:func:`myelin.bus.serve`), so every attempt is on the record.

Identities: the services, ``admin`` (``myelin up``: provisioning and health checks; a
superuser, like a cluster-admin kubeconfig), ``operator`` (people, through the command
line), and producers (``producer`` or ``producer-<name>``), who may only send events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from myelin import topology
from myelin.nats_identity import ANONYMOUS, inbox_prefix
from myelin.settings import Settings
from myelin.subjects import (
    ARTIFACTS_BUCKET,
    AUDIT_STREAM,
    DLQ_STREAM,
    DRIFT_STREAM,
    EVENTS_STREAM,
    FEATURES_STREAM,
    INFERENCES_STREAM,
    INGEST_STREAM,
    LATE_STREAM,
    MODELS_BUCKET,
    RETRAINS_BUCKET,
    RPC_FEATURES_CHECK,
    RPC_FEATURES_ERASE,
    RPC_FEATURES_REPLAY,
    RPC_FEATURES_VIEWS,
    RPC_GOVERNANCE_DECIDE,
    RPC_GOVERNANCE_ERASE,
    RPC_GOVERNANCE_PROMOTE,
    RPC_GOVERNANCE_ROLLBACK,
    RPC_GOVERNANCE_ROUTES,
    RPC_INGEST_PUBLISH,
    RPC_WAREHOUSE_ERASE,
    RPC_WAREHOUSE_QUERY,
    RPC_WAREHOUSE_REWIND,
    VIEWS_BUCKET,
)

SERVICES = ("governance", "warehouse", "features", "inference", "ingest", "retrainer", "ops")
ADMIN = "admin"
OPERATOR = "operator"
PRODUCER = "producer"
#: governance's second connection, in the server's system account: it hears every refused
#: connection (``$SYS.SERVER.*.CLIENT.AUTH.ERR``) and puts it on the audit trail
AUTH_AUDIT = "auth-audit"
AUTH_ERRORS = "$SYS.SERVER.*.CLIENT.AUTH.ERR"
#: the identities ``myelin up`` creates credentials for
DEV_IDENTITIES = (*SERVICES, ADMIN, OPERATOR, PRODUCER, AUTH_AUDIT)
#: the audit actions of a refused request: an identity that may not, and no identity
FORBIDDEN_ACTION = "forbidden"
UNAUTHENTICATED_ACTION = "unauthenticated"


def is_producer(identity: str) -> bool:
    return identity == PRODUCER or identity.startswith(f"{PRODUCER}-")


# Who may call each endpoint (health is open to every identity). Admin may call them all.
ENDPOINT_CALLERS: dict[str, frozenset[str]] = {
    RPC_INGEST_PUBLISH: frozenset({OPERATOR, PRODUCER}),  # and every producer-<name>
    RPC_GOVERNANCE_DECIDE: frozenset({"features", "inference", "warehouse", "retrainer"}),
    RPC_GOVERNANCE_PROMOTE: frozenset({OPERATOR}),  # the retrainer only moves routes
    RPC_GOVERNANCE_ROUTES: frozenset({OPERATOR, "retrainer"}),
    RPC_GOVERNANCE_ROLLBACK: frozenset({OPERATOR}),
    RPC_GOVERNANCE_ERASE: frozenset({OPERATOR}),
    RPC_FEATURES_ERASE: frozenset({"governance"}),
    RPC_WAREHOUSE_ERASE: frozenset({"governance"}),
    RPC_WAREHOUSE_QUERY: frozenset({OPERATOR, "features", "retrainer", "ops"}),
    RPC_WAREHOUSE_REWIND: frozenset({OPERATOR, "features"}),
    RPC_FEATURES_REPLAY: frozenset({OPERATOR}),
    RPC_FEATURES_CHECK: frozenset({OPERATOR}),
    RPC_FEATURES_VIEWS: frozenset({OPERATOR, "retrainer"}),
}


#: who may score over gRPC (OIP v2 and Predict): applications and people
GRPC_CALLERS = frozenset({"app", OPERATOR})


def may_score(identity: str) -> bool:
    return identity == ADMIN or identity in GRPC_CALLERS


def may_call(identity: str, endpoint: str) -> bool:
    """Whether ``identity`` may call ``endpoint`` (a subject without its caller token)."""
    if identity == ADMIN or endpoint.startswith("myelin.rpc.health."):
        return True
    allowed = ENDPOINT_CALLERS.get(endpoint)
    if allowed is None:
        return False  # an endpoint nobody listed is nobody's
    if endpoint == RPC_INGEST_PUBLISH and is_producer(identity):
        return True
    return identity in allowed


# The role each identity has for the pii_read policy (myelin/policies/pii_read.rego): in
# the development stack the operator is its privacy officer; services and producers have
# none, so they can never read personal data.
ROLES: dict[str, str] = {OPERATOR: "privacy_officer"}


def role_of(identity: str) -> str:
    return ROLES.get(identity, "none")


def requester(caller: str, claimed: str) -> str:
    """Who asks, for the record and the policies: the authenticated caller; what the
    request claims counts only on a server without authentication."""
    if caller and caller != ANONYMOUS:
        return caller
    return claimed


@dataclass(frozen=True)
class Grant:
    """One identity's NATS permissions."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    responder: bool = False  # may answer requests (publish to their reply subjects)


# ------------------------------------------------------------- building blocks


def _stream_read(stream: str) -> list[str]:
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    ]


def _consume(stream: str, durable: str = "*") -> list[str]:
    """Create, read, pull from, ack and delete consumer ``durable`` of ``stream`` (``*``:
    any name, for services whose consumers are named at run time)."""
    create = (
        [f"$JS.API.CONSUMER.CREATE.{stream}.>"]
        if durable == "*"
        else [
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
        ]
    )
    return [
        *create,
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.DELETE.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _kv_read(bucket: str) -> list[str]:
    return _stream_read(f"KV_{bucket}")


def _kv_write(bucket: str, keys: Iterable[str] = (">",)) -> list[str]:
    return [*_kv_read(bucket), *(f"$KV.{bucket}.{k}" for k in keys)]


def _objects_read(bucket: str) -> list[str]:
    stream = f"OBJ_{bucket}"
    return [
        *_stream_read(stream),
        "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


def _objects_write(bucket: str) -> list[str]:
    return [
        *_objects_read(bucket),
        f"$O.{bucket}.C.>",
        f"$O.{bucket}.M.>",
        f"$JS.API.STREAM.PURGE.OBJ_{bucket}",
    ]


def _publish_to(stream: str, settings: Settings) -> list[str]:
    spec = next(s for s in topology.streams(settings) if s.name == stream)
    return list(spec.subjects)


def _foreign_durables(owner: str, stream: str, settings: Settings) -> list[str]:
    """What ``_consume(stream)`` (any name) would allow on the fixed-name durables of
    other services: denied, so a features worker cannot pull, ack or delete the
    warehouse's consumer of the same stream."""
    out: list[str] = []
    for d in topology.durables(settings):
        if d.stream == stream and d.owner != owner:
            n = d.name
            out += [
                f"$JS.API.CONSUMER.CREATE.{stream}.{n}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{n}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{n}",
                f"$JS.API.CONSUMER.INFO.{stream}.{n}",
                f"$JS.API.CONSUMER.DELETE.{stream}.{n}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{n}",
                f"$JS.ACK.{stream}.{n}.>",
            ]
    return out


def _durables(owner: str, settings: Settings) -> list[str]:
    return [
        p
        for d in topology.durables(settings)
        if d.owner == owner
        for p in _consume(d.stream, d.name)
    ]


# A model's aliases and routes move only through governance (the registry owner), which
# also pins the cards it approved
_SERVING_KEYS = (
    f"$KV.{MODELS_BUCKET}.*.aliases",
    f"$KV.{MODELS_BUCKET}.*.routes",
    f"$KV.{MODELS_BUCKET}.*.approved",
)


def _service_grants(settings: Settings) -> dict[str, list[str]]:
    s = settings
    dlq = _publish_to(DLQ_STREAM, s)
    forbidden = [f"myelin.audit.{FORBIDDEN_ACTION}", f"myelin.audit.{UNAUTHENTICATED_ACTION}"]
    return {
        "governance": [
            *_publish_to(AUDIT_STREAM, s),  # every action, its refusals among them
            *_kv_read(MODELS_BUCKET),
            f"$JS.API.STREAM.INFO.OBJ_{ARTIFACTS_BUCKET}",  # the registry opens both stores
            *_SERVING_KEYS,
            # erasure: a subject's key is overwritten on disk (a secure delete)
            *_kv_read(topology.SUBJECT_KEYS_BUCKET),
            f"$JS.API.STREAM.MSG.DELETE.KV_{topology.SUBJECT_KEYS_BUCKET}",
        ],
        "warehouse": [
            *dlq,
            *forbidden,
            *_kv_read(topology.SUBJECT_KEYS_BUCKET),  # an allowed PII read opens tokens
            *_kv_read(topology.CONTRACTS_BUCKET),  # erasure: where dead letters name subjects
            *_durables("warehouse", s),
            # retention: each stream's max age, changed after governance allowed it
            *(
                p
                for spec in topology.streams(s)
                for p in (f"$JS.API.STREAM.INFO.{spec.name}", f"$JS.API.STREAM.UPDATE.{spec.name}")
            ),
        ],
        "features": [
            *_publish_to(FEATURES_STREAM, s),
            *_publish_to(LATE_STREAM, s),
            *dlq,
            "myelin.audit.view_failed",
            *forbidden,
            *_consume(EVENTS_STREAM),
            *_stream_read(EVENTS_STREAM),
            *_stream_read(FEATURES_STREAM),
            *_kv_read(topology.CONTRACTS_BUCKET),
            *_kv_write(VIEWS_BUCKET),
            *_kv_write(topology.LEASES_BUCKET),
        ],
        "inference": [
            *_publish_to(INFERENCES_STREAM, s),
            *_publish_to(DRIFT_STREAM, s),
            *forbidden,
            *_kv_read(MODELS_BUCKET),
            *_objects_read(ARTIFACTS_BUCKET),
        ],
        "ingest": [
            *_publish_to(EVENTS_STREAM, s),
            *dlq,
            *forbidden,
            *_durables("ingest", s),
            *_kv_read(topology.CONTRACTS_BUCKET),
            *_kv_write(topology.SUBJECT_KEYS_BUCKET),  # a subject's key, created once
        ],
        "retrainer": [
            *dlq,
            *forbidden,
            "myelin.audit.retrain_start",
            "myelin.audit.retrain_finish",
            "myelin.audit.retrain_skip",
            *_durables("retrainer", s),
            *_stream_read(EVENTS_STREAM),
            *_stream_read(FEATURES_STREAM),
            *_stream_read(LATE_STREAM),
            *_kv_write(MODELS_BUCKET),
            *_kv_write(RETRAINS_BUCKET),
            *_objects_write(ARTIFACTS_BUCKET),
        ],
        "ops": [*forbidden],
    }


def _operator_grants(settings: Settings) -> list[str]:
    return [
        *_kv_write(topology.CONTRACTS_BUCKET),
        *_kv_write(MODELS_BUCKET),
        *_objects_write(ARTIFACTS_BUCKET),
        *_kv_write(RETRAINS_BUCKET),
        # `myelin models retrain` runs a job in the command line, as the retrainer would
        "myelin.audit.retrain_start",
        "myelin.audit.retrain_finish",
        "myelin.audit.retrain_skip",
        *_stream_read(EVENTS_STREAM),
        *_stream_read(FEATURES_STREAM),
        *_stream_read(LATE_STREAM),
        *_stream_read(INGEST_STREAM),
        *_kv_read(VIEWS_BUCKET),
    ]


def _health_subjects(service: str, settings: Settings) -> list[str]:
    workers = {"ingest": settings.ingest_workers, "features": settings.features_workers}.get(
        service, 1
    )
    names = [service if k == 1 else f"{service}-{k}" for k in range(1, max(workers, 1) + 1)]
    return [f"myelin.rpc.health.{n}.*" for n in names]


def grants(identity: str, settings: Settings) -> Grant:
    """The NATS permissions of ``identity`` (see the module docstring)."""
    if identity == ADMIN:
        return Grant(publish=(">",), subscribe=(">",), responder=True)
    if identity == AUTH_AUDIT:  # the system account: hears refused connections, says nothing
        return Grant(publish=(), subscribe=(AUTH_ERRORS,), publish_deny=(">",))
    common_pub = ["$JS.API.INFO", f"myelin.rpc.*.*.{identity}"]
    common_sub = [f"{inbox_prefix(identity)}.>"]
    if identity in SERVICES:
        own = _service_grants(settings)[identity]
        serves = [f"myelin.rpc.{identity}.*.*", *_health_subjects(identity, settings)]
        deny = [] if identity == "governance" else list(_SERVING_KEYS)
        if identity == "features":  # it may consume EVENTS under any name, but not these
            deny += _foreign_durables(identity, EVENTS_STREAM, settings)
        return Grant(
            publish=tuple(dict.fromkeys([*common_pub, *own])),
            subscribe=tuple([*common_sub, *serves]),
            publish_deny=tuple(deny),
            responder=True,
        )
    if identity == OPERATOR:
        return Grant(
            publish=tuple(dict.fromkeys([*common_pub, *_operator_grants(settings)])),
            subscribe=tuple(common_sub),
            publish_deny=_SERVING_KEYS,
        )
    if is_producer(identity):
        return Grant(
            publish=(
                *common_pub,
                f"myelin.ingest.{identity}",
                f"myelin.ingest.{identity}.>",
                *_kv_read(topology.CONTRACTS_BUCKET),
            ),
            subscribe=tuple(common_sub),
            publish_deny=_SERVING_KEYS,
        )
    raise ValueError(f"no permissions are defined for identity {identity!r}")


def _quoted(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def _user(identity: str, key: str, settings: Settings) -> str:
    g = grants(identity, settings)
    publish = f"allow: {_quoted(g.publish)}" if g.publish else ""
    if g.publish_deny:
        publish += (", " if publish else "") + f"deny: {_quoted(g.publish_deny)}"
    perms = [f"publish: {{{publish}}}", f"subscribe: {{allow: {_quoted(g.subscribe)}}}"]
    if g.responder:
        perms.append("allow_responses: true")
    return (
        f"    # {identity}\n    {{nkey: {key}, permissions: {{\n      "
        + ",\n      ".join(perms)
        + "\n    }}"
    )


def nats_authorization(public_keys: dict[str, str], settings: Settings) -> str:
    """nats-server's users: one nkey user per identity (``public_keys``: identity -> its
    public key), with :func:`grants`; :data:`AUTH_AUDIT` in the system account."""
    users = [
        _user(identity, key, settings)
        for identity, key in sorted(public_keys.items())
        if identity != AUTH_AUDIT
    ]
    out = "authorization {\n  users: [\n" + ",\n".join(users) + "\n  ]\n}"
    if AUTH_AUDIT in public_keys:
        sys_user = _user(AUTH_AUDIT, public_keys[AUTH_AUDIT], settings)
        out += f"\naccounts {{\n  SYS {{ users: [\n{sys_user}\n  ] }}\n}}\nsystem_account: SYS"
    return out
