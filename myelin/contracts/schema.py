"""The declarative form of a contract: what the registry stores and compares.

A :class:`ContractSpec` is derived from a msgspec Struct in code (``spec_from_struct``),
or written as JSON by a producer team; ``struct_from_spec`` turns it back into a frozen
msgspec Struct, so a version registered at run time is validated exactly like one in code.

Field types are ``string``, ``int``, ``float`` and ``bool``, optionally ``nullable``, with
the usual constraints. Producers are validated *closed* (unknown fields are refused);
consumers read *open* (unknown fields ignored), which is what the compatibility rules in
:mod:`myelin.contracts.compat` assume.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

FieldType = Literal["string", "int", "float", "bool"]
Mode = Literal[
    "NONE",
    "BACKWARD",
    "FORWARD",
    "FULL",
    "BACKWARD_TRANSITIVE",
    "FORWARD_TRANSITIVE",
    "FULL_TRANSITIVE",
]
DEFAULT_MODE: Mode = "FULL_TRANSITIVE"
_NAME = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class FieldSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: _NAME
    type: FieldType
    required: bool = True
    default: str | int | float | bool | None = None
    nullable: bool = False
    pii: bool = False
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    ge: float | None = None
    le: float | None = None


class ContractSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    type: _NAME
    version: Annotated[int, msgspec.Meta(ge=1)]
    key_field: str
    fields: list[FieldSpec]
    compatibility: Mode = DEFAULT_MODE
    description: str = ""

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def pii_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.pii)


class SpecError(ValueError):
    pass


_PY_TYPES: dict[str, type] = {"string": str, "int": int, "float": float, "bool": bool}


def _from_type_info(t: msgspec.inspect.Type) -> tuple[FieldType, bool, dict[str, Any]]:
    nullable = False
    if isinstance(t, msgspec.inspect.UnionType):
        members = [m for m in t.types if not isinstance(m, msgspec.inspect.NoneType)]
        if len(members) != 1:
            raise SpecError("only `T | None` unions are supported in contracts")
        nullable, t = True, members[0]
    if isinstance(t, msgspec.inspect.StrType):
        return (
            "string",
            nullable,
            {"min_length": t.min_length, "max_length": t.max_length, "pattern": t.pattern},
        )
    if isinstance(t, msgspec.inspect.BoolType):
        return "bool", nullable, {}
    if isinstance(t, msgspec.inspect.IntType):
        return "int", nullable, {"ge": t.ge, "le": t.le}
    if isinstance(t, msgspec.inspect.FloatType):
        return "float", nullable, {"ge": t.ge, "le": t.le}
    raise SpecError(f"unsupported field type {type(t).__name__} in a contract")


def spec_from_struct(
    type_: str,
    version: int,
    struct: type[msgspec.Struct],
    key_field: str,
    pii_fields: tuple[str, ...] = (),
    compatibility: Mode = DEFAULT_MODE,
    description: str = "",
) -> ContractSpec:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = []
    for f in info.fields:
        ftype, nullable, cons = _from_type_info(f.type)
        default = None if f.default is msgspec.NODEFAULT else f.default
        fields.append(
            FieldSpec(
                name=f.name,
                type=ftype,
                required=f.required,
                default=default,
                nullable=nullable,
                pii=f.name in pii_fields,
                **{k: v for k, v in cons.items() if v is not None},
            )
        )
    spec = ContractSpec(
        type=type_,
        version=version,
        key_field=key_field,
        fields=fields,
        compatibility=compatibility,
        description=description or (struct.__doc__ or "").strip(),
    )
    validate_spec(spec)
    return spec


def validate_spec(spec: ContractSpec) -> None:
    names = [f.name for f in spec.fields]
    if len(set(names)) != len(names):
        raise SpecError(f"{spec.type} v{spec.version}: duplicate field names")
    key = spec.field(spec.key_field)
    if key is None or key.type != "string" or key.nullable:
        raise SpecError(
            f"{spec.type} v{spec.version}: key_field {spec.key_field!r} must be a non-null string field"
        )
    if key.pii:
        raise SpecError(
            f"{spec.type} v{spec.version}: the key field cannot be PII (it is a partition key)"
        )
    for f in spec.fields:
        if f.required and f.default is not None:
            raise SpecError(f"{spec.type}.{f.name}: a required field has no default")
        if f.pii and f.type != "string":
            raise SpecError(
                f"{spec.type}.{f.name}: only string fields can be PII (they are tokenized)"
            )


def struct_from_spec(spec: ContractSpec) -> type[msgspec.Struct]:
    """A frozen, closed msgspec Struct equivalent to the spec."""
    validate_spec(spec)
    defs: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in spec.fields:
        meta: dict[str, Any] = {
            k: getattr(f, k)
            for k in ("min_length", "max_length", "pattern", "ge", "le")
            if getattr(f, k) is not None
        }
        if f.type == "int":
            meta = {k: int(v) for k, v in meta.items()}
        base: Any = _PY_TYPES[f.type]
        typ: Any = Annotated[base, msgspec.Meta(**meta)] if meta else base
        if f.nullable:
            typ = typ | None
        if f.required:
            defs.append((f.name, typ))
        else:
            defs.append((f.name, typ, f.default))
    name = "".join(p.capitalize() for p in spec.type.split("_")) + f"V{spec.version}"
    return msgspec.defstruct(name, defs, frozen=True, kw_only=True, forbid_unknown_fields=True)
