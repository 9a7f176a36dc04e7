"""The shape of the code: imports run one way, modules meet at public names,
and both backends provide what the model calls."""
import ast
from pathlib import Path

import pytest

import charrnn
from charrnn import kernels

PACKAGE = Path(charrnn.__file__).parent


def _modules():
    """{dotted name: parsed module} for every module of charrnn."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py")
    return found


MODULES = _modules()


def _imports(name):
    """The charrnn modules that module ``name`` imports, anywhere in it
    (function-level imports included)."""
    tree, is_package = MODULES[name]
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "charrnn"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "charrnn":
                continue
            for alias in node.names:  # `from . import model` names a module
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out - {name}


def test_charrnn_modules_import_each_other_without_a_cycle():
    graph = {name: _imports(name) for name in MODULES}
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)
    for name in sorted(graph):
        visit(name)


def test_no_module_uses_another_modules_underscore_names():
    reach_ins = []
    for name, (tree, _) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("charrnn")):
                reach_ins += [f"{name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
            # obj._name on anything but self / cls (an object of another class
            # or module); dunders are Python's own
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                reach_ins.append(f"{name}:{node.lineno}: .{node.attr}")
    assert reach_ins == []


def test_the_layers_import_downwards_only():
    """kernels import no charrnn module outside kernels/ but the leaves
    (errors, paths); the API layer is imported by nothing below it."""
    leaves = {"charrnn.errors", "charrnn.paths"}
    for name in MODULES:
        if name.startswith("charrnn.kernels"):
            outside = {m for m in _imports(name) if not m.startswith("charrnn.kernels")} - leaves
            assert outside == set(), name
    for name in MODULES:
        if name not in ("charrnn", "charrnn.cli"):
            assert "charrnn.cli" not in _imports(name), name


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_backend_provides_the_kernel_contract(device):
    if device == "cpu":
        module = kernels.cpu
    else:
        pytest.importorskip("numba.cuda")
        try:
            module = kernels.import_cuda()
        except ImportError as e:
            pytest.skip(f"numba-cuda is not installed: {e}")
    missing = [name for name in kernels.CONTRACT if not hasattr(module, name)]
    assert missing == []
    cpu_args = {name: kernels.signature(kernels.cpu, name) for name in kernels.CONTRACT}
    assert {name: kernels.signature(module, name) for name in kernels.CONTRACT} == cpu_args
