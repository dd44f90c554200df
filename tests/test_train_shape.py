"""The shape of the training code (issue 28's redesign): every function in mm/train is at most 60 lines, the
Trainer holds fewer than 15 attributes, and neither the trainer nor the executors name an objective."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "mm" / "train"


def test_no_function_in_mm_train_is_over_60_lines():
    long = []
    for path in sorted(TRAIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_the_trainer_holds_fewer_than_15_attributes():
    tree = ast.parse((TRAIN / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    names = set()
    for node in ast.walk(trainer):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self":
                    names.add(el.attr)
    assert names and len(names) < 15, sorted(names)


def test_the_loop_and_the_executors_hold_no_objective_code():
    """Objectives are named in docstrings and comments only: no code line of the trainer or an executor mentions
    CoCa, SigLIP or distillation."""
    for name in ("trainer.py", "executors.py", "grad_cache.py"):
        source = (TRAIN / name).read_text()
        code = [line for line in _code_lines(source) if re.search(r"coca|siglip|distil", line, flags=re.I)]
        assert not code, (name, code)


def _code_lines(source: str) -> list[str]:
    """Lines of code with docstrings and comments removed."""
    tree = ast.parse(source)
    doc_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            doc_lines.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    lines = source.splitlines()
    return [line.split("#")[0] for i, line in enumerate(lines, 1) if i not in doc_lines]
