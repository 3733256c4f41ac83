"""Registry of known event contracts: ``(type, schema_version)`` -> contract.

Each contract names its payload type, the field that is the entity / partition key, and
the fields that hold personal data. Decoders are built once, here, at start-up.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any

import msgspec

from myelin.contracts.events import ClickV1, ImpressionV1, PurchaseV1


@dataclass(frozen=True)
class Contract:
    type: str
    version: int
    payload: builtins.type[msgspec.Struct]
    key_field: str
    pii_fields: tuple[str, ...] = ()
    json_decoder: msgspec.json.Decoder[Any] = field(init=False, repr=False, compare=False)
    msgpack_decoder: msgspec.msgpack.Decoder[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {f.name for f in msgspec.structs.fields(self.payload)}
        if self.key_field not in names:
            raise ValueError(f"{self.type} v{self.version}: key field {self.key_field!r} missing")
        object.__setattr__(self, "json_decoder", msgspec.json.Decoder(self.payload))
        object.__setattr__(self, "msgpack_decoder", msgspec.msgpack.Decoder(self.payload))


class ContractRegistry:
    """An immutable lookup of contracts by ``(type, version)``."""

    def __init__(self, contracts: list[Contract]) -> None:
        self._by_key: dict[tuple[str, int], Contract] = {}
        for c in contracts:
            if (c.type, c.version) in self._by_key:
                raise ValueError(f"duplicate contract {c.type} v{c.version}")
            self._by_key[(c.type, c.version)] = c

    def get(self, type_: str, version: int) -> Contract | None:
        return self._by_key.get((type_, version))

    def versions(self, type_: str) -> list[int]:
        return sorted(v for (t, v) in self._by_key if t == type_)

    def types(self) -> list[str]:
        return sorted({t for (t, _) in self._by_key})

    def __iter__(self) -> Any:
        return iter(self._by_key.values())


def default_registry() -> ContractRegistry:
    return ContractRegistry(
        [
            Contract("impression", 1, ImpressionV1, key_field="user_id"),
            Contract("click", 1, ClickV1, key_field="user_id"),
            Contract("purchase", 1, PurchaseV1, key_field="user_id"),
        ]
    )
