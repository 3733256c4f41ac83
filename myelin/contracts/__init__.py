"""Event contracts: the envelope, the typed event payloads and their registry."""

from myelin.contracts.envelope import IncomingEvent, StreamEvent
from myelin.contracts.registry import Contract, ContractRegistry, default_registry

__all__ = [
    "Contract",
    "ContractRegistry",
    "IncomingEvent",
    "StreamEvent",
    "default_registry",
]
