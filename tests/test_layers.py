"""The package's layers (README: Layout): every import, lazy ones inside functions included, points to the same
layer or one below, and no two modules import each other, directly or around a circle.

    python tests/test_layers.py        # prints each layer's modules and what each imports
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mixtral"

# top to bottom; a module's layer is that of its longest listed prefix
LAYERS = [
    ["mixtral.cli", "mixtral.__main__"],
    ["mixtral.server", "mixtral.ui"],
    ["mixtral.engine", "mixtral"],
    ["mixtral.loading", "mixtral.generate", "mixtral.train", "mixtral.quantize_checkpoint", "mixtral.offloading",
     "mixtral.distributed"],
    ["mixtral.kernels"],
    ["mixtral.weights"],
    ["mixtral.quantize"],
    ["mixtral.model", "mixtral.experts"],
    ["mixtral.kv_cache", "mixtral.prefix_cache", "mixtral.memory", "mixtral.memory_plan", "mixtral.data",
     "mixtral.sampling", "mixtral.torch_lowbit", "mixtral.stopping"],
    ["mixtral.errors", "mixtral.paths", "mixtral.config", "mixtral.tokenizer", "mixtral.chat_format",
     "mixtral.tokenizer_backends", "mixtral.gguf_file", "mixtral.web_guard"],
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at the top or inside a function)."""
    found = modules()
    graph = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # `from . import x` names a module; `from .x import y` a member of x
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in found else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in found and d != name}
    return graph


def layer_of(name: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    if layer is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS (and to the README's Layout)")
    return layer


def test_every_import_points_down_or_sideways():
    graph = import_graph()
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, deps in graph.items() for b in deps if layer_of(b) < layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for dep in graph[stack.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
        return seen

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reachable(b)})
    assert not circles, f"modules on an import circle: {circles}"


def test_the_model_and_the_sampler_import_no_kernel():
    graph = import_graph()
    for name in ("mixtral.model", "mixtral.sampling", "mixtral.quantize"):
        assert not any(dep.startswith("mixtral.kernels") for dep in graph[name]), name


if __name__ == "__main__":
    graph = import_graph()
    for index in range(len(LAYERS)):
        names = sorted(n for n in graph if layer_of(n) == index)
        print(f"layer {len(LAYERS) - index}: {', '.join(n.removeprefix('mixtral.') or 'mixtral' for n in names)}")
        for name in names:
            deps = ", ".join(sorted(d.removeprefix("mixtral.") for d in graph[name]))
            print(f"    {name.removeprefix('mixtral.') or 'mixtral (package)'} -> {deps or '-'}")
