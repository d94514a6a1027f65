"""The package's import graph, parsed from its source: arrows point down only
(cli -> modules -> ops -> the compiled library), no module but ops.py calls torch.ops.robustops,
nothing imports the tests' oracle (reference.py), algorithm modules know no command line, and no
module reaches into another's private names."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "robustops")

# helpers every layer may use; they import no robustops module (_library loads the compiled library)
BASE = {"robustops._rng", "robustops._checks", "robustops._library", "robustops._runfiles"}
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


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_no_private_names_of_other_modules(mod):
    targets, bound, names, tree, _ = GRAPH[mod]
    bad = [n[len("private:"):] for n in names if n.startswith("private:") and top(n[len("private:"):]) != top(mod)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            other = bound[node.value.id]
            if node.attr.startswith("_") and not node.attr.startswith("__") and top(other) != top(mod):
                bad.append(f"{other}.{node.attr}")
    assert not bad, f"{mod} uses private names of other modules: {bad}"


def test_cli_uses_plain_imports():
    for mod, (_, _, names, _, _path) in GRAPH.items():
        if layer(mod) == "cli":
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


def test_readme_lists_the_registered_methods():
    """README.md's table of training methods is the registry's (ro.train.methods_table())."""
    import robustops as ro

    readme = open(os.path.join(os.path.dirname(PKG), "README.md")).read()
    table = readme.split("<!-- methods -->\n", 1)[1].split("\n<!-- /methods -->", 1)[0]
    assert table == ro.train.methods_table()
