"""Loaded models, alias resolution, hot swap, the serving policy check and model readiness.

The host follows the registry (``watch``): every model that has aliases is discovered, and
each alias target is loaded beside what serves, warmed with one inference and checked with
governance before the in-memory alias map flips. In-flight requests keep the session they
started with, so none is dropped. A target that cannot be loaded, or that governance
denies (the aliases key can be written without asking governance), never takes traffic:
the previous target keeps serving and the host reports why the registry's wish is not met,
because a deployment whose desired aliases cannot be served is not ready.

Readiness is answered from memory; only requests for a version or model the host does not
hold yet load anything.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from myelin.decisions import GovernanceClient, Verdict
from myelin.errors import MyelinError, Retryable
from myelin.models import ModelNotFound, ModelRegistry, ModelVersion, Routes, card_digest
from myelin.settings import Settings
from services.inference.drift_counters import DriftCounters
from services.inference.routing import canary_takes
from services.inference.runtime import OrtModel, load_onnx

log = logging.getLogger(__name__)


class ModelDenied(MyelinError):
    code = "model_denied"


@dataclass
class LoadedModel:
    mv: ModelVersion
    ort: OrtModel
    verdict: Verdict
    decided_at: float
    loaded_at: float = field(default_factory=time.time)
    # why the last periodic re-decision failed ("" when it succeeded)
    renew_error: str = ""
    # served values per reference bin in the current window (None: no reference registered)
    drift: DriftCounters | None = None
    # its card is not the one governance approved: refused for good, whatever the policy
    tampered: bool = False

    @property
    def version(self) -> str:
        return str(self.mv.version)


@dataclass(frozen=True)
class RouteTable:
    """A model's routes as the host follows them: only loaded, allowed targets take part."""

    routes: Routes
    canary: LoadedModel | None = None
    shadow: LoadedModel | None = None
    canary_problem: str = ""  # why the registry's canary takes no traffic (readiness)
    shadow_problem: str = ""  # why the registry's shadow is not scored (status)


@dataclass(frozen=True)
class Routed:
    """Where one request goes: the version that answers it, how it was chosen, and the
    version scored beside it off the hot path, if any."""

    model: LoadedModel
    alias: str
    route: str  # "champion" (the default alias), "canary", another alias, or "pinned"
    shadow: LoadedModel | None


@dataclass(frozen=True)
class _Held:
    """Why an alias's registry target does not take traffic."""

    version: int
    reason: str  # for readiness, e.g. "ctr:champion -> v3 denied by governance: ..."
    error: MyelinError  # what a request for the alias gets while nothing else serves it


def _reasons(verdict: Verdict) -> str:
    return "; ".join(verdict.reasons) or "no reason given"


class ModelHost:
    def __init__(
        self, registry: ModelRegistry, governance: GovernanceClient, settings: Settings
    ) -> None:
        self._registry = registry
        self._gov = governance
        self._s = settings
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._aliases: dict[str, dict[str, int]] = {}  # what traffic follows
        self._desired: dict[str, dict[str, int]] = {}  # what the registry says
        self._held: dict[tuple[str, str], _Held] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._follow_locks: dict[str, asyncio.Lock] = {}
        self._routes: dict[str, RouteTable] = {}
        self._synced = False
        self._registry_error = ""
        self.default_alias = settings.model_alias
        self.swaps = 0

    def known_models(self) -> list[str]:
        return sorted({n for n, _ in self._loaded} | set(self._aliases))

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    # ------------------------------------------------------------------ readiness

    def not_ready(self) -> list[str]:
        """Why not every alias target in the registry is loaded, warmed and allowed."""
        reasons: list[str] = []
        if not self._synced:
            reasons.append(
                "model registry not read yet"
                + (f": {self._registry_error}" if self._registry_error else "")
            )
        elif self._registry_error:
            reasons.append(self._registry_error)
        now = time.monotonic()
        for name in sorted(self._desired):
            serving = self._aliases.get(name, {})
            for alias, version in sorted(self._desired[name].items()):
                model = self._loaded.get((name, version))
                if serving.get(alias) != version or model is None:
                    held = self._held.get((name, alias))
                    if held is not None and held.version == version:
                        reasons.append(held.reason)
                    else:
                        reasons.append(f"{name} v{version} not loaded yet")
                elif not model.verdict.allow:
                    reasons.append(
                        f"{name}:{alias} -> v{version} denied by governance: "
                        + _reasons(model.verdict)
                    )
                elif model.renew_error and now - model.decided_at > self._s.policy_cache_ttl_s:
                    # requests re-decide an expired verdict themselves, and would fail too
                    reasons.append(
                        f"{name}:{alias} -> v{version}: serving verdict expired and could not "
                        f"be renewed: {model.renew_error}"
                    )
        for _, table in sorted(self._routes.items()):
            if table.canary_problem:
                reasons.append(table.canary_problem)
        return reasons

    def ready(self) -> bool:
        return not self.not_ready()

    def model_ready(self, name: str, ref: str = "") -> bool:
        """``ref`` (version, alias or empty for the default alias) is loaded and allowed.
        From memory only: a readiness probe never loads a model."""
        ref = ref.strip() or self.default_alias
        version = int(ref) if ref.isdigit() else self._aliases.get(name, {}).get(ref)
        if version is None:
            return False
        model = self._loaded.get((name, version))
        return model is not None and model.verdict.allow

    # ------------------------------------------------------------------ serving

    async def get(self, name: str, ref: str = "") -> tuple[LoadedModel, str]:
        """Resolve ``ref`` (version, alias or empty for the default alias) to an allowed model."""
        ref = ref.strip() or self.default_alias
        if ref.isdigit():
            version, alias = int(ref), ""
        else:
            alias = ref
            target = self._aliases.get(name, {}).get(alias)
            if target is None and (name, alias) not in self._held:
                # registered or moved since the last poll (perhaps being loaded by it right
                # now): follow it now rather than answer NOT_FOUND
                await self.follow(name)
                target = self._aliases[name].get(alias)
            if target is None:
                held = self._held.get((name, alias))
                if held is not None:
                    raise copy.copy(held.error) from None
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
            version = target
        model = await self._load(name, version)
        await self._check(model)
        return model, alias

    async def route(self, name: str, ref: str, entity_id: str) -> Routed:
        """Resolve a Predict: the default alias follows the model's routes (a canary takes
        its share of entities by a sticky hash; a shadow is scored beside the champion);
        an explicit alias or version is served as asked."""
        ref = ref.strip() or self.default_alias
        model, alias = await self.get(name, ref)
        if alias != self.default_alias:
            return Routed(model, alias, alias or "pinned", None)
        table = self._routes.get(name)
        if table is None:
            return Routed(model, alias, alias, None)
        canary = table.canary
        if canary is not None and canary_takes(name, entity_id, table.routes.canary_share):
            try:
                await self._check(canary)
            except ModelDenied:
                pass  # denied since it was followed: the champion answers
            else:
                return Routed(canary, alias, "canary", None)
        shadow = table.shadow
        return Routed(
            model, alias, alias, shadow if shadow is not None and shadow.verdict.allow else None
        )

    async def _load(self, name: str, version: int) -> LoadedModel:
        key = (name, version)
        model = self._loaded.get(key)
        if model is not None:
            return model
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            model = self._loaded.get(key)
            if model is not None:
                return model
            mv = await self._registry.get(name, version)
            pinned = (await self._registry.approved(name)).get(version)
            data = await self._registry.artifact(mv)
            ortm = await asyncio.to_thread(
                load_onnx, data, self._s.ort_intra_threads, self._s.ort_inter_threads
            )
            try:
                await asyncio.to_thread(ortm.warm_up)
            except Exception as exc:  # noqa: BLE001 - real inputs may still run; serve it cold
                log.warning("warm-up of %s v%d failed, serving it cold: %r", name, version, exc)
            tampered = pinned is not None and pinned != card_digest(mv)
            if tampered:
                # rewritten since governance approved it: not this card, not served
                verdict = Verdict(
                    decision_id="",
                    allow=False,
                    reasons=[f"the card of {name} v{version} changed after governance approved it"],
                    policy_version="",
                )
            else:
                verdict = await self._decide(mv)
            drift = DriftCounters(mv.reference) if mv.reference is not None else None
            model = LoadedModel(mv, ortm, verdict, time.monotonic(), drift=drift, tampered=tampered)
            self._loaded[key] = model
            log.info("loaded %s v%d (allowed=%s)", name, version, verdict.allow)
            return model

    async def _decide(self, mv: ModelVersion) -> Verdict:
        try:
            return await self._gov.decide(
                "serve", f"{mv.name}:v{mv.version}", {"model": msgspec.to_builtins(mv)}
            )
        except MyelinError as exc:
            raise Retryable(
                f"governance unavailable, not serving {mv.name} v{mv.version}: {exc.message}"
            ) from None

    async def _check(self, model: LoadedModel) -> None:
        if not model.tampered and time.monotonic() - model.decided_at > self._s.policy_cache_ttl_s:
            model.verdict = await self._decide(model.mv)
            model.decided_at = time.monotonic()
        if not model.verdict.allow:
            raise ModelDenied(
                f"model {model.mv.name} v{model.mv.version} may not be served: "
                + "; ".join(model.verdict.reasons),
                decision_id=model.verdict.decision_id,
                policy_version=model.verdict.policy_version,
            )

    # ------------------------------------------------------------------ following the registry

    async def follow(self, name: str, fresh: dict[str, int] | None = None) -> None:
        """Bring ``name``'s aliases in line with the registry (``fresh``, read if None): each
        new target is loaded, warmed and allowed before its alias flips to it."""
        async with self._follow_locks.setdefault(name, asyncio.Lock()):
            if fresh is None:
                fresh = await self._registry.aliases(name)
            self._desired[name] = fresh
            serving = self._aliases.setdefault(name, {})
            for alias, version in fresh.items():
                if serving.get(alias) == version:
                    self._held.pop((name, alias), None)
                    continue
                try:
                    model = await self._load(name, version)
                except Exception as exc:  # noqa: BLE001 - keep serving the old version
                    err = (
                        exc
                        if isinstance(exc, MyelinError)
                        else Retryable(f"cannot load {name} v{version}: {exc!r}")
                    )
                    reason = f"{name}:{alias} -> v{version} not loaded: {err.message}"
                    self._hold(name, alias, version, reason, err)
                    continue
                if not model.verdict.allow:
                    self._hold(
                        name,
                        alias,
                        version,
                        f"{name}:{alias} -> v{version} denied by governance: "
                        + _reasons(model.verdict),
                        ModelDenied(
                            f"model {name} v{version} may not be served: "
                            + _reasons(model.verdict),
                            decision_id=model.verdict.decision_id,
                            policy_version=model.verdict.policy_version,
                        ),
                    )
                    continue
                old = serving.get(alias)
                serving = {**serving, alias: version}
                self._aliases[name] = serving  # one assignment: readers see old or new map
                self._held.pop((name, alias), None)
                if old is not None:
                    self.swaps += 1
                log.info("%s:%s now v%d (was %s)", name, alias, version, old)

    async def follow_routes(self, name: str, routes: Routes) -> None:
        """Load and check ``name``'s canary and shadow; a target that cannot be loaded or
        is denied takes no part (the champion serves), and says why."""
        current = self._routes.get(name)
        if routes == Routes():
            self._routes.pop(name, None)
            return
        if (
            current is not None
            and current.routes == routes
            and not (current.canary_problem or current.shadow_problem)
        ):
            return
        targets: dict[str, tuple[LoadedModel | None, str]] = {}
        for route, version in (("canary", routes.canary), ("shadow", routes.shadow)):
            if not version:
                targets[route] = (None, "")
                continue
            try:
                model = await self._load(name, version)
            except Exception as exc:  # noqa: BLE001 - the champion keeps serving
                message = exc.message if isinstance(exc, MyelinError) else repr(exc)
                targets[route] = (None, f"{name}:{route} -> v{version} not loaded: {message}")
                continue
            if not model.verdict.allow:
                targets[route] = (
                    None,
                    f"{name}:{route} -> v{version} denied by governance: "
                    + _reasons(model.verdict),
                )
                continue
            targets[route] = (model, "")
        table = RouteTable(
            routes,
            canary=targets["canary"][0],
            shadow=targets["shadow"][0],
            canary_problem=targets["canary"][1],
            shadow_problem=targets["shadow"][1],
        )
        for problem in (table.canary_problem, table.shadow_problem):
            if problem and problem not in (
                current.canary_problem if current else "",
                current.shadow_problem if current else "",
            ):
                log.warning("%s; the champion serves its traffic", problem)
        if current is None or current.routes != routes:
            log.info("%s routes now %s", name, routes)
        self._routes[name] = table

    def routes(self, name: str) -> RouteTable | None:
        return self._routes.get(name)

    def _hold(self, name: str, alias: str, version: int, reason: str, error: MyelinError) -> None:
        previous = self._held.get((name, alias))
        self._held[(name, alias)] = _Held(version, reason, error)
        if previous is None or previous.reason != reason:  # once, not every poll
            current = self._aliases.get(name, {}).get(alias)
            log.warning(
                "%s; %s",
                reason,
                f"still serving v{current}" if current is not None else "the alias serves nothing",
            )

    async def refresh_once(self) -> None:
        """Follow alias moves and newly aliased models, then renew expiring verdicts."""
        try:
            names = set(await self._registry.aliased_models())
            for name in sorted(names | set(self._aliases)):
                await self.follow(name, await self._registry.aliases(name) if name in names else {})
                await self.follow_routes(
                    name, await self._registry.routes(name) if name in names else Routes()
                )
        except MyelinError as exc:
            self._registry_error = f"model registry unreadable: {exc.message}"
            raise
        except Exception as exc:
            self._registry_error = f"model registry unreadable: {exc!r}"
            raise
        self._registry_error = ""
        self._synced = True
        for model in self.loaded():
            if time.monotonic() - model.decided_at > self._s.policy_cache_ttl_s / 2:
                await self._renew(model)

    async def _renew(self, model: LoadedModel) -> None:
        if model.tampered:
            return  # no policy makes a rewritten card the approved one
        try:
            verdict = await self._decide(model.mv)
        except MyelinError as exc:
            if not model.renew_error:
                log.warning("%s", exc.message)
            model.renew_error = exc.message
            return
        if verdict.allow != model.verdict.allow:
            log.warning(
                "governance now %s %s v%d%s",
                "allows" if verdict.allow else "denies",
                model.mv.name,
                model.mv.version,
                "" if verdict.allow else f": {_reasons(verdict)}",
            )
        model.verdict, model.decided_at, model.renew_error = verdict, time.monotonic(), ""

    async def watch(
        self,
        interval_s: float = 0.5,
        on_refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        while True:
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS restarting: try again
                log.warning("model refresh failed: %r", exc)
            if on_refresh is not None:
                try:
                    await on_refresh()
                except Exception:  # the models must still be followed
                    log.exception("after-refresh hook failed")
            await asyncio.sleep(interval_s)

    async def versions(self, name: str) -> list[int]:
        return await self._registry.versions(name)

    def status(self) -> dict[str, Any]:
        return {
            "models": [
                f"{m.mv.name}:v{m.mv.version}{'' if m.verdict.allow else ' (denied)'}"
                for m in self._loaded.values()
            ],
            "aliases": self._aliases,
            "desired_aliases": self._desired,
            "routes": {
                name: {
                    "canary": t.routes.canary,
                    "canary_share": t.routes.canary_share,
                    "shadow": t.routes.shadow,
                    **({"canary_problem": t.canary_problem} if t.canary_problem else {}),
                    **({"shadow_problem": t.shadow_problem} if t.shadow_problem else {}),
                }
                for name, t in self._routes.items()
            },
            "swaps": self.swaps,
        }
