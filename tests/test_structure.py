"""The package's import graph, parsed from its source: arrows point down only
(cli -> modules -> ops -> the compiled library), no import cycle anywhere (imports inside functions
count), the algorithm modules in their order (perturbation/protocol below attacks, the rest of
perturbation above it, nothing at the package root above train/), no module but ops.py calls
torch.ops.robustops, nothing imports the tests' oracle (reference.py), algorithm modules know no
command line, no file reaches into another file's private names (not even inside one subpackage),
no function over 80 lines and no file over 700, and the benchmarks import the installed package.
Each rule's checker is a plain function, and a test shows it fails on a violation."""
import ast
import collections
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "robustops")

# helpers every layer may use; they import no robustops module (_library loads the compiled library)
BASE = {"robustops._rng", "robustops._checks", "robustops._library", "robustops._runfiles", "robustops._cuda",
        "robustops._threads"}
OPS = "robustops.ops"
REFERENCE = "robustops.reference"
CLI = "robustops.cli"


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def sources():
    for root, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield module_name(path), path


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports(mod: str, path: str):
    """(imported robustops modules, {local name: robustops module it is bound to}, imported names)."""
    tree = ast.parse(open(path).read(), filename=path)
    is_pkg = path.endswith("__init__.py")
    targets, bound, names = set(), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names.append(a.name)
                if a.name.startswith("robustops"):
                    targets.add(a.name)
                    bound[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = resolve(mod, is_pkg, node)
            names.append(base)
            if not base.startswith("robustops"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if os.path.exists(os.path.join(os.path.dirname(PKG), *sub.split(".")) + ".py") or \
                        os.path.isdir(os.path.join(os.path.dirname(PKG), *sub.split("."))):
                    targets.add(sub)
                    bound[a.asname or a.name] = sub
                else:
                    targets.add(base)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        names.append(f"private:{base}.{a.name}")
    return targets, bound, names, tree


def layer(mod: str) -> str:
    if mod in BASE:
        return "base"
    if mod == OPS:
        return "ops"
    if mod == REFERENCE:
        return "reference"
    if mod == CLI or mod.startswith(CLI + ".") or mod == "robustops.__main__":
        return "cli"
    if mod == "robustops":
        return "root"
    return "module"


# What each layer may import (besides itself).
ALLOWED = {"base": {"base"}, "ops": {"base"}, "reference": {"base", "ops"}, "root": {"base", "ops"},
           "module": {"base", "ops", "module", "root"}, "cli": {"base", "ops", "module", "root", "cli"}}

GRAPH = {m: imports(m, p) + (p,) for m, p in sources()}


def top(mod: str) -> str:
    """The package-level unit a module belongs to (robustops.attacks.engine -> robustops.attacks)."""
    parts = mod.split(".")
    return ".".join(parts[:2])


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_arrows_point_down(mod):
    targets = GRAPH[mod][0]
    bad = [t for t in targets if t != "robustops" and layer(t) not in ALLOWED[layer(mod)] and top(t) != top(mod)]
    bad += [t for t in targets if layer(t) == "reference"]
    assert not bad, f"{mod} ({layer(mod)}) must not import {bad}"


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_only_ops_calls_the_compiled_library(mod):
    src = open(GRAPH[mod][4]).read()
    if mod not in (OPS, "robustops._library"):  # _library loads the library and reads its build info
        assert "torch.ops.robustops" not in src, f"{mod} calls torch.ops.robustops directly: go through ops.py"


@pytest.mark.parametrize("mod", sorted(m for m in GRAPH if layer(m) != "cli"))
def test_algorithm_modules_know_no_command_line(mod):
    names = GRAPH[mod][2]
    assert "argparse" not in names and not any(n == CLI or n.startswith(CLI + ".") for n in names), mod


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_definitions(trees):
    """{private name: files defining it} over {path: ast}: functions, classes, module / class
    variables and attributes assigned (self._x = ...)."""
    defs = collections.defaultdict(set)
    for path, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and private(n.name):
                defs[n.name].add(path)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and private(n.id):
                defs[n.id].add(path)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and private(n.attr):
                defs[n.attr].add(path)
            elif isinstance(n, ast.alias) and n.asname and private(n.asname):
                defs[n.asname].add(path)
    return defs


def foreign_private_uses(trees):
    """[(path, line, name)]: a private name read in a file that does not define it while another
    package file does (an inherited ``self._run_args()``, ``other._forward``, ``from .x import _y``):
    a file uses only its own private names, even inside one subpackage."""
    defs = private_definitions(trees)
    bad = []
    for path, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
                name = n.attr
            elif isinstance(n, ast.ImportFrom):
                bad += [(path, n.lineno, a.name) for a in n.names
                        if private(a.name) and a.name in defs and path not in defs[a.name]]
                continue
            else:
                continue
            if private(name) and name in defs and path not in defs[name]:
                bad.append((path, n.lineno, name))
    return bad


def test_no_private_names_of_other_files():
    bad = foreign_private_uses({p: t for _, (_, _, _, t, p) in GRAPH.items()})
    assert not bad, "private names used outside the file that defines them (make them public): " + \
        ", ".join(f"{os.path.relpath(p, ROOT)}:{line} {name}" for p, line, name in bad)


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_no_private_names_of_other_modules(mod):
    """Also a private name reached through another module (``from ..x import _y``, ``mod._y``), even a
    name the checker above cannot see defined (a compiled or re-exported one)."""
    targets, bound, names, tree, _ = GRAPH[mod]
    bad = [n[len("private:"):] for n in names if n.startswith("private:")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            other = bound[node.value.id]
            if private(node.attr) and other != mod:
                bad.append(f"{other}.{node.attr}")
    assert not bad, f"{mod} uses private names of other modules: {bad}"


def module_graph(graph):
    """{module: package modules it imports} (imports inside functions too; the root package
    ``robustops``, a facade of re-exports, is left out)."""
    return {m: {t for t in v[0] if t != "robustops" and t in graph and t != m} for m, v in graph.items()}


def import_cycles(edges):
    """The import cycles of a {module: imported modules} graph: each strongly connected component of
    more than one module (Tarjan), as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
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
                out.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(out)


def test_no_import_cycle():
    cycles = import_cycles(module_graph(GRAPH))
    assert not cycles, f"import cycles: {cycles}"


def reachable(edges, start):
    """Every module reachable from start by imports (start excluded unless it is on a cycle)."""
    seen, todo = set(), list(edges.get(start, ()))
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges.get(m, ()))
    return seen


def under(mod: str, unit: str) -> bool:
    return mod == unit or mod.startswith(unit + ".")


def root_module(mod: str) -> bool:
    """A module at the package root (robustops/x.py), not a subpackage's."""
    return mod.count(".") == 1 and not os.path.isdir(os.path.join(PKG, mod.split(".")[1]))


# (lower, upper, why): no module of `lower` reaches a module of `upper` by imports, directly or not.
# Units are module names or predicates.
ORDER = [
    ("robustops.perturbation.protocol", "robustops.attacks", "attacks import the protocol: it knows no attack"),
    ("robustops.attacks", lambda m: under(m, "robustops.perturbation") and m != "robustops.perturbation.protocol",
     "attacks import only perturbation/protocol; quality, fit, cvae, pairs sit above them"),
    (root_module, "robustops.train", "nothing at the package root sits above train/"),
    ("robustops.perturbation.protocol", "robustops.train", "the protocol is below training"),
    ("robustops.corruptions", lambda m: under(m, "robustops.attacks") or under(m, "robustops.train"),
     "corruptions sit below attacks/ and train/ (which may use them)"),
    (lambda m: under(m, "robustops.attacks") or under(m, "robustops.smoothing"), "robustops.preemptive",
     "robustify runs the attacks and smoothing: they know nothing of it"),
]


def order_violations(edges, order=ORDER):
    """[(module, reached module, why)] for each rule of order that the import graph breaks."""
    def member(unit, m):
        return unit(m) if callable(unit) else under(m, unit)

    bad = []
    for lower, upper, why in order:
        for m in sorted(edges):
            if member(lower, m) and m != "robustops.__main__":
                bad += [(m, r, why) for r in sorted(reachable(edges, m)) if member(upper, r) and not member(lower, r)]
    return bad


def test_algorithm_modules_in_order():
    bad = order_violations(module_graph(GRAPH))
    assert not bad, "\n".join(f"{m} reaches {r}: {why}" for m, r, why in bad)


MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 700


def size_violations(trees, lines):
    """[(path, what, n)] for each function longer than MAX_FUNCTION_LINES and each file longer than
    MAX_FILE_LINES (decorators and docstrings count)."""
    bad = [(p, "file", n) for p, n in lines.items() if n > MAX_FILE_LINES]
    for path, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = n.end_lineno - n.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append((path, f"{n.name}()", length))
    return bad


def test_functions_and_files_are_short():
    trees = {p: t for _, (_, _, _, t, p) in GRAPH.items()}
    lines = {p: len(open(p).read().splitlines()) for p in trees}
    bad = size_violations(trees, lines)
    assert not bad, ", ".join(f"{os.path.relpath(p, ROOT)} {what}: {n} lines" for p, what, n in bad)


def edits_sys_path(src: str) -> bool:
    tree = ast.parse(src)
    return any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
               and n.value.id == "sys" for n in ast.walk(tree))


def test_benchmarks_import_the_installed_package():
    bench = os.path.join(ROOT, "benchmarks")
    bad = [f for f in sorted(os.listdir(bench)) if f.endswith(".py") and edits_sys_path(open(os.path.join(bench, f)).read())]
    assert not bad, f"benchmarks edit sys.path (import the installed robustops instead): {bad}"


#: CLI modules that import the user's code by its module path (evaluate --model package.module:factory).
USER_CODE_LOADERS = {"robustops.cli.evaluate"}


def test_cli_uses_plain_imports():
    for mod, (_, _, names, _, _path) in GRAPH.items():
        if layer(mod) == "cli" and mod not in USER_CODE_LOADERS:
            assert "importlib" not in names, f"{mod}: wire subcommands with plain imports"


def test_the_checker_sees_violations(tmp_path):
    """The parser behind these tests does find a forbidden import (so they can fail)."""
    bad = tmp_path / "robustops" / "attacks"
    bad.mkdir(parents=True)
    f = bad / "x.py"
    f.write_text("from ..cli import main\nfrom .. import reference\nimport argparse\n")
    targets, _, names, _ = imports("robustops.attacks.x", str(f))
    assert "robustops.cli.main" in targets or "robustops.cli" in targets
    assert "argparse" in names and any(layer(t) == "reference" for t in targets)


def test_each_rule_can_fail():
    """Each checker above finds a made-up violation of its rule."""
    # a cycle through a function-level import, and none in a chain
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # order: attacks reaching perturbation.quality through another module; a root module reaching train
    edges = {"robustops.attacks.x": {"robustops.smoothing.y"}, "robustops.smoothing.y": {"robustops.perturbation.quality"},
             "robustops.perturbation.quality": {"robustops.attacks.x"}, "robustops.proxy": {"robustops.train.fit"},
             "robustops.train.fit": set(), "robustops.perturbation.protocol": set()}
    bad = order_violations(edges)
    assert ("robustops.attacks.x", "robustops.perturbation.quality", ORDER[1][2]) in bad
    assert ("robustops.proxy", "robustops.train.fit", ORDER[2][2]) in bad
    assert order_violations({"robustops.attacks.x": {"robustops.perturbation.protocol"},
                             "robustops.perturbation.protocol": set()}) == []
    # a private name of a sibling file in the same subpackage: inherited, imported, and on a module
    a = ast.parse("class P:\n    def _run_args(self):\n        return 1\n_helper = 2\n")
    b = ast.parse("from .a import P, _helper\nfrom . import a\nclass Q(P):\n    def f(self):\n"
                  "        return self._run_args() + a._helper\n    def _own(self):\n        return self._own\n")
    found = sorted((p, name) for p, _, name in foreign_private_uses({"a.py": a, "b.py": b}))
    assert found == [("b.py", "_helper"), ("b.py", "_helper"), ("b.py", "_run_args")]
    # sizes
    long_fn = ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert size_violations({"f.py": long_fn}, {"f.py": MAX_FUNCTION_LINES + 1}) == [("f.py", "f()", MAX_FUNCTION_LINES + 1)]
    assert size_violations({"g.py": ast.parse("x = 1\n")}, {"g.py": MAX_FILE_LINES + 1}) == [("g.py", "file", MAX_FILE_LINES + 1)]
    assert edits_sys_path("import sys\nsys.path.insert(0, '.')\n") and not edits_sys_path("import os\n")


def test_readme_lists_the_registered_methods():
    """README.md's table of training methods is the registry's (ro.train.methods_table())."""
    import robustops as ro

    readme = open(os.path.join(os.path.dirname(PKG), "README.md")).read()
    table = readme.split("<!-- methods -->\n", 1)[1].split("\n<!-- /methods -->", 1)[0]
    assert table == ro.train.methods_table()
