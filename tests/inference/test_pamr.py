"""PAMR: parity with a naive per-pixel reference, invariants, and one case computed by hand."""

import math

import pytest
import torch

from clipdense.inference import PAMR

UNIT = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def naive_pamr(image: torch.Tensor, masks: torch.Tensor, num_iter: int, dilations: tuple[int, ...]) -> torch.Tensor:
    """PAMR written pixel by pixel from the official code's definition, with Python floats."""
    img, m = image.double().tolist(), masks.double().tolist()
    b_, c_, h, w = image.shape
    k_ = masks.shape[1]

    def at(y, x):  # replicate padding = clamped coordinates
        return min(max(y, 0), h - 1), min(max(x, 0), w - 1)

    weights = {}  # (b, y, x) -> [(ny, nx, weight)]
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                neigh = [at(y + dy * d, x + dx * d) for d in dilations for dy, dx in UNIT]
                logits = [0.0] * len(neigh)
                for c in range(c_):
                    # std over the 3 x 3 window of every dilation, centre counted once per dilation; unbiased
                    vals = [img[b][c][y][x]] * len(dilations) + [img[b][c][ny][nx] for ny, nx in neigh]
                    mean = sum(vals) / len(vals)
                    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                    for p, (ny, nx) in enumerate(neigh):
                        logits[p] += -abs(img[b][c][y][x] - img[b][c][ny][nx]) / (1e-8 + 0.1 * std) / c_
                top = max(logits)
                exps = [math.exp(v - top) for v in logits]
                weights[b, y, x] = [(ny, nx, e / sum(exps)) for (ny, nx), e in zip(neigh, exps, strict=True)]
    for _ in range(num_iter):
        m = [
            [[[sum(a * m[b][k][ny][nx] for ny, nx, a in weights[b, y, x]) for x in range(w)] for y in range(h)]
             for k in range(k_)]
            for b in range(b_)
        ]  # fmt: skip
    return torch.tensor(m, dtype=torch.float64)


def test_matches_naive_reference():
    torch.manual_seed(0)
    image, masks = torch.randn(2, 3, 7, 9), torch.randn(2, 4, 7, 9)
    expected = naive_pamr(image, masks, num_iter=2, dilations=(1, 2))
    out = PAMR(num_iter=2, dilations=(1, 2))(image, masks)
    assert out.shape == (2, 4, 7, 9) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # the dilations reach past the 7-pixel height: clamping at the border must still agree
    expected = naive_pamr(image[:1], masks[:1], num_iter=1, dilations=(3, 8))
    torch.testing.assert_close(PAMR(1, (3, 8))(image[:1], masks[:1]).double(), expected, atol=1e-5, rtol=1e-5)


def test_affinity_is_a_distribution_over_neighbours():
    torch.manual_seed(1)
    aff = PAMR(dilations=(1, 2, 4)).affinity(torch.rand(2, 3, 10, 12))
    assert aff.shape == (2, 24, 10, 12)
    assert (aff >= 0).all()
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(2, 10, 12))


def test_probabilities_stay_probabilities():
    torch.manual_seed(2)
    probs = torch.randn(2, 5, 16, 20).softmax(dim=1)
    out = PAMR(num_iter=10, dilations=(2, 4))(torch.rand(2, 3, 16, 20), probs)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, 16, 20))
    assert not torch.allclose(out, probs, atol=1e-3)  # it did change the masks


def test_constant_image_gives_uniform_affinity_and_constant_masks_are_fixed():
    pamr = PAMR(num_iter=5, dilations=(1, 3))
    image = torch.full((1, 3, 9, 11), 0.7)
    torch.testing.assert_close(pamr.affinity(image), torch.full((1, 16, 9, 11), 1 / 16))
    masks = torch.tensor([0.25, -1.5, 3.0]).view(1, 3, 1, 1).expand(1, 3, 9, 11)
    torch.testing.assert_close(pamr(image, masks), masks)
    torch.testing.assert_close(pamr(torch.rand(1, 3, 9, 11), masks), masks)  # any image: weights sum to 1


def test_zero_iterations_return_the_masks():
    masks = torch.randn(1, 4, 6, 6)
    assert PAMR(num_iter=0)(torch.rand(1, 3, 6, 6), masks) is masks


def test_image_normalisation_does_not_matter():
    # -|dx| / std is unchanged by x -> a * x + b per channel: raw 0..255 and CLIP-normalised images agree
    torch.manual_seed(3)
    raw = torch.randint(0, 256, (1, 3, 12, 15), dtype=torch.uint8)
    masks = torch.randn(1, 6, 12, 15)
    mean, std = torch.tensor([122.8, 116.7, 104.1]).view(1, 3, 1, 1), torch.tensor([68.5, 66.6, 70.3]).view(1, 3, 1, 1)
    pamr = PAMR(num_iter=3, dilations=(1, 2))
    reference = pamr(raw.float(), masks)
    torch.testing.assert_close(pamr(raw, masks), reference)
    torch.testing.assert_close(pamr((raw.float() - mean) / std, masks), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pamr(raw.float().flip(1), masks), reference)  # BGR: channels are averaged


def test_hand_computed_centre_pixel():
    # Centre 0 and eight neighbours +-1, +-3, +-3, +-9: the 9 values have mean 0 and squared deviations
    # 1+1+9+9+9+9+81+81 = 200, so the unbiased std is sqrt(200 / 8) = 5 and the kernel is
    # -|0 - x_j| / (1e-8 + 0.1 * 5) = -2 |x_j|: -2 for +-1, -6 for the four +-3, -18 for +-9.
    # Softmax: Z = 2 e^-2 + 4 e^-6 + 2 e^-18 = 0.27067057 + 0.00991501 + 0.00000003 = 0.28058561, so
    # a(+1) = a(-1) = e^-2 / Z = 0.48233153, each +-3 gets e^-6 / Z = 0.00883421, each +-9 e^-18 / Z = 5.43e-8.
    image = torch.tensor([[1.0, -1.0, 3.0], [-3.0, 0.0, 3.0], [-3.0, 9.0, -9.0]], dtype=torch.float64)
    masks = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    masks[0, 0, 0, 0] = 1.0  # class 0: only the +1 neighbour (top left)
    masks[0, 1] = (image.abs() == 3).double()  # class 1: the four +-3 neighbours
    out = PAMR(num_iter=1, dilations=(1,))(image.view(1, 1, 3, 3), masks)
    # class 0: a(+1) = 0.48233153; class 1: 4 * 0.00883421 = 0.03533684
    torch.testing.assert_close(out[0, :, 1, 1], torch.tensor([0.48233153, 0.03533684], dtype=torch.float64))


def test_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="resize one to the other"):
        PAMR()(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="positive integers"):
        PAMR(dilations=(0, 2))
