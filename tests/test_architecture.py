"""The shape of the code, checked: no import cycles, no private names across modules, short modules.

Reads every Python file of the project with the stdlib `ast` (nothing is imported), so it runs in
well under a second and names the offending module and line when a rule breaks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lifecycle", "tasks", "flows", "deployments", "api", "dlm", "bench", "devrig", "tests")
# A module longer than this states why at its top (a line starting "Long because" in its docstring).
MAX_LINES = 500
CORE_FORBIDDEN = ("prefect", "typer", "fastapi")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)  # module -> first line
    private: list[tuple[str, str, int]] = field(default_factory=list)  # (module, name, line)
    externals: set[str] = field(default_factory=set)


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for package in PACKAGES:
        base = ROOT / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__" for part in path.parts):
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            tree = ast.parse(path.read_text(), filename=str(path))
            found[".".join(parts)] = Module(".".join(parts), path, is_package, tree)
    return found


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def _graph() -> dict[str, Module]:
    modules = _modules()
    for module in modules.values():
        typing_only = _type_checking_lines(module.tree)

        def add(target: str, line: int, module: Module = module) -> None:
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != module.name:
                    module.imports.setdefault(prefix, line)
            if target.split(".")[0] not in PACKAGES:
                module.externals.add(target.split(".")[0])

        aliases: dict[str, str] = {}
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                module.private.append((aliases[node.value.id], node.attr, node.lineno))
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if node.lineno in typing_only:
                    continue
                add(target, node.lineno)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        add(sub, node.lineno)
                    elif (
                        alias.name.startswith("_")
                        and not alias.name.startswith("__")
                        and target in modules
                        and target != module.name
                    ):
                        module.private.append((target, alias.name, node.lineno))
    return modules


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(name: str) -> None:
        index[name] = low[name] = counter[0]
        counter[0] += 1
        stack.append(name)
        on_stack.add(name)
        for target in modules[name].imports:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == name:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return cycles


def private_imports(modules: dict[str, Module]) -> list[str]:
    return [
        f"{m.name}:{line} imports {name} from {target}"
        for m in modules.values()
        for target, name, line in m.private
    ]


def long_modules(modules: dict[str, Module]) -> list[str]:
    out = []
    for m in modules.values():
        if not m.name.startswith(
            ("lifecycle", "tasks", "flows", "deployments", "api", "dlm", "devrig", "bench")
        ):
            continue
        lines = len(m.path.read_text().splitlines())
        doc = ast.get_docstring(m.tree) or ""
        if lines > MAX_LINES and "Long because" not in doc:
            out.append(f"{m.path.relative_to(ROOT)} has {lines} lines and no 'Long because' reason")
    return out


def test_no_import_cycles() -> None:
    assert import_cycles(_graph()) == []


def test_no_private_names_across_modules() -> None:
    assert private_imports(_graph()) == []


def test_long_modules_say_why() -> None:
    assert long_modules(_graph()) == []


def test_core_imports_no_orchestrator_or_edge() -> None:
    modules = _graph()
    bad = [
        f"{m.name} imports {ext}"
        for m in modules.values()
        if m.name.startswith("lifecycle")
        for ext in sorted(m.externals)
        if ext in CORE_FORBIDDEN
    ]
    bad += [
        f"{m.name} imports {target}"
        for m in modules.values()
        if m.name.startswith("lifecycle")
        for target in m.imports
        if not target.startswith("lifecycle")
    ]
    assert bad == []


def test_layers_import_one_way() -> None:
    """dlm -> api -> deployments -> flows -> tasks -> lifecycle (the CLI starts the deployments
    and serves the REST API); nothing imports dlm, nothing but dlm imports api; the runtime
    imports neither tests, bench nor devrig (but `dlm demo`)."""
    order = {"lifecycle": 0, "tasks": 1, "flows": 2, "deployments": 3, "api": 4, "dlm": 5}
    modules = _graph()
    bad = []
    for m in modules.values():
        top = m.name.split(".")[0]
        for target in m.imports:
            other = target.split(".")[0]
            if (
                (top in order and other in ("tests", "bench"))
                or (top == "bench" and other == "tests")
                or (top in order and other == "devrig" and m.name != "dlm.demo")
                or (top in order and other in order and other != top and order[other] >= order[top])
            ):
                bad.append(f"{m.name} imports {target}")
    assert bad == []


def test_api_is_an_edge() -> None:
    """The REST API is an edge like the CLI: only `dlm` (which serves it) imports it."""
    modules = _graph()
    bad = [
        f"{m.name} imports {target}"
        for m in modules.values()
        if m.name.split(".")[0] not in ("api", "dlm", "tests")
        for target in m.imports
        if target.split(".")[0] == "api"
    ]
    assert bad == []
    assert any(t.startswith("api") for t in modules["dlm.commands_tokens"].imports)


# The core's packages, lowest first: a package imports only the foundation (lifecycle/*.py)
# and the packages before it.
CORE_LAYERS = ("transfer", "storage", "catalogue", "planning", "apply", "integrity")


def _core_package(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "lifecycle":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in CORE_LAYERS else "foundation"


def test_core_packages_import_downwards() -> None:
    rank = {"foundation": -1, **{p: i for i, p in enumerate(CORE_LAYERS)}}
    bad = []
    for m in _graph().values():
        mine = _core_package(m.name)
        if mine is None:
            continue
        for target in m.imports:
            theirs = _core_package(target)
            if theirs is not None and theirs != mine and rank[theirs] >= rank[mine] and target != "lifecycle":
                bad.append(f"{m.name} ({mine}) imports {target} ({theirs})")
    assert bad == []


if __name__ == "__main__":  # the numbers for a report
    graph = _graph()
    print("cycles:", import_cycles(graph))
    print("private cross-imports:", len(private_imports(graph)))
    for line in private_imports(graph):
        print("  ", line)
    sizes = sorted(
        (len(m.path.read_text().splitlines()), str(m.path.relative_to(ROOT)))
        for m in graph.values()
        if not m.name.startswith("tests")
    )
    print("largest modules:", sizes[-5:])
    print("long without reason:", long_modules(graph))
