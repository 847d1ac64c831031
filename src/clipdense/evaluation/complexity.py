"""Parameters and GFLOPs of a config's model, counted as the papers' tables count them (``clipdense flops``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from clipdense.config import ExperimentConfig
from clipdense.runs import build_architecture, is_detection


@dataclass
class ComplexityCount:
    """The counts of one way of running a model.

    Attributes:
        variant: ``""``, or for PPL ``"Monte-Carlo, N=<samples>"`` / ``"mean-only"``.
        parameters: Parameters, the text encoder excluded (as the papers count).
        parameters_with_text_encoder: Parameters, the text encoder included.
        gflops: GFLOPs as multiply-adds, the text encoder excluded.
        gflops_with_text_encoder: GFLOPs as multiply-adds, the text encoder included.
    """

    variant: str
    parameters: int
    parameters_with_text_encoder: int
    gflops: float
    gflops_with_text_encoder: float


@dataclass
class ModelComplexity:
    """What :func:`model_complexity` returns.

    Attributes:
        model: The registered model name.
        num_classes: Classes the model was built with.
        size: Input height and width.
        detector: Whether the model is a detector (its counts cover the dense part only).
        counts: One entry per way of running the model (PPL: Monte-Carlo and mean-only).
    """

    model: str
    num_classes: int
    size: tuple[int, int]
    detector: bool
    counts: list[ComplexityCount] = field(default_factory=list)

    def format(self) -> str:
        """The table ``clipdense flops`` prints: a header line, then Params / GFLOPs without and with text."""
        what = "dense part: backbone, FPN, heads on 1000/100 RoIs" if self.detector else "GFLOPs as multiply-adds"
        lines = [f"{self.model} ({self.num_classes} classes), input {self.size[0]}x{self.size[1]}, {what}"]
        for c in self.counts:
            label = f"{c.variant}: " if c.variant else ""
            for text in (False, True):
                which = "included" if text else "excluded (as the paper counts)"
                params = (c.parameters_with_text_encoder if text else c.parameters) / 1e6
                gflops = c.gflops_with_text_encoder if text else c.gflops
                lines.append(f"  {label}text encoder {which:<31} Params {params:7.1f}M   GFLOPs {gflops:8.1f}")
        return "\n".join(lines)


def model_complexity(
    cfg: ExperimentConfig, size: int | tuple[int, int] | None = None, num_classes: int | None = None
) -> ModelComplexity:
    """Count the parameters and GFLOPs of the model a config builds, with random weights.

    Args:
        cfg: The experiment config (``model.name``, ``model.overrides``, ``model.class_names``).
        size: Input side, or (height, width). Default: 1024 x 1024; detectors 800 x 1344 (a COCO image resized
            to 800 x 1333 and padded to a multiple of 32; mmdet counts 1280 x 800).
        num_classes: Classes when the config names none (default: 150; detection configs: 80, COCO's).

    Returns:
        The counts; PPL models are counted twice, with Monte-Carlo inference and mean-only.
    """
    from clipdense.models import count_flops, count_parameters

    num_classes = num_classes or (80 if is_detection(cfg) else 150)
    letters = "abcdefghijklmnopqrstuvwxyz"  # placeholders of two letters: short enough for any prompt context
    names = cfg.model.class_names or [a + b for a in letters for b in letters][:num_classes]
    model = build_architecture(cfg, names).eval()  # weights do not change the counts
    detector = getattr(model, "task", None) == "detection"
    if size is None:
        size = (800, 1344) if detector else (1024, 1024)
    elif isinstance(size, int):
        size = (size, size)
    variants = [""]
    if getattr(model, "mc_inference", None) is not None:  # PPL: Monte-Carlo inference and its mean-only mode
        variants = [f"Monte-Carlo, N={model.n_samples}", "mean-only"]
    counts = []
    for variant in variants:
        if variant == "mean-only":
            model.mc_inference = False
        flops = count_flops(model, size)
        counts.append(
            ComplexityCount(
                variant,
                count_parameters(model, include_text_encoder=False),
                count_parameters(model, include_text_encoder=True),
                flops["gflops"],
                flops["gflops_with_text_encoder"],
            )
        )
    return ModelComplexity(cfg.model.name, len(names), tuple(size), detector, counts)
