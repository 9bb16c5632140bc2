"""The layers of the code (README "Architecture"): no package imports one above it, no file-level import circle.

Every module of ``sp_ray`` and ``export`` is parsed with ``ast`` (nothing is imported) and each of its imports
of our own code, at any depth in the file (lazy imports included), is checked against ``LAYERS``.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A unit may import units of lower layers only; units of one layer never import each other.
LAYERS: list[tuple[str, ...]] = [
    ("export.runtime",),  # torch-free: numpy and onnxruntime only
    ("sp_ray", "sp_ray.errors"),  # sp_ray: the package's __init__ (its version)
    ("sp_ray.config", "sp_ray.types", "sp_ray.machine", "sp_ray.onnx_model"),
    ("sp_ray.checkpoint", "sp_ray.device", "sp_ray.data", "sp_ray.drawing"),
    ("sp_ray.models",),
    ("sp_ray.objectives",),
    ("sp_ray.pretrain",),
    ("sp_ray.evaluation",),
    ("sp_ray.train",),
    ("sp_ray.densecl",),
    ("sp_ray.tune", "sp_ray.predict", "sp_ray.serve", "export.exporter"),
    ("sp_ray.benchmark",),
    ("sp_ray.run",),
    ("sp_ray.demo",),
    ("sp_ray.cli",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    """The layer unit of a module of ours (``sp_ray.models.knet`` -> ``sp_ray.models``), None for others."""
    parts = module.split(".")
    if parts[0] == "export":
        return "export.exporter" if len(parts) > 1 and parts[1] == "exporter" else "export.runtime"
    if parts[0] == "sp_ray":
        return "sp_ray" if len(parts) == 1 or parts[1] == "__version__" else f"sp_ray.{parts[1]}"
    return None


def our_modules() -> dict[str, Path]:
    files = [*ROOT.glob("sp_ray/**/*.py"), *ROOT.glob("export/**/*.py")]
    return {module_name(f): f for f in files}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports: ``from a.b import c`` gives ``a.b.c`` when that is a module, else ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name for name in found if unit_of(name) is not None}


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(name) for name in our_modules()}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS (and to the README's Architecture)"


def test_no_module_imports_a_layer_above_or_beside_its_own() -> None:
    modules = our_modules()
    wrong = []
    for name, path in sorted(modules.items()):
        own = unit_of(name)
        for imported in sorted(imports_of(path, set(modules))):
            target = unit_of(imported)
            if target != own and RANK[target] >= RANK[own]:
                wrong.append(f"{path.relative_to(ROOT)} ({own}, layer {RANK[own]}) imports {imported} "
                             f"({target}, layer {RANK[target]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_circle_between_files() -> None:
    modules = our_modules()
    graph = {name: {m for m in imports_of(path, set(modules)) if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ and the modules under it are one unit for this check: a module importing its
    # own package (``from sp_ray.models import FAMILIES`` in sp_ray.models.x) only runs after __init__.
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in pairwise(circle)):
                    circles.append(circle)
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "file-level import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_checks_see_an_import_against_the_layers(tmp_path: Path) -> None:
    """The parser finds top-level and lazy imports, so the layer test cannot pass by reading nothing."""
    source = tmp_path / "m.py"
    source.write_text("import sp_ray.cli\n\ndef f():\n"
                      "    from sp_ray.train.loop import fit\n    from export import rle\n")
    assert imports_of(source, {"sp_ray.train.loop", "export.rle"}) == {"sp_ray.cli", "sp_ray.train.loop", "export.rle"}
    assert unit_of("sp_ray.train.loop") == "sp_ray.train" and RANK["sp_ray.train"] > RANK["sp_ray.models"]
    assert unit_of("export.exporter.onnx_export") == "export.exporter" and unit_of("export.rle") == "export.runtime"
