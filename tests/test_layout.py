"""The layout's rules (docs/architecture.md), checked on the code itself: common/ imports no stage, every import
points down the floors, no two files or packages import each other (through others either), no package imports
another's private name, no file outside tests grows past ~450 lines, the only sys.path edits are the entry scripts'
one line, and no module beside an entry script shadows a library of the same name."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "train", "export", "space", "deploy", "compare", "bench")
STAGES = ("train", "export", "space", "deploy", "compare", "bench")
ENTRY_SCRIPTS = {"train/run.py", "export/to_gguf.py", "space/app.py", *(
    path.relative_to(REPO).as_posix() for path in (REPO / "scripts").glob("*.py"))}
MAX_LINES = 450


def sources() -> list[Path]:
    return sorted(path for folder in (*PACKAGES, "scripts") for path in (REPO / folder).rglob("*.py")
                  if "__pycache__" not in path.parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import in a file, relative imports resolved to absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(REPO).parent.as_posix().replace("/", ".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_every_package_is_there():
    for package in PACKAGES:
        assert (REPO / package / "__init__.py").is_file(), package
    assert len(sources()) > 40


def test_the_base_imports_no_stage():
    for path in (REPO / "common").rglob("*.py"):
        for module, _ in imports(path):
            assert module.split(".")[0] not in STAGES, f"{path.relative_to(REPO)} imports {module}"


def test_no_package_imports_another_packages_private_names():
    offences = []
    for path in sources():
        own = path.relative_to(REPO).parts[0]
        for module, names in imports(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != own:
                offences += [f"{path.relative_to(REPO)}: {module}.{name}" for name in names
                             if name.startswith("_") and not name.startswith("__")]
    assert offences == []


def test_no_file_outside_tests_is_over_the_limit():
    long = {path.relative_to(REPO).as_posix(): count for path in sources()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _path_edits(path: Path) -> list[int]:
    """Lines that change sys.path (insert, append, extend, slice assignment)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                ast.unparse(node.func.value) == "sys.path" and node.func.attr in ("insert", "append", "extend"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Assign) and any(ast.unparse(target).startswith("sys.path") for target in node.targets):
            lines.append(node.lineno)
    return lines


def test_only_entry_scripts_edit_sys_path_and_only_to_put_the_repository_first():
    for path in sources():
        name = path.relative_to(REPO).as_posix()
        edits = _path_edits(path)
        if name not in ENTRY_SCRIPTS:
            assert edits == [], f"{name} edits sys.path at lines {edits}"
            continue
        assert len(edits) <= 1, f"{name} edits sys.path at lines {edits}"
        if edits:
            line = path.read_text().splitlines()[edits[0] - 1]
            assert "sys.path.insert(0, str(" in line and ("parents[1]" in line or "REPO" in line), line


@pytest.mark.parametrize("folder", sorted({Path(script).parent.as_posix() for script in ENTRY_SCRIPTS}))
def test_no_module_beside_an_entry_script_shadows_a_library(folder):
    """`python export/to_gguf.py` puts export/ on sys.path first: a module there named like a library (it happened
    with export/safetensors.py) would be imported in the library's place."""
    shadowing = []
    for path in (REPO / folder).glob("*.py"):
        name = path.stem
        if name in sys.stdlib_module_names:
            shadowing.append(f"{folder}/{path.name} (the standard library's {name})")
            continue
        spec = importlib.util.find_spec(name) if name not in PACKAGES and name != "__init__" else None
        if spec is not None and spec.origin and not Path(spec.origin).is_relative_to(REPO):
            shadowing.append(f"{folder}/{path.name} ({spec.origin})")
    assert shadowing == []


# ------------------------------------------------------------------ the import graph
# A package's floor (docs/architecture.md): every import, lazy ones inside functions included, points to the same
# floor or a lower one, so the tree reads bottom up as the pipeline; packages on one floor do not import each other.
FLOORS = {"common": 0, "train": 1, "export": 2, "space": 3, "compare": 4, "deploy": 4, "bench": 4, "scripts": 5}


def module_file(module: str) -> Path | None:
    """The project's file a dotted module name is (a module, or a package's __init__.py); None outside the project."""
    path = REPO.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def file_edges() -> dict[Path, set[Path]]:
    """Each project file → the project files it imports (`from package import module` counts as the module)."""
    edges = {}
    for path in sources():
        targets = set()
        for module, names in imports(path):
            named = [module_file(f"{module}.{name}") for name in names]
            targets |= {target for target in named if target} or ({module_file(module)} - {None})
            if any(target is None for target in named):  # names defined in the module itself
                targets |= {module_file(module)} - {None}
        edges[path] = targets - {path}
    return edges


def test_every_import_points_down_or_across_its_own_package():
    offences = []
    for path, targets in file_edges().items():
        own = path.relative_to(REPO).parts[0]
        for target in targets:
            other = target.relative_to(REPO).parts[0]
            if other != own and FLOORS[other] >= FLOORS[own]:
                offences.append(f"{path.relative_to(REPO)} (floor {FLOORS[own]}) imports "
                                f"{target.relative_to(REPO)} (floor {FLOORS[other]})")
    assert offences == []


def cycles(edges: dict) -> list[list]:
    """The graph's strongly connected components of more than one node (Tarjan's algorithm, iteratively).

    >>> cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    [['a', 'b']]
    >>> cycles({"a": {"b"}, "b": set()})
    []
    """
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()), key=str)))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ()), key=str))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component, key=str))
    return found


def test_no_two_files_import_each_other_even_through_others():
    found = cycles(file_edges())
    assert [[path.relative_to(REPO).as_posix() for path in cycle] for cycle in found] == []


def test_no_two_packages_import_each_other():
    edges = {}
    for path, targets in file_edges().items():
        edges.setdefault(path.relative_to(REPO).parts[0], set()).update(
            target.relative_to(REPO).parts[0] for target in targets)
    assert cycles({package: targets - {package} for package, targets in edges.items()}) == []
