from __future__ import annotations

from pathlib import Path

from myelin.tools.protogen import GEN_DIR, generate


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """`make proto` output must be committed: regenerate and compare byte for byte."""
    out = tmp_path / "gen"
    generate(out)
    fresh = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in GEN_DIR.iterdir() if p.is_file()}
    assert fresh.keys() == committed.keys()
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"regenerate with `make proto`: {stale}"
