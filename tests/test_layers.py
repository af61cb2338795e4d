"""The layering of src/modelseal (docs/architecture.md): imports point downward, no cycles.

Every ``import``/``from ... import`` of a modelseal module anywhere in a module (also inside
functions, so a lazy import cannot hide an upward edge) is checked against the layer table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "modelseal"

# Lowest first. A package may import its own modules and any package of a lower layer;
# packages that share a layer are peers and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("util",),
    ("format",),
    ("audit",),
    ("keys",),
    ("signing", "pki"),
    ("governance",),
    ("recipes",),
    ("registry",),
    ("loaders", "telemetry", "recovery", "evidence"),
    ("server",),
    ("cli",),
]
# The public facade: ``modelseal`` itself and the loader names kept at the top for users.
FACADE = {"modelseal", "modelseal.safetensors", "modelseal.torch", "modelseal.onnx", "modelseal.hf"}
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modelseal modules that ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "modelseal")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "modelseal":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imported(m, p, known) - {m} for m, p in mods.items()}


def test_every_package_has_a_layer() -> None:
    packages = {package_of(m) for m in modules() if m not in FACADE}
    assert packages - RANK.keys() == set(), "add the new package to LAYERS and docs/architecture.md"


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        if src in FACADE:
            continue
        for dst in sorted(targets):
            if dst in FACADE:
                bad.append(f"{src} imports the facade {dst}; import the module that owns the name")
                continue
            a, b = package_of(src), package_of(dst)
            if a != b and RANK[b] >= RANK[a]:
                kind = "a peer" if RANK[a] == RANK[b] else "an upper layer"
                bad.append(f"{src} -> {dst}: {b} is {kind} of {a}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_imports_point_downward() -> None:
    assert layering_violations(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_check_catches_an_upward_import_and_a_cycle() -> None:
    edges = {
        "modelseal.format.header": {"modelseal.keys.service"},
        "modelseal.keys.service": {"modelseal.format.header"},
        "modelseal.signing.trust": {"modelseal.pki.ca"},
        "modelseal.recipes.seal": {"modelseal"},
    }
    bad = layering_violations(edges)
    assert any("format.header -> modelseal.keys.service" in b for b in bad)
    assert any("pki is a peer of signing" in b for b in bad)
    assert any("imports the facade" in b for b in bad)
    assert not any(b.startswith("modelseal.keys.service") for b in bad)
    assert cycles(edges) == [["modelseal.format.header", "modelseal.keys.service"]]


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_is_small_and_says_what_it_owns(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 420, "split the module: about 400 lines at most"
    assert ast.get_docstring(ast.parse(text)), "a module docstring says what it owns and what it must not know"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_docs_architecture_names_every_module(path: Path) -> None:
    doc = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    name = path.parent.name if path.name == "__init__.py" else path.stem
    assert f"`{name}`" in doc or f"`{name}/`" in doc, "docs/architecture.md must keep the map true"
