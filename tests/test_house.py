"""The house as docs/design.md draws it: every import of fairseq_base/ and scripts/ (those inside
functions too) goes from a room to a room on a lower floor, so there is no circle and no import
that runs back up; nothing outside fairseq_patches/ but the package's face imports from it."""

import ast
import os
import re
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where a top-level name is found: the package, and the scripts' own modules (scripts/ is on their path).
ROOTS = {"fairseq_base": "", "reproduce": "scripts"}
FACE = "fairseq_base/__init__.py"


def declared_floors(markdown: str) -> Dict[str, int]:
    """room -> floor, from the rows ``| N | `room` | ... |`` of docs/design.md's house table."""
    section = markdown.split("## The house, floor by floor", 1)[1].split("\n## ", 1)[0]
    return {room: int(floor) for floor, room in re.findall(r"^\| (\d+) \| `([^`]+)` \|", section, re.M)}


def room_of(path: str, floors: Dict[str, int]) -> Optional[str]:
    """The declared room that holds ``path``: the file itself, else the deepest folder above it."""
    if path in floors:
        return path
    folders = [room for room in floors if room.endswith("/") and path.startswith(room)]
    return max(folders, key=len) if folders else None


def sources() -> List[str]:
    found = []
    for top in ("fairseq_base", "scripts"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            found += [os.path.relpath(os.path.join(folder, f), REPO) for f in files if f.endswith(".py")]
    return sorted(found)


def resolve(module: str) -> Optional[str]:
    """The repository file that ``import module`` runs (a package's __init__.py), or None outside it."""
    top = module.split(".")[0]
    if top not in ROOTS:
        return None
    base = os.path.join(ROOTS[top], *module.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(os.path.join(REPO, candidate)):
            return candidate
    return None


def imports_of(path: str) -> List[Tuple[int, str]]:
    """(line, file imported) for every import in ``path`` of a file of this repository."""
    tree = ast.parse(open(os.path.join(REPO, path)).read(), path)
    package = os.path.dirname(path).replace(os.sep, ".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, resolve(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's own package up
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            for alias in node.names:  # ``from package import module`` imports the module
                found.append((node.lineno, resolve(f"{module}.{alias.name}") or resolve(module)))
    return [(line, target) for line, target in found if target is not None and target != path]


def violations(edges: List[Tuple[str, int, str]], floors: Dict[str, int]) -> List[str]:
    """What breaks the house among ``edges`` (importing file, line, imported file)."""
    wrong = []
    for source, line, target in edges:
        mine, theirs = room_of(source, floors), room_of(target, floors)
        where = f"{source}:{line} imports {target}"
        if mine is None or theirs is None:
            wrong.append(f"{where}: {source if mine is None else target} is in no room of docs/design.md")
        elif mine != theirs and floors[theirs] >= floors[mine]:
            wrong.append(f"{where}: floor {floors[mine]} ({mine}) may not import floor {floors[theirs]} ({theirs})")
        elif theirs == "fairseq_base/fairseq_patches/" and mine != theirs and source != FACE:
            wrong.append(f"{where}: only fairseq_patches/ itself and the package's face import from it")
    wrong += [f"circle: {' -> '.join(circle)}" for circle in circles(edges)]
    return wrong


def circles(edges: List[Tuple[str, int, str]]) -> List[List[str]]:
    """Each circle of files (inside one room too), found by depth-first search."""
    graph: Dict[str, List[str]] = {}
    for source, _, target in edges:
        graph.setdefault(source, []).append(target)
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for following in graph.get(node, []):
            if state.get(following) == "open":
                found.append(stack[stack.index(following):] + [following])
            elif following not in state:
                visit(following)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_import_goes_down_the_floors_that_docs_design_declares():
    floors = declared_floors(open(os.path.join(REPO, "docs", "design.md")).read())
    edges = [(path, line, target) for path in sources() for line, target in imports_of(path)]
    assert len(edges) > 60, "the imports were not read"
    assert not violations(edges, floors), "\n".join(violations(edges, floors))
    unhoused = [path for path in sources() if room_of(path, floors) is None]
    assert not unhoused, f"files in no room of docs/design.md: {unhoused}"


def test_an_upward_import_a_circle_and_a_reach_into_fairseq_patches_are_each_refused():
    floors = {"a.py": 1, "b.py": 2, "pkg/": 2, "fairseq_base/fairseq_patches/": 3, FACE: 4}
    assert violations([("b.py", 3, "a.py"), (FACE, 1, "fairseq_base/fairseq_patches/x.py")], floors) == []
    upward = violations([("a.py", 7, "b.py")], floors)
    assert upward == ["a.py:7 imports b.py: floor 1 (a.py) may not import floor 2 (b.py)"]
    same_floor = violations([("b.py", 1, "pkg/c.py")], floors)
    assert same_floor == ["b.py:1 imports pkg/c.py: floor 2 (b.py) may not import floor 2 (pkg/)"]
    inside = violations([("pkg/c.py", 1, "pkg/d.py"), ("pkg/d.py", 2, "pkg/c.py")], floors)
    assert inside == ["circle: pkg/c.py -> pkg/d.py -> pkg/c.py"]
    reach = violations([("fairseq_base/fairseq_patches/x.py", 1, "b.py"),
                        ("fairseq_base/x.py", 5, "fairseq_base/fairseq_patches/y.py")],
                       {**floors, "fairseq_base/x.py": 5})
    assert reach == ["fairseq_base/x.py:5 imports fairseq_base/fairseq_patches/y.py: only fairseq_patches/ itself "
                     "and the package's face import from it"]
    assert violations([("new.py", 1, "a.py")], floors) == ["new.py:1 imports a.py: new.py is in no room of "
                                                          "docs/design.md"]


def test_imports_inside_functions_and_from_package_import_module_are_read():
    found = dict((target, line) for line, target in imports_of("fairseq_base/upcycle.py"))
    assert "fairseq_base/reshard.py" in found and "fairseq_base/options.py" in found
    assert ("fairseq_base/layer.py" in {t for _, t in imports_of("scripts/reproduce/training.py")})  # in a function
    assert "fairseq_base/fairseq_patches/checkpoint_files.py" in {
        t for _, t in imports_of("fairseq_base/fairseq_patches/eval_lm.py")}  # from package import module
