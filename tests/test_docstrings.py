"""Every public module, class and function of sknock has a docstring (issue 10, point 5).

Read with ``ast``, so no module is imported (some need root or optional dependencies to import).
Public: a name not starting with ``_``, methods of public classes included.  ``__init__`` needs none when
its class has one; other dunder methods need none.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sknock"


def _missing(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(PACKAGE.parent)
    missing = [f"{where}: module"] if ast.get_docstring(tree) is None else []

    def visit(body: list[ast.stmt], prefix: str, class_doc: bool | None) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = node.name
                if name == "__init__":
                    if class_doc is not None and not class_doc and ast.get_docstring(node) is None:
                        missing.append(f"{where}:{node.lineno}: {prefix}{name}")
                    continue
                if name.startswith("_"):
                    continue
                if ast.get_docstring(node) is None:
                    missing.append(f"{where}:{node.lineno}: {prefix}{name}")
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node) is not None
                if not doc:
                    missing.append(f"{where}:{node.lineno}: {prefix}{node.name}")
                visit(node.body, f"{prefix}{node.name}.", doc)

    visit(tree.body, "", None)
    return missing


def test_every_public_definition_has_a_docstring() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert files, f"no sources under {PACKAGE}"
    missing = [entry for path in files for entry in _missing(path)]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)
