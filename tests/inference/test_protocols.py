"""The official evaluation protocols' arithmetic, each pinned by an independent example: mmcv's resize rule, the
softmax-over-synonyms reduction, SCLIP's area threshold, NACLIP's PAMR step, a background spelt as stuff words."""

import pytest
import torch
import torch.nn.functional as F

from clipdense.clip.text import ClassEmbeddings
from clipdense.inference import PAMR, OpenVocabPredictor, SegmenterConfig
from clipdense.inference.predictor import resized_size


def _whole(**kw) -> SegmenterConfig:
    return SegmenterConfig(templates="single", short_side=None, window=None, **kw)


def _synonym_sims(p: OpenVocabPredictor, clip, image) -> torch.Tensor:
    """S x H x W cosines of every synonym, upsampled to the image: the official per-query logits."""
    x = (image.float() / 255 - torch.tensor(clip.mean).view(3, 1, 1)) / torch.tensor(clip.std).view(3, 1, 1)
    out = p.encoder(x[None])
    sims = torch.einsum("bdhw,sd->bshw", F.normalize(out.dense, dim=1), p._classes.embeddings)
    return F.interpolate(sims, size=out.padded_size, mode="bilinear")[0, :, :75, :110]


@pytest.mark.parametrize(
    ("size", "mmcv", "torchvision"),
    [
        ((333, 500), (336, 505), (336, 504)),
        ((500, 333), (505, 336), (504, 336)),
        ((1024, 2048), (336, 672), (336, 672)),
    ],
)
def test_resize_rules(size, mmcv, torchvision):
    """mmcv.rescale_size with scale (2048, 336): factor min(2048 / long, 336 / short), sides rounded half up
    (500 * 336 / 333 = 504.50 -> 505); torchvision truncates the long side (504)."""
    assert resized_size(*size, SegmenterConfig(short_side=336, resize="mmcv")) == mmcv
    assert resized_size(*size, SegmenterConfig(short_side=336)) == torchvision


def test_mmcv_resize_keeps_the_long_side_bound():
    """Cityscapes in SCLIP: scale (2048, 560); a 1 x 20 strip is bounded by the long side instead."""
    assert resized_size(1024, 2048, SegmenterConfig(short_side=560, resize="mmcv")) == (560, 1120)
    assert resized_size(100, 4000, SegmenterConfig(short_side=560, resize="mmcv")) == (51, 2048)


@torch.no_grad()
def test_max_prob_synonyms_are_the_official_reduction(clip, image):
    """SCLIP/ClearCLIP/NACLIP: softmax(scale * logits) over all S queries, then the max over each class's queries."""
    classes = ["cat, kitty, feline", "grass", "sky, heaven"]
    p = OpenVocabPredictor(clip, _whole(synonyms="max_prob", logit_scale=50.0))
    p.set_classes(classes)
    p.set_image(image)
    seg = p.predict(probs=True)
    sims = _synonym_sims(p, clip, image)
    soft = F.softmax(50.0 * sims, dim=0)
    expected = torch.stack([soft[0:3].amax(0), soft[3], soft[4:6].amax(0)])
    torch.testing.assert_close(seg.probs, expected, atol=1e-5, rtol=0)
    assert torch.equal(seg.labels, expected.argmax(0))
    ours = OpenVocabPredictor(clip, _whole(logit_scale=50.0))(image, classes, probs=True).probs
    assert (ours - seg.probs).abs().max() > 1e-3  # max-cosine-then-softmax is a different number


def _feature_classes(p: OpenVocabPredictor, clip, image, cells) -> None:
    """Sets classes whose embeddings are the dense features of the given cells, so each wins somewhere
    (random tiny text towers put one class everywhere)."""
    x = (image.float() / 255 - torch.tensor(clip.mean).view(3, 1, 1)) / torch.tensor(clip.std).view(3, 1, 1)
    dense = p.encoder(x[None]).dense[0]
    emb = F.normalize(torch.stack([dense[:, i, j] for i, j in cells]), dim=1)
    p._classes = ClassEmbeddings(emb, torch.arange(len(cells)), [f"class{i}" for i in range(len(cells))])
    p._background_index = 0


@torch.no_grad()
def test_area_threshold_is_sclips(clip, image):
    """SCLIP's area_thd: classes 1.. predicted on <= thd of the non-background pixels get probability 0."""
    cells = [(0, 0), (0, 3), (1, 1), (2, 3), (1, 2)]
    plain = OpenVocabPredictor(clip, _whole(logit_scale=50.0))
    _feature_classes(plain, clip, image, cells)
    plain.set_image(image)
    base = plain.predict(probs=True)
    counts = torch.bincount(base.labels.flatten(), minlength=5)[1:].float()
    present = counts[counts > 0].sort().values
    assert len(present) >= 2, "the example needs two foreground classes"
    thd = float((present[0] + present[1]) / 2 / counts.sum())  # removes the smallest foreground class only
    # SCLIP, written out: one-hot areas over classes 1.., kept where area > thd * their sum
    area = F.one_hot(base.probs.argmax(0), 5).float()[:, :, 1:].sum((0, 1))
    keep = (area > thd * area.sum()).float()
    probs = base.probs.clone()
    probs[1:] *= keep[:, None, None]
    p = OpenVocabPredictor(clip, _whole(logit_scale=50.0, area_threshold=thd))
    _feature_classes(p, clip, image, cells)
    p.set_image(image)
    seg = p.predict(probs=True)
    assert keep.sum() == (counts > 0).sum() - 1  # one class was removed
    torch.testing.assert_close(seg.probs, probs)
    assert torch.equal(seg.labels, probs.argmax(0))


@torch.no_grad()
def test_pamr_refines_the_full_resolution_query_logits(clip, image):
    """NACLIP: PAMR on the per-query cosines upsampled to the image, guided by the normalised input resized to the
    image, before the logit scale and the softmax."""
    classes = ["cat, kitty", "grass", "sky"]
    p = OpenVocabPredictor(clip, _whole(synonyms="max_prob", logit_scale=40.0, pamr_steps=3, pamr_dilations=(1, 2)))
    p.set_classes(classes)
    p.set_image(image)
    seg = p.predict(probs=True)
    x = (image.float() / 255 - torch.tensor(clip.mean).view(3, 1, 1)) / torch.tensor(clip.std).view(3, 1, 1)
    refined = PAMR(3, (1, 2))(x[None], _synonym_sims(p, clip, image)[None])[0]
    soft = F.softmax(40.0 * refined, dim=0)
    expected = torch.stack([soft[0:2].amax(0), soft[2], soft[3]])
    torch.testing.assert_close(seg.probs, expected, atol=1e-5, rtol=0)


def test_background_spelt_as_stuff_words(clip, image):
    """The official VOC21 list's first entry is 26 stuff words; probability below prob_thd goes to it (index 0)."""
    p = OpenVocabPredictor(clip, _whole(background_threshold=1.0))
    names = p.set_classes(["sky, wall, tree", "cat", "dog"], background_index=0)
    assert names == ["sky", "cat", "dog"]  # nothing prepended
    p.set_image(image)
    assert torch.all(p.predict().labels == 0)
    with pytest.raises(ValueError, match="background_index 3"):
        p.set_classes(["a", "b", "c"], background_index=3)


@torch.no_grad()
@pytest.mark.parametrize("fit", ["pad_stretch", "truncate"])
def test_patch_fit_stretches_the_scores_over_the_window(clip, image, fit):
    """MaskCLIP (mmseg AdaptivePadding): zero-pad bottom/right, then resize the scores to the unpadded image;
    SCLIP/NACLIP whole mode: the stride-32/16 convolution drops the remainder, the scores are stretched back."""
    p = OpenVocabPredictor(clip, _whole(patch_fit=fit, normalize="imagenet", logit_scale=1.0))
    p.set_classes(["cat", "grass", "sky"])
    p.set_image(image)
    probs = p.predict(probs=True).probs
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet's
    x = (image.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    if fit == "pad_stretch":
        x = F.pad(x, (0, 128 - 110, 0, 96 - 75))  # tiny-RN: stride 32
    else:
        x = x[:, :64, :96]
    out = p.encoder(x[None])
    assert out.dense.shape[-2:] == ((3, 4) if fit == "pad_stretch" else (2, 3))
    scores = F.interpolate(p._classes.scores(out.dense), size=(75, 110), mode="bilinear")[0]
    torch.testing.assert_close(probs, F.softmax(scores, dim=0), atol=1e-5, rtol=0)
