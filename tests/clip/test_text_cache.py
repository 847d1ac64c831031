"""The on-disk class-embedding cache: hits across embedders, misses, damaged files, the size cap, off switches."""

import dataclasses
import os
import threading
from pathlib import Path

import pytest
import torch

from clipdense.clip import TextEmbedder, load_clip
from clipdense.clip import text as text_module
from clipdense.clip.text_cache import TextEmbeddingCache, cache_root

NAMES = ["cat", "sky", "traffic light"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPDENSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLIPDENSE_NO_CACHE", raising=False)
    return tmp_path / "cache" / "text"


@pytest.fixture
def clip(tiny_checkpoints):
    """Weights from a file: a fingerprint that is the same in every run."""
    return load_clip("tiny-RN", tiny_checkpoints["tiny-RN"][1]["safetensors"])


@pytest.fixture
def encoded(monkeypatch):
    """How many prompts each text-tower call encodes."""
    calls = []
    original = text_module.encode_text
    monkeypatch.setattr(text_module, "encode_text", lambda m, t: calls.append(len(t)) or original(m, t))
    return calls


def _files(folder):
    return sorted(folder.glob("*.safetensors")) if folder.exists() else []


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPDENSE_CACHE", str(tmp_path / "here"))
    assert cache_root() == tmp_path / "here"
    monkeypatch.delenv("CLIPDENSE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "clipdense"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path("~/.cache/clipdense").expanduser()


def test_a_second_embedder_reads_the_disk_and_encodes_nothing(cache_dir, clip, tiny_checkpoints, monkeypatch):
    first = TextEmbedder(clip, "scene").encode_names(NAMES)
    assert len(_files(cache_dir)) == 1

    def fail(model, tokens):
        raise AssertionError("encoded although the disk cache holds every name")

    monkeypatch.setattr(text_module, "encode_text", fail)
    again = load_clip("tiny-RN", tiny_checkpoints["tiny-RN"][1]["safetensors"])
    assert again.fingerprint == clip.fingerprint
    second = TextEmbedder(again, "scene").encode_names(NAMES[::-1])
    assert torch.equal(second, first.flip(0))


def test_new_names_are_encoded_and_added_to_the_file(cache_dir, clip, encoded):
    TextEmbedder(clip, "scene").encode_names(NAMES[:2])
    emb = TextEmbedder(clip, "scene").encode_names(NAMES)
    assert encoded == [10, 5]  # 2 names x 5 templates, then only the third name
    stored = TextEmbeddingCache().load(TextEmbedder(clip, "scene")._disk_key, TextEmbedder(clip, "scene").templates)
    assert list(stored) == NAMES and torch.equal(torch.stack(list(stored.values())), emb)


@pytest.mark.parametrize(
    "change",
    [
        lambda clip: (clip, ["a photo of a {}.", "a {}."]),
        lambda clip: (dataclasses.replace(clip, fingerprint="other weights"), "scene"),
        lambda clip: (dataclasses.replace(clip, quick_gelu=not clip.quick_gelu), "scene"),
    ],
    ids=["templates", "fingerprint", "quick_gelu"],
)
def test_other_templates_or_weights_miss(cache_dir, clip, encoded, change):
    TextEmbedder(clip, "scene").encode_names(NAMES)
    other, templates = change(clip)
    TextEmbedder(other, templates).encode_names(NAMES)
    assert len(encoded) == 2 and len(_files(cache_dir)) == 2


def test_a_damaged_file_is_ignored_and_replaced(cache_dir, clip, encoded, caplog):
    first = TextEmbedder(clip, "scene").encode_names(NAMES)
    (path,) = _files(cache_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("DEBUG", logger="clipdense.clip.text_cache"):
        second = TextEmbedder(clip, "scene").encode_names(NAMES)
    assert len(encoded) == 2 and "ignoring unreadable" in caplog.text
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    TextEmbedder(clip, "scene").encode_names(NAMES)  # read from the rewritten file
    assert len(encoded) == 2


def test_a_file_of_another_group_reads_as_a_miss(tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    cache.save("weights a", ["{}"], {"cat": torch.ones(4)})
    cache.path("weights a", ["{}"]).rename(cache.path("weights b", ["{}"]))  # as if the hashes collided
    assert cache.load("weights b", ["{}"]) == {}


def test_the_size_cap_removes_the_least_recently_used_files(tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    for i, key in enumerate("abc"):
        cache.save(key, ["{}"], {"cat": torch.ones(256)})
        os.utime(cache.path(key, ["{}"]), ns=(i * 10**9, i * 10**9))
    size = cache.path("a", ["{}"]).stat().st_size
    cache.load("a", ["{}"])  # used now: the newest
    cache.max_bytes = 3 * size
    cache.save("d", ["{}"], {"cat": torch.ones(256)})
    assert {p.name for p in _files(cache.folder)} == {cache.path(k, ["{}"]).name for k in "acd"}


def test_concurrent_writers_never_leave_a_damaged_file(tmp_path):
    cache = TextEmbeddingCache(tmp_path)
    errors = []

    def write(i):
        try:
            for j in range(5):
                cache.save("w", ["{}"], {f"name {i} {j}": torch.full((64,), float(i))})
                assert cache.load("w", ["{}"])  # every read finds a whole file
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(_files(cache.folder)) == 1 and not list(cache.folder.glob(".*"))  # no temporary files left


def test_off_switches_write_nothing(cache_dir, clip, monkeypatch, encoded):
    TextEmbedder(clip, "scene", disk_cache=False).encode_names(NAMES)
    monkeypatch.setenv("CLIPDENSE_NO_CACHE", "1")
    TextEmbedder(clip, "scene").encode_names(NAMES)
    assert _files(cache_dir) == [] and len(encoded) == 2


def test_random_weights_are_never_written(cache_dir, encoded):
    torch.manual_seed(0)
    TextEmbedder(load_clip("tiny-RN", None), "scene").encode_names(NAMES)
    assert _files(cache_dir) == [] and len(encoded) == 1
