"""Regenerate the gRPC code in ``myelin/gen`` from ``proto/`` (``make proto``).

Generated imports are rewritten to be package-relative, so the output is importable as
``myelin.gen``. ``tests/unit/test_proto_drift.py`` fails when the committed code drifts.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "myelin" / "gen"
_IMPORT = re.compile(r"^import (\w+_pb2(?:_grpc)?) as (\w+)$", re.MULTILINE)
_FROM = re.compile(r"^from (\w+_pb2) import", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy plugins (protoc-gen-mypy*) on PATH, next to this interpreter.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = path.read_text()
        text = _IMPORT.sub(r"from . import \1 as \2", text)
        text = _FROM.sub(r"from .\1 import", text)
        path.write_text(text)
        written.append(path)
    (out_dir / "__init__.py").write_text(
        '"""Generated from proto/ by `make proto`; do not edit."""\n'
    )
    (out_dir / "py.typed").write_text("")
    return written


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else GEN_DIR
    for p in generate(target):
        print(f"wrote {p.relative_to(target.parent) if target.parent in p.parents else p}")


if __name__ == "__main__":
    main()
