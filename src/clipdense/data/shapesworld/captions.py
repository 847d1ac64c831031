"""Captions: natural-language descriptions of placed objects, their spatial relations and the background.

A caption either names one random object ("a photo of a small red circle on a striped background") or
pairs objects with their relation ("a red circle left of a blue square and a green star"), shortened to
``cfg.max_caption_words`` words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipdense.data.shapesworld.config import ShapesWorldConfig
from clipdense.data.shapesworld.objects import PlacedObject

__all__ = ["draw_caption", "noun_phrase"]


def noun_phrase(obj: PlacedObject, with_size: bool) -> str:
    """Noun phrase of an object with its article, e.g. ``"a red circle"`` or ``"an orange square"``.

    Args:
        obj: The object.
        with_size: Put the size word first (``"a small red circle"``).

    Returns:
        The phrase.
    """
    words = [obj.size, obj.colour, obj.shape] if with_size else [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


def _relation(a: int, b: int, objects: Sequence[PlacedObject]) -> str:
    """Spatial relation of object ``a`` relative to object ``b`` ("<a> left of <b>")."""
    if np.any(objects[a].full_mask & objects[b].full_mask):
        return "in front of" if a > b else "behind"
    dx = objects[a].centre[0] - objects[b].centre[0]
    dy = objects[a].centre[1] - objects[b].centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def draw_caption(
    rng: np.random.Generator, cfg: ShapesWorldConfig, objects: Sequence[PlacedObject], background: str
) -> tuple[str, tuple[int, ...], bool]:
    """Draws a caption for a scene.

    With probability ``cfg.single_object_caption_prob`` the caption names one random object, else it names
    the objects in random order, pairwise joined by their spatial relation. Too long captions are shortened
    step by step: prefix, size words, background, then trailing objects are dropped.

    Args:
        rng: Random generator of the scene.
        cfg: World configuration.
        objects: The placed objects, in drawing order.
        background: Background texture name.

    Returns:
        (caption, indices of the named objects in caption order, whether it is a single-object caption).
    """
    single = bool(rng.random() < cfg.single_object_caption_prob)
    background_phrase = f" on a {background} background"
    if single:
        index = int(rng.integers(len(objects)))
        with_size = bool(rng.random() < 0.75)
        template = int(rng.integers(4))
        phrase = noun_phrase(objects[index], with_size)
        caption = [
            f"a photo of {phrase}",
            phrase,
            phrase + background_phrase,
            f"a photo of {phrase}{background_phrase}",
        ]
        return caption[template], (index,), True

    order = [int(i) for i in rng.permutation(len(objects))]
    with_size = rng.random(len(objects)) < cfg.size_word_prob
    prefix = str(rng.choice(["", "a photo of ", "an image of "]))
    with_background = bool(rng.random() < 0.6)

    def compose(named: list[int], use_prefix: bool, use_sizes: bool, use_background: bool) -> str:
        clauses = []
        for k in range(0, len(named), 2):
            a = named[k]
            clause = noun_phrase(objects[a], use_sizes and bool(with_size[a]))
            if k + 1 < len(named):
                b = named[k + 1]
                other = noun_phrase(objects[b], use_sizes and bool(with_size[b]))
                clause += f" {_relation(a, b, objects)} {other}"
            clauses.append(clause)
        text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
        return (prefix if use_prefix else "") + text + (background_phrase if use_background else "")

    # Shorten step by step until the caption fits: drop prefix, size words, background, trailing objects.
    variants = [(True, True, True), (False, True, True), (False, False, True), (False, False, False)]
    for count in range(len(order), 0, -1):
        for use_prefix, use_sizes, use_background in variants:
            text = compose(order[:count], use_prefix, use_sizes, use_background and with_background)
            if len(text.split()) <= cfg.max_caption_words:
                return text, tuple(order[:count]), False
    return text, tuple(order[:1]), False
