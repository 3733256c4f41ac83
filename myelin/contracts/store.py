"""The contracts registry in NATS KV (bucket ``myelin_contracts``, key ``<type>.v<N>``).

Registration checks compatibility against the stored history and refuses with the
precise list of what breaks. Versions are written once (KV create), never updated.
"""

from __future__ import annotations

from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from myelin.bus import kv_bucket, kv_keys
from myelin.contracts.compat import Incompatibility, check
from myelin.contracts.registry import ContractRegistry
from myelin.contracts.schema import ContractSpec, validate_spec
from myelin.errors import MyelinError
from myelin.topology import CONTRACTS_BUCKET

_dec = msgspec.json.Decoder(ContractSpec)
_enc = msgspec.json.Encoder()


class ContractRejected(MyelinError):
    code = "contract_incompatible"

    def __init__(self, spec: ContractSpec, problems: list[Incompatibility]) -> None:
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{spec.type} v{spec.version} is not {spec.compatibility}-compatible:\n{lines}",
            problems=[p.__dict__ for p in problems],
        )
        self.problems = problems


class ContractConflict(MyelinError):
    code = "contract_conflict"


def key(spec: ContractSpec) -> str:
    return f"{spec.type}.v{spec.version}"


class ContractStore:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: Any = None

    async def _bucket(self) -> Any:
        if self._kv is None:
            self._kv = await kv_bucket(self._js, CONTRACTS_BUCKET)
        return self._kv

    async def specs(self) -> list[ContractSpec]:
        kv = await self._bucket()
        keys = await kv_keys(self._js, CONTRACTS_BUCKET)
        out = []
        for k in keys:
            try:
                entry = await kv.get(k)
            except KeyNotFoundError:
                continue  # deleted
            out.append(_dec.decode(entry.value))
        return sorted(out, key=lambda s: (s.type, s.version))

    async def registry(self) -> ContractRegistry:
        return ContractRegistry.from_specs(await self.specs())

    async def register(self, spec: ContractSpec) -> None:
        """Add a version, or raise :class:`ContractRejected` with every problem found."""
        validate_spec(spec)
        history = await self.specs()
        same = next((h for h in history if h.type == spec.type and h.version == spec.version), None)
        if same is not None:
            if same == spec:
                return  # idempotent
            raise ContractConflict(
                f"{spec.type} v{spec.version} is already registered with a different "
                f"definition; versions are immutable: register v{spec.version + 1}"
            )
        problems = check(spec, history)
        if problems:
            raise ContractRejected(spec, problems)
        kv = await self._bucket()
        try:
            await kv.create(key(spec), _enc.encode(spec))
        except KeyWrongLastSequenceError:
            raise ContractConflict(
                f"{spec.type} v{spec.version} was registered concurrently"
            ) from None

    async def publish(self, specs: list[ContractSpec]) -> None:
        """Register the built-in contracts (idempotent), oldest version first."""
        for spec in sorted(specs, key=lambda s: (s.type, s.version)):
            await self.register(spec)
