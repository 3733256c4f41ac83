"""After shadow: canary and champion are later steps, each a governance decision (the
promote policy wants a retrained version to go shadow -> canary -> champion, and no worse
than the champion on the holdout)."""

from __future__ import annotations

from myelin.models import ModelRegistry
from myelin.retraining.errors import RetrainError


async def advance(
    registry: ModelRegistry,
    name: str,
    version: int,
    *,
    requester: str,
    canary_share: float = 0.1,
) -> str:
    """Ask governance for ``version``'s next stage: shadow -> canary (``canary_share`` of
    the traffic) -> champion. Returns the stage reached; :class:`PromotionDenied` carries
    the policy's reasons. Governance audits each decision."""
    champion = (await registry.aliases(name)).get("champion")
    if version == champion:
        raise RetrainError(f"{name} v{version} is already the champion")
    routes = await registry.routes(name)
    if routes.shadow == version:
        await registry.set_routes(
            name, canary=version, canary_share=canary_share, shadow=0, requester=requester
        )
        return "canary"
    if routes.canary == version:
        await registry.set_alias(name, "champion", version, requester=requester)
        return "champion"
    raise RetrainError(
        f"{name} v{version} is neither the shadow (v{routes.shadow or '-'}) nor the canary "
        f"(v{routes.canary or '-'}): a version advances shadow -> canary -> champion; retrain "
        "it or put it in shadow first"
    )
