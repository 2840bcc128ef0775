"""The package's import graph, read from the source (module-level and function-level imports alike):
units sit in layers and import only from lower layers, no module takes part in an import circle,
and no private name crosses a unit boundary. Plus what that buys: the flags and the parsing of a
saved config do not depend on which feature modules were imported.

A unit is a subpackage (`megatron_rlp.data`) or a top-level module (`megatron_rlp.train`);
`(package)` is `megatron_rlp/__init__.py`. A new unit must be given a layer here.
"""
import ast
import json
import os
import subprocess
import sys
from collections import defaultdict

from conftest import REPO_ROOT

PACKAGE = "megatron_rlp"
# Lowest first. A unit may import from units of lower layers only.
LAYERS = [
    ("foundation", {"kernels", "compat", "cli"}),
    ("device", {"device"}),
    ("config", {"config"}),
    ("models", {"models"}),
    ("data", {"data"}),
    ("training", {"training"}),
    ("inference", {"inference"}),
    ("hf", {"hf"}),
    ("features", {"quant", "rlp", "dry_run"}),
    ("extensions", {"extensions"}),
    ("loading", {"loading"}),
    ("entry points", {"train", "generate", "(package)"}),
]
LAYER_OF = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def _source_files() -> dict:
    """Module name -> path, for the package and its kernels (installed as megatron_rlp.kernels)."""
    roots = {PACKAGE: os.path.join(REPO_ROOT, PACKAGE),
             f"{PACKAGE}.kernels": os.path.join(REPO_ROOT, "kernels")}
    files = {}
    for prefix, root in roots.items():
        for folder, _, names in os.walk(root):
            for name in names:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                files[".".join([prefix, *rel])] = os.path.join(folder, name)
    return files


def _imports(module: str, path: str, modules: dict):
    """(imported module, imported names) for every import statement of `path`, at any depth."""
    is_package = path.endswith("__init__.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if submodules and len(submodules) == len(names):  # `from pkg import submodule`
                for sub in submodules:
                    yield sub, ()
            else:
                yield base, tuple(names)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def import_graph():
    """{module: {imported module of this package: names}} over every source file."""
    modules = _source_files()
    graph = defaultdict(dict)
    for module, path in modules.items():
        for target, names in _imports(module, path, modules):
            if target.split(".")[0] == PACKAGE and target != module:
                graph[module].setdefault(target, set()).update(names)
    return modules, graph


def test_every_unit_has_a_layer():
    modules, _ = import_graph()
    unplaced = sorted({_unit(m) for m in modules} - set(LAYER_OF))
    assert not unplaced, f"give these a layer in LAYERS: {unplaced}"


def test_units_import_only_from_lower_layers():
    _, graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _unit(a) != _unit(b) and LAYER_OF[_unit(b)] >= LAYER_OF[_unit(a)])
    assert not upward, "imports that point up (or sideways) a layer:\n" + "\n".join(upward)


def test_no_module_is_in_an_import_circle():
    _, graph = import_graph()
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_no_private_name_crosses_a_unit():
    _, graph = import_graph()
    crossing = sorted(f"{a} imports {b}.{name}" for a, targets in graph.items()
                      for b, names in targets.items() for name in names
                      if name.startswith("_") and _unit(a) != _unit(b))
    assert not crossing, "\n".join(crossing)


def test_the_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above read real files: one upward import in a copy of `models` is found."""
    modules = _source_files()
    rogue = tmp_path / "rogue.py"
    rogue.write_text("def f():\n    from megatron_rlp.train import build_run\n")
    names = dict(_imports(f"{PACKAGE}.models.rogue", str(rogue), modules))
    assert f"{PACKAGE}.train" in names
    assert LAYER_OF[_unit(f"{PACKAGE}.train")] > LAYER_OF[_unit(f"{PACKAGE}.models.rogue")]


def test_flags_and_saved_configs_do_not_depend_on_what_was_imported():
    """In a fresh process: the parser's flags are the same before and after every feature module
    is imported, and a saved config with every feature's keys parses before any is imported."""
    script = """
import json, sys
from megatron_rlp.config import build_parser, config_from_dict, parse_args

def flags():
    return sorted(o for a in build_parser()._actions for o in a.option_strings)

saved = parse_args(["--fp4", "nvfp4", "--rlp-num-thoughts", "4", "--data-phases", "p.yaml",
                    "--dry-run-world-size", "8"]).to_flat_dict()
cfg = config_from_dict(saved)
features = [m for m in sys.modules if m.startswith(("megatron_rlp.quant", "megatron_rlp.rlp",
                                                    "megatron_rlp.data", "megatron_rlp.extensions"))]
before = flags()
import megatron_rlp.extensions  # every feature
print(json.dumps({"features_imported_to_parse": features, "same_flags": before == flags(),
                  "n_flags": len(before), "rlp": cfg.rlp.rlp_num_thoughts, "fp4": cfg.fp4.fp4,
                  "phases": cfg.phases.data_phases,
                  "dry_run_world_size": cfg.dry_run_plan.dry_run_world_size}))
"""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["features_imported_to_parse"] == []
    assert result["same_flags"] and result["n_flags"] > 80
    assert (result["rlp"], result["fp4"], result["phases"], result["dry_run_world_size"]) == (
        4, "nvfp4", "p.yaml", 8)


def test_every_extension_names_a_config_section():
    from megatron_rlp.config import SECTIONS
    from megatron_rlp.extensions import EXTENSIONS, stage_builder

    assert {e.section for e in EXTENSIONS} <= set(SECTIONS)
    assert len({e.section for e in EXTENSIONS}) == len(EXTENSIONS)
    assert stage_builder("rlp").__module__ == "megatron_rlp.rlp.stage"
    # --stage's choices (config cannot import the extensions) are the trainer's own and theirs.
    import dataclasses

    from megatron_rlp.config import TrainingConfig

    stage = next(f for f in dataclasses.fields(TrainingConfig) if f.name == "stage")
    assert set(stage.metadata["choices"]) == {"pretrain"} | {
        name for e in EXTENSIONS for name in e.stages}
