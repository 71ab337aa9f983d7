"""The package's modules depend on one another in one direction only.

Read from the source (no import is run): every ``import`` of a module of the
package, at module level or inside a function. Imports under ``if
TYPE_CHECKING:`` never run, so they are counted apart: the only one allowed
to point back up is the session's reference to the router, for the public
type of ``session.router``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sqlalchemy_replicas

PACKAGE = Path(sqlalchemy_replicas.__file__).parent
NAME = "sqlalchemy_replicas"

# The shared state and what it is built from: none of them may know the
# router or the session, even for annotations (they use Protocols instead).
BELOW_THE_ROUTER = ("cluster", "causal", "monitor", "plan", "policy", "targets", "positions")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """The package modules ``path`` imports when run, and those it imports
    for type checkers only."""
    tree = ast.parse(path.read_text())
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    run: set[str] = set()
    typing_only: set[str] = set()

    def visit(node: ast.AST, target: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking_block(child):
                assert isinstance(child, ast.If)
                for stmt in child.body:
                    visit_stmt(stmt, typing_only)
                for stmt in child.orelse:
                    visit_stmt(stmt, target)
            else:
                visit_stmt(child, target)

    def visit_stmt(node: ast.AST, target: set[str]) -> None:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == NAME or base.startswith(NAME + "."):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    target.add(candidate if resolves(candidate) else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(NAME + "."):
                    target.add(alias.name)
        visit(node, target)

    visit(tree, run)
    return run - {this}, typing_only - {this}


def resolves(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative).is_dir()


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    run: dict[str, set[str]] = {}
    typing_only: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        run[name], typing_only[name] = imports_of(path)
    return run, typing_only


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the package's modules (parent packages aside: importing
    ``a.b`` runs ``a/__init__``, which is not a dependency of ``a.b``'s code)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == NAME or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_modules_import_one_another_without_a_cycle() -> None:
    """No chain of imports that run (module level or inside functions) leads
    from a module of the package back to itself."""
    run, _ = graph()
    assert len(run) > 30  # the walk found the package's modules
    assert find_cycle(run) is None, " -> ".join(find_cycle(run) or [])


def test_no_cycle_even_counting_annotations_but_the_sessions_router_type() -> None:
    """Counting the imports for type checkers as well, the only way back up
    is ``session.router``'s public type."""
    run, typing_only = graph()
    combined = {name: run[name] | typing_only[name] for name in run}
    combined[f"{NAME}.session"] -= {f"{NAME}.router"}
    assert find_cycle(combined) is None, " -> ".join(find_cycle(combined) or [])


def test_the_shared_state_and_its_parts_do_not_know_the_router_or_the_session() -> None:
    """The cluster, causal scopes, the lag monitor, the plan, the policy, the
    targets and the position backends import neither the router nor the
    session, not even for annotations."""
    run, typing_only = graph()
    upper = {f"{NAME}.router", f"{NAME}.session"}
    for name in run:
        short = name.removeprefix(NAME + ".").split(".")[0]
        if short in BELOW_THE_ROUTER:
            assert not (run[name] | typing_only[name]) & upper, name


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module loop is reported."""
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.a"}}) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None
