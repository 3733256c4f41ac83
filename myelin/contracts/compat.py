"""Schema-registry compatibility rules, with a precise report of what breaks.

- BACKWARD: consumers on the new version read events written with the old one.
  Allowed: delete fields; add fields that have defaults; widen int -> float.
- FORWARD: consumers on the old version read events written with the new one.
  Allowed: add fields; delete fields that had defaults in the old version.
- FULL: both. NONE: anything. ``*_TRANSITIVE``: against every earlier version, not only
  the latest (the safe default for a replayable log: a field deleted in v2 and re-added
  with another type in v3 is caught).

Whatever the mode, the key field may not change and a PII flag may not be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from myelin.contracts.schema import ContractSpec, FieldSpec


@dataclass(frozen=True)
class Incompatibility:
    field: str
    change: str
    detail: str
    against_version: int

    def __str__(self) -> str:
        return f"v{self.against_version}: {self.field}: {self.change}: {self.detail}"


def _readable(reader: FieldSpec, writer: FieldSpec) -> str | None:
    """Why a reader of type ``reader`` cannot read values written as ``writer``, or None."""
    if writer.nullable and not reader.nullable:
        return "values may be null but the reader does not accept null"
    if reader.type != writer.type and not (reader.type == "float" and writer.type == "int"):
        return f"type {writer.type} cannot be read as {reader.type}"
    for attr, upper in (("max_length", True), ("le", True), ("min_length", False), ("ge", False)):
        r, w = getattr(reader, attr), getattr(writer, attr)
        if r is not None and (w is None or (r < w if upper else r > w)):
            return f"{attr} tightened from {w} to {r}"
    if reader.pattern is not None and reader.pattern != writer.pattern:
        return f"pattern changed from {writer.pattern!r} to {reader.pattern!r}"
    return None


def _reader_problems(
    reader: ContractSpec, writer: ContractSpec, old: ContractSpec, missing: str, why_missing: str
) -> list[Incompatibility]:
    """What breaks when ``reader`` reads events written with ``writer`` (open reader)."""
    out = []
    for r in reader.fields:
        w = writer.field(r.name)
        if w is None:
            if r.required:
                out.append(
                    Incompatibility(
                        r.name, missing, why_missing.format(v=old.version, f=r.name), old.version
                    )
                )
        elif why := _readable(r, w):
            out.append(Incompatibility(r.name, "type_changed", why, old.version))
    return out


def _backward(new: ContractSpec, old: ContractSpec) -> list[Incompatibility]:
    """New readers, old events."""
    return _reader_problems(
        new, old, old, "field_added_without_default", "v{v} events lack {f!r}; give it a default"
    )


def _forward(new: ContractSpec, old: ContractSpec) -> list[Incompatibility]:
    """Old readers, new events."""
    return _reader_problems(
        old, new, old, "field_removed", "v{v} readers require {f!r}; it had no default"
    )


def check(new: ContractSpec, history: list[ContractSpec]) -> list[Incompatibility]:
    """Problems registering ``new`` on top of ``history`` (all earlier versions)."""
    earlier = sorted((h for h in history if h.type == new.type), key=lambda h: h.version)
    problems: list[Incompatibility] = []
    if earlier and new.version <= earlier[-1].version:
        return [
            Incompatibility(
                "version",
                "version_not_increasing",
                f"latest is v{earlier[-1].version}; register v{earlier[-1].version + 1}",
                earlier[-1].version,
            )
        ]
    if not earlier:
        return []
    latest = earlier[-1]
    if new.key_field != latest.key_field:
        problems.append(
            Incompatibility(
                new.key_field,
                "key_field_changed",
                f"was {latest.key_field!r}: partitioning and entities would change",
                latest.version,
            )
        )
    for o in latest.fields:
        f = new.field(o.name)
        if o.pii and f is not None and not f.pii:
            problems.append(
                Incompatibility(
                    o.name,
                    "pii_flag_removed",
                    "a field marked PII must stay PII (raw values would be stored)",
                    latest.version,
                )
            )
    mode = new.compatibility
    if mode == "NONE":
        return problems
    against = earlier if mode.endswith("_TRANSITIVE") else [latest]
    for old in against:
        if mode.startswith(("BACKWARD", "FULL")):
            problems += _backward(new, old)
        if mode.startswith(("FORWARD", "FULL")):
            problems += _forward(new, old)
    seen: set[tuple[str, str, int]] = set()
    unique = []
    for p in problems:
        k = (p.field, p.change, p.against_version)
        if k not in seen:
            seen.add(k)
            unique.append(p)
    return unique
