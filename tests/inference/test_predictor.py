"""OpenVocabPredictor: windows, refinements, background, shapes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdense.clip.refine import key_smoothing, prompt_denoise
from clipdense.inference import OpenVocabPredictor, SegmenterConfig, read_image, window_starts


@pytest.mark.parametrize(("size", "crop", "stride"), [(100, 40, 20), (64, 64, 32), (30, 64, 32), (101, 50, 17)])
def test_windows_cover_the_image(size, crop, stride):
    starts = window_starts(size, crop, stride)
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + crop] = True
        assert s + min(crop, size) <= size
    assert covered.all() and starts[0] == 0


@pytest.mark.parametrize("mode", ["maskclip", "vanilla", "naclip"])
def test_prediction_has_image_size_and_valid_labels(clip, image, mode):
    p = OpenVocabPredictor(clip, SegmenterConfig(mode=mode, templates="single", short_side=96, window=64, stride=32))
    p.set_image(image)
    names = p.set_classes(["cat", "grass, lawn", "sky"])
    seg = p.predict(probs=True, entropy=True)
    assert names == ["cat", "grass", "sky"]
    assert seg.labels.shape == (75, 110) and seg.labels.dtype == torch.int64
    assert seg.probs.shape == (3, 75, 110)
    assert 0 <= seg.labels.min() and seg.labels.max() < 3
    torch.testing.assert_close(seg.probs.sum(0), torch.ones(75, 110))
    assert torch.equal(seg.labels, seg.probs.argmax(0))
    torch.testing.assert_close(seg.confidence, seg.probs.amax(0))
    torch.testing.assert_close(seg.entropy, -(seg.probs * seg.probs.log()).sum(0))
    assert p.predict().probs is None and p.predict().entropy is None  # full-size maps only when asked for
    assert sum(a["pixels"] for a in seg.areas().values()) == 75 * 110


def test_one_window_equals_whole_image(clip, image):
    whole = OpenVocabPredictor(clip, SegmenterConfig(templates="single", short_side=None, window=None))
    slide = OpenVocabPredictor(clip, SegmenterConfig(templates="single", short_side=None, window=128, stride=64))
    a, b = whole(image, ["cat", "sky"], probs=True), slide(image, ["cat", "sky"], probs=True)
    torch.testing.assert_close(a.probs, b.probs)


def test_windows_average_logits(clip, image):
    """Sliding windows: the merged scores are the mean of each window's upsampled scores."""
    cfg = SegmenterConfig(templates="single", short_side=None, window=64, stride=46, logit_scale=1.0)
    p = OpenVocabPredictor(clip, cfg)
    p.set_image(image)
    p.set_classes(["cat", "sky"])
    probs = p.predict(probs=True).probs
    x = (image.float() / 255 - torch.tensor(clip.mean).view(3, 1, 1)) / torch.tensor(clip.std).view(3, 1, 1)
    total, count = torch.zeros(2, 75, 110), torch.zeros(75, 110)
    for y in window_starts(75, 64, 46):
        for x0 in window_starts(110, 64, 46):
            out = p.encoder(x[None, :, y : y + 64, x0 : x0 + 64])
            s = p._classes.scores(out.dense)
            total[:, y : y + 64, x0 : x0 + 64] += F.interpolate(s, size=(64, 64), mode="bilinear")[0]
            count[y : y + 64, x0 : x0 + 64] += 1
    torch.testing.assert_close(probs, F.softmax(total / count, dim=0), atol=1e-5, rtol=0)


def test_set_image_once_predict_many(clip, image):
    p = OpenVocabPredictor(clip, SegmenterConfig(templates="single", short_side=64))
    p.set_image(image)
    p.set_classes(["cat", "sky"])
    a = p.predict(probs=True)
    p.set_classes(["sky", "cat", "road"])
    b = p.predict(probs=True)
    assert b.probs.shape[0] == 3 and b.class_names == ["sky", "cat", "road"]
    # same image features, same text: the relative scores of cat and sky do not change
    ratio_a = (a.probs[0] / a.probs[1]).log()
    ratio_b = (b.probs[1] / b.probs[0]).log()
    torch.testing.assert_close(ratio_a, ratio_b, atol=1e-4, rtol=1e-4)


def test_prompt_denoise_formula():
    scores = torch.randn(1, 3, 2, 2) * 0.05
    scores[:, 2] = -1.0  # class 2 is confident nowhere
    out = prompt_denoise(scores, 0.5)
    conf = torch.softmax(100 * scores, 1).amax(dim=(2, 3))[0]
    for c in range(3):
        expected = torch.full_like(scores[0, c], -100.0) if conf[c] < 0.5 else scores[0, c]
        torch.testing.assert_close(out[0, c], expected)
    assert torch.all(out[0, 2] == -100)


def _official_refine_output(output, k, ks_thresh):
    """MaskClipHead.refine_output's key smoothing (MaskCLIP, mmseg/models/decode_heads/maskclip_head.py), in its
    own layout: output N x C x H x W, k N x HW x C keys."""
    output = torch.softmax(output * 100, dim=1)
    n, c, h, w = output.shape
    output = output.view(n, c, -1).transpose(-2, -1).clone()
    k = F.normalize(k, p=2)  # dim=1: over the HW positions
    weight = k @ k.transpose(-2, -1)
    selected = (output.max(dim=-1, keepdim=True)[0] < ks_thresh).expand(-1, -1, c)
    weighted = weight @ output
    output[selected] = weighted[selected]
    return output.transpose(-2, -1).reshape(n, c, h, w)


def test_key_smoothing_matches_the_official_head():
    torch.manual_seed(0)
    scores = torch.randn(2, 4, 3, 5) * 0.02
    scores[0, 1, 0, 0] = 1.0  # one confident pixel
    keys = torch.randn(2, 8, 3, 5)
    out = key_smoothing(scores, keys, 0.9)
    expected = _official_refine_output(scores, keys.flatten(2).transpose(1, 2), 0.9)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert (out < 0).any()  # no clamp: official weights can be negative
    # the confident pixel keeps its own distribution
    torch.testing.assert_close(out[0, :, 0, 0], torch.softmax(100 * scores, 1)[0, :, 0, 0])


def test_key_smoothing_by_hand():
    """Two pixels, two classes, 1-channel keys (3, 4). Pixel 0 is a tie (P = 1/2, 1/2); pixel 1 has scores (0.1, 0):
    P = (1, e^-10) / (1 + e^-10). official: keys / ||(3, 4)|| = (0.6, 0.8), w_00 = 0.36, w_01 = 0.48, so pixel 0
    becomes 0.36 * (1/2, 1/2) + 0.48 * P_1. cosine: each 1-d key normalises to 1, w = 1, pixel 0 = (1/2, 1/2) + P_1."""
    scores = torch.tensor([[0.0, 0.1], [0.0, 0.0]]).view(1, 2, 1, 2)
    keys = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    e = math.exp(-10)
    p1 = torch.tensor([1 / (1 + e), e / (1 + e)])
    official = key_smoothing(scores, keys, 0.9)[0, :, 0]
    torch.testing.assert_close(official[:, 0], 0.18 + 0.48 * p1)
    torch.testing.assert_close(official[:, 1], p1)  # above the threshold: kept
    cosine = key_smoothing(scores, keys, 0.9, key_norm="cosine")[0, :, 0]
    torch.testing.assert_close(cosine[:, 0], 0.5 + p1)


def test_key_smoothed_probabilities_are_what_is_upsampled(clip, image):
    """With key smoothing, window outputs are probabilities: averaged, upsampled, then softmax unscaled (mmseg)."""
    cfg = SegmenterConfig(templates="single", short_side=None, window=None, key_smoothing=1.0)
    p = OpenVocabPredictor(clip, cfg)
    p.set_image(image)
    p.set_classes(["cat", "sky", "road"])
    probs = p.predict(probs=True).probs
    x = (image.float() / 255 - torch.tensor(clip.mean).view(3, 1, 1)) / torch.tensor(clip.std).view(3, 1, 1)
    out = p.encoder(x[None])
    smoothed = key_smoothing(p._classes.scores(out.dense), out.keys, 1.0)
    full = F.interpolate(smoothed, size=out.padded_size, mode="bilinear")[..., :75, :110]
    torch.testing.assert_close(probs, F.softmax(full[0], dim=0), atol=1e-5, rtol=0)


def test_refinements_run_in_the_predictor(clip, image):
    cfg = SegmenterConfig(templates="single", short_side=64, key_smoothing=0.5, prompt_denoise=0.5)
    seg = OpenVocabPredictor(clip, cfg)(image, ["cat", "sky", "road"], probs=True)
    assert seg.labels.shape == (75, 110) and torch.isfinite(seg.probs).all()


def test_background_threshold(clip, image):
    cfg = SegmenterConfig(templates="single", short_side=64, background_threshold=1.0)
    p = OpenVocabPredictor(clip, cfg)
    assert p.set_classes(["cat", "sky"]) == ["background", "cat", "sky"]
    p.set_image(image)
    assert torch.all(p.predict().labels == 0)  # nothing reaches probability 1
    p.set_classes(["sky", "background, wall", "cat"])
    assert torch.all(p.predict().labels == 1)


def test_inputs_and_errors(clip, image, tmp_path):
    p = OpenVocabPredictor(clip, SegmenterConfig(templates="single", short_side=64))
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict()
    with pytest.raises(ValueError, match="empty"):
        p.set_classes([])
    with pytest.raises(ValueError, match="uint8"):
        read_image(np.zeros((5, 5, 3), np.float32))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="could not decode"):
        read_image(bad)
    assert read_image(image.permute(1, 2, 0).numpy()).shape == (3, 75, 110)
    with pytest.raises(ValueError, match="unknown mode"):
        SegmenterConfig(mode="bogus")
    with pytest.raises(ValueError, match="stride"):
        SegmenterConfig(window=64, stride=100)


def test_read_image_max_pixels_for_every_input_kind(tmp_path):
    from PIL import Image

    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, 200:] = 255  # left half black, right half white
    Image.fromarray(pixels).save(tmp_path / "p.png")
    for given in (tmp_path / "p.png", Image.fromarray(pixels), pixels, torch.from_numpy(pixels).permute(2, 0, 1)):
        image = read_image(given, max_pixels=12_000)
        assert image.shape == (3, 94, 126) and image.dtype == torch.uint8  # 126 x 94 = 11844 <= 12000
        assert image[:, :, :60].max() == 0 and image[:, :, 66:].min() == 255
        assert read_image(given).shape == read_image(given, max_pixels=120_000).shape == (3, 300, 400)


def test_segment_many_batches_windows_across_images_with_equal_results(clip):
    torch.manual_seed(3)
    images = [(torch.rand(3, h, w) * 255).to(torch.uint8) for h, w in ((75, 110), (64, 64), (90, 70), (75, 110))]
    cfg = SegmenterConfig(templates="single", short_side=64, window=48, stride=32, window_batch=5)
    p = OpenVocabPredictor(clip, cfg)
    p.set_classes(["cat", "sky", "road"])
    calls = []
    encoder = p.encoder
    p.encoder = lambda x: calls.append(len(x)) or encoder(x)
    many = list(p.segment_many(images, probs=True))
    assert max(calls) == 5 and len(calls) < sum(len(p._windows(i).boxes) for i in images)  # shared batches
    for image, seg in zip(images, many, strict=True):
        one = p(image, probs=True)
        assert torch.equal(seg.labels, one.labels)
        torch.testing.assert_close(seg.probs, one.probs, atol=1e-5, rtol=0)
