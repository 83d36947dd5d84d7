"""The layout docs/ARCHITECTURE.md describes, held as tests: the import-linter contracts of pyproject.toml,
imports at the top of each file (a lazy one says why), and modules of a readable size."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qat import keys

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qat", "data", "trainer")
MAX_LINES = 400


def python_files(*folders: str) -> list[Path]:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if not folders or f.split("/", 1)[0] in folders]


def function_imports(path: Path) -> list[ast.stmt]:
    """Import statements inside a function body (at any depth)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def imported_modules(node: ast.AST) -> list[str]:
    """The absolute module names an import statement names (none for other nodes and relative imports)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "lint-imports is missing: install the dev extra (pip install -e '.[dev]')"
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "3 kept, 0 broken" in r.stdout


def test_lower_layers_never_import_the_trainer():
    for path in python_files("qat", "data"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = imported_modules(node)
            assert not any(n == "trainer" or n.startswith("trainer.") for n in names), (path, node.lineno)


def test_a_function_local_import_says_why():
    missing = []
    for path in python_files(*PACKAGES):
        lines = path.read_text().splitlines()
        for node in function_imports(path):
            around = lines[node.lineno - 2: node.end_lineno]
            if not any("# lazy:" in line for line in around):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "imports inside functions without a '# lazy: <reason>' comment:\n" + "\n".join(missing)


def test_test_modules_import_helpers_not_each_other():
    """Shared test code lives in tests/helpers/ and shared fixtures in tests/conftest.py: no file under tests/ imports
    a test module or conftest (shared code hid among tests there, and an autouse fixture imported with it acted
    unseen in the importing module), and a test module imports its helpers at the top, where a reader looks."""
    crossed, local = [], []
    for path in python_files("tests"):
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            crossed += [f"{rel}:{node.lineno}: {name}" for name in imported_modules(node)
                        if name.split(".")[0] == "conftest" or name.split(".")[0].startswith("test_")]
        local += [f"{rel}:{node.lineno}" for node in function_imports(path)
                  if any(name.split(".")[0] == "helpers" for name in imported_modules(node))]
    assert not crossed, "import these from tests/helpers/ (fixtures: conftest.py) instead:\n" + "\n".join(crossed)
    assert not local, "import helpers at the top of the module:\n" + "\n".join(local)


def test_the_saved_folder_contract_is_spelled_in_keys_only():
    """Every distqat_ key, completion marker and shared file name is written once, in qat/keys.py: a literal
    copy elsewhere (trainer/init.py once set `config.distqat_init` that qat/ptq/rotate.py read back by string)
    drifts from the reader the first time one side is renamed."""
    names = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)
             and (v.startswith("distqat_") or k.endswith(("_FILE", "_MARKER")))}
    assert "manifest.json" in names and "distqat_init" in names
    literal = re.compile("|".join(rf"""["']{re.escape(v)}""" for v in sorted(names)) + r"""|["']distqat_""")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in python_files(*PACKAGES) if p.name != "keys.py"
             or p.parent.name != "qat" for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not found, "use the constants of qat/keys.py instead of these literals:\n" + "\n".join(found)
    assert "distqat_init =" not in "".join(p.read_text() for p in python_files(*PACKAGES))


@pytest.mark.parametrize("folder", [*PACKAGES, "tests", "bench"])
def test_no_source_file_over_400_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in python_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their seams: {long}"


def installed_top_level_names() -> dict[str, str]:
    """{import name: what provides it} for the standard library and every installed distribution but distqat."""
    names = {n: "the standard library" for n in sys.stdlib_module_names}
    for name, dists in importlib.metadata.packages_distributions().items():
        if "distqat" not in dists:
            names[name] = ", ".join(dists)
    return names


# Folders whose modules run with the folder itself on sys.path: a script's own folder (python bench/x.py,
# python tests/scripts/x.py) and the test folder (pytest's rootdir-relative imports of conftest and test files).
SCRIPT_FOLDERS = ("bench", "tests", "tests/scripts")


@pytest.mark.parametrize("folder", SCRIPT_FOLDERS)
def test_no_module_shadows_an_installed_package(folder):
    """bench/kernels.py once hid Hugging Face's `kernels`, which transformers 5.25 imports, from every bench script
    run with bench/ on sys.path: a module named like an installed top-level package takes its place."""
    taken = installed_top_level_names()
    here = ROOT / folder
    mods = [p.stem for p in here.glob("*.py")] + [p.parent.name for p in here.glob("*/__init__.py")]
    clashes = {m: taken[m] for m in mods if m in taken and m != "__init__"}
    assert not clashes, f"{folder}/: rename these, they shadow installed packages: {clashes}"


def test_the_checkout_packages_shadow_nothing_installed():
    taken = installed_top_level_names()
    assert not {p: taken[p] for p in (*PACKAGES, "bench") if p in taken}


def test_benches_are_a_package_run_as_modules():
    """python -m bench.<name> puts the checkout's root on sys.path, not bench/; no bench edits sys.path."""
    assert (ROOT / "bench" / "__init__.py").is_file()
    for path in python_files("bench"):
        assert "sys.path.insert" not in path.read_text(), path
    assert '-m bench.suite' in (ROOT / "bench" / "gpu_suite.sh").read_text()
