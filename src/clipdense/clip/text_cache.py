"""An on-disk cache of class-name text embeddings, so a class list is encoded once per model and template set.

Each (weights key, template set) group is one safetensors file, ``<cache>/text/<sha1>.safetensors``, holding an
N x D ``embeddings`` tensor; its metadata names the N classes (JSON) and repeats the key and templates, so a hash
collision or a foreign file reads as a miss. Files are replaced atomically (:func:`clipdense.fileio.atomic_write`):
a reader sees a whole old file or a whole new one. When two processes add names to one group at once, the last
writer's file wins and the other's new names are encoded again next time; nothing is ever half written. A file that
cannot be read is ignored and rewritten. The folder is kept under a size cap, least recently used files first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipdense.fileio import atomic_write

logger = logging.getLogger(__name__)

#: Cache folder (default: ``$XDG_CACHE_HOME/clipdense``, else ``~/.cache/clipdense``).
CACHE_ENV = "CLIPDENSE_CACHE"
#: Set to 1 to turn the on-disk cache off.
NO_CACHE_ENV = "CLIPDENSE_NO_CACHE"
DEFAULT_MAX_BYTES = 200 * 2**20
_STALE_TMP_S = 3600  # temporary files of writers that were killed are removed after this long


def cache_root() -> Path:
    """The cache folder: ``$CLIPDENSE_CACHE``, else ``$XDG_CACHE_HOME/clipdense``, else ``~/.cache/clipdense``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "clipdense"


def cache_disabled() -> bool:
    """Whether ``$CLIPDENSE_NO_CACHE`` turns the on-disk cache off (any value but empty, 0, false, no)."""
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class TextEmbeddingCache:
    """Class-name embeddings on disk, grouped by (weights key, templates).

    Args:
        root: Cache folder (default :func:`cache_root`); files go to its ``text/`` subfolder.
        max_bytes: Size cap of that subfolder; the least recently used files are removed past it.
    """

    def __init__(self, root: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(root if root is not None else cache_root()) / "text"
        self.max_bytes = max_bytes

    def path(self, key: str, templates: Sequence[str]) -> Path:
        """The file of one (weights key, templates) group."""
        digest = hashlib.sha1("\n".join([key, *templates]).encode()).hexdigest()
        return self.folder / f"{digest}.safetensors"

    def load(self, key: str, templates: Sequence[str]) -> dict[str, torch.Tensor]:
        """The stored embeddings of a group, name -> D (float32, CPU); empty when missing or unreadable."""
        path = self.path(key, templates)
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
            names = json.loads(meta["names"])
            if meta.get("key") != key or json.loads(meta["templates"]) != list(templates):
                raise ValueError("written for another model or template set")
            if emb.ndim != 2 or emb.shape[0] != len(names):
                raise ValueError(f"{emb.shape[0]} embeddings for {len(names)} names")
        except Exception as e:  # truncated, corrupt or foreign: a miss, and the next save replaces it
            logger.debug("ignoring unreadable text-embedding cache %s: %s: %s", path, type(e).__name__, e)
            return {}
        with suppress(OSError):
            os.utime(path)  # mark it recently used for the size cap
        return dict(zip(names, emb, strict=True))

    def save(self, key: str, templates: Sequence[str], embeddings: Mapping[str, torch.Tensor]) -> None:
        """Add name -> D embeddings to a group's file (merged with what it holds now), then apply the size cap.

        Failing to write (read-only or full disk) is logged, never raised: the cache only saves time.
        """
        path = self.path(key, templates)
        merged = {**self.load(key, templates), **embeddings}
        tensors = {"embeddings": torch.stack([e.detach().float().cpu() for e in merged.values()]).contiguous()}
        meta = {"key": key, "templates": json.dumps(list(templates)), "names": json.dumps(list(merged))}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as e:
            logger.debug("could not write the text-embedding cache %s: %s", path, e)
            return
        self._evict()

    def _evict(self) -> None:
        """Remove the least recently used group files until the folder fits ``max_bytes``."""
        files = []
        for p in self.folder.glob("*.safetensors"):
            with suppress(OSError):  # another process may remove or replace it meanwhile
                stat = p.stat()
                if not p.name.startswith("."):
                    files.append((stat.st_mtime_ns, stat.st_size, p))
                elif time.time() - stat.st_mtime > _STALE_TMP_S:
                    p.unlink()
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            with suppress(OSError):
                p.unlink()
                logger.debug("text-embedding cache over %d bytes: removed %s", self.max_bytes, p)
            total -= size
