"""ImageNet-C corruptions and the MaskCLIP robustness sweep (`clipdense.evaluation.robustness`, CLI)."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from clipdense.cli import main
from clipdense.evaluation import robustness
from clipdense.evaluation.robustness import CORRUPTIONS, SEVERITIES, corrupt, format_table

pytest.importorskip("imagecorruptions", reason='needs pip install "clipdense[robustness]"')

FAST = ["--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32"]
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "spatter"}


@pytest.fixture(scope="module")
def image():
    """A 40 x 56 x 3 uint8 image with smooth structure and texture, so blur and JPEG change it too."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:56]
    base = np.stack([yy * 5, xx * 4, (yy + xx) * 2], axis=-1).astype(np.float64)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def test_the_eight_maskclip_corruptions():
    assert len(CORRUPTIONS) == 8 and SEVERITIES == (1, 2, 3, 4, 5)
    import imagecorruptions

    assert set(CORRUPTIONS) <= set(imagecorruptions.get_corruption_names("all"))


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_changes_image_keeps_size_and_is_seeded(image, name, severity):
    before = image.copy()
    out = corrupt(image, name, severity, seed=3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(image, before), "the input must not be modified"
    assert np.abs(out.astype(int) - image).mean() > 0.5
    assert np.array_equal(out, corrupt(image, name, severity, seed=3))
    other = corrupt(image, name, severity, seed=4)
    if name in RANDOM:
        assert not np.array_equal(out, other)
    else:
        assert np.array_equal(out, other)


def test_noise_grows_with_severity(image):
    change = [np.abs(corrupt(image, "gaussian_noise", s, 0).astype(int) - image).mean() for s in SEVERITIES]
    assert change == sorted(change) and change[-1] > 2 * change[0]


@pytest.mark.parametrize("size", [(33, 47), (64, 32), (97, 130)])
def test_odd_sizes_are_kept(size):
    img = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    for name in CORRUPTIONS:
        assert corrupt(img, name, 5, 0).shape == img.shape


def test_global_numpy_rng_is_left_alone(image):
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    corrupt(image, "spatter", 3, seed=9)
    corrupt(image, "gaussian_noise", 3, seed=9)
    assert np.array_equal(np.random.rand(3), expected)


def test_size_changes_of_the_package_are_undone(image, monkeypatch):
    import imagecorruptions

    for shape in [(48, 64, 3), (32, 32, 3)]:
        monkeypatch.setattr(imagecorruptions, "corrupt", lambda img, shape=shape, **kw: np.full(shape, 7, np.uint8))
        out = corrupt(image, "jpeg_compression", 1, 0)
        assert out.shape == image.shape and out.dtype == np.uint8 and (out == 7).all()


@pytest.mark.parametrize(
    "args, match",
    [
        (("fog", 1), "unknown corruption 'fog'"),
        (("gaussian_noise", 0), "severity must be an integer from 1 to 5"),
        (("gaussian_noise", 6), "severity must be an integer from 1 to 5"),
        (("gaussian_noise", 2.5), "severity must be an integer from 1 to 5"),
    ],
)
def test_bad_name_or_severity(image, args, match):
    with pytest.raises(ValueError, match=match):
        corrupt(image, *args, seed=0)


def test_bad_images(image):
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        corrupt(image.astype(np.float32), "gaussian_noise", 1, 0)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        corrupt(image[..., 0], "gaussian_noise", 1, 0)
    with pytest.raises(ValueError, match=">= 32 pixels"):
        corrupt(image[:20], "gaussian_noise", 1, 0)


def test_missing_package_says_what_to_install(image, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "clipdense\[robustness\]"'):
        corrupt(image, "gaussian_noise", 1, 0)


def test_format_table_layout():
    results = {
        "clean": 50.0,
        "corruptions": ["gaussian_noise", "spatter"],
        "severities": [1, 2],
        "results": {
            "gaussian_noise": {"1": 40.0, "2": 30.0, "mean": 35.0},
            "spatter": {"1": 45.0, "2": None, "mean": 45.0},
        },
        "mean": {"1": 42.5, "2": 30.0, "mean": 40.0},
        "seed": 0,
        "images": 2,
    }
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["corruption", "1", "2", "mean"]
    assert lines[2].split() == ["gaussian_noise", "40.0", "30.0", "35.0"]
    assert lines[3].split() == ["spatter", "45.0", "-", "45.0"]
    assert lines[5].split() == ["mean", "42.5", "30.0", "40.0"]
    assert lines[6].startswith("clean mIoU: 50.0")


def _write_ade(root, n=3):
    rng = np.random.default_rng(0)
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
            root / "images" / "validation" / f"ADE_val_{i:08d}.jpg"
        )
        Image.fromarray(rng.integers(0, 151, (40, 56), dtype=np.uint8)).save(
            root / "annotations" / "validation" / f"ADE_val_{i:08d}.png"
        )


@pytest.fixture
def ade(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _write_ade(root)
    return root


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_robustness_command_writes_the_whole_table(tiny_configs, ade, tmp_path, capsys):
    out = tmp_path / "robust.json"
    code, stdout, err = _run(
        capsys, "robustness", "--dataset", "ade20k", "--root", ade, "--split", "validation", "--limit", "2",
        "--model", "tiny-RN", "--random-weights", "--out", out, *FAST,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["images"] == 2 and report["dataset"] == "ade20k"
    assert report["corruptions"] == list(CORRUPTIONS) and report["severities"] == list(SEVERITIES)
    assert set(report["results"]) == set(CORRUPTIONS)
    assert 0 <= report["clean"] <= 100
    for name in CORRUPTIONS:
        row = report["results"][name]
        assert set(row) == {"1", "2", "3", "4", "5", "mean"}
        assert all(0 <= v <= 100 for v in row.values())
        assert row["mean"] == pytest.approx(np.mean([row[str(s)] for s in SEVERITIES]))
        assert name in stdout
    assert "clean mIoU" in stdout and f"saved {out}" in stdout
    assert format_table(report) in stdout


def test_eval_zeroshot_corruption_matches_the_sweep(tiny_checkpoints, ade, tmp_path, capsys, monkeypatch):
    """eval-zeroshot --corruption feeds image i corrupted with seed + i; same checkpoint and seed: the sweep's cell."""
    from clipdense.data.datasets import build_dataset
    from clipdense.inference import OpenVocabPredictor

    seen = []
    set_image = OpenVocabPredictor.set_image
    monkeypatch.setattr(OpenVocabPredictor, "set_image", lambda self, im: (seen.append(im), set_image(self, im))[1])
    model = ["--model", "tiny-RN", "--pretrained", tiny_checkpoints["tiny-RN"][1]["state_dict"], *FAST]
    data = ["--dataset", "ade20k", "--root", ade, "--split", "validation"]
    code, _, err = _run(capsys, "eval-zeroshot", *data, "--corruption", "gaussian_noise", "--severity", "5",
                        "--corruption-seed", "7", "--out", tmp_path / "noisy.json", *model)  # fmt: skip
    assert code == 0, err
    noisy = json.loads((tmp_path / "noisy.json").read_text())
    assert noisy["corruption"] == {"name": "gaussian_noise", "severity": 5, "seed": 7}
    assert noisy["images"] == 3 and 0 <= noisy["miou"] <= 100
    dataset = build_dataset("ade20k", ade, "validation")
    assert len(seen) == 3
    for i, im in enumerate(seen):
        original = dataset[i]["image"].permute(1, 2, 0).numpy()
        assert np.array_equal(im, corrupt(original, "gaussian_noise", 5, 7 + i))

    code, _, err = _run(capsys, "eval-zeroshot", *data, "--out", tmp_path / "clean.json", *model)
    assert code == 0, err
    clean = json.loads((tmp_path / "clean.json").read_text())
    assert clean["corruption"] is None

    code, _, err = _run(capsys, "robustness", *data, "--corruptions", "gaussian_noise", "--severities", "5",
                        "--corruption-seed", "7", "--out", tmp_path / "sweep.json", *model)  # fmt: skip
    assert code == 0, err
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["results"]["gaussian_noise"]["5"] == pytest.approx(noisy["miou"])
    assert sweep["clean"] == pytest.approx(clean["miou"])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--corruption", "gaussian_noise"], "needs --severity"),
        (["--severity", "2"], "--severity needs --corruption"),
    ],
)
def test_eval_zeroshot_corruption_args(tiny_configs, ade, capsys, extra, match):
    code, _, err = _run(capsys, "eval-zeroshot", "--dataset", "ade20k", "--root", ade, "--split", "validation",
                        "--model", "tiny-RN", "--random-weights", *extra, *FAST)  # fmt: skip
    assert code == 2 and match in err  # usage errors exit 2


def test_unknown_corruption_is_rejected_by_the_parser(ade, capsys):
    assert main(["robustness", "--dataset", "ade20k", "--root", str(ade), "--corruptions", "fog"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["robustness", "eval-zeroshot"])
def test_cli_without_the_package(ade, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    extra = ["--corruption", "spatter", "--severity", "1"] if command == "eval-zeroshot" else []
    code, _, err = _run(capsys, command, "--dataset", "ade20k", "--root", ade, "--random-weights", *extra)
    assert code == 1 and 'pip install "clipdense[robustness]"' in err


def test_sweep_checks_its_arguments_before_loading(ade):
    from clipdense.data.datasets import build_dataset

    dataset = build_dataset("ade20k", ade, "validation")
    with pytest.raises(ValueError, match="unknown corruption"):
        robustness.robustness_sweep(object(), dataset, ["fog"], [1])
    with pytest.raises(ValueError, match="severity"):
        robustness.robustness_sweep(object(), dataset, ["spatter"], [7])
