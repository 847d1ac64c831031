"""The public API is what the README uses: every name it mentions imports, and the top level exports nothing else."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

import clipdense

README = (Path(__file__).parents[1] / "README.md").read_text()
ARCHITECTURE = (Path(__file__).parents[1] / "ARCHITECTURE.md").read_text()


def _imported_names(text: str) -> set[tuple[str, str]]:
    """(module, name) of every ``from clipdense... import a, b`` line in the README's code blocks."""
    out = set()
    for module, names in re.findall(r"^from (clipdense[\w.]*) import ([\w, ]+)$", text, flags=re.M):
        out |= {(module, n.strip()) for n in names.split(",") if n.strip()}
    return out


def _dotted_names(text: str) -> set[str]:
    """Every ``clipdense.a.b`` the README writes in backticks or code (trailing calls stripped)."""
    return set(re.findall(r"\bclipdense(?:\.\w+)+", text))


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_readme_mentions_imports():
    assert _imported_names(README), "the README's Python section should import from clipdense"
    for module, name in sorted(_imported_names(README)):
        assert hasattr(importlib.import_module(module), name), f"README: from {module} import {name}"


@pytest.mark.parametrize("doc", ["README.md", "ARCHITECTURE.md"])
def test_dotted_names_resolve(doc):
    text = README if doc == "README.md" else ARCHITECTURE
    for dotted in sorted(_dotted_names(text)):
        _resolve(dotted)


def test_top_level_exports_exactly_what_the_readme_uses():
    used = {name for module, name in _imported_names(README) if module == "clipdense"}
    used |= {d.split(".")[1] for d in _dotted_names(README) if hasattr(clipdense, d.split(".")[1])}
    used -= {n for n in used if importlib.util.find_spec(f"clipdense.{n}") is not None}  # subpackages
    assert set(clipdense.__all__) == used
    for name in clipdense.__all__:
        assert getattr(clipdense, name) is not None


def test_architecture_names_existing_modules():
    root = Path(clipdense.__file__).parent
    paths = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+(?:\.py|/))`", ARCHITECTURE))
    assert len(paths) > 20
    for path in sorted(paths):
        found = (root / path).exists() or any(root.rglob(path.rstrip("/")))
        assert found, f"ARCHITECTURE.md names {path}, which is not in src/clipdense"
