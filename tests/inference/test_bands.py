"""Band-wise upsampling and reduction: equal to the untiled computation, in bounded memory."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from clipdense.clip import load_clip
from clipdense.config import EvalConfig
from clipdense.inference import (
    OpenVocabPredictor,
    SegmenterConfig,
    predict_dense,
    predict_probs,
    reduce_in_bands,
    upsample_rows,
)


@pytest.mark.parametrize(
    ("low", "size"), [((7, 9), (75, 110)), ((21, 28), (21, 28)), ((40, 30), (13, 17)), ((1, 5), (6, 6))]
)
def test_upsample_rows_equals_interpolate(low, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *low)
    full = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    for start, stop in ((0, size[0]), (0, 1), (size[0] // 2, size[0]), (size[0] - 1, size[0])):
        torch.testing.assert_close(upsample_rows(x, size, start, stop), full[..., start:stop, :], atol=1e-6, rtol=0)


def untiled(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)[0].softmax(0)


@pytest.mark.parametrize("band_elements", [1, 3 * 110 * 4, 1 << 22])  # one row, four rows, one band
def test_reduction_in_bands_equals_the_untiled_one(band_elements):
    torch.manual_seed(1)
    scores, size = torch.randn(1, 3, 10, 14) * 5, (75, 110)
    probs = untiled(scores, size)
    out = reduce_in_bands(
        lambda a, b: upsample_rows(scores, size, a, b)[0].softmax(0),
        size,
        3,
        entropy=True,
        keep_probs=True,
        band_elements=band_elements,
    )
    torch.testing.assert_close(out.probs, probs, atol=1e-5, rtol=0)
    assert torch.equal(out.labels, probs.argmax(0))
    torch.testing.assert_close(out.confidence, probs.amax(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, -(probs * probs.log()).sum(0), atol=1e-5, rtol=0)


def test_open_vocabulary_prediction_in_bands_equals_one_band(tiny_configs, monkeypatch):
    torch.manual_seed(0)
    clip = load_clip("tiny-RN", None)
    image = (torch.rand(3, 75, 110) * 255).to(torch.uint8)
    p = OpenVocabPredictor(clip, SegmenterConfig(templates="single", short_side=96, window=64, stride=32))
    p.set_image(image)
    p.set_classes(["cat", "grass", "sky", "road"])
    one_band = p.predict(probs=True)
    monkeypatch.setattr("clipdense.inference.bands.BAND_ELEMENTS", 4 * 110 * 3)  # bands of 3 rows
    banded = p.predict(probs=True)
    torch.testing.assert_close(banded.probs, one_band.probs, atol=1e-5, rtol=0)
    assert torch.equal(banded.labels, one_band.labels)


class ConvSegmenter(torch.nn.Module):
    """Logits at 1/4 resolution, as a trained segmentor returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 4, stride=4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(x)}


def reference_probs(model, image: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """The untiled computation: every view's logits upsampled to the image, softmax, mean over views."""
    from torchvision.transforms.v2 import functional as TF

    from clipdense.inference.sliding import infer_logits, normalize

    x, total, views = normalize(image), 0, 0
    for scale in cfg.scales:
        xs = TF.resize(x, [round(cfg.short_side * scale)], antialias=True)
        for flip in (False, True) if cfg.flip else (False,):
            logits = infer_logits(model, (xs.flip(-1) if flip else xs)[None], cfg)
            logits = logits.flip(-1) if flip else logits
            total = total + F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)[
                0
            ].softmax(0)
            views += 1
    return total / views


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_trained_prediction_in_bands_equals_the_untiled_one(mode, monkeypatch):
    torch.manual_seed(0)
    model = ConvSegmenter().eval()
    image = (torch.rand(3, 90, 120) * 255).to(torch.uint8)
    cfg = replace(EvalConfig(), mode=mode, short_side=64, crop=48, stride=32, scales=(0.75, 1.0, 1.25), flip=True,
                  resize="torchvision")  # fmt: skip
    expected = reference_probs(model, image, cfg)
    monkeypatch.setattr("clipdense.inference.bands.BAND_ELEMENTS", 5 * 120 * 7)  # bands of 7 rows
    out = predict_dense(model, image, cfg, keep_probs=True)
    torch.testing.assert_close(out.probs, expected, atol=1e-5, rtol=0)
    assert torch.equal(out.labels, expected.argmax(0))
    assert predict_dense(model, image, cfg).probs is None
    torch.testing.assert_close(predict_probs(model, image, cfg), expected, atol=1e-5, rtol=0)


def test_channels_last_and_bf16_inference_agree_with_fp32():
    from clipdense.inference.sliding import prepare_model

    torch.manual_seed(0)
    image = (torch.rand(3, 90, 120) * 255).to(torch.uint8)
    cfg = replace(EvalConfig(), mode="slide", short_side=64, crop=48, stride=32, channels_last=False)
    model = ConvSegmenter().eval()
    expected = predict_dense(model, image, cfg, keep_probs=True).probs
    fast = prepare_model(ConvSegmenter().eval(), replace(cfg, channels_last=True))
    fast.load_state_dict(model.state_dict())
    assert fast.conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = predict_dense(fast, image, replace(cfg, channels_last=True), keep_probs=True).probs
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    bf16 = predict_dense(model, image, replace(cfg, precision="bf16"), keep_probs=True).probs
    assert bf16.dtype == torch.float32 and (bf16 - expected).abs().max() < 0.05


@pytest.mark.parametrize(
    ("hw", "scale", "mmseg", "torchvision"),
    [
        ((333, 500), 1.0, (512, 769), (512, 768)),  # mmcv rounds half up, torchvision truncates
        ((333, 500), 0.75, (384, 577), (384, 576)),  # MultiScaleFlipAug: (int(2048 r), int(512 r))
        ((100, 1200), 1.0, (171, 2048), (512, 6144)),  # the long side capped at 2048
    ],
)
def test_eval_resize_is_mmsegs_test_pipeline(hw, scale, mmseg, torchvision):
    """mmseg's test pipeline for DenseCLIP/MaskCLIP+: Resize((2048, 512), keep_ratio=True) at each ratio r, one
    factor min(2048 r / long, 512 r / short), sides int(x * factor + 0.5), on the uint8 image, then Normalize."""
    from torchvision.transforms.v2 import functional as TF

    from clipdense.inference.sliding import eval_view, normalize

    image = (torch.rand(3, *hw) * 255).to(torch.uint8)
    h, w = hw
    factor = min(int(2048 * scale) / max(h, w), int(512 * scale) / min(h, w))
    assert (int(h * factor + 0.5), int(w * factor + 0.5)) == mmseg
    view = eval_view(image, scale, EvalConfig())
    assert tuple(view.shape[-2:]) == mmseg
    torch.testing.assert_close(view, normalize(TF.resize(image, list(mmseg), antialias=False)))
    assert tuple(eval_view(image, scale, replace(EvalConfig(), resize="torchvision")).shape[-2:]) == torchvision
