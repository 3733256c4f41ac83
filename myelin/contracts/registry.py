"""Registry of known event contracts: ``(type, schema_version)`` -> contract.

Each contract names its payload type, the field that is the entity / partition key, and
the fields that hold personal data. Decoders are built once per contract. A registry is
immutable; a new version means a new registry object (ingest swaps it atomically).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgspec

from myelin.contracts.events import ClickV1, ImpressionV1, PurchaseV1, PurchaseV2
from myelin.contracts.schema import ContractSpec, spec_from_struct, struct_from_spec


@dataclass(frozen=True)
class Contract:
    type: str
    version: int
    payload: builtins.type[msgspec.Struct]
    key_field: str
    pii_fields: tuple[str, ...] = ()
    spec: ContractSpec | None = field(default=None, compare=False)
    json_decoder: msgspec.json.Decoder[Any] = field(init=False, repr=False, compare=False)
    msgpack_decoder: msgspec.msgpack.Decoder[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {f.name for f in msgspec.structs.fields(self.payload)}
        if self.key_field not in names:
            raise ValueError(f"{self.type} v{self.version}: key field {self.key_field!r} missing")
        unknown = set(self.pii_fields) - names
        if unknown:
            raise ValueError(f"{self.type} v{self.version}: PII fields {sorted(unknown)} missing")
        object.__setattr__(self, "json_decoder", msgspec.json.Decoder(self.payload))
        object.__setattr__(self, "msgpack_decoder", msgspec.msgpack.Decoder(self.payload))
        if self.spec is None:
            object.__setattr__(
                self,
                "spec",
                spec_from_struct(
                    self.type, self.version, self.payload, self.key_field, self.pii_fields
                ),
            )

    @classmethod
    def from_spec(
        cls, spec: ContractSpec, payload: builtins.type[msgspec.Struct] | None = None
    ) -> Contract:
        return cls(
            spec.type,
            spec.version,
            payload or struct_from_spec(spec),
            spec.key_field,
            spec.pii_fields,
            spec,
        )


class ContractRegistry:
    """An immutable lookup of contracts by ``(type, version)``."""

    def __init__(self, contracts: list[Contract]) -> None:
        self._by_key: dict[tuple[str, int], Contract] = {}
        for c in contracts:
            if (c.type, c.version) in self._by_key:
                raise ValueError(f"duplicate contract {c.type} v{c.version}")
            self._by_key[(c.type, c.version)] = c

    @classmethod
    def from_specs(cls, specs: list[ContractSpec]) -> ContractRegistry:
        """Specs from the registry store; where code has the same contract, use its Struct."""
        code = {(c.type, c.version): c for c in builtin_contracts()}
        out = []
        for s in specs:
            c = code.get((s.type, s.version))
            out.append(c if c is not None and c.spec == s else Contract.from_spec(s))
        return cls(out)

    def get(self, type_: str, version: int) -> Contract | None:
        return self._by_key.get((type_, version))

    @property
    def lookup(self) -> Mapping[tuple[str, int], Contract]:
        """Read-only ``(type, version) -> contract`` mapping, for hot loops."""
        return MappingProxyType(self._by_key)

    @property
    def has_pii(self) -> bool:
        """Whether any contract marks a field as PII."""
        return any(c.pii_fields for c in self._by_key.values())

    def versions(self, type_: str) -> list[int]:
        return sorted(v for (t, v) in self._by_key if t == type_)

    def types(self) -> list[str]:
        return sorted({t for (t, _) in self._by_key})

    def specs(self) -> list[ContractSpec]:
        return [c.spec for c in self._by_key.values() if c.spec is not None]

    def __iter__(self) -> Iterator[Contract]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


def builtin_contracts() -> list[Contract]:
    """The contracts that ship in code; published to the registry store at start-up."""
    return [
        Contract("impression", 1, ImpressionV1, key_field="user_id"),
        Contract("click", 1, ClickV1, key_field="user_id"),
        Contract("purchase", 1, PurchaseV1, key_field="user_id"),
        Contract("purchase", 2, PurchaseV2, key_field="user_id", pii_fields=("email",)),
    ]


def default_registry() -> ContractRegistry:
    return ContractRegistry(builtin_contracts())
