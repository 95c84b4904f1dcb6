"""The import layering of docs/architecture.md, checked on the source.

Layers, lowest first; a module may import only from lower layers and from its own package
(``soupkit.io.*`` from ``soupkit.io.*``, ...). Every import counts, also those inside functions
or under ``TYPE_CHECKING``: a lazy import does not make a wrong direction right.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "soupkit"

# Top-level module or subpackage of soupkit -> layer. Keep in step with docs/architecture.md.
LAYERS: list[tuple[str, set[str]]] = [
    ("maths, errors, threads", {"ops", "rng", "errors", "background"}),
    ("package root", {"__init__"}),  # __version__ and SoupkitError only
    ("io", {"io"}),
    ("methods", {"methods"}),
    ("recipe", {"recipe"}),
    ("plan", {"plan"}),
    ("execute", {"execute"}),
    ("export", {"export", "card"}),
    ("merge", {"merge"}),
    ("fit", {"fit"}),
    ("reports", {"describe", "verify", "analyze"}),
    ("eval", {"eval"}),  # score a recipe, adapter or model (reuses fit's data formats)
    ("sweep", {"sweep"}),  # optuna search over recipes, scored with eval
    ("cli", {"cli", "testing"}),  # testing: tiny models for tests and examples; nothing in soupkit uses it
    ("entry point", {"__main__"}),
]
LAYER_OF = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}
# Pure maths: not even soupkit.errors, so `import soupkit.ops` can never pull in the pipeline.
IMPORTS_NOTHING = {"ops", "rng", "errors", "background"}
# Lower layers that a layer still may not use: a merge rule knows no files (and, being below
# recipe, no recipe).
NOT_FROM = {"methods": {"io"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def part_of(module: str) -> str:
    """``soupkit.io.adapter`` -> ``io``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def soupkit_imports(module: str) -> set[str]:
    """Every soupkit module that ``module``'s source imports, wherever the import statement sits."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from soupkit.methods import cat` imports the module soupkit.methods.cat
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {name for name in found if name == "soupkit" or name.startswith("soupkit.")}


def test_every_module_is_in_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if part_of(m) not in LAYER_OF)
    assert not unplaced, f"put these in LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module in MODULES:
        part = part_of(module)
        for target in soupkit_imports(module):
            other = part_of(target)
            if part in IMPORTS_NOTHING and other != part:
                wrong.append(f"{module} imports {target}: {part} imports nothing from soupkit")
            elif other in NOT_FROM.get(part, set()):
                wrong.append(f"{module} imports {target}: {part} may not use {other}")
            elif other != part and LAYER_OF[other] >= LAYER_OF[part]:
                wrong.append(f"{module} ({LAYERS[LAYER_OF[part]][0]}) imports {target} ({LAYERS[LAYER_OF[other]][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    """No cycle among modules, counting lazy imports too (within a package the layer rule cannot see them)."""
    graph = {m: sorted(t for t in soupkit_imports(m) if t in MODULES and t != m) for m in MODULES}
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state[nxt] == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in graph:
        if state[module] == 0:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_import_checker_sees_lazy_and_from_imports() -> None:
    """The checker itself: it must find an import inside a function and resolve `from pkg import module`."""
    assert "soupkit.methods.cat" in soupkit_imports("soupkit.methods.registry")
    assert "soupkit.recipe" in soupkit_imports("soupkit.cli.group")  # imported inside the command functions


def test_each_module_imports_on_its_own() -> None:
    """Import every module first, in a fresh interpreter each time as far as soupkit is concerned.

    One subprocess; before each module every ``soupkit`` entry leaves ``sys.modules`` (third-party
    packages stay loaded, which keeps this a few seconds instead of one torch import per module).
    ``soupkit.__main__`` is left out: importing it runs the CLI.
    """
    names = sorted(m for m in MODULES if m != "soupkit.__main__")
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for key in [k for k in sys.modules if k == 'soupkit' or k.startswith('soupkit.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_random_salts_live_in_one_module() -> None:
    """Every salt of a seeded draw is a name from soupkit.methods.seeds, never a literal at the call."""
    literal_salts = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            position = {"generator": 0, "uniform": 2, "uniform_for": 3}.get(fn)  # where each takes its salt
            salt = node.args[position] if position is not None and len(node.args) > position else None
            if isinstance(salt, ast.JoinedStr):  # f"{salt}|{name}" composes names; a word in it is a literal salt
                salt = ast.Constant("".join(v.value for v in salt.values if isinstance(v, ast.Constant)))
            if isinstance(salt, ast.Constant) and any(ch.isalnum() for ch in str(salt.value)):
                literal_salts.append(f"{module}:{node.lineno}")
    assert not literal_salts, f"use a name from soupkit/methods/seeds.py: {literal_salts}"


def test_salt_values_are_the_ones_lock_files_recorded() -> None:
    """Changing a salt changes every output of its method; these are the values outputs were made with."""
    from soupkit.methods import seeds

    assert (seeds.DARE, seeds.DELLA, seeds.RANGE_FINDER, seeds.LEGO_KMEANS, seeds.PEFT_MASKS) == (
        "dare",
        "della",
        "range-finder",
        "lego-kmeans",
        "peft",
    )
