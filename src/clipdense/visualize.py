"""Pictures of predictions: segmentation overlays with a legend of class names and areas, detections, transport
plans."""

from __future__ import annotations

import colorsys

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision.utils import draw_segmentation_masks

MIN_SIDE = 320  # pictures of smaller images are enlarged (nearest) to at least this long side


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct RGB colours (golden-ratio hue steps), the same for the same class index."""
    colours = []
    for i in range(num_classes):
        h = (i * 0.618033988749895) % 1.0
        s, v = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.75)
        colours.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)))
    return colours


def _view_factor(height: int, width: int) -> int:
    """Integer enlargement that brings the long side to at least :data:`MIN_SIDE` (1 for large images)."""
    return max(1, -(-MIN_SIDE // max(height, width)))


def _enlarge(maps: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour enlargement of the last two (H, W) dimensions by ``factor``."""
    return maps.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else maps


def overlay(
    image: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    alpha: float = 0.55,
    legend: bool = True,
) -> Image.Image:
    """Draw the label map over the image, with a legend of the classes present and their area.

    Args:
        image: 3 x H x W uint8 RGB image.
        labels: H x W int64 labels into ``class_names``.
        class_names: C names.
        alpha: Opacity of the colour masks.
        legend: Add a legend panel to the right of the image.

    Returns:
        The picture as a PIL image (H x (W + legend width)); images under 320 pixels are enlarged by an
        integer factor first. A class named "background" is left unpainted.
    """
    num = len(class_names)
    colours = palette(num)
    counts = torch.bincount(labels.flatten(), minlength=num)
    present = [c for c in range(num) if counts[c]]
    # "background" stays unpainted (grey in the legend), so the objects stand out
    background = {c for c in present if class_names[c].split(",")[0].strip().lower() == "background"}
    for c in background:
        colours[c] = (128, 128, 128)
    painted = torch.zeros(num, dtype=torch.bool)
    painted[[c for c in present if c not in background]] = True
    factor = _view_factor(*labels.shape)  # small images are enlarged for viewing
    h, w = labels.shape[0] * factor, labels.shape[1] * factor
    font_size = max(11, min(18, h // 24))
    font = ImageFont.load_default(size=font_size)
    rows = sorted(present, key=lambda c: -int(counts[c]))
    entries = [(c, f"{class_names[c]}  {100.0 * counts[c].item() / labels.numel():.1f}%") for c in rows]
    line = font_size + 6
    panel_w = int(max((font.getlength(t) for _, t in entries), default=0)) + font_size + 24 if legend else 0
    canvas = Image.new("RGB", (w + panel_w, max(h, line * len(entries) + 12) if legend else h), (255, 255, 255))
    # blended a band of rows at a time into the canvas: a 27-megapixel photo needs the canvas and a few MB
    # (torchvision's draw_segmentation_masks takes a mask per class and float copies of the whole image)
    table = torch.tensor(colours, dtype=torch.float32)
    band = max(1, (1 << 20) // labels.shape[1])
    for start in range(0, labels.shape[0], band):
        part = labels[start : start + band]
        pixels = image[:, start : start + band].permute(1, 2, 0).float()
        blended = torch.where(painted[part][..., None], pixels * (1 - alpha) + table[part] * alpha, pixels)
        picture = Image.fromarray(blended.round_().to(torch.uint8).numpy())
        if factor > 1:
            picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
        canvas.paste(picture, (0, start * factor))
    if legend:
        draw = ImageDraw.Draw(canvas)
        for i, (c, text) in enumerate(entries):
            y = 6 + i * line
            draw.rectangle([w + 8, y, w + 8 + font_size, y + font_size], fill=colours[c], outline=(0, 0, 0))
            draw.text((w + 14 + font_size, y - 1), text, fill=(0, 0, 0), font=font)
    return canvas


def side_by_side(
    image: torch.Tensor,
    prediction: torch.Tensor,
    truth: torch.Tensor,
    class_names: list[str],
    iou: dict[str, float],
    title: str = "",
    alpha: float = 0.55,
) -> Image.Image:
    """Scene | prediction | truth in one picture, with one legend of the classes and their IoU.

    Args:
        image: 3 x H x W uint8 RGB image.
        prediction: H x W int64 predicted labels into ``class_names``.
        truth: H x W int64 true labels into ``class_names``.
        class_names: C names (a class named "background" is left unpainted).
        iou: IoU (percent) of each class to list, by name, in legend order (classes missing here are not listed).
        title: A line above the panels (e.g. the model and the scene's seed).
        alpha: Opacity of the colour masks.

    Returns:
        The picture: three panels enlarged as :func:`overlay` enlarges, titled, and the legend to the right.
    """
    colours = palette(len(class_names))
    panels = [overlay(image, torch.zeros_like(truth), ["background"], alpha, legend=False)]
    panels += [overlay(image, labels, class_names, alpha, legend=False) for labels in (prediction, truth)]
    pw, ph = panels[0].size
    font_size = max(11, min(18, ph // 20))
    font = ImageFont.load_default(size=font_size)
    line, gap, top = font_size + 6, 8, (font_size + 10) * (2 if title else 1)
    index = {name: c for c, name in enumerate(class_names)}
    entries = [(index[name], f"{name.split(',')[0]}  IoU {value:.1f}%") for name, value in iou.items() if name in index]
    legend_w = int(max((font.getlength(t) for _, t in entries), default=0)) + font_size + 24
    width = 3 * pw + 2 * gap + legend_w + gap
    canvas = Image.new("RGB", (width, max(top + ph, top + line * len(entries) + 6) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 4), title, fill=(0, 0, 0), font=font)
    for i, (panel, name) in enumerate(zip(panels, ("scene", "prediction", "truth"), strict=True)):
        x = i * (pw + gap)
        draw.text((x + pw // 2 - font.getlength(name) / 2, top - font_size - 6), name, fill=(0, 0, 0), font=font)
        canvas.paste(panel, (x, top))
    x0 = 3 * pw + 3 * gap
    for i, (c, text) in enumerate(entries):
        y = top + i * line
        fill = (128, 128, 128) if class_names[c].split(",")[0].strip().lower() == "background" else colours[c]
        draw.rectangle([x0, y, x0 + font_size, y + font_size], fill=fill, outline=(0, 0, 0))
        draw.text((x0 + font_size + 6, y - 1), text, fill=(0, 0, 0), font=font)
    return canvas


def heatmap(values: torch.Tensor, vmax: float | None = None) -> Image.Image:
    """An H x W map (e.g. per-pixel uncertainty) as a colour picture (black - red - yellow).

    Args:
        values: H x W non-negative values.
        vmax: Value shown brightest (default: the map's maximum).
    """
    vmax = float(values.max()) if vmax is None else vmax
    scaled = (values.float() / max(vmax, 1e-12)).clamp(0, 1).mul(255).round().to(torch.uint8)
    gray = Image.fromarray(scaled.numpy(), mode="L")
    return ImageOps.colorize(gray, black="#000004", mid="#bc3754", white="#fcffa4")


def draw_detections(image: torch.Tensor, detections, alpha: float = 0.45) -> Image.Image:
    """Draw boxes with "class score" captions (and instance masks) over the image.

    Args:
        image: 3 x H x W uint8 RGB image.
        detections: :class:`clipdense.inference.Detections` for the image.
        alpha: Opacity of the instance masks.

    Returns:
        The picture as a PIL image; images under 320 pixels are enlarged by an integer factor first.
    """
    from torchvision.utils import draw_bounding_boxes

    colours = palette(len(detections.class_names))
    factor = _view_factor(*image.shape[1:])
    boxes = detections.boxes * factor
    image = _enlarge(image, factor)
    per_object = [colours[int(k)] for k in detections.labels]
    if detections.masks is not None and len(detections.masks):
        image = draw_segmentation_masks(image, _enlarge(detections.masks, factor), alpha=alpha, colors=per_object)
    if len(boxes):
        image = draw_bounding_boxes(image, boxes, colors=per_object, width=2)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    # captions with PIL's scalable default font (torchvision's need a TrueType file for a readable size)
    font_size = max(11, min(18, image.shape[1] // 24))
    font = ImageFont.load_default(size=font_size)
    draw = ImageDraw.Draw(picture)
    for box, k, score, colour in zip(boxes.tolist(), detections.labels, detections.scores, per_object, strict=True):
        text = f"{detections.class_names[int(k)]} {float(score):.2f}"
        x, y = box[0], max(0.0, box[1] - font_size - 4)
        draw.rectangle([x, y, x + font.getlength(text) + 6, y + font_size + 4], fill=colour)
        draw.text((x + 3, y + 1), text, fill=(255, 255, 255), font=font)
    return picture


def plan_heatmap(image: torch.Tensor, mass: torch.Tensor, caption: str, vmax: float | None = None) -> Image.Image:
    """One prompt's transport-plan mass over the image it was computed on, with a caption line below.

    Args:
        image: 3 x H x W uint8 RGB image (the view the model saw, e.g. CLIP's centre crop).
        mass: h x w mass per feature cell (e.g. a slice of :attr:`~clipdense.models.fewshot.TransportExplanation.
            plans`); shown bilinearly upsampled to H x W, so nothing is drawn outside the image.
        caption: Text under the picture (e.g. the prompt's index and its share of the score).
        vmax: Mass shown brightest (default: the map's maximum); pass one value to make several maps comparable.

    Returns:
        The picture: the image darkened under a black-red-yellow map of the mass, enlarged as :func:`overlay`
        enlarges small images, and the caption.
    """
    h, w = image.shape[1:]
    factor = _view_factor(h, w)
    up = torch.nn.functional.interpolate(mass[None, None].float(), size=(h * factor, w * factor), mode="bilinear",
                                         align_corners=False)[0, 0]  # fmt: skip
    colour = heatmap(up.clamp(min=0), vmax=vmax if vmax is not None else float(mass.max()))
    base = Image.fromarray(_enlarge(image, factor).permute(1, 2, 0).numpy())
    picture = Image.blend(base, colour, 0.6)
    font_size = max(11, min(16, picture.height // 20))
    font = ImageFont.load_default(size=font_size)
    canvas = Image.new("RGB", (picture.width, picture.height + font_size + 10), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    ImageDraw.Draw(canvas).text((4, picture.height + 4), caption, fill=(0, 0, 0), font=font)
    return canvas


def plan_grid(rows: list[list[Image.Image]], row_titles: list[str]) -> Image.Image:
    """Pictures in a grid (e.g. one row per class, one :func:`plan_heatmap` per prompt), each row titled above."""
    pw, ph = rows[0][0].size
    font_size = max(11, min(18, ph // 18))
    font = ImageFont.load_default(size=font_size)
    gap, title_h = 8, font_size + 10
    width = max(len(r) for r in rows) * (pw + gap) + gap
    canvas = Image.new("RGB", (width, len(rows) * (ph + title_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (row, title) in enumerate(zip(rows, row_titles, strict=True)):
        y = gap + i * (ph + title_h + gap)
        draw.text((gap, y), title, fill=(0, 0, 0), font=font)
        for j, panel in enumerate(row):
            canvas.paste(panel, (gap + j * (pw + gap), y + title_h))
    return canvas
