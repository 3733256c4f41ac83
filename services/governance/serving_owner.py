"""Outbound adapter: governance as the model registry's owner. It alone may write a
model's ``aliases`` and ``routes`` keys (the NATS permissions say so), so every move of
what serves passes its ``promote`` policy and is audited, whoever asks.

The requester on record is the caller's authenticated identity (on a server without
authentication, what the caller says; ``anonymous`` if nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from myelin import access
from myelin.audit import platform_record
from myelin.models import (
    ModelRegistry,
    ModelVersion,
    PromotionDenied,
    RegistryError,
    Routes,
    card_digest,
    check_name,
)
from myelin.nats_identity import ANONYMOUS
from myelin.records import AuditRecord
from services.governance.logic import Decision, DecisionRequest

_json = msgspec.json.Encoder()
_routes_dec = msgspec.json.Decoder(Routes)


class PromoteRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    alias: str
    version: int
    requester: str = ""


class RoutesRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    canary: int | None = None
    canary_share: float | None = None
    shadow: int | None = None
    requester: str = ""


class RollbackRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    requester: str = ""


def requester_of(caller: str, claimed: str) -> str:
    return access.requester(caller, claimed) or ANONYMOUS


class ServingOwner:
    def __init__(
        self,
        registry: ModelRegistry,
        decide: Callable[[DecisionRequest], Awaitable[Decision]],
        audit: Callable[[AuditRecord], Awaitable[None]],
    ) -> None:
        self._reg = registry
        self._decide = decide
        self._audit = audit
        # one move of a model's aliases or routes at a time: each reads, decides, then
        # writes what it read plus its change (two at once could undo each other). This
        # orders the moves one governance process serves; replicas would need the routes'
        # revision carried through (they are not run yet)
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _ask_promote(
        self, mv: ModelVersion, alias: str, requester: str, **extra: Any
    ) -> None:
        """The ``promote`` decision on ``mv`` taking ``alias`` (or a route); raises
        :class:`PromotionDenied` with the policy's reasons."""
        decision = await self._decide(
            DecisionRequest(
                action="promote",
                subject=f"{mv.name}:v{mv.version}",
                input={
                    "alias": alias,
                    "requester": requester,
                    "model": msgspec.to_builtins(mv),
                    **extra,
                },
            )
        )
        if not decision.allow:
            raise PromotionDenied(
                f"promoting {mv.name} v{mv.version} to {alias} was denied: "
                f"{'; '.join(decision.reasons)}",
                decision_id=decision.decision_id,
            )
        await self._approve(mv)

    async def _approve(self, mv: ModelVersion) -> None:
        """Pin the card just judged: inference serves this version only while its card
        (and so its artifact's digest) is the one approved."""
        digest = card_digest(mv)

        def change(current: bytes | None) -> bytes:
            approved = msgspec.json.decode(current, type=dict[str, str]) if current else {}
            approved[str(mv.version)] = digest
            return _json.encode(approved)

        await self._reg.update(f"{mv.name}.approved", change)

    async def set_alias(self, req: PromoteRequest, caller: str) -> None:
        """Point ``alias`` at ``version`` if the promotion is allowed."""
        async with self._lock(check_name(req.name)):
            await self._set_alias(req, caller)

    async def _set_alias(self, req: PromoteRequest, caller: str) -> None:
        name, alias, version = check_name(req.name), req.alias, req.version
        mv = await self._reg.get(name, version)
        routes = await self._reg.routes(name)
        await self._ask_promote(
            mv, alias, requester_of(caller, req.requester), routes=msgspec.to_builtins(routes)
        )

        def change(current: bytes | None) -> bytes:
            aliases = msgspec.json.decode(current, type=dict[str, int]) if current else {}
            aliases[alias] = version
            return _json.encode(aliases)

        await self._reg.update(f"{name}.aliases", change)
        if alias == "champion" and version in (routes.canary, routes.shadow):
            # a version leaves its route when it becomes the champion
            await self._write_routes(
                name,
                lambda r: msgspec.structs.replace(
                    r,
                    canary=0 if r.canary == version else r.canary,
                    canary_share=0.0 if r.canary == version else r.canary_share,
                    shadow=0 if r.shadow == version else r.shadow,
                ),
            )

    async def _write_routes(self, name: str, change: Callable[[Routes], Routes]) -> None:
        def encode(current: bytes | None) -> bytes:
            return _json.encode(change(_routes_dec.decode(current) if current else Routes()))

        await self._reg.update(f"{name}.routes", encode)

    async def set_routes(self, req: RoutesRequest, caller: str) -> Routes:
        """Move a model's canary and / or shadow (``0`` removes a route); each new target
        asks ``promote`` to ``canary`` / ``shadow``."""
        async with self._lock(check_name(req.name)):
            return await self._set_routes(req, caller)

    async def _set_routes(self, req: RoutesRequest, caller: str) -> Routes:
        name = check_name(req.name)
        canary, canary_share, shadow = req.canary, req.canary_share, req.shadow
        requester = requester_of(caller, req.requester)
        current = await self._reg.routes(name)
        champion = (await self._reg.aliases(name)).get("champion")
        new = current
        if canary is not None:
            share = current.canary_share if canary_share is None else canary_share
            new = msgspec.structs.replace(new, canary=canary, canary_share=share if canary else 0.0)
        elif canary_share is not None:
            new = msgspec.structs.replace(new, canary_share=canary_share)
        if shadow is not None:
            new = msgspec.structs.replace(new, shadow=shadow)
        elif canary and canary == current.shadow:
            new = msgspec.structs.replace(new, shadow=0)  # it moves up from shadow to canary
        if new.canary and not 0.0 < new.canary_share <= 1.0:
            raise RegistryError(f"a canary share is in (0, 1], got {new.canary_share}")
        for route, version in (("canary", new.canary), ("shadow", new.shadow)):
            if version and version == champion:
                raise RegistryError(
                    f"v{version} is the champion of {name}; it cannot also be its {route}"
                )
        if new.canary and new.canary == new.shadow:
            raise RegistryError(f"v{new.canary} cannot be both canary and shadow")
        if new.shadow and champion is not None and new.shadow != current.shadow:
            theirs = (await self._reg.get(name, champion)).provenance.features
            mine = (await self._reg.get(name, new.shadow)).provenance.features
            if list(mine) != list(theirs):
                raise RegistryError(
                    f"a shadow is scored on the features the champion was served: v{new.shadow} "
                    f"reads {list(mine)}, the champion v{champion} {list(theirs)}"
                )
        for route, version, was in (
            ("canary", new.canary, (current.canary, current.canary_share)),
            ("shadow", new.shadow, (current.shadow, 0.0)),
        ):
            now = (version, new.canary_share if route == "canary" else 0.0)
            if version and now != was:
                await self._ask_promote(
                    await self._reg.get(name, version),
                    route,
                    requester,
                    share=now[1],
                    champion=champion,
                    routes=msgspec.to_builtins(current),
                )
        await self._write_routes(name, lambda _: new)
        return new

    async def rollback(self, req: RollbackRequest, caller: str) -> Routes:
        """Take every route away: always allowed (it only takes traffic off versions), and
        audited. Returns the routes taken away."""
        async with self._lock(check_name(req.name)):
            return await self._rollback(req, caller)

    async def _rollback(self, req: RollbackRequest, caller: str) -> Routes:
        name = check_name(req.name)
        requester = requester_of(caller, req.requester)
        previous = await self._reg.routes(name)
        await self._write_routes(name, lambda _: Routes())
        await self._audit(
            platform_record(
                "rollback",
                name,
                [f"routes of {name} cleared by {requester}"],
                {"model": name, "requester": requester, "previous": msgspec.to_builtins(previous)},
                allow=True,
            )
        )
        return previous
