"""Tests for the shipped class lists and class-list parsers."""

from __future__ import annotations

import pytest

from clipdense.data.classnames import (
    AVAILABLE,
    display_name,
    load_classnames,
    parse_class_list,
    read_class_file,
    synonyms,
)

EXPECTED_LENGTHS = {
    "ade20k": 150,
    "voc21": 21,
    "voc20": 20,
    "context60": 60,
    "context59": 59,
    "cocostuff171": 171,
    "cocoobject": 81,
    "cityscapes": 19,
}


def test_available_matches_expected() -> None:
    assert set(AVAILABLE) == set(EXPECTED_LENGTHS)


@pytest.mark.parametrize("name", sorted(EXPECTED_LENGTHS))
def test_list_length_and_unique(name: str) -> None:
    entries = load_classnames(name)
    assert len(entries) == EXPECTED_LENGTHS[name]
    names = [display_name(e).casefold() for e in entries]
    assert len(set(names)) == len(names)
    assert all(e == e.strip() and e for e in entries)
    assert all("_" not in e for e in entries), "use natural multi-word names, not underscores"


def test_background_lists() -> None:
    for name in ("voc21", "context60", "cocoobject"):
        assert load_classnames(name)[0] == "background"
    for name in ("voc20", "context59", "cocostuff171", "ade20k", "cityscapes"):
        assert "background" not in [display_name(e) for e in load_classnames(name)]
    assert load_classnames("voc21")[1:] == load_classnames("voc20")
    assert load_classnames("context60")[1:] == load_classnames("context59")
    assert load_classnames("cocoobject")[1:] == load_classnames("cocostuff171")[:80]


def test_voc_renamings() -> None:
    voc = load_classnames("voc20")
    for name in ("airplane", "dining table", "motorbike", "potted plant", "tv monitor"):
        assert name in voc
    for old in ("aeroplane", "diningtable", "pottedplant", "tvmonitor"):
        assert old not in voc
    context = load_classnames("context59")
    assert {"airplane", "potted plant", "tv monitor"} <= set(context)


def test_known_positions() -> None:
    ade = [display_name(e) for e in load_classnames("ade20k")]
    assert (ade[0], ade[12], ade[149]) == ("wall", "person", "flag")
    stuff = load_classnames("cocostuff171")
    assert (stuff[0], stuff[79], stuff[80], stuff[170]) == ("person", "toothbrush", "banner", "wood")
    city = load_classnames("cityscapes")
    assert (city[0], city[6], city[18]) == ("road", "traffic light", "bicycle")
    context = load_classnames("context59")
    assert (context[0], context[58]) == ("airplane", "wood")


def test_unknown_list() -> None:
    with pytest.raises(ValueError, match="available lists"):
        load_classnames("voc")


def test_display_name_and_synonyms() -> None:
    assert display_name("person, people") == "person"
    assert display_name("sky") == "sky"
    assert synonyms(" person ,people ") == ["person", "people"]


def test_parse_comma_list() -> None:
    assert parse_class_list(" cat, grass ,sky ") == ["cat", "grass", "sky"]
    assert parse_class_list("traffic light") == ["traffic light"]


def test_parse_semicolon_list_with_synonyms() -> None:
    assert parse_class_list("cat, kitty; grass ;sky") == ["cat, kitty", "grass", "sky"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no classes"),
        ("   ", "no classes"),
        ("cat,, sky", "class 2 is empty"),
        ("cat, sky,", "class 3 is empty"),
        ("cat; ; sky", "class 2 is empty"),
        ("cat,, kitty; sky", "empty synonym"),
        ("cat, Cat", "appears twice"),
        ("cat, kitty; CAT", "appears twice"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_class_list(text)


def test_read_class_file(tmp_path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\n\ncat, kitty\n  grass  \n# comment\nsky\n")
    assert read_class_file(path) == ["cat, kitty", "grass", "sky"]


def test_read_class_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="one class name per line"):
        read_class_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no classes"):
        read_class_file(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\nsky\nSky, heavens\n")
    with pytest.raises(ValueError, match="'Sky' appears twice"):
        read_class_file(dup)
    bad = tmp_path / "bad.txt"
    bad.write_text("cat\nsky,\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_class_file(bad)
