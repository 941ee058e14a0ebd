"""The layers' import rules (LAYOUT.md): every import in llava_next/, read from the AST, against the forbidden arrows.

An arrow is (importing module prefix, imported module prefix); a module is its dotted name (`llava_next.model.
decoder`). Relative imports are resolved first. Also: no import cycle between modules, and `import llava_next`
pulls in neither transformers nor mistral_common.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llava_next"

# (who, what it must never import); "*" = every module of the package.
FORBIDDEN = [
    ("llava_next.model", "llava_next.loading"), ("llava_next.model", "llava_next.preprocess"),
    ("llava_next.model", "llava_next.sampling"), ("llava_next.model", "llava_next.engine"), ("llava_next.model", "llava_next.parallel"),
    ("llava_next.model", "llava_next.compat"), ("llava_next.model", "llava_next.entrypoints"),
    ("llava_next.loading.weights", "llava_next.loading.quantization"),
    ("llava_next.compat.beam_search", "llava_next.compat.generate"),
    ("llava_next.compat.paged_rows", "llava_next.compat.generate"),
    ("llava_next.compat.paged_rows", "llava_next.compat.beam_search"),
    ("llava_next.engine", "llava_next.entrypoints"), ("llava_next.engine", "llava_next.compat"),
    ("llava_next.engine", "fastapi"), ("llava_next.engine", "ray"),
    ("llava_next.entrypoints.openai", "llava_next.compat"),
    ("llava_next.sampling", "llava_next.engine"),
    ("llava_next.loading", "llava_next.compat"), ("llava_next.preprocess", "llava_next.compat"),
    ("*", "transformers"), ("*", "mistral_common"), ("*", "bench"), ("*", "benchmark"),
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module `path` imports, at any depth of the file (inside functions too), as absolute names."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        who = module_name(path, root)
        for imported in imports_of(path, root):
            for src, dst in FORBIDDEN:
                if (src == "*" or _within(who, src)) and _within(imported, dst):
                    out.append(f"{who} imports {imported} (forbidden: {src} -> {dst})")
    return sorted(set(out))


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Import cycles between the package's modules (strongly connected components of size > 1)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {m: {i for i in imports_of(p, root) if i in modules and i != m and not m.startswith(i + ".")}
             for m, p in modules.items()}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_forbidden_import():
    assert violations() == []


def test_no_import_cycle():
    assert cycles() == []


@pytest.mark.parametrize("line, expected", [
    ("from llava_next.engine.scheduler import Scheduler", "llava_next.model.bad imports llava_next.engine"),
    ("import transformers", "llava_next.model.bad imports transformers"),
    ("from ..compat import modeling", "llava_next.model.bad imports llava_next.compat"),
])
def test_an_injected_forbidden_import_is_caught(tmp_path, line, expected):
    fake = tmp_path / "llava_next"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text(f"def f():\n    {line}\n")
    assert any(v.startswith(expected) for v in violations(fake)), violations(fake)


def test_an_injected_cycle_is_caught(tmp_path):
    fake = tmp_path / "llava_next"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("from llava_next.b import x\n")
    (fake / "b.py").write_text("from llava_next import a\nx = 1\n")
    assert cycles(fake) == [["llava_next.a", "llava_next.b"]]


def test_import_llava_next_pulls_in_no_reference_library():
    code = ("import sys, llava_next; llava_next.LlavaNextForConditionalGeneration; llava_next.AutoProcessor; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'mistral_common')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _module_level_imports(path: Path) -> set[str]:
    """The absolute names a module imports at import time (top-level statements, not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
    return found


# config.py is the bottom layer: at import time it imports errors only; two lazy delegations, each imported
# only when called: `LlavaNextConfig.from_pretrained` reads the file through loading/hub, `geometry` (and the
# default pinpoints) are model/anyres's pure arithmetic.
CONFIG_LAZY = {"llava_next.loading.hub", "llava_next.loading.hub.read_config", "llava_next.model.anyres",
               "llava_next.model.anyres.AnyresGeometry", "llava_next.model.anyres.DEFAULT_PINPOINTS"}


def test_config_imports_nothing_above_it():
    path = PACKAGE / "config.py"
    ours = {m for m in _module_level_imports(path) if m.startswith("llava_next")}
    assert ours <= {"llava_next.errors"}, ours
    lazy = {m for m in imports_of(path) if _within(m, "llava_next") and not _within(m, "llava_next.errors")}
    assert lazy <= CONFIG_LAZY, lazy - CONFIG_LAZY


def test_the_llm_entry_point_lives_in_entrypoints():
    import llava_next

    defined = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if any(isinstance(n, ast.ClassDef) and n.name == "LLM" for n in ast.parse(p.read_text()).body))
    assert defined == ["entrypoints/llm.py"]
    assert llava_next._EXPORTS["LLM"] == "entrypoints.llm"
    assert not any(_within(i, "llava_next.entrypoints") for p in (PACKAGE / "engine").rglob("*.py")
                   for i in imports_of(p))  # engine/ never reaches up to its entry points
