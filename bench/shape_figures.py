"""Shape figures of the code base (issue 25's "done when"), counted from the source:

- the longest library function, and the library functions over 80 lines / with more than 8 parameters
  (library: outside tests/ and bench/; Click commands excepted, as the house rule says);
- imports inside functions outside ``*/cli.py`` (the CLI edge, where lazy imports keep `tools --help` fast);
- import circles between the project's modules, counting imports inside functions too (a circle that only
  works because one side imports late is still a circle);
- duplicate pairs, as the `duplicates` command on PATH counts them (skipped when it is not installed).

    python bench/shape_figures.py [ROOT] [--json]
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tools", "corpora", "recipes", "release", "evals")


def library_files(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def _is_command(fn: ast.AST) -> bool:
    deco = " ".join(ast.unparse(d) for d in fn.decorator_list)
    return any(w in deco for w in ("command", "option", "group"))


def _n_params(fn) -> int:
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
    return n - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(mod: str, node: ast.AST, is_pkg: bool) -> list[str]:
    """Project modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def figures(root: Path = ROOT) -> dict:
    funcs, inner_imports, graph = [], 0, {}
    files = library_files(root)
    mods = {module_name(root, p) for p in files}
    for p in files:
        mod = module_name(root, p)
        tree = ast.parse(p.read_text(encoding="utf-8"))
        edges = graph.setdefault(mod, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_command(node):
                funcs.append((node.end_lineno - node.lineno + 1, _n_params(node), f"{p.relative_to(root)}:{node.lineno} "
                                                                                   f"{node.name}"))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and p.name != "cli.py":
                inner_imports += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node)
                                     if n is not node and not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(m for m in _imported(mod, node, p.name == "__init__.py") if m in mods and m != mod)
    longest = max(funcs)
    return {"longest_function": {"lines": longest[0], "where": longest[2]},
            "functions_over_80_lines": sorted(f"{w} ({n} lines)" for n, _, w in funcs if n > 80),
            "functions_over_8_params": sorted(f"{w} ({k} params)" for _, k, w in funcs if k > 8),
            "imports_inside_functions_outside_cli": inner_imports,
            "import_circles": circles(graph),
            "duplicate_pairs": duplicate_pairs(root)}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def duplicate_pairs(root: Path) -> int | None:
    exe = shutil.which("duplicates")
    if not exe:
        return None
    r = subprocess.run([exe, "--repo", str(root), "--seconds", "120"], capture_output=True, text=True, timeout=300)
    m = re.search(r"(\d+) pairs?", r.stdout) or re.search(r"(\d+) pair", r.stdout)
    return 0 if "no duplicates" in r.stdout else (int(m.group(1)) if m else None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(next((a for a in args if not a.startswith("--")), ROOT)).resolve()
    f = figures(root)
    if "--json" in args:
        print(json.dumps(f, indent=2))
        return 0
    print(f"longest library function: {f['longest_function']['lines']} lines ({f['longest_function']['where']})")
    print(f"library functions over 80 lines: {len(f['functions_over_80_lines'])}")
    print(f"library functions with more than 8 parameters: {len(f['functions_over_8_params'])}")
    print(f"imports inside functions outside */cli.py: {f['imports_inside_functions_outside_cli']}")
    print(f"import circles: {len(f['import_circles'])} {f['import_circles'] or ''}")
    print(f"duplicate pairs: {f['duplicate_pairs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
