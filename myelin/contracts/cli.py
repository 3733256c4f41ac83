"""``myelin contracts ...``: check a proposed contract offline, register it, list them.

Exit codes, for producer teams' CI: 0 compatible / registered, 1 incompatible (the
report says which field changed how), 2 invalid file or unreachable registry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import msgspec

from myelin import bus
from myelin.contracts.compat import check
from myelin.contracts.registry import default_registry
from myelin.contracts.schema import ContractSpec, SpecError, validate_spec
from myelin.contracts.store import ContractConflict, ContractRejected, ContractStore
from myelin.errors import MyelinError
from myelin.settings import Settings

OK, INCOMPATIBLE, INVALID = 0, 1, 2


def load_spec(path: Path) -> ContractSpec:
    try:
        spec = msgspec.json.decode(path.read_bytes(), type=ContractSpec)
        validate_spec(spec)
    except (OSError, msgspec.MsgspecError, SpecError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    return spec


def load_history(directory: Path | None) -> list[ContractSpec]:
    """Offline history: the contracts shipped in code, plus any JSON specs in ``directory``."""
    specs = {(s.type, s.version): s for s in default_registry().specs()}
    if directory is not None:
        for p in sorted(directory.glob("*.json")):
            s = load_spec(p)
            specs[(s.type, s.version)] = s
    return list(specs.values())


def _report(spec: ContractSpec, problems: list[object]) -> None:
    if not problems:
        print(f"{spec.type} v{spec.version}: compatible ({spec.compatibility})")
        return
    print(f"{spec.type} v{spec.version}: NOT {spec.compatibility}-compatible:", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(Path(args.file))
    history = [
        h
        for h in load_history(Path(args.history) if args.history else None)
        if not (h.type == spec.type and h.version == spec.version)
    ]
    problems = check(spec, history)
    _report(spec, list(problems))
    return INCOMPATIBLE if problems else OK


async def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    spec = load_spec(Path(args.file))
    nc = await bus.connect(settings, "contracts-cli", reconnect=False)
    try:
        await ContractStore(bus.jetstream(nc, settings)).register(spec)
    except ContractRejected as exc:
        _report(spec, list(exc.problems))
        return INCOMPATIBLE
    except ContractConflict as exc:
        print(exc.message, file=sys.stderr)
        return INCOMPATIBLE
    finally:
        await nc.close()
    print(f"registered {spec.type} v{spec.version}")
    return OK


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    nc = await bus.connect(settings, "contracts-cli", reconnect=False)
    try:
        specs = await ContractStore(bus.jetstream(nc, settings)).specs()
    finally:
        await nc.close()
    for s in specs:
        if args.type and s.type != args.type:
            continue
        if args.json:
            print(msgspec.json.encode(s).decode())
        else:
            fields = ", ".join(
                f"{f.name}:{f.type}{'?' if f.nullable else ''}{'' if f.required else '=' + json.dumps(f.default)}"
                f"{' [PII]' if f.pii else ''}"
                for f in s.fields
            )
            print(f"{s.type} v{s.version} key={s.key_field} {s.compatibility}: {fields}")
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for s in default_registry().specs():
        path = out / f"{s.type}.v{s.version}.json"
        path.write_bytes(msgspec.json.format(msgspec.json.encode(s)) + b"\n")
        print(f"wrote {path}")
    return OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("contracts", help="event contracts registry")
    cs = c.add_subparsers(dest="contracts_cmd", required=True)
    ck = cs.add_parser(
        "check", help="check a proposed contract offline (exit 0 ok, 1 incompatible, 2 invalid)"
    )
    ck.add_argument("file")
    ck.add_argument(
        "--history", help="directory of earlier versions as JSON (default: the built-in contracts)"
    )
    rg = cs.add_parser("register", help="register a contract version in the live registry")
    rg.add_argument("file")
    ls = cs.add_parser("list", help="contracts in the live registry")
    ls.add_argument("type", nargs="?")
    ls.add_argument("--json", action="store_true")
    ex = cs.add_parser("export", help="write the built-in contracts as JSON files")
    ex.add_argument("dir")


async def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.contracts_cmd == "check":
            return cmd_check(args)
        if args.contracts_cmd == "export":
            return cmd_export(args)
        if args.contracts_cmd == "register":
            return await cmd_register(args, settings)
        return await cmd_list(args, settings)
    except SpecError as exc:
        print(f"invalid contract: {exc}", file=sys.stderr)
        return INVALID
    except MyelinError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return INVALID
    except OSError as exc:
        print(f"registry unreachable: {exc}", file=sys.stderr)
        return INVALID
