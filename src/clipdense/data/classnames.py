"""Shipped class-name lists and parsers for user-supplied class lists.

A class *entry* is one string that may carry comma-separated synonyms, e.g. ``"person, people"``; the first
synonym is the *display name*. Shipped lists live in ``clipdense/data/classnames/<name>.txt`` with one entry
per line, in the label order of the matching dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

AVAILABLE: tuple[str, ...] = (
    "ade20k",
    "voc21",
    "voc20",
    "context60",
    "context59",
    "cocostuff171",
    "cocoobject",
    "cityscapes",
)


#: The official repositories' class-name files, copied verbatim (``classnames/official/SOURCES.md``), by
#: ``<method>_<dataset>``: e.g. ``sclip_voc21``, whose background entry is 26 stuff words.
OFFICIAL: tuple[str, ...] = tuple(
    f"{method}_{dataset}"
    for method in ("maskclip", "sclip", "clearclip", "naclip")
    for dataset in AVAILABLE
    if not (method == "maskclip" and dataset in ("voc21", "context60", "cocoobject"))  # MaskCLIP ships none
)


def load_classnames(name: str) -> list[str]:
    """Loads a shipped class list: ours (:data:`AVAILABLE`) or an official one (:data:`OFFICIAL`).

    Args:
        name: One of :data:`AVAILABLE` or :data:`OFFICIAL`.

    Returns:
        The list's entries in label order, synonyms kept (e.g. ``"person, people"``).

    Raises:
        ValueError: If ``name`` is not a shipped list.
    """
    if name not in AVAILABLE and name not in OFFICIAL:
        raise ValueError(
            f"unknown class list {name!r}; available lists: {', '.join(AVAILABLE)}; the official repositories' "
            f"lists: {', '.join(OFFICIAL)}. For your own classes use read_class_file() or parse_class_list()."
        )
    folder = resources.files(__package__) / "classnames"
    text = (folder / "official" / f"{name}.txt" if name in OFFICIAL else folder / f"{name}.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def display_name(entry: str) -> str:
    """Returns the display name (first synonym) of an entry: ``"person, people"`` -> ``"person"``."""
    return entry.split(",", 1)[0].strip()


def synonyms(entry: str) -> list[str]:
    """Returns all synonyms of a class entry, display name first, e.g. ``["person", "people"]``."""
    return [part.strip() for part in entry.split(",") if part.strip()]


def parse_class_list(text: str) -> list[str]:
    """Parses a class list given on the command line.

    Two forms are accepted:

    * ``"cat, grass, sky"``: comma-separated, one class per item, no synonyms.
    * ``"cat, kitty; grass; sky"``: as soon as a ``;`` is present it separates classes, and commas inside a
      class separate synonyms (the first one is the display name).

    Args:
        text: The class list string.

    Returns:
        One entry per class, synonyms joined with ``", "``.

    Raises:
        ValueError: On an empty list, an empty class or synonym, or duplicate classes (display names compared
            case-insensitively).
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_class_list expects a string such as 'cat, grass, sky', got {type(text).__name__}")
    where = f"class list {text!r}"
    if not text.strip():
        _validate([], where)
    if ";" in text:
        entries = [_normalize_entry(part, f"{where}, class {i + 1}") for i, part in enumerate(text.split(";"))]
    else:
        entries = [part.strip() for part in text.split(",")]
    _validate(entries, where)
    return entries


def read_class_file(path: str | Path) -> list[str]:
    """Reads a user class file: one class per line, optional comma-separated synonyms per line.

    Blank lines and lines starting with ``#`` are skipped.

    Args:
        path: The text file.

    Returns:
        One entry per class, in file order, synonyms joined with ``", "``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On an empty list, an empty synonym, or duplicate classes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"class file {path} not found; expected a text file with one class name per line "
            "(synonyms comma-separated, '#' starts a comment line)"
        )
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(_normalize_entry(line, f"{path}:{lineno}"))
    _validate(entries, f"class file {path}")
    return entries


def _normalize_entry(entry: str, where: str) -> str:
    parts = [part.strip() for part in entry.split(",")]
    if not any(parts):
        raise ValueError(f"{where} is empty; remove the stray separator or give a class name")
    if not all(parts):
        raise ValueError(f"{where} ({entry.strip()!r}) has an empty synonym; remove the doubled or trailing comma")
    return ", ".join(parts)


def _validate(entries: Iterable[str], where: str) -> None:
    entries = list(entries)
    if not entries:
        raise ValueError(f"{where} contains no classes; give at least one class name, e.g. 'cat, grass, sky'")
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        name = display_name(entry)
        if not name:
            raise ValueError(
                f"{where}: class {i + 1} is empty; remove the doubled or trailing separator "
                "(classes are separated by ',' or, when synonyms are used, by ';')"
            )
        key = name.casefold()
        if key in seen:
            raise ValueError(
                f"{where}: class {name!r} appears twice (classes {seen[key] + 1} and {i + 1}); "
                "every class must be unique (compared case-insensitively)"
            )
        seen[key] = i
