"""The package's import directions, read from every module's source (function-level imports
included): the model never reaches up into decoding, training, conversion or the CLI; the
reference folder never imports Megatron or the rest of the plugin; compat and parallel stay at
the bottom; nothing in the package imports the integrations."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stag_plugin"
TOP = ("cli", "generate", "__main__")

# folder -> the stag_plugin folders / top-level modules it must never import
FORBIDDEN = {
    "reference": ("core", "parallel", "decode", "training", "convert", "compat", "integrations",
                  *TOP),
    "compat": ("core", "parallel", "reference", "decode", "training", "convert",
               "integrations", *TOP),
    "parallel": ("core", "decode", "training", "convert", "integrations", *TOP),
    "core": ("decode", "training", "convert", "integrations", *TOP),
    "decode": ("training", "convert", "integrations", *TOP),
    "training": ("convert", "integrations", *TOP),
    "convert": ("integrations", *TOP),
}


def imports_of(path: Path) -> set:
    """Every module name imported anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def part_of(name: str):
    """stag_plugin.<part>... -> part (a folder or a top-level module); None outside."""
    parts = name.split(".")
    return parts[1] if parts[0] == "stag_plugin" and len(parts) > 1 else None


def modules_in(folder: str) -> list:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_directions(folder):
    wrong = []
    for path in modules_in(folder):
        for name in imports_of(path):
            part = part_of(name)
            if part in FORBIDDEN[folder]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_reference_never_imports_megatron():
    wrong = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in modules_in("reference") for name in imports_of(path)
             if name.split(".")[0] == "megatron"]
    assert not wrong, "\n".join(wrong)


def test_nothing_in_the_package_imports_the_integrations():
    wrong = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in sorted(PACKAGE.rglob("*.py")) if "integrations" not in path.parts
             for name in imports_of(path) if part_of(name) == "integrations"]
    assert not wrong, "\n".join(wrong)


def test_every_folder_is_checked_and_documented():
    folders = sorted(p.name for p in PACKAGE.iterdir()
                     if p.is_dir() and (p / "__init__.py").is_file())
    assert set(folders) - {"integrations"} == set(FORBIDDEN), folders
    for folder in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"stag_plugin/{folder}/__init__.py: say what lives " \
                                            "there and what it may import"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The checker itself: a function-level import of training inside core is found."""
    fake = PACKAGE / "core" / "model.py"
    found = {part_of(n) for n in imports_of(fake)}
    assert "training" not in found
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from stag_plugin.training import train\n")
    assert "training" in {part_of(n) for n in imports_of(probe) if n.startswith("stag_plugin")}


def test_old_import_paths_forward_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    sys.modules.pop("stag_plugin.model", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("stag_plugin.model")
    from stag_plugin.core.model import StagGPTModel

    assert old.StagGPTModel is StagGPTModel
    assert any(issubclass(w.category, DeprecationWarning)
               and "stag_plugin.model moved to stag_plugin.core.model" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
