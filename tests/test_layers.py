"""The package's structure: import layers (import-linter) and no repeated blocks of code."""

from __future__ import annotations

import os
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = 10  # lines


def _lint(config: Path, cwd: Path) -> tuple[int, str]:
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd / "src"), str(cwd)])}
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                        "sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"],
                       cwd=cwd, env=env, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def test_import_layers_hold():
    rc, out = _lint(REPO / "pyproject.toml", REPO)
    assert rc == 0, out
    assert "0 broken" in out


def test_the_layer_check_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "src" / "toy"
    for name, body in {"__init__.py": "", "low.py": "from toy import high\n", "high.py": ""}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(body)
    cfg = tmp_path / "layers.toml"
    cfg.write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "toy"
        [[tool.importlinter.contracts]]
        name = "toy layers"
        type = "layers"
        layers = ["toy.high", "toy.low"]
    """))
    rc, out = _lint(cfg, tmp_path)
    assert rc != 0 and "BROKEN" in out and "toy.low -> toy.high" in out


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines that carry code: no blanks, comments, imports or lone brackets."""
    out = []
    for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = " ".join(raw.split())
        if not s or s.startswith("#") or s.startswith(("import ", "from ")) or s in ("(", ")", "[", "]", "{",
                                                                                   "}", "),", "],", "},"):
            continue
        out.append((i, s))
    return out


def repeated_blocks(files: list[Path], size: int = BLOCK) -> list[tuple[str, str]]:
    """Pairs of places where ``size`` consecutive code lines are the same (whitespace folded)."""
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for f in files:
        lines = _code_lines(f)
        for k in range(len(lines) - size + 1):
            window = tuple(s for _, s in lines[k:k + size])
            seen[window].append(f"{f.relative_to(REPO) if f.is_relative_to(REPO) else f}:{lines[k][0]}")
    return [(places[0], places[1]) for places in seen.values() if len(places) > 1]


def _source_files() -> list[Path]:
    files = sorted((REPO / "src" / "ofer").rglob("*.py")) + sorted(REPO.glob("*.py"))
    return files + sorted((REPO / "benchmarks").glob("*.py"))


def test_no_block_of_code_is_written_twice():
    dups = repeated_blocks(_source_files())
    assert not dups, f"{len(dups)} repeated blocks of {BLOCK} lines, e.g. {dups[:5]}"


def test_the_repeat_scan_finds_a_copy(tmp_path):
    body = "".join(f"x{i} = compute({i}, 'a')  # step\n" for i in range(12))
    (tmp_path / "a.py").write_text("import os\n\n" + body)
    (tmp_path / "b.py").write_text("def f():\n    pass\n" + body)
    (tmp_path / "c.py").write_text(body[: body.index("x9")])  # 9 lines only
    dups = repeated_blocks([tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"])
    assert len(dups) == 3 and all("a.py" in a and "b.py" in b for a, b in dups)


if __name__ == "__main__":  # pragma: no cover
    for a, b in repeated_blocks(_source_files()):
        print(a, b)
    pytest.main([__file__])
