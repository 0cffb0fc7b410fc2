"""The house rules that the code's shape must keep (docs/architecture.md): stages meet only through their
artifacts (no stage module imports another), and no function is longer than 120 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import mlrnet_cli

PKG = Path(mlrnet_cli.__file__).parent
STAGES = {"corrupt", "collect", "train", "evaluate", "weights", "predict"}
MAX_FUNCTION_LINES = 120


def imported_modules(path: Path) -> set[str]:
    """``mlrnet_cli`` modules a file imports, at any depth (function-local imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mlrnet_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlrnet_cli"):
            out.add(node.module)
            if node.module == "mlrnet_cli":  # from mlrnet_cli import train
                out |= {f"mlrnet_cli.{a.name}" for a in node.names}
    return out


def stage_imports(path: Path) -> set[str]:
    return {m.split(".")[1] for m in imported_modules(path) if m.count(".") >= 1 and m.split(".")[1] in STAGES}


def test_no_stage_module_imports_another_stage() -> None:
    found = {p.stem: stage_imports(p) - {p.stem} for p in sorted(PKG.glob("*.py")) if p.stem in STAGES}
    assert {"collect", "train", "evaluate", "weights", "corrupt"} <= set(found)
    assert {k: v for k, v in found.items() if v} == {}


def test_shared_modules_import_no_stage() -> None:
    """Shared code lives below the stages: only the CLI layer (commands/, cli.py) imports a stage."""
    shared = [p for p in sorted(PKG.glob("*.py")) if p.stem not in STAGES | {"cli", "__main__"}]
    assert {p.stem: stage_imports(p) for p in shared if stage_imports(p)} == {}


def test_the_import_reader_sees_stage_imports(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text("from mlrnet_cli import train\ndef f():\n    from mlrnet_cli.collect import X\n")
    assert stage_imports(src) == {"train", "collect"}


def test_every_method_has_one_registered_step() -> None:
    from mlrnet_cli.configs import Method
    from mlrnet_cli.train import STEPS

    assert set(STEPS) == {m.value for m in Method}


def test_no_function_is_longer_than_120_lines() -> None:
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
