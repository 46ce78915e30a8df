"""The library's layout stays walkable (docs/architecture.md).

Read from the code's own imports (``ast``, nothing is imported): the
top-level packages and modules of ``speechbrain_blspkd`` ("rooms") must
import each other without a circle, so that every room stands above all
it imports; and no library module may grow past 600 lines.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "speechbrain_blspkd"
MAX_LINES = 600


def _room(module):
    """``speechbrain_blspkd.nnet.cif`` -> ``nnet``; a top-level module is
    its own room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path, package=PACKAGE):
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_imports(package=PACKAGE):
    """``{(room, room): [where, ...]}`` for every import between rooms."""
    edges = {}
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        if "." not in module:
            continue  # the package face itself
        source = _room(module)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if not name.startswith(package.name + "."):
                    continue
                target = _room(name)
                if target != source:
                    where = f"{module}:{node.lineno} imports {name}"
                    edges.setdefault((source, target), []).append(where)
    return edges


def find_circle(edges):
    """One circle of rooms as a list (first == last), or None."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_find_circle_sees_a_circle_and_its_absence():
    assert find_circle({("a", "b"): [], ("b", "c"): []}) is None
    circle = find_circle({("a", "b"): [], ("b", "c"): [], ("c", "a"): []})
    assert circle[0] == circle[-1] and set(circle) == {"a", "b", "c"}


def test_rooms_import_each_other_without_a_circle():
    edges = room_imports()
    assert ("recipe", "brain") in edges  # the reading sees real imports
    circle = find_circle(edges)
    if circle:
        ties = [
            w for a, b in zip(circle, circle[1:]) for w in edges[(a, b)][:3]
        ]
        pytest.fail(
            "import circle between "
            + " -> ".join(circle)
            + ":\n  "
            + "\n  ".join(ties)
        )


def test_no_library_module_is_over_600_lines():
    sizes = {
        str(p.relative_to(PACKAGE.parent)): len(
            p.read_text(encoding="utf-8").splitlines()
        )
        for p in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50
    too_long = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
