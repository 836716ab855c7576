"""The benchmark and evidence scripts (scripts/) run for minutes to hours and are not part of the suite, so a rename
in hftl can break them unnoticed: five of them imported `hftl.cli.RECIPES` for a week after it was gone. This checks,
without running them, that every name a script imports from hftl still exists."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def hftl_imports(source: str) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for `from hftl... import name` and (line, module, None) for `import hftl...`, anywhere in
    the file (the scripts import inside functions, after setting their environment)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "hftl":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if alias.name.split(".")[0] == "hftl"]
    return found


def missing(imports: list[tuple[int, str, str | None]]) -> list[str]:
    gone = []
    for line, module, name in imports:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            gone.append(f"line {line}: {module} ({e})")
            continue
        if name is not None and not hasattr(mod, name):
            try:  # `from hftl import recipe` names a submodule
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                gone.append(f"line {line}: {module}.{name}")
    return gone


def test_the_check_finds_a_name_that_is_gone():
    sample = "def f():\n    from hftl.cli import RECIPES, main\n    from hftl import recipe\n    import hftl.nothing_here\n"
    assert hftl_imports(sample) == [(2, "hftl.cli", "RECIPES"), (2, "hftl.cli", "main"), (3, "hftl", "recipe"),
                                    (4, "hftl.nothing_here", None)]
    gone = missing(hftl_imports(sample))
    assert gone[0] == "line 2: hftl.cli.RECIPES" and gone[1].startswith("line 4: hftl.nothing_here") and len(gone) == 2


def test_every_name_a_script_imports_from_hftl_exists():
    scripts = sorted((REPO_ROOT / "scripts").rglob("*.py"))
    imports = {str(p.relative_to(REPO_ROOT)): hftl_imports(p.read_text()) for p in scripts}
    assert sum(map(len, imports.values())) > 20  # the check reads the scripts' imports at all
    assert {path: gone for path, found in imports.items() if (gone := missing(found))} == {}
