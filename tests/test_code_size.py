"""The size rules of the code (tests excluded): short functions that take few parameters."""

import ast
import os

from conftest import ROOT

MAX_LINES = 40  # of code, the docstring not counted
MAX_PARAMS = 5  # self and cls not counted; *args and **kwargs count one each
SKIPPED = {"tests", "data", "ckpt", "plots", "logs", "__pycache__"}


def project_functions():
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED and not d.startswith(".")]
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield os.path.relpath(path, ROOT), node


def code_lines(node):
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def parameters(node):
    a = node.args
    named = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
    return len(named) + (a.vararg is not None) + (a.kwarg is not None)


def test_functions_are_short_and_take_few_parameters():
    found = list(project_functions())
    assert any(path == "trainer.py" for path, _ in found)
    too_long = [f"{path}:{node.lineno} {node.name} ({code_lines(node)} lines)"
                for path, node in found if code_lines(node) > MAX_LINES]
    too_many = [f"{path}:{node.lineno} {node.name} ({parameters(node)} parameters)"
                for path, node in found if parameters(node) > MAX_PARAMS]
    assert not too_long and not too_many, too_long + too_many
