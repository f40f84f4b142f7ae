"""The layout is the architecture: imports run one way, with no cycles, read from the code itself.

- `engine/` is a plain library: no Ray, no FastAPI, nothing of `deployments/` or `demo/`, and of
  `serve_app/` only settings, errors and stage types;
- `serve_app/` never imports `deployments/`, and only its CLI may import `demo/`;
- `deployments/` may import `engine/` and `serve_app/`, never `demo/`;
- no module takes part in an import cycle (imports inside functions count too);
- importing the ingress loads neither torch nor transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "deployments", "serve_app", "demo")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str) -> set[str]:
    """Every module `path` imports, anywhere in it, as absolute dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from engine.quant import gptq` imports the module engine.quant.gptq
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imported_modules(path, name) if m in modules and m != name}
    return graph


GRAPH = project_graph()


def imports_of(prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def raw_imports(prefix: str) -> dict[str, set[str]]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = module_name(path)
            if name == prefix or name.startswith(prefix + "."):
                out[name] = imported_modules(path, name)
    return out


def offending(imports: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {dep}"
        for module, deps in imports.items()
        for dep in deps
        if any(dep == f or dep.startswith(f + ".") for f in forbidden)
    )


def test_the_graph_sees_every_package() -> None:
    for package in PACKAGES:
        assert imports_of(package), f"no modules found under {package}/"
    # A known edge, so that a broken parser cannot pass the rules below by seeing nothing.
    assert "engine.prompts" in GRAPH["deployments.vlm"] | set().union(*imports_of("engine.generate").values())


def test_engine_is_a_library_without_ray_web_or_demo() -> None:
    forbidden = ("ray", "fastapi", "starlette", "deployments", "demo", "serve_app.openai", "serve_app.web",
                 "serve_app.cli")
    assert offending(raw_imports("engine"), forbidden) == []


def test_serve_app_never_imports_the_graph_and_only_the_cli_imports_demo() -> None:
    assert offending(raw_imports("serve_app"), ("deployments",)) == []
    serving = {m: d for m, d in raw_imports("serve_app").items() if not m.startswith("serve_app.cli")}
    assert offending(serving, ("demo",)) == []


def test_the_graph_never_imports_demo() -> None:
    assert offending(raw_imports("deployments"), ("demo",)) == []


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("module", ["deployments.ingress", "serve_app.openai.protocol", "serve_app.web.router"])
def test_the_http_side_imports_no_torch_or_transformers(module: str) -> None:
    probe = (
        f"import sys, {module}; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'engine.generate', 'engine.continuous') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing {module} loaded {done.stdout.strip()}"
