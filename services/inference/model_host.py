"""Loaded models, alias resolution, hot swap and the serving policy check.

Traffic follows an alias only once the version it points to is loaded and allowed by
governance: a new version loads beside the serving one, then the in-memory alias map
flips. In-flight requests keep the session they started with, so none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from myelin.decisions import GovernanceClient, Verdict
from myelin.errors import MyelinError, Retryable
from myelin.models import ModelNotFound, ModelRegistry, ModelVersion
from myelin.settings import Settings
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

    @property
    def version(self) -> str:
        return str(self.mv.version)


class ModelHost:
    def __init__(
        self, registry: ModelRegistry, governance: GovernanceClient, settings: Settings
    ) -> None:
        self._registry = registry
        self._gov = governance
        self._s = settings
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._aliases: dict[str, dict[str, int]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self.default_alias = settings.model_alias
        self.swaps = 0

    def known_models(self) -> list[str]:
        return sorted({n for n, _ in self._loaded} | set(self._aliases))

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def ready(self) -> bool:
        """At least one model loaded and allowed, and every alias points at a loaded one."""
        if not any(m.verdict.allow for m in self._loaded.values()):
            return False
        return all((n, v) in self._loaded for n, al in self._aliases.items() for v in al.values())

    async def get(self, name: str, ref: str = "") -> tuple[LoadedModel, str]:
        """Resolve ``ref`` (version, alias or empty for the default alias) to an allowed model."""
        ref = ref.strip() or self.default_alias
        if ref.isdigit():
            version, alias = int(ref), ""
        else:
            alias = ref
            if name not in self._aliases:
                self._aliases[name] = await self._registry.aliases(name)
            target = self._aliases[name].get(alias)
            if target is None:
                raise ModelNotFound(f"model {name!r} has no alias {alias!r}")
            version = target
        model = await self._load(name, version)
        await self._check(model)
        return model, alias

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
            data = await self._registry.artifact(mv)
            ortm = await asyncio.to_thread(
                load_onnx, data, self._s.ort_intra_threads, self._s.ort_inter_threads
            )
            verdict = await self._decide(mv)
            model = LoadedModel(mv, ortm, verdict, time.monotonic())
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
        if time.monotonic() - model.decided_at > self._s.policy_cache_ttl_s:
            model.verdict = await self._decide(model.mv)
            model.decided_at = time.monotonic()
        if not model.verdict.allow:
            raise ModelDenied(
                f"model {model.mv.name} v{model.mv.version} may not be served: "
                + "; ".join(model.verdict.reasons),
                decision_id=model.verdict.decision_id,
                policy_version=model.verdict.policy_version,
            )

    async def refresh_once(self) -> None:
        """Follow alias moves: preload the new target, then flip the alias."""
        for name in list(self._aliases):
            fresh = await self._registry.aliases(name)
            for alias, version in fresh.items():
                if self._aliases[name].get(alias) == version:
                    continue
                try:
                    await self._load(name, version)
                except Exception as exc:  # noqa: BLE001 - keep serving the old version
                    log.warning("cannot load %s v%d for %s: %r", name, version, alias, exc)
                    continue
                old = self._aliases[name].get(alias)
                self._aliases[name] = {**self._aliases[name], alias: version}
                self.swaps += 1
                log.info("%s:%s now v%d (was %s)", name, alias, version, old)
        for model in self.loaded():
            if time.monotonic() - model.decided_at > self._s.policy_cache_ttl_s / 2:
                with contextlib.suppress(MyelinError):
                    model.verdict = await self._decide(model.mv)
                    model.decided_at = time.monotonic()

    async def watch(self, interval_s: float = 0.5) -> None:
        while True:
            try:
                await self.refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS restarting: try again
                log.warning("model refresh failed: %r", exc)
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
            "swaps": self.swaps,
        }
