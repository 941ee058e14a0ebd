"""The engine's import arrows (LAYOUT.md): engine/* stands on model/, sampling/, preprocess/, loading/,
config and errors only; never generation/, compat/, entrypoints/, fastapi, ray or transformers."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "llava_next" / "engine"
ALLOWED = ("llava_next.engine", "llava_next.model", "llava_next.sampling", "llava_next.preprocess",
           "llava_next.loading", "llava_next.config", "llava_next.errors")
FORBIDDEN_TOP = {"transformers", "fastapi", "ray", "mistral_common", "bench", "uvicorn"}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_engine_imports_only_what_it_may():
    files = sorted(ENGINE.glob("*.py"))
    assert len(files) >= 10
    bad = []
    for path in files:
        for name in _imports(path):
            if name.split(".")[0] in FORBIDDEN_TOP:
                bad.append((path.name, name))
            elif name.startswith("llava_next") and not name.startswith(ALLOWED) and name != "llava_next":
                bad.append((path.name, name))
    assert not bad, f"forbidden imports in engine/: {bad}"


def test_every_engine_file_says_what_it_leaves_out():
    for path in ENGINE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, path.name
        if path.name != "__init__.py":
            assert "Leaves out" in doc, path.name
