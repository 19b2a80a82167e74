"""The import structure: no cycle between any two modules (import-linter's acyclic_siblings contract checks
siblings; this checks every module, a package's __init__ against its own children included)."""

import pkgutil
from pathlib import Path

import grimp
import tomllib

import mimajax

ROOTS = ("mimajax", "data_pipeline", "configs")


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []
  counter = [0]

  def visit(node):
    work = [(node, iter(sorted(graph.find_modules_directly_imported_by(node))))]
    index[node] = low[node] = counter[0]
    counter[0] += 1
    stack.append(node)
    on_stack.add(node)
    while work:
      current, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
        elif child in on_stack:
          low[current] = min(low[current], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[current])
      if low[current] == index[current]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == current:
            break
        if len(component) > 1:
          found.append(sorted(component))

  for module in sorted(graph.modules):
    if module not in index:
      visit(module)
  return found


def test_no_module_imports_itself_back():
  graph = grimp.build_graph(*ROOTS, include_external_packages=False)
  assert len(graph.modules) > 80
  assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
  graph = grimp.ImportGraph()
  for m in ("a", "a.b", "a.c", "a.d"):
    graph.add_module(m)
  graph.add_import(importer="a.b", imported="a.c")
  graph.add_import(importer="a.c", imported="a.d")
  graph.add_import(importer="a.d", imported="a.b")
  assert _cycles(graph) == [["a.b", "a.c", "a.d"]]


# Above the shared library: the model families and the tools (the command line, the parity checks).
FAMILIES = {"mimaface", "mmfa"}
TOOLS = {"cli", "parity"}


def test_every_top_level_module_has_a_layer():
  """A new module under mimajax/ must be named in the shared-library contract (pyproject.toml), or be a
  family or a tool here: otherwise the contracts would silently not cover it."""
  config = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
  shared_contract = config["tool"]["importlinter"]["contracts"][0]
  shared = {m.removeprefix("mimajax.") for m in shared_contract["source_modules"] if m.startswith("mimajax.")}
  modules = {m.name for m in pkgutil.iter_modules(mimajax.__path__)}
  assert modules - shared - FAMILIES - TOOLS == set()
  assert shared & (FAMILIES | TOOLS) == set()
