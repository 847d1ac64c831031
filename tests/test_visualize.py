"""Overlay pictures: colours blended where a class is painted, the image untouched elsewhere, a legend."""

import numpy as np
import torch

from clipdense.visualize import MIN_SIDE, overlay, palette


def test_overlay_blends_each_class_colour_and_leaves_background_alone():
    torch.manual_seed(0)
    image = (torch.rand(3, 400, 500) * 255).to(torch.uint8)
    labels = torch.zeros(400, 500, dtype=torch.long)
    labels[100:, :] = 1
    labels[300:, 250:] = 2
    names = ["background", "cat", "sky", "road"]  # road: absent
    picture = overlay(image, labels, names, alpha=0.5, legend=False)
    assert picture.size == (500, 400)
    got = torch.from_numpy(np.array(picture)).permute(2, 0, 1).int()
    colours = torch.tensor(palette(4)).int()
    assert torch.equal(got[:, labels == 0], image[:, labels == 0].int())  # background: unpainted
    for c in (1, 2):
        expected = (image[:, labels == c].int() + colours[c][:, None]) / 2
        assert (got[:, labels == c] - expected).abs().max() <= 1


def test_overlay_legend_and_enlargement():
    labels = torch.tensor([[0, 1], [1, 1]])
    image = torch.zeros(3, 2, 2, dtype=torch.uint8)
    plain = overlay(image, labels, ["cat", "sky"], legend=False)
    assert plain.size == (MIN_SIDE, MIN_SIDE)  # small images are enlarged by an integer factor
    pixels = np.asarray(plain)
    assert (pixels[: MIN_SIDE // 2, : MIN_SIDE // 2] == pixels[0, 0]).all()  # nearest: one label, one colour
    assert not (pixels[0, 0] == pixels[-1, -1]).all()
    with_legend = overlay(image, labels, ["cat", "sky"])
    assert with_legend.size[0] > MIN_SIDE and with_legend.size[1] == MIN_SIDE
