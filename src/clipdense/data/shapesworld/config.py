"""What a ShapesWorld scene can contain: the vocabulary, the generator's parameters and the class names.

Every object class is a (colour, shape) pair such as ``"red circle"``; backgrounds and size words only
appear in captions.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "SIZE_NAMES", "ShapesWorldConfig", "class_names"]

#: Named object colours (RGB). Saturated or extreme, so they stand out from the muted backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (245, 125, 190),
    "cyan": (40, 200, 215),
    "brown": (125, 75, 35),
}
#: Shapes that can be drawn (all stay distinguishable down to ~12 px).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
#: Background textures; each name reads naturally in "on a <name> background".
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")
#: Size words for the tertiles of the configured object size range.
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")


@dataclass
class ShapesWorldConfig:
    """Parameters of the ShapesWorld scene generator.

    Attributes:
        image_size: Side length S of the square images, in pixels.
        min_objects: Minimum number of objects per scene.
        max_objects: Maximum number of objects per scene.
        min_size: Smallest object extent (diameter of its circumscribing circle) as a fraction of S.
        max_size: Largest object extent as a fraction of S. The range is split into three tertiles
            named "small", "medium" and "large" in captions.
        shapes: Shape names, a subset of :data:`SHAPES`.
        colours: Colour names, a subset of :data:`COLOURS`.
        backgrounds: Background texture names, a subset of :data:`BACKGROUNDS`.
        min_visible_fraction: Every object keeps at least this fraction of its area visible after
            later objects are drawn over it.
        single_object_caption_prob: Probability that a caption names just one (random) object.
        size_word_prob: Probability that a multi-object caption gives an object's size word.
        max_caption_words: Captions are shortened (prefix, size words, background, then trailing objects
            dropped) to at most this many words so that they fit CLIP's 24-token context.
        max_rotation_deg: Polygonal shapes are rotated uniformly within +-this angle.
        colour_jitter: Per-channel uniform jitter (+-) applied to object colours.
        supersample: Supersampling factor used to anti-alias object edges.
        max_placement_tries: Placement attempts per object before it is dropped.
    """

    image_size: int = 160
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.08
    max_size: float = 0.18
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    backgrounds: tuple[str, ...] = BACKGROUNDS
    min_visible_fraction: float = 0.5
    single_object_caption_prob: float = 0.5
    size_word_prob: float = 0.6
    max_caption_words: int = 18
    max_rotation_deg: float = 12.0
    colour_jitter: int = 12
    supersample: int = 4
    max_placement_tries: int = 100

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.colours = tuple(self.colours)
        self.backgrounds = tuple(self.backgrounds)
        for kind, values, known in (
            ("shape", self.shapes, SHAPES),
            ("colour", self.colours, tuple(COLOURS)),
            ("background", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(
                    f"ShapesWorldConfig: invalid {kind}s {list(values)} (unknown: {unknown}); "
                    f"use a non-empty list of distinct names from {list(known)}."
                )
        if len(self.shapes) * len(self.colours) > 254:
            raise ValueError("ShapesWorldConfig: more than 254 classes do not fit a uint8 label map; use fewer.")
        if self.image_size < 16:
            raise ValueError(f"ShapesWorldConfig: image_size={self.image_size} is too small; use >= 16.")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"ShapesWorldConfig: need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}."
            )
        if not 0.0 < self.min_size <= self.max_size <= 0.5:
            raise ValueError(
                f"ShapesWorldConfig: need 0 < min_size <= max_size <= 0.5 (fractions of the image side), "
                f"got {self.min_size}, {self.max_size}."
            )
        if not 0.0 < self.min_visible_fraction <= 1.0:
            raise ValueError(
                f"ShapesWorldConfig: min_visible_fraction={self.min_visible_fraction} must be in (0, 1]: "
                "every object needs a visible part to be labelled."
            )
        for name in ("single_object_caption_prob", "size_word_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ShapesWorldConfig: {name}={getattr(self, name)} must be in [0, 1].")
        if self.max_caption_words < 4:
            raise ValueError("ShapesWorldConfig: max_caption_words must be >= 4 to name one object.")
        if self.supersample < 1 or self.max_placement_tries < 1:
            raise ValueError("ShapesWorldConfig: supersample and max_placement_tries must be >= 1.")

    @property
    def num_classes(self) -> int:
        """Number of object classes C (background excluded)."""
        return len(self.colours) * len(self.shapes)


def class_names(cfg: ShapesWorldConfig | None = None) -> list[str]:
    """Object class names, ``"<colour> <shape>"``, colour-major in config order.

    Args:
        cfg: World configuration (default :class:`ShapesWorldConfig`).

    Returns:
        C names; class i has label i + 1 in semantic maps (0 = background).
    """
    cfg = cfg or ShapesWorldConfig()
    return [f"{colour} {shape}" for colour in cfg.colours for shape in cfg.shapes]
