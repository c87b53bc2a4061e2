"""The house stays as docs/architecture.md draws it: the rooms' arrows point down (or within a
room), no import circle between modules (lazy imports, inside functions, count; names imported only
for type checking do not, as they are never imported), no module over 700 lines, no private name
(``_x``) of one module used by another, and ruff finds nothing. Read from the source with ``ast``."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dbmagic"
MAX_LINES = 700

# the rooms, bottom up (docs/architecture.md): a module imports from its own room and the rooms below
# it, never above. A room is a list of module names or prefixes; the observe folder holds two rooms
# (tracing is a subscriber to calls, judging runs over batches). The package's doors (dbmagic,
# dbmagic.__main__ and the public modules that re-export, dbmagic.spark, dbmagic.ledger, ...) may
# import any room; dbmagic.testing sits beside, on what a call is made of.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("dbmagic.errors", "dbmagic._deps", "dbmagic._version", "dbmagic.transport.secret")),
    ("transport", ("dbmagic.transport",)),
    ("prompts", ("dbmagic.prompts",)),
    ("call", ("dbmagic.call", "dbmagic.settings")),
    ("tracing", ("dbmagic.observe.tracing",)),
    ("client", ("dbmagic.client",)),
    ("batching", ("dbmagic.batching",)),
    ("judging", ("dbmagic.observe.judging",)),
    ("frontends", ("dbmagic.frontends",)),
]
BESIDE = {"testing": ("dbmagic.testing", {"base", "transport", "call"})}


def modules() -> dict[str, Path]:
    """``dbmagic.x.y`` -> its file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except inside ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level == 0:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """``module -> the package modules it imports`` and the private names one module takes from another."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    private: list[str] = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            else:
                base = _resolve(module, path, node)
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub, None) if sub in known else (base, alias.name))
            for target, name in targets:
                while target and target not in known:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if not target or target == module:
                    continue
                edges[module].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{module} imports {name} from {target}")
        # x._name on anything but self or cls: an object of another module's class reached into (a name
        # this module defines itself, an attribute or a method of its own classes, is its own business)
        own = _private_names(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and node.attr not in own):
                private.append(f"{module} uses {ast.unparse(node)}")
    return edges, private


def _private_names(tree: ast.AST) -> set[str]:
    """The ``_names`` a module defines: functions, classes, their attributes (``self._x = ...``,
    class-level ones, slots) and module globals."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            names.add(node.value)  # __slots__ = ("_value",), setattr(obj, "_x", ...)
    return {n for n in names if n.startswith("_")}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def room_of(module: str) -> str:
    """The room ``module`` is in (the longest prefix that names it), or "door"."""
    best, length = "door", 0
    for name, prefixes in [*ROOMS, *((n, (p,)) for n, (p, _) in BESIDE.items())]:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = name, len(prefix)
    return best


def test_every_arrow_points_down_or_within_its_room():
    edges, _ = graph()
    rank = {name: i for i, (name, _) in enumerate(ROOMS)}
    wrong = []
    for module, targets in sorted(edges.items()):
        here = room_of(module)
        if here == "door":
            continue
        for target in sorted(targets):
            there = room_of(target)
            allowed = (BESIDE[here][1] | {here} if here in BESIDE
                       else there in rank and rank[there] <= rank[here])
            if not allowed:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert wrong == []


def test_every_module_is_in_a_room():
    doors = sorted(m for m in modules() if room_of(m) == "door" and m.count(".") > 1)
    assert doors == []


def test_no_import_circle_between_modules():
    edges, _ = graph()
    # a package's __init__ re-exports its modules: the package and its own modules are one room
    for module in list(edges):
        edges[module] = {t for t in edges[module] if not (module.startswith(t + ".") or t.startswith(module + "."))}
    assert circles(edges) == []


def test_no_module_is_over_700_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_private_name_of_one_module_is_used_by_another():
    _, private = graph()
    assert private == []


def test_ruff_finds_nothing():
    """The lint of pyproject.toml's [tool.ruff] (pyflakes, import order, bugbear) over the whole tree."""
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                           cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stdout[-3000:] + found.stderr[-2000:]

