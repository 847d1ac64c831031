"""``clipdense app``: a Gradio web demo of open-vocabulary segmentation (and of trained runs) in the browser.

The page takes an image (upload or paste) and class names written as ``segment --classes`` takes them (``;``
between classes, commas between synonyms), and shows the segmentation as an annotated image (each class can be
highlighted), a table of class areas, and the files ``segment`` writes (overlay, label PNG, JSON) for download;
PPL runs add their uncertainty map, detector runs show boxes (and masks). A gallery of ShapesWorld scenes runs with
one click.

The work is done by :class:`DemoEngine`, plain Python that tests call directly: the model is loaded once, the
text embeddings are cached between requests, one forward pass runs at a time, large images are downscaled with a
notice and bad input becomes a message. Gradio (``pip install "clipdense[app]"``) is imported only by
:func:`build_ui` and :func:`cmd_app`: the library never imports it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipdense.cli.common import (
    OFFLINE_MODEL,
    CLIError,
    add_model_args,
    fraction,
    non_negative_int,
    positive_int,
    trained_eval_overrides,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

#: The inputs of a request (besides the image and the classes) and their defaults.
DEFAULT_MAX_PIXELS = 4_000_000
DEFAULT_MAX_CLASSES = 200
EXAMPLE_SEEDS = (7, 11, 23, 42)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``app``."""
    p = sub.add_parser("app", help="a web demo in the browser (Gradio; pip install 'clipdense[app]')")
    p.add_argument("--checkpoint", default=None, help="a trained model: a `clipdense train` run directory, an "
                   "exported folder or hf-hub:ORG/NAME (default: training-free, --model)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every network interface)")
    p.add_argument("--port", type=positive_int, default=7860, help="port (the next free one if taken)")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (off)")
    p.add_argument("--max-pixels", type=non_negative_int, default=DEFAULT_MAX_PIXELS,
                   help="downscale larger images to this many pixels, with a notice (0: full size)")  # fmt: skip
    p.add_argument("--max-classes", type=positive_int, default=DEFAULT_MAX_CLASSES, help="longest class list")
    p.add_argument("--examples", type=non_negative_int, default=len(EXAMPLE_SEEDS),
                   help="ShapesWorld scenes in the example gallery")  # fmt: skip
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="--checkpoint runs: autocast precision (default: the run's)")  # fmt: skip
    p.add_argument("--score-threshold", type=fraction, default=0.3, help="detector runs: the initial score threshold")
    add_model_args(p, default_model=OFFLINE_MODEL)
    p.set_defaults(func=cmd_app)


@dataclass
class DemoResult:
    """What one request gives the page.

    Attributes:
        image: H x W x 3 uint8 RGB image as segmented (downscaled if it was too large); None on error.
        annotations: (H x W bool mask, label) per class present or object found, for the annotated image.
        colours: Label -> ``#rrggbb``, the overlay's colours.
        table: Rows of the areas table (class, pixels, % of the image) or of the detections (class, score, box).
        columns: The table's column names.
        files: Files to download: ``<name>_overlay.png``, ``<name>_labels.png``, ``<name>.json`` (as ``segment``
            writes them; detectors ``<name>_detections.png`` and ``<name>.json``).
        picture: The overlay with its legend; detectors: the boxes/masks picture.
        uncertainty: PPL runs: the per-pixel uncertainty map; else None.
        message: Markdown for the status line: what was done, notices (downscaling), or what was wrong.
        ok: False when the request could not be served (``message`` says why).
    """

    image: np.ndarray | None = None
    annotations: list[tuple[np.ndarray, str]] = field(default_factory=list)
    colours: dict[str, str] = field(default_factory=dict)
    table: list[list[Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=lambda: ["class", "pixels", "% of image"])
    files: list[str] = field(default_factory=list)
    picture: Any = None
    uncertainty: Any = None
    message: str = ""
    ok: bool = True


class DemoEngine:
    """The app's model and its request handler (no Gradio here).

    Args:
        predictor: An :class:`~clipdense.inference.OpenVocabPredictor` (training-free), a
            :class:`~clipdense.inference.TrainedPredictor` or a :class:`~clipdense.inference.DetectionPredictor`.
        out_dir: Where the download files of each request are written (a folder per request).
        max_pixels: Downscale larger images to this many pixels (0 or None: never).
        max_classes: Longest class list a request may name.
        description: The model, in one line, for the page.
    """

    def __init__(
        self,
        predictor,
        out_dir: str | Path,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_classes: int = DEFAULT_MAX_CLASSES,
        description: str = "",
    ) -> None:
        from clipdense.inference import DetectionPredictor, OpenVocabPredictor

        self.predictor = predictor
        self.kind = (
            "open"
            if isinstance(predictor, OpenVocabPredictor)
            else "detection"
            if isinstance(predictor, DetectionPredictor)
            else "trained"
        )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_pixels, self.max_classes = max_pixels or None, max_classes
        self.description = description
        self.lock = threading.Lock()  # one forward pass at a time on the one model, whatever the server does
        self._open: OrderedDict[Any, Any] = OrderedDict()  # training-free predictors by settings (a few kept)
        self._text: dict[str, Any] = {}  # TextEmbedder by templates: their embedding caches outlive a request
        if self.kind == "open":
            self._text[predictor.config.templates] = predictor.text
            self._open[repr(predictor.config)] = predictor
        self._uncertainty: bool | None = None  # trained runs: whether the model has PPL's uncertainty outputs

    @property
    def default_classes(self) -> list[str]:
        """The classes of a trained run (empty for training-free models, which take any)."""
        return [] if self.kind == "open" else list(self.predictor.class_names)

    def _open_predictor(self, mode: str | None, templates: str | None, background_threshold: float | None,
                        key_smoothing: float | None, prompt_denoise: float | None):  # fmt: skip
        """The training-free predictor for these settings: the start-up one's config with them replaced."""
        from clipdense.clip.text import TextEmbedder
        from clipdense.inference import OpenVocabPredictor

        base = self.predictor
        chosen = {"mode": mode, "templates": templates}
        config = replace(base.config, **{k: v for k, v in chosen.items() if v})
        thresholds = {"background_threshold": background_threshold, "key_smoothing": key_smoothing,
                      "prompt_denoise": prompt_denoise}  # fmt: skip
        # None keeps the start-up value; 0 (a slider at its left end) turns the step off
        config = replace(config, **{k: v or None for k, v in thresholds.items() if v is not None})
        key = repr(config)  # the dataclass is not hashable; its repr names every field
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        if config.templates not in self._text:
            disk = base.text.disk is not None
            self._text[config.templates] = TextEmbedder(base.clip, config.templates, disk_cache=disk)
        predictor = OpenVocabPredictor(base.clip, config, self._text[config.templates])
        self._open[key] = predictor
        while len(self._open) > 8:
            self._open.popitem(last=False)
        return predictor

    def _read(self, image: str | Path | np.ndarray | Any) -> tuple[torch.Tensor, str | None, str]:
        """The image as 3 x H x W uint8, the downscaling notice (or None) and a file stem for the downloads."""
        import numpy as np

        from clipdense.data.datasets import read_image_size
        from clipdense.inference import read_image

        if image is None:
            raise ValueError("no image: upload or paste one, or click an example below")
        if isinstance(image, (str, Path)):
            path = Path(image)
            try:
                width, height = read_image_size(path, apply_exif_orientation=True)
            except Exception:
                raise ValueError(f"{path.name} is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:60] or "image"
        else:
            array = np.asarray(image)
            height, width = array.shape[:2]
            image, stem = array, "image"
        tensor = read_image(image, self.max_pixels)
        notice = None
        if tuple(tensor.shape[1:]) != (height, width):
            notice = (
                f"The image ({width} x {height}, {width * height / 1e6:.3g} MP) is above this demo's limit of "
                f"{self.max_pixels / 1e6:.3g} MP: it was downscaled to {tensor.shape[2]} x {tensor.shape[1]}, and "
                "the outputs are at that size."
            )
        return tensor, notice, stem

    def _classes(self, text: str | None) -> list[str] | None:
        """The class entries of the text box (``segment --classes`` syntax); None: the trained run's own."""
        from clipdense.data.classnames import parse_class_list

        if text is None or not text.strip():
            if self.kind != "open":
                return None
            raise ValueError("no classes: type the class names, e.g. 'red circle; blue square; background'")
        classes = parse_class_list(text)
        if len(classes) > self.max_classes:
            raise ValueError(
                f"{len(classes)} classes is more than this demo takes ({self.max_classes}, `clipdense app "
                "--max-classes`): name fewer, or use `clipdense segment --classes-file`"
            )
        return classes

    def run(
        self,
        image: str | Path | np.ndarray | None,
        classes: str | None,
        mode: str | None = None,
        templates: str | None = None,
        background_threshold: float | None = None,
        key_smoothing: float | None = None,
        prompt_denoise: float | None = None,
        score_threshold: float = 0.3,
    ) -> DemoResult:
        """Serve one request: segment (or detect in) the image; bad input gives ``ok=False`` and a message.

        Args:
            image: A file path, or an H x W x 3 uint8 array.
            classes: Class names, ``segment --classes`` syntax; empty for a trained run's own classes.
            mode: Training-free dense mode (maskclip, sclip, clearclip, naclip); None keeps the start-up one.
            templates: Prompt templates (ensemble, imagenet, scene, single); None keeps the start-up ones.
            background_threshold: Top probability below this -> background; 0 or None: off.
            key_smoothing: MaskCLIP key smoothing threshold; 0 or None: off.
            prompt_denoise: MaskCLIP prompt denoising threshold; 0 or None: off.
            score_threshold: Detectors: keep objects scoring at least this.
        """
        try:
            tensor, notice, stem = self._read(image)
            names = self._classes(classes)
            folder = self.out_dir / uuid.uuid4().hex[:12]
            with self.lock:
                if self.kind == "detection":
                    result = self._detect(tensor, stem, folder, score_threshold)
                else:
                    settings = (mode, templates, background_threshold, key_smoothing, prompt_denoise)
                    result = self._segment(tensor, names, stem, folder, settings)
        except (ValueError, OSError, CLIError) as e:  # bad input, or weights/embeddings that cannot be had
            return DemoResult(message=f"**Cannot segment this:** {e}", ok=False)
        if notice:
            result.message = f"{notice}\n\n{result.message}"
        return result

    def _segment(self, tensor, names, stem: str, folder: Path, settings: tuple) -> DemoResult:
        import numpy as np

        from clipdense.cli.segment import _write_segmentation
        from clipdense.visualize import heatmap, overlay

        if self.kind == "open":
            predictor = self._open_predictor(*settings)
            display = predictor.set_classes(names)
            predictor.set_image(tensor)
            seg = predictor.predict()
        else:
            predictor = self.predictor
            display = predictor.set_classes(names) if names is not None else predictor.class_names
            predictor.set_image(tensor)
            seg = None
            if self._uncertainty is None:
                try:
                    seg = predictor.predict(uncertainty=True)
                    self._uncertainty = True
                except ValueError:  # not a PPL model: remembered, so no extra pass is tried again
                    self._uncertainty = False
            if seg is None:
                seg = predictor.predict(uncertainty=self._uncertainty)
        display = list(display)
        folder.mkdir(parents=True)
        _write_segmentation(folder, Path(f"{stem}.png"), tensor, seg, display, predictor.describe(), summary=False)
        files = [folder / f"{stem}_overlay.png", folder / f"{stem}_labels.png", folder / f"{stem}.json"]
        labels = seg.labels.numpy()
        areas = seg.areas()
        colours = _colours(display)
        order = sorted(range(len(display)), key=lambda c: -areas[display[c]]["pixels"])
        annotations = [(labels == c, display[c]) for c in order if areas[display[c]]["pixels"]]
        table = [[display[c], areas[display[c]]["pixels"], round(100 * areas[display[c]]["fraction"], 2)]
                 for c in order]  # fmt: skip
        uncertainty = None
        if seg.uncertainty is not None:
            uncertainty = heatmap(seg.uncertainty, vmax=float(np.log(len(display))))
            files.append(folder / f"{stem}_uncertainty.png")
        present = [f"{row[0]} {row[2]:.1f}%" for row in table if row[1]]
        return DemoResult(
            image=tensor.permute(1, 2, 0).numpy(),
            annotations=annotations,
            colours=colours,
            table=table,
            files=[str(f) for f in files],
            picture=overlay(tensor, seg.labels, display),
            uncertainty=uncertainty,
            message=f"{tensor.shape[2]} x {tensor.shape[1]} px, {len(display)} classes: " + ", ".join(present),
        )

    def _detect(self, tensor, stem: str, folder: Path, score_threshold: float) -> DemoResult:
        from clipdense.cli.common import write_json, write_png
        from clipdense.visualize import draw_detections

        predictor = self.predictor
        predictor.set_image(tensor)
        found = predictor.predict(score_threshold=score_threshold)
        picture = draw_detections(tensor, found)
        folder.mkdir(parents=True)
        report = {"image": f"{stem}.png", "size": list(tensor.shape[1:]), "score_threshold": score_threshold,
                  "detections": found.to_list()}  # fmt: skip
        write_png(folder / f"{stem}_detections.png", picture)
        write_json(folder / f"{stem}.json", report)
        names = found.class_names
        colours = _colours(names)
        annotations, table = [], []
        for i, d in enumerate(report["detections"]):
            label = d["class"]
            if found.masks is not None:
                annotations.append((found.masks[i].numpy(), label))
            else:
                annotations.append((tuple(int(round(v)) for v in d["box"]), label))
            table.append([label, d["score"], ", ".join(f"{v:.0f}" for v in d["box"])])
        return DemoResult(
            image=tensor.permute(1, 2, 0).numpy(),
            annotations=annotations,
            colours=colours,
            table=table,
            columns=["class", "score", "box x0, y0, x1, y1"],
            files=[str(folder / f"{stem}_detections.png"), str(folder / f"{stem}.json")],
            picture=picture,
            message=f"{len(table)} objects with score >= {score_threshold}",
        )


def _colours(names: list[str]) -> dict[str, str]:
    """Class name -> ``#rrggbb``: the overlay's palette, so the page and the downloaded overlay agree."""
    from clipdense.visualize import palette

    return {n: "#{:02x}{:02x}{:02x}".format(*c) for n, c in zip(names, palette(len(names)), strict=True)}


def example_scenes(folder: str | Path, seeds=EXAMPLE_SEEDS, image_size: int = 128) -> list[tuple[str, str]]:
    """ShapesWorld scenes written as PNGs, each with the class list that names what is in it.

    Args:
        folder: Where to write ``shapesworld_<seed>.png``.
        seeds: Scene seeds.
        image_size: Scene side in pixels.

    Returns:
        (image path, class list in ``--classes`` syntax: the scene's classes and a background entry).
    """
    from PIL import Image

    from clipdense.data.shapesworld import ShapesWorldConfig, class_names, generate_scene
    from clipdense.evaluation.shapesworld import BACKGROUND_ENTRY

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ShapesWorldConfig(image_size=image_size)
    names = class_names(cfg)
    out = []
    for seed in seeds:
        scene = generate_scene(seed, cfg)
        path = folder / f"shapesworld_{seed}.png"
        Image.fromarray(scene.image).save(path)
        present = list(dict.fromkeys(names[int(k)] for k in scene.labels))
        out.append((str(path), "; ".join([*present, BACKGROUND_ENTRY])))
    return out


def load_engine(args: argparse.Namespace, out_dir: str | Path) -> DemoEngine:
    """The engine the command line describes: a trained ``--checkpoint``, or the training-free ``--model``."""
    from clipdense.cli.common import build_predictor

    if args.checkpoint is not None:
        from clipdense.inference import DetectionPredictor, TrainedPredictor
        from clipdense.runs import build_from_run

        overrides = trained_eval_overrides(args)
        model, cfg = build_from_run(args.checkpoint, args.device)
        if getattr(model, "task", None) == "detection":
            predictor = DetectionPredictor(model, cfg.model.class_names)
        else:
            clip_source = (cfg.model.overrides.get("clip_model", "RN50"), cfg.model.pretrained)
            predictor = TrainedPredictor(model, cfg.model.class_names, replace(cfg.eval, **overrides), clip_source)
        description = f"`{cfg.model.name}` from `{args.checkpoint}` ({len(cfg.model.class_names)} classes)"
    else:
        if args.precision is not None:
            raise CLIError("--precision applies to trained runs (--checkpoint)")
        predictor = build_predictor(args)
        clip = predictor.clip
        description = f"`{clip.name}` ({clip.pretrained or 'random weights'}), training-free"
        if clip.description:
            description += f": {clip.description}"
    return DemoEngine(predictor, out_dir, args.max_pixels, args.max_classes, description)


def build_ui(engine: DemoEngine, examples: list[tuple[str, str]] = (), score_threshold: float = 0.3):
    """The Gradio page around ``engine`` (Blocks; one request at a time: ``queue(default_concurrency_limit=1)``)."""
    import gradio as gr

    from clipdense.config import MODES, SegmenterConfig

    open_vocab = engine.kind == "open"
    start = engine.predictor.config if open_vocab else SegmenterConfig()

    def handle(image, classes, mode, templates, background, smoothing, denoise, score):
        result = engine.run(image, classes, mode, templates, background, smoothing, denoise, score)
        if not result.ok:
            gr.Warning(result.message.replace("**", ""))
            return None, None, None, None, None, result.message
        annotated = gr.AnnotatedImage(value=(result.image, result.annotations), color_map=result.colours)
        table = gr.Dataframe(value=result.table, headers=result.columns)
        return annotated, table, result.picture, result.uncertainty, result.files, result.message

    with gr.Blocks(title="clipdense") as demo:
        gr.Markdown(
            "# clipdense: segment an image into classes named in words\n"
            f"Model: {engine.description}. Classes as `clipdense segment --classes` takes them: `;` between "
            "classes, commas between synonyms (`person, people; grass; sky`)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"], elem_id="image")
                classes = gr.Textbox(
                    label="classes" + ("" if open_vocab else " (empty: the model's own)"),
                    placeholder="red circle; blue square; background" if open_vocab else ", ".join(
                        engine.default_classes[:6]),
                    elem_id="classes",
                )  # fmt: skip
                with gr.Accordion("settings", open=False):
                    mode = gr.Dropdown(list(MODES), value=start.mode, label="mode", visible=open_vocab)
                    templates = gr.Dropdown(["ensemble", "imagenet", "scene", "single"], value=start.templates,
                                            label="prompt templates", visible=open_vocab)  # fmt: skip
                    background = gr.Slider(0, 1, value=start.background_threshold or 0, step=0.05,
                                           label="background threshold (0: off)", visible=open_vocab)  # fmt: skip
                    smoothing = gr.Slider(0, 1, value=start.key_smoothing or 0, step=0.05,
                                          label="key smoothing (0: off)", visible=open_vocab)  # fmt: skip
                    denoise = gr.Slider(0, 1, value=start.prompt_denoise or 0, step=0.05,
                                        label="prompt denoising (0: off)", visible=open_vocab)  # fmt: skip
                    score = gr.Slider(0, 1, value=score_threshold, step=0.05, label="score threshold",
                                      visible=engine.kind == "detection")  # fmt: skip
                submit = gr.Button("Segment" if engine.kind != "detection" else "Detect", variant="primary",
                                   elem_id="submit")  # fmt: skip
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                annotated = gr.AnnotatedImage(label="segmentation (click a class to highlight it)", elem_id="annotated")
                table = gr.Dataframe(headers=["class", "pixels", "% of image"], label="class areas", elem_id="areas",
                                     interactive=False)  # fmt: skip
                with gr.Row():
                    picture = gr.Image(label="overlay with legend" if engine.kind != "detection" else "detections",
                                       type="pil", elem_id="picture", interactive=False)  # fmt: skip
                    uncertainty = gr.Image(label="uncertainty (PPL)", type="pil", interactive=False,
                                           visible=engine.kind == "trained")  # fmt: skip
                files = gr.File(label="downloads: overlay, label PNG, JSON", file_count="multiple", elem_id="files")
        inputs = [image, classes, mode, templates, background, smoothing, denoise, score]
        outputs = [annotated, table, picture, uncertainty, files, status]
        submit.click(handle, inputs, outputs)
        if examples:
            gr.Examples(
                [[path, text if open_vocab else ""] for path, text in examples],
                inputs=[image, classes],
                outputs=outputs,
                # an example runs with the start-up settings
                fn=lambda img, text: handle(img, text, None, None, None, None, None, score_threshold),
                run_on_click=True,
                cache_examples=False,
                label="ShapesWorld examples (click one to run it)",
                examples_per_page=8,
            )
    return demo.queue(default_concurrency_limit=1)


def cmd_app(args: argparse.Namespace) -> None:
    """Loads the model, renders the examples, serves the page until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError('clipdense app needs Gradio: pip install "clipdense[app]"') from None
    if args.share:
        print("--share: the page is also reachable by anyone who has its gradio.live link")
    out_dir = Path(tempfile.mkdtemp(prefix="clipdense-app-"))
    try:
        engine = load_engine(args, out_dir / "results")
        size = 128
        if engine.kind == "open":
            size = engine.predictor.clip.image_size
        examples = example_scenes(out_dir / "examples", EXAMPLE_SEEDS[: args.examples], image_size=size)
        demo = build_ui(engine, examples, args.score_threshold)
        print(f"model: {engine.description.replace('`', '')}")
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(out_dir)])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
