"""The dependency rules of docs/architecture.md, read off every module's imports (function-level
imports included): stages import only downward, algos imports only torch and the registry, only the
CLI imports distributed, the ground floor imports nothing above it (only forkrl.errors, the floor's floor)."""
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "forkrl"

# lower number = lower layer; a module may import its own package and lower layers only
LAYERS = {
    "forkrl": 0, "forkrl.types": 0, "forkrl.registry": 0, "forkrl.io": 0, "forkrl.config": 0,
    "forkrl.arithmetic": 0, "forkrl.cpu": 0, "forkrl.errors": 0,
    "forkrl.models": 1, "forkrl.tasks": 1, "forkrl.envs": 1,
    "forkrl.rollout": 2, "forkrl.agents": 2, "forkrl.algos": 2, "forkrl.metrics": 2,
    "forkrl.collect": 3,
    "forkrl.train": 4,
    "forkrl.distributed": 5,
    "forkrl.cli": 6,
}
GROUND = {"forkrl.types", "forkrl.registry", "forkrl.io", "forkrl.arithmetic", "forkrl.cpu", "forkrl.errors"}
STDLIB_OK_FOR_ALGOS = {"__future__", "inspect", "math", "collections", "dataclasses", "typing", "functools"}


def _unit(module: str) -> str:
    """The package (or ground-floor module) a dotted module name belongs to."""
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    raise AssertionError(f"{module}: not in the layer table of tests/test_architecture.py")


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def _imports(path: pathlib.Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                out.append(".".join(base + ([node.module] if node.module else [])))
            else:
                out.append(node.module)
    return out


def _violations():
    found = []
    for module, path in _modules():
        unit = _unit(module)
        for imp in _imports(path, module):
            top = imp.split(".")[0]
            if unit == "forkrl.algos" and top != "forkrl" and top not in {"torch"} | STDLIB_OK_FOR_ALGOS:
                found.append(f"{module} imports {imp}: algos imports only torch (and the standard library)")
            if top != "forkrl":
                continue
            target = _unit(imp)
            if target == unit:
                continue
            if unit == "forkrl.algos" and target != "forkrl.registry":
                found.append(f"{module} imports {imp}: algos imports only the registry from forkrl")
            elif unit in GROUND and target != "forkrl.errors":
                found.append(f"{module} imports {imp}: the ground floor imports nothing from forkrl")
            elif unit == "forkrl.config":
                if target not in ("forkrl.registry", "forkrl.errors"):
                    found.append(f"{module} imports {imp}: config may name registries but imports no stage")
            elif target == "forkrl.distributed" and unit != "forkrl.cli":
                found.append(f"{module} imports {imp}: only the CLI imports distributed")
            elif LAYERS[target] >= LAYERS[unit] and target not in ("forkrl", "forkrl.errors"):
                found.append(f"{module} imports {imp}: {unit} (layer {LAYERS[unit]}) may not import "
                             f"{target} (layer {LAYERS[target]})")
    return found


def test_every_module_follows_the_dependency_rules():
    assert _violations() == []


def test_the_rule_checker_catches_a_violation(tmp_path, monkeypatch):
    """The checker is not vacuous: an upward import in a stage is reported."""
    fake = tmp_path / "forkrl"
    (fake / "tasks").mkdir(parents=True)
    (fake / "tasks" / "bad.py").write_text("from forkrl.envs.tools import TOOLS\nimport numpy\n")
    (fake / "algos").mkdir()
    (fake / "algos" / "bad.py").write_text("import numpy\nfrom forkrl.train import Trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    found = _violations()
    assert any("forkrl.tasks.bad imports forkrl.envs.tools" in v for v in found)
    assert any("forkrl.algos.bad imports numpy" in v for v in found)
    assert any("forkrl.algos.bad imports forkrl.train" in v for v in found)
