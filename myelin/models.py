"""The model registry: versions, aliases and provenance in NATS KV; ONNX artifacts in
the NATS object store. Shared by the inference service (reads) and the CLI (writes).

KV bucket ``myelin_models``:
- ``<name>.v<N>``      :class:`ModelVersion` (JSON), written once (create, never update)
- ``<name>.aliases``   ``{"champion": N, "challenger": M}``
- ``<name>.routes``    :class:`Routes` (canary, shadow)
- ``<name>.approved``  ``{"N": card digest}``: the cards governance allowed to serve
Object store ``myelin_model_artifacts``: ``<name>/v<N>.onnx``.

Aliases and routes are moved by governance alone (the registry owner: no other identity
may write those keys): :meth:`ModelRegistry.set_alias` and friends send it a request, it
asks its ``promote`` policy and writes (``services/governance/serving_owner.py``). The
promote policy includes every serving rule, so an alias is never moved to a version that
inference would refuse.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from myelin import bus
from myelin.drift import Reference
from myelin.errors import MyelinError, RemoteError
from myelin.subjects import (
    ARTIFACTS_BUCKET,
    MODELS_BUCKET,
    RPC_GOVERNANCE_PROMOTE,
    RPC_GOVERNANCE_ROLLBACK,
    RPC_GOVERNANCE_ROUTES,
)

ALIASES = ("champion", "challenger", "shadow")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class RegistryError(MyelinError):
    code = "registry_error"


class ModelNotFound(RegistryError):
    code = "model_not_found"


class PromotionDenied(RegistryError):
    code = "promotion_denied"


class TensorSpec(msgspec.Struct, frozen=True):
    name: str
    datatype: str  # OIP datatype, e.g. FP32
    shape: list[int]


_IDENT = r"^[a-z][a-z0-9_]{0,63}$"


class LabelSource(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a model's outcomes come from, to join them to its inferences
    (:mod:`myelin.quality`).

    - ``kind="event"``: the outcome of an inference of entity *e* at time *t* is 1 when an
      event of ``event_type`` of *e* follows within ``window_s`` (a click after a
      recommendation), else 0; only inferences older than the window are judged.
    - ``kind="request"``: events of ``event_type`` name the inference they label in
      ``request_field`` and carry the outcome (0 or 1) in ``value_field`` (a labels stream
      keyed by request id); unlabelled inferences are left out.
    """

    kind: Literal["event", "request"] = "event"
    event_type: Annotated[str, msgspec.Meta(pattern=_IDENT)]
    window_s: Annotated[int, msgspec.Meta(ge=1, le=90 * 86400)] = 3600
    request_field: Annotated[str, msgspec.Meta(pattern=_IDENT)] = "request_id"
    value_field: Annotated[str, msgspec.Meta(pattern=_IDENT)] = "label"


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    training_window: list[int] = []  # [start_ms, end_ms] of the training data's event time
    feature_views: list[str] = []  # "name@hash"
    feature_view: str = ""
    features: list[str] = []  # input column order
    training_rows: int = 0
    training_query: str = ""
    created_by: str = ""
    label_source: LabelSource | None = None  # how its outcomes are known (quality views)


class Routes(msgspec.Struct, frozen=True, kw_only=True):
    """How a model's default-alias traffic is split (registry key ``<name>.routes``)."""

    canary: int = 0  # a version taking ``canary_share`` of the requests (0: none)
    canary_share: float = 0.0  # by a sticky hash of the request's (first) entity id
    shadow: int = 0  # a version scored beside the champion on the same features (0: none)


class ModelVersion(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: int
    artifact: str
    sha256: str
    size: int
    created_ms: int
    platform: str = "onnx_onnxv1"
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    provenance: Provenance = Provenance()
    metrics: dict[str, float] = {}
    labels: dict[str, str] = {}
    # every input feature's and the score's training distribution, frozen as quantile bins
    # (myelin.drift): what the serving process measures drift against
    reference: Reference | None = None


_mv_dec = msgspec.json.Decoder(ModelVersion)


def card_digest(mv: ModelVersion) -> str:
    """A version card's digest: what governance approved is what is served (the card
    names the artifact's sha256, which is checked when the artifact is read)."""
    return hashlib.sha256(msgspec.json.encode(mv)).hexdigest()


_routes_dec = msgspec.json.Decoder(Routes)
_json = msgspec.json.Encoder()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise RegistryError(f"model name {name!r} must match {_NAME.pattern}")
    return name


class ModelRegistry:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self._kv: Any = None
        self._obj: Any = None

    async def _stores(self) -> tuple[Any, Any]:
        if self._kv is None:
            self._kv = await self._js.key_value(MODELS_BUCKET)
            self._obj = await self._js.object_store(ARTIFACTS_BUCKET)
        return self._kv, self._obj

    async def versions(self, name: str) -> list[int]:
        keys = await bus.kv_keys(self._js, MODELS_BUCKET)
        prefix = f"{name}.v"
        return sorted(
            int(k[len(prefix) :])
            for k in keys
            if k.startswith(prefix) and k[len(prefix) :].isdigit()
        )

    async def get(self, name: str, version: int) -> ModelVersion:
        kv, _ = await self._stores()
        try:
            entry = await kv.get(f"{name}.v{version}")
        except KeyNotFoundError:
            raise ModelNotFound(f"model {name} has no version {version}") from None
        return _mv_dec.decode(entry.value)

    async def aliases(self, name: str) -> dict[str, int]:
        kv, _ = await self._stores()
        try:
            entry = await kv.get(f"{name}.aliases")
        except KeyNotFoundError:
            return {}
        result: dict[str, int] = msgspec.json.decode(entry.value, type=dict[str, int])
        return result

    async def aliased_models(self) -> list[str]:
        """Every model that has an aliases key (what a server should keep loaded)."""
        keys = await bus.kv_keys(self._js, MODELS_BUCKET)
        suffix = ".aliases"
        return sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))

    async def resolve(self, name: str, version_or_alias: str) -> ModelVersion:
        """``"3"`` -> version 3; ``"champion"`` -> what the alias points to."""
        ref = version_or_alias.strip()
        if ref.isdigit():
            return await self.get(name, int(ref))
        target = (await self.aliases(name)).get(ref)
        if target is None:
            raise ModelNotFound(f"model {name} has no alias {ref!r}")
        return await self.get(name, target)

    async def artifact(self, mv: ModelVersion) -> bytes:
        _, obj = await self._stores()
        result = await obj.get(mv.artifact)
        data: bytes = result.data
        if hashlib.sha256(data).hexdigest() != mv.sha256:
            raise RegistryError(f"artifact of {mv.name} v{mv.version} does not match its sha256")
        return data

    async def register(
        self,
        name: str,
        onnx_bytes: bytes,
        *,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        provenance: Provenance,
        metrics: dict[str, float],
        labels: dict[str, str] | None = None,
        reference: Reference | None = None,
    ) -> ModelVersion:
        check_name(name)
        if (
            reference is not None
            and provenance.features
            and reference.features != list(provenance.features)
        ):
            raise RegistryError(
                f"the drift reference covers {reference.features}, but the model reads "
                f"{list(provenance.features)}: build it from the training matrix in that order"
            )
        kv, obj = await self._stores()
        for _ in range(20):
            existing = await self.versions(name)
            version = (existing[-1] if existing else 0) + 1
            artifact = f"{name}/v{version}.onnx"
            mv = ModelVersion(
                name=name,
                version=version,
                artifact=artifact,
                sha256=hashlib.sha256(onnx_bytes).hexdigest(),
                size=len(onnx_bytes),
                created_ms=int(time.time() * 1000),
                inputs=inputs,
                outputs=outputs,
                provenance=provenance,
                metrics=metrics,
                labels=labels or {},
                reference=reference,
            )
            await obj.put(artifact, onnx_bytes)
            try:
                await kv.create(f"{name}.v{version}", _json.encode(mv))
            except KeyWrongLastSequenceError:
                continue  # another writer took this number; try the next
            return mv
        raise RegistryError(f"could not allocate a version for {name}")

    async def update(self, key: str, change: Callable[[bytes | None], bytes]) -> None:
        """Compare-and-set ``key`` to ``change(current value or None)``."""
        kv, _ = await self._stores()
        for _ in range(20):
            try:
                entry = await kv.get(key)
                current, revision = entry.value, entry.revision
            except KeyNotFoundError:
                current, revision = None, 0
            value = change(current)
            try:
                if revision:
                    await kv.update(key, value, last=revision)
                else:
                    await kv.create(key, value)
                return
            except KeyWrongLastSequenceError:
                continue
        raise RegistryError(f"could not update {key}: too much contention")

    async def approved(self, name: str) -> dict[int, str]:
        """The versions governance allowed to serve, with the digest of the card it judged
        (:func:`card_digest`): a card rewritten since is not served."""
        kv, _ = await self._stores()
        try:
            entry = await kv.get(f"{name}.approved")
        except KeyNotFoundError:
            return {}
        raw: dict[str, str] = msgspec.json.decode(entry.value, type=dict[str, str])
        return {int(v): d for v, d in raw.items()}

    async def routes(self, name: str) -> Routes:
        """``name``'s canary and shadow (``Routes()`` when it has none)."""
        kv, _ = await self._stores()
        try:
            entry = await kv.get(f"{name}.routes")
        except KeyNotFoundError:
            return Routes()
        return _routes_dec.decode(entry.value)

    # -------------------------------------------- what serves: moved by governance only

    async def set_alias(self, name: str, alias: str, version: int, *, requester: str = "") -> None:
        """Point ``alias`` at ``version``, if governance allows the promotion: governance,
        the registry owner, decides and writes (nobody else may write aliases). The
        requester on record is this connection's identity; ``requester`` counts only on
        a server without authentication."""
        await self._ask(
            RPC_GOVERNANCE_PROMOTE,
            {"name": name, "alias": alias, "version": version, "requester": requester},
        )

    async def set_routes(
        self,
        name: str,
        *,
        canary: int | None = None,
        canary_share: float | None = None,
        shadow: int | None = None,
        requester: str = "",
    ) -> Routes:
        """Move ``name``'s canary (a version and its share of the champion's traffic) and / or
        shadow (a version scored beside the champion, off the hot path); ``0`` removes a
        route. Each new target asks governance (``promote`` to ``canary`` / ``shadow``),
        which writes the routes; returns them."""
        raw = await self._ask(
            RPC_GOVERNANCE_ROUTES,
            {
                "name": name,
                "canary": canary,
                "canary_share": canary_share,
                "shadow": shadow,
                "requester": requester,
            },
        )
        return _routes_dec.decode(raw)

    async def rollback(self, name: str, *, requester: str = "") -> Routes:
        """Take every route away (the champion serves all traffic, nothing is shadowed);
        always allowed, and audited. Returns the routes it took away."""
        raw = await self._ask(RPC_GOVERNANCE_ROLLBACK, {"name": name, "requester": requester})
        return _routes_dec.decode(raw)

    async def _ask(self, endpoint: str, body: dict[str, Any]) -> bytes:
        try:
            return bytes(await bus.request(self._nc, endpoint, body, timeout=30.0))
        except RemoteError as exc:
            error = _REMOTE.get(exc.code, RegistryError)
            raise error(exc.message, **exc.details) from None


_REMOTE: dict[str, type[RegistryError]] = {
    c.code: c for c in (RegistryError, ModelNotFound, PromotionDenied)
}
