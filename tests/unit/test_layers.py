"""The layers run one way (DESIGN.md, "Layers run one way"):

    medmaas.cli (composition root) ──wires──► workers/ ──builds on──► app/ core
                                   └────────► app/web, app/api ──────► app/ core
    medmaas.client, medmaas.commands, medmaas.formatting: HTTP only, import neither.

Every import statement in a module counts, also the ones inside functions, so a lazy
import cannot hide a dependency that runs the wrong way.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSITION_ROOT = ("medmaas.cli", "medmaas.standalone", "medmaas.demo")
CLIENT_MODULES = ("medmaas/client.py", "medmaas/commands.py", "medmaas/formatting.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in the file names (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__", "spec_from_file_location", "find_spec"):
            # dynamic imports by name: the string literals they are given
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return found


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def offenders(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in files:
        hits = sorted(m for m in imports_of(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_the_walker_sees_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    pkg = ROOT / "app" / "ingest" / "__init__.py"
    assert "app.ingest.common" in imports_of(pkg)  # `from .common import ...`
    probe = ROOT / "app" / "_layer_probe.py"
    probe.write_text("def f():\n    import workers.tasks\n    __import__('workers.kinds')\n")
    try:
        assert {"workers.tasks", "workers.kinds"} <= imports_of(probe)
    finally:
        probe.unlink()


def test_nothing_under_app_imports_workers_or_the_composition_root() -> None:
    assert offenders(python_files("app"), ("workers", *COMPOSITION_ROOT, "medmaas.commands")) == {}


def test_workers_do_not_import_the_web_layer_or_the_composition_root() -> None:
    assert offenders(python_files("workers"), ("app.api", "app.web", "app.factory", "medmaas")) == {}


@pytest.mark.parametrize("relpath", CLIENT_MODULES)
def test_the_client_imports_neither_app_nor_workers(relpath: str) -> None:
    assert offenders([ROOT / relpath], ("app", "workers", *COMPOSITION_ROOT)) == {}


def test_the_web_app_loads_no_worker_code(tmp_path: Path) -> None:
    """Built for real: creating the app and rendering the OpenAPI document (which walks
    every job kind's spec) loads nothing from workers/ and no torch."""
    code = (
        "import sys\n"
        "from app.config import from_env\n"
        "from app import create_app\n"
        "from pathlib import Path\n"
        f"app = create_app(from_env({{}}, home=Path(r'{tmp_path}'), testing=True, secret_key='x'))\n"
        "app.test_client().get('/api/v1/openapi.json')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'torch'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rdkit_children_load_only_the_chemistry_helper() -> None:
    code = "import sys, workers.scoring.rdkit_child\nprint(sorted(m for m in ('flask', 'sqlalchemy', 'pandas', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
