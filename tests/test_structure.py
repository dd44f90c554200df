"""The package's structure stays as ARCHITECTURE.md draws it: layers with one direction of imports.

Every module of ``mm`` belongs to a unit (the longest prefix in :data:`LAYERS`); a unit imports only units of
earlier layers, and its own modules. Imports are read with ``ast`` from the source, wherever they stand (top of
the file, inside a function, under ``TYPE_CHECKING``), so a deferred import cannot hide a wrong direction. Some
units are also held to a list of the packages from outside mm they may import (:data:`THIRD_PARTY`): ``mm.models``
builds networks from torch and the standard library alone, other libraries' formats (open_clip, timm,
transformers) being the interop layer's (``mm.hub``). The checker itself is tested: it must catch a deliberate
upward import, a cycle and a foreign import planted in a copy of the package.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Earlier layers first. Units of one layer may not import each other. The root package (mm/__init__.py: public
# re-exports, mm/__main__.py) sits above everything.
LAYERS: list[tuple[str, ...]] = [
    ("mm._version", "mm.utils"),
    ("mm.config",),
    ("mm.layers",),
    ("mm.models",),
    ("mm.hub",),
    ("mm.tokenizer", "mm.losses", "mm.data"),
    ("mm.inference",),
    ("mm.eval",),
    ("mm.train",),
    ("mm.serve",),
    ("mm.cli",),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# The packages from outside mm (besides the standard library) that a unit may import; units not listed are not held
# to a list. models/ depends on torch and mm's earlier layers alone: open_clip's configs and timm's modules are read
# by mm.hub (open_clip_configs.py), which registers open_clip's registry as a preset source of mm.models.presets.
THIRD_PARTY: dict[str, frozenset[str]] = {"mm.models": frozenset({"torch"})}
TOP = len(LAYERS)
MAX_FUNCTION_LINES = 80


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> tuple[str, int]:
    """(unit, layer rank) of a module: the longest listed prefix; the root package is above all layers."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in RANK:
            return prefix, RANK[prefix]
    if module in ("mm", "mm.__main__"):
        return "mm", TOP
    raise AssertionError(f"{module}: in no layer of tests/test_structure.py (add its unit to LAYERS)")


def imports(path: Path, module: str, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported mm module) for every import in ``path``; ``from PKG import NAME`` counts as PKG.NAME
    when that is a module, else as PKG."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mm":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if sub in modules else target))
    return found


def external_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) for every absolute import of a package other than mm in ``path``, wherever it
    stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return [(line, name) for line, name in found if name != "mm"]


def third_party_violations(root: Path) -> list[str]:
    """Imports of packages outside the standard library that a unit's :data:`THIRD_PARTY` list does not allow."""
    files, _ = scan(root)
    out = []
    for module, path in files.items():
        unit, _ = unit_of(module)
        allowed = THIRD_PARTY.get(unit)
        if allowed is None:
            continue
        for line, name in external_imports(path):
            if name not in allowed and name not in sys.stdlib_module_names:
                out.append(f"{path.relative_to(root)}:{line}: {module} imports {name}: {unit} may import only the "
                           f"standard library, {', '.join(sorted(allowed))} and mm's earlier layers")
    return out


def scan(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    """Every module under ``root/mm`` and its imports of other mm modules."""
    files = {module_name(p, root): p for p in sorted((root / "mm").rglob("*.py"))}
    modules = set(files)
    return files, {m: [(n, t) for n, t in imports(p, m, modules) if t != m] for m, p in files.items()}


def layer_violations(root: Path) -> list[str]:
    files, graph = scan(root)
    out = []
    for module, targets in graph.items():
        unit, rank = unit_of(module)
        for line, target in targets:
            t_unit, t_rank = unit_of(target)
            if t_unit != unit and t_rank >= rank:
                out.append(f"{files[module].relative_to(root)}:{line}: {module} (layer {rank}) imports {target} "
                           f"(layer {t_rank}): imports must point to earlier layers")
    return out


def cycles(root: Path) -> list[list[str]]:
    """Import cycles among mm modules (strongly connected components of more than one module)."""
    _, graph = scan(root)
    edges = {m: sorted({t for _, t in ts if t in graph}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_import_points_to_an_earlier_layer():
    assert layer_violations(ROOT) == []


def test_no_import_cycles():
    assert cycles(ROOT) == []


def test_models_import_only_torch_and_the_standard_library():
    assert third_party_violations(ROOT) == []


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "mm", tmp_path / "mm", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_checker_catches_an_upward_import(tmp_path):
    root = _copy_package(tmp_path)
    mlp = root / "mm" / "layers" / "mlp.py"
    mlp.write_text(mlp.read_text() + "\n\ndef _planted():\n    from ..cli import main  # noqa: F401\n")
    found = layer_violations(root)
    assert len(found) == 1 and "mm.layers.mlp (layer 2) imports mm.cli (layer 10)" in found[0], found


def test_the_checker_catches_a_cycle(tmp_path):
    root = _copy_package(tmp_path)
    mlp = root / "mm" / "layers" / "mlp.py"
    mlp.write_text(mlp.read_text() + "\n\nfrom . import block  # noqa: E402,F401\n")  # block imports mlp
    assert any({"mm.layers.block", "mm.layers.mlp"} <= set(c) for c in cycles(root)), cycles(root)


def test_the_checker_catches_a_foreign_import_in_models(tmp_path):
    """open_clip or timm imported by models/ (here at the top of a file and deferred inside a function) fails, as does
    models/ importing the interop layer that now holds them."""
    root = _copy_package(tmp_path)
    vision = root / "mm" / "models" / "vision.py"
    vision.write_text("import open_clip  # noqa: F401\n" + vision.read_text()
                      + "\n\ndef _planted():\n    from timm.layers import Mlp  # noqa: F401\n"
                      + "    from ..hub import open_clip_configs  # noqa: F401\n")
    found = third_party_violations(root)
    assert len(found) == 2 and "mm.models.vision imports open_clip" in found[0] and "imports timm" in found[1], found
    layers = layer_violations(root)
    assert len(layers) == 1 and "mm.models.vision (layer 3) imports mm.hub.open_clip_configs (layer 4)" in layers[0]


def test_long_functions_say_why():
    """No function over ~80 lines without a comment saying why (``# long: ...`` in its body)."""
    long = []
    for path in sorted((ROOT / "mm").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = lines[node.lineno - 1: node.end_lineno]
                if len(body) > MAX_FUNCTION_LINES and not any("# long:" in line for line in body):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(body)} lines)")
    assert long == []


# "--flag" in a string of a library module (not a docstring): a message naming a command's option. Library functions
# are also called from configs and Python, so they name things by the caller's name for them (a `what` / `names`
# argument the command fills in) and command examples live in mm/cli/. Known exceptions, with why:
FLAG = re.compile(r"(?<![\w-])--(?:[a-z]|$)")  # "--model", or an f-string's "--{...}"; not "a--b" or "-k"
FLAG_EXCEPTIONS: set[tuple[str, str]] = set()  # none left: mm finetune runs on the trainer, whose hints name its keys


def flag_strings(root: Path) -> list[str]:
    """``path:line 'string'`` for each non-docstring string constant outside mm/cli/ that names a command-line flag."""
    found = []
    for path in sorted((root / "mm").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("mm/cli/"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and FLAG.search(node.value) and (rel, node.value) not in FLAG_EXCEPTIONS]
    return found


def test_library_messages_name_no_command_line_flag(tmp_path):
    assert flag_strings(ROOT) == []
    root = _copy_package(tmp_path)  # the checker catches a planted message and an f-string's "--{kind}"
    planted = root / "mm" / "hub" / "spec.py"
    planted.write_text(planted.read_text() + '\n\ndef _planted(kind):\n    """Not this: --model."""\n'
                       '    raise ValueError("drop --pretrained" + f"`mm embed --{kind}`")\n')
    found = flag_strings(root)
    assert len(found) == 2 and all(f.startswith("mm/hub/spec.py:") for f in found), found


def test_import_mm_is_light():
    """``import mm`` loads no torch: the public names are imported when first used."""
    code = ("import sys, mm; heavy = [m for m in ('torch', 'numpy', 'accelerate', 'open_clip') if m in sys.modules]; "
            "print(heavy); assert not heavy, heavy; assert callable(mm.create_model) and 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_command_line_and_a_model_leave_dynamo_and_torchvision_unloaded():
    """Every `mm` command, DataLoader worker and launched rank imports the CLI and builds a model; torch._dynamo
    (through a decorator run at import) and torchvision (which imports dynamo) cost several seconds a process
    there, so they load only when used: torch.compile, an optimizer step, open_clip's own preprocessing."""
    code = ("import sys, torch, mm.cli, mm\n"
            "from mm.models.patches import Patches, patchify\n"
            "m = mm.create_model('tiny-clip').eval()\n"
            "with torch.no_grad():\n"
            "    m.encode_image(torch.zeros(1, 3, 32, 32))\n"
            "    m.encode_image(Patches.stack([patchify(torch.zeros(3, 8, 16), 4)]))\n"
            "print(sorted(n for n in ('torch._dynamo', 'torchvision') if n in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_python_dash_m_mm_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "mm", "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mm ") and "zeroshot" in proc.stdout


def test_a_model_directory_saved_before_the_restructure_still_loads(tmp_path):
    """Earlier versions wrote ``grad_checkpointing`` into every stack of config.json (an architecture field
    then, a training setting now): such a directory loads, with the same weights and outputs."""
    import json

    import torch

    import mm

    torch.manual_seed(0)
    model = mm.create_model("tiny-coca").eval()
    mm.save_pretrained(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    meta = json.loads(path.read_text())
    stacks = [meta["model"]["vision"]["transformer"], meta["model"]["text"]["transformer"],
              meta["model"]["decoder"]["transformer"]]
    for stack in stacks:
        assert "grad_checkpointing" not in stack
        stack["grad_checkpointing"] = False  # as every config.json of earlier versions holds it
    path.write_text(json.dumps(meta, indent=2))
    loaded = mm.load_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    images, tokens = torch.randn(2, 3, 32, 32), mm.get_tokenizer(model)(["a red circle", "a blue star"])
    with torch.no_grad():
        want, got = model(images, tokens), loaded(images, tokens)
    assert torch.equal(want.image_emb, got.image_emb) and torch.equal(want.caption_logits, got.caption_logits)
