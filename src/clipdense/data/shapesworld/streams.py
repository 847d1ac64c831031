"""Seed streams and the image-caption stream for CLIP pre-training.

Each purpose draws its scenes from its own seed stream: scene i of a stream is the scene of seed
``user seed + *_SEED_OFFSET + i``. The CLIP pre-training stream (:class:`ShapesWorldCaptions`) renders its
scenes on the fly, or reads them from a scene cache (:func:`render_scene_cache`): the same scenes rendered
once into memory-mapped uint8 arrays, so that many epochs cost a fraction of the CPU time.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from clipdense.data.shapesworld.config import ShapesWorldConfig
from clipdense.data.shapesworld.scene import Scene, generate_scene, single_object_scene
from clipdense.fileio import atomic_write_json

__all__ = [
    "CLIP_SEED_OFFSET",
    "EVAL_SEED_OFFSET",
    "TRAIN_SEED_OFFSET",
    "VAL_SEED_OFFSET",
    "ShapesWorldCaptions",
    "normalize_image",
    "render_scene_cache",
    "training_scene",
]

#: Seed offset of the exported segmentation training split.
TRAIN_SEED_OFFSET = 0
#: Seed offset of the exported segmentation validation split.
VAL_SEED_OFFSET = 100_000_000
#: Seed offset of the CLIP pre-training scenes.
CLIP_SEED_OFFSET = 200_000_000
#: Seed offset of the zero-shot evaluation scenes.
EVAL_SEED_OFFSET = 300_000_000


def training_scene(seed: int, cfg: ShapesWorldConfig, single_object: bool = False) -> Scene:
    """Scene ``seed`` of a training stream.

    Args:
        seed: Non-negative integer seed.
        cfg: World configuration.
        single_object: Render the one-object scene ``single_object_scene(seed, cfg, seed % C)``
            ("a photo of a <size> <colour> <shape>") instead of :func:`generate_scene`.

    Returns:
        The :class:`Scene`.
    """
    return single_object_scene(seed, cfg, seed % cfg.num_classes) if single_object else generate_scene(seed, cfg)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """Converts an image to a CLIP input tensor.

    Args:
        image: H x W x 3 uint8 RGB image.

    Returns:
        3 x H x W float32 tensor normalised with the OpenAI CLIP mean and std.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean) / std


# ----------------------------------------------------------------------------------------------------------
# Scene cache: render once, train for many epochs
# ----------------------------------------------------------------------------------------------------------

_CACHE_META = "cache.json"
_CACHE_ARRAYS = ("images.npy", "captions.npy")
_CACHE_VERSION = 1
#: Caption slots in the cache are fixed-width ASCII; captions are capped at 18 words, far below this.
_CAPTION_BYTES = 192


def _cache_meta(num_scenes: int, base_seed: int, cfg: ShapesWorldConfig, single_object: bool) -> dict:
    """What a cache of these scenes holds, as recorded in ``cache.json`` (without the progress fields)."""
    return {
        "version": _CACHE_VERSION,
        "num_scenes": num_scenes,
        "base_seed": base_seed,
        "single_object": single_object,
        "config": asdict(cfg),
    }


def _meta_key(meta: dict) -> str:
    """The part of a cache record that identifies its scenes, as a comparable string."""
    keys = ("version", "num_scenes", "base_seed", "single_object", "config")
    return json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)


def _read_cache_meta(root: Path) -> dict | None:
    """The ``cache.json`` record of a cache folder, or None when it is missing or unreadable."""
    try:
        return json.loads((root / _CACHE_META).read_text())
    except (OSError, ValueError):
        return None


def _render_range(job: tuple[int, int, ShapesWorldConfig, bool]) -> tuple[np.ndarray, list[bytes]]:
    """Renders training scenes ``seed0 .. seed0 + count - 1``: (count x S x S x 3 uint8 images, ASCII captions)."""
    seed0, count, cfg, single_object = job
    scenes = [training_scene(seed0 + i, cfg, single_object) for i in range(count)]
    return np.stack([s.image for s in scenes]), [s.caption.encode("ascii") for s in scenes]


def render_scene_cache(
    root: str | Path,
    num_scenes: int,
    base_seed: int = CLIP_SEED_OFFSET,
    cfg: ShapesWorldConfig | None = None,
    workers: int = 2,
    chunk: int = 512,
    progress: bool = True,
    single_object: bool = False,
) -> Path:
    """Renders training scenes ``base_seed .. base_seed + num_scenes - 1`` (:func:`training_scene`) once
    into memory-mapped arrays.

    Layout: ``root/images.npy`` (N x S x S x 3 uint8), ``root/captions.npy`` (N fixed-width ASCII byte
    strings) and ``root/cache.json`` (what the cache holds and how far rendering got). Rendering goes
    chunk by chunk in ``workers`` processes; an interrupted call keeps every finished chunk and the next
    call continues from there. A complete cache of the same scenes is reused as is; a cache of other
    scenes is replaced.

    Args:
        root: Cache folder (created if missing).
        num_scenes: Number of scenes N.
        base_seed: Seed of scene 0.
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        workers: Rendering processes (0 or 1: render in this process).
        chunk: Scenes per unit of work (and per progress record).
        progress: Show a tqdm progress bar.
        single_object: One-object scenes (see :func:`training_scene`).

    Returns:
        ``root`` as a Path, ready for ``ShapesWorldCaptions(..., cache=root)``.
    """
    cfg = cfg or ShapesWorldConfig()
    if num_scenes < 1 or chunk < 1:
        raise ValueError(f"num_scenes and chunk must be >= 1, got {num_scenes}, {chunk}.")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = _cache_meta(num_scenes, base_seed, cfg, single_object)
    found = _read_cache_meta(root)
    same = found is not None and _meta_key(found) == _meta_key(meta)
    if same and found.get("complete"):
        return root
    done = int(found.get("rendered", 0)) if same else 0
    size = cfg.image_size
    paths = [root / name for name in _CACHE_ARRAYS]
    shapes = [((num_scenes, size, size, 3), np.uint8), ((num_scenes,), f"S{_CAPTION_BYTES}")]
    if done and all(p.is_file() for p in paths):
        images, captions = (np.load(p, mmap_mode="r+") for p in paths)
    else:
        done = 0
        images, captions = (
            np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=shape)
            for p, (shape, dtype) in zip(paths, shapes, strict=True)
        )
    atomic_write_json(root / _CACHE_META, {**meta, "complete": False, "rendered": done})
    jobs = [(base_seed + s, min(chunk, num_scenes - s), cfg, single_object) for s in range(done, num_scenes, chunk)]
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_render_range, jobs) if pool is not None else map(_render_range, jobs)
        with tqdm(total=num_scenes, initial=done, desc="ShapesWorld scene cache", unit="scene",
                  disable=not progress) as bar:  # fmt: skip
            for batch, texts in results:
                if max(map(len, texts)) > _CAPTION_BYTES:
                    raise ValueError(f"a caption is longer than {_CAPTION_BYTES} bytes; raise _CAPTION_BYTES.")
                images[done : done + len(texts)] = batch
                captions[done : done + len(texts)] = texts
                done += len(texts)
                images.flush()
                captions.flush()
                atomic_write_json(root / _CACHE_META, {**meta, "complete": done == num_scenes, "rendered": done})
                bar.update(len(texts))
    finally:
        if pool is not None:
            pool.terminate()
    del images, captions
    return root


# ----------------------------------------------------------------------------------------------------------
# Torch dataset
# ----------------------------------------------------------------------------------------------------------


class ShapesWorldCaptions(Dataset):
    """Image-caption pairs for contrastive training: rendered on the fly, or read from a scene cache.

    Item ``i`` is scene ``training_scene(base_seed + i, cfg, single_object)``. With ``cache`` (a folder
    written by :func:`render_scene_cache` for the same scenes) the pixels and caption are read from its
    memory-mapped arrays instead of being rendered again: the same values, at a fraction of the CPU time.

    Args:
        num_scenes: Dataset length.
        base_seed: Seed of item 0 (default keeps clear of the exported segmentation splits).
        cfg: World configuration (default :class:`ShapesWorldConfig`).
        cache: A complete scene cache of exactly these scenes, or None to render on the fly.
        single_object: One-object scenes with their plain captions instead of full scenes.

    Raises:
        ValueError: The cache is incomplete or holds other scenes.
    """

    def __init__(
        self,
        num_scenes: int = 120_000,
        base_seed: int = CLIP_SEED_OFFSET,
        cfg: ShapesWorldConfig | None = None,
        cache: str | Path | None = None,
        single_object: bool = False,
    ) -> None:
        if num_scenes < 1:
            raise ValueError(f"ShapesWorldCaptions: num_scenes must be >= 1, got {num_scenes}.")
        self.num_scenes = num_scenes
        self.base_seed = base_seed
        self.cfg = cfg or ShapesWorldConfig()
        self.single_object = single_object
        self.cache = None if cache is None else Path(cache)
        if self.cache is not None:
            found = _read_cache_meta(self.cache)
            expected = _cache_meta(num_scenes, base_seed, self.cfg, single_object)
            if found is None or not found.get("complete") or _meta_key(found) != _meta_key(expected):
                raise ValueError(
                    f"{self.cache} is not a complete scene cache of these scenes ({num_scenes} scenes from seed "
                    f"{base_seed}, {self.cfg.image_size} px); build it with render_scene_cache(...)."
                )
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None  # opened lazily, once per process

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        """Returns (3 x S x S normalised float32 image, caption)."""
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"ShapesWorldCaptions index {index} out of range [0, {self.num_scenes}).")
        if self.cache is None:
            scene = training_scene(self.base_seed + index, self.cfg, self.single_object)
            return normalize_image(scene.image), scene.caption
        if self._arrays is None:
            self._arrays = tuple(np.load(self.cache / name, mmap_mode="r") for name in _CACHE_ARRAYS)
        images, captions = self._arrays
        return normalize_image(np.array(images[index])), captions[index].decode("ascii")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # DataLoader workers map the files themselves
