"""Notebooks are valid and stay thin: every code cell compiles, and the library's names they use
exist (a renamed function breaks this test rather than a user's Colab session)."""

import ast
import glob
import importlib
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


def _code_cells(path):
  with open(path) as f:
    nb = json.load(f)
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      # IPython shell escapes and magics are not Python: keep their indentation, run nothing.
      lines = [l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("!", "%")) else l
               for l in "".join(cell["source"]).splitlines()]
      yield "\n".join(lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_cells_compile_and_reference_real_functions(path):
  assert NOTEBOOKS, "no notebooks found"
  modules = {}
  for src in _code_cells(path):
    tree = ast.parse(src)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
          "engram_jax", "experiments"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          try:
            modules[alias.asname or alias.name] = importlib.import_module(full)
          except ModuleNotFoundError:
            mod = importlib.import_module(node.module)
            assert hasattr(mod, alias.name), f"{path}: {full} does not exist"
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in modules):
        assert hasattr(modules[node.value.id], node.attr), (
            f"{path}: {node.value.id}.{node.attr} does not exist")
