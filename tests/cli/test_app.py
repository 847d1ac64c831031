"""`clipdense app`: the request handler called directly (ShapesWorld scenes, settings, bad input, trained runs),
and the page in a real browser (headless Chromium driven by Selenium)."""

import json
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clipdense.cli import build_parser, main
from clipdense.cli.app import DemoEngine, example_scenes, load_engine
from tiny_models import write_tiny_run

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _args(*argv):
    args = build_parser().parse_args(["app", "--device", "cpu", *argv])
    return args


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The default app: the shipped ShapesWorld CLIP, training-free (works offline)."""
    return load_engine(_args(), tmp_path_factory.mktemp("app") / "results")


@pytest.fixture(scope="module")
def examples(engine, tmp_path_factory):
    return example_scenes(tmp_path_factory.mktemp("examples"), (7, 11), engine.predictor.clip.image_size)


def test_segments_a_shapesworld_example(engine, examples, tmp_path):
    from clipdense.data.shapesworld import ShapesWorldConfig, class_names, generate_scene

    path, classes = examples[0]
    result = engine.run(path, classes)
    assert result.ok, result.message
    h, w = result.image.shape[:2]
    masks = np.stack([m for m, _ in result.annotations])
    assert (masks.sum(0) == 1).all()  # each pixel in exactly one class's mask
    assert sum(row[1] for row in result.table) == h * w
    assert [row[1] for row in result.table] == sorted((row[1] for row in result.table), reverse=True)
    assert sum(row[2] for row in result.table) == pytest.approx(100, abs=0.1)
    overlay, labels, report = result.files
    assert overlay.endswith("shapesworld_7_overlay.png") and result.picture.size[0] > w  # legend panel
    report = json.loads(open(report).read())
    assert set(report) == {"image", "size", "classes", "areas", "settings"}  # what `segment` writes
    label_map = np.array(Image.open(labels))
    names = report["classes"]
    for mask, name in result.annotations:
        assert (label_map[mask] == names.index(name)).all()
    # what `clipdense segment` gives for the same image and classes, pixel for pixel
    assert main(["segment", path, "--classes", classes, "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert (np.array(Image.open(tmp_path / "shapesworld_7_labels.png")) == label_map).all()
    # the shipped CLIP knows these shapes: well above the 1 in 5 of chance
    scene = generate_scene(7, ShapesWorldConfig(image_size=engine.predictor.clip.image_size))
    truth = np.array(["background", *class_names()])[scene.semantic]
    assert np.mean(np.array(names)[label_map] == truth) > 0.4


def test_text_embeddings_are_cached_between_requests(engine, examples, monkeypatch):
    path, classes = examples[1]
    assert engine.run(path, classes).ok
    calls = []
    text = engine.predictor.text
    original = text._encode_prompts
    monkeypatch.setattr(text, "_encode_prompts", lambda prompts: calls.append(prompts) or original(prompts))
    assert engine.run(examples[0][0], classes).ok
    assert calls == []  # the same classes on another image: no text encoding


def test_settings_change_the_segmentation(engine, examples):
    path, classes = examples[0]
    base = engine.run(path, "red circle; blue square")
    assert base.ok and {row[0] for row in base.table} == {"red circle", "blue square"}
    with_bg = engine.run(path, "red circle; blue square", background_threshold=0.99)
    assert with_bg.ok and "background" in [row[0] for row in with_bg.table]  # added by the threshold
    naclip = engine.run(path, classes, mode="naclip", key_smoothing=0.5, prompt_denoise=0.5)
    assert naclip.ok
    assert json.loads(open(naclip.files[2]).read())["settings"]["mode"] == "naclip"
    assert json.loads(open(base.files[2]).read())["settings"]["mode"] == "maskclip"


@pytest.mark.parametrize(
    "image, classes, expected",
    [
        (None, "cat", "no image"),
        ("text", "cat", "not an image"),
        ("scene", "", "no classes"),
        ("scene", "cat; ; dog", "empty"),
        ("scene", "; ".join(f"class {i}" for i in range(500)), "500 classes is more than this demo takes (200"),
    ],
)
def test_bad_input_is_a_message(engine, examples, tmp_path, image, classes, expected):
    if image == "text":
        image = tmp_path / "notes.png"
        image.write_text("not a picture")
    elif image == "scene":
        image = examples[0][0]
    result = engine.run(image, classes)
    assert not result.ok and expected in result.message and result.image is None


def test_large_images_are_downscaled_with_a_notice(engine, tmp_path):
    small = DemoEngine(engine.predictor, tmp_path, max_pixels=64 * 48)
    big = tmp_path / "big.png"
    Image.fromarray(np.full((300, 400, 3), 120, np.uint8)).save(big)
    result = small.run(big, "red circle; background")
    assert result.ok and result.image.shape[:2] == (48, 64)
    assert "400 x 300" in result.message and "downscaled to 64 x 48" in result.message


def test_one_forward_pass_at_a_time(engine, examples, monkeypatch):
    active, peak = [0], [0]
    original = engine.predictor.predict

    def counting(*args, **kwargs):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(engine.predictor, "predict", counting)
    threads = [threading.Thread(target=engine.run, args=examples[0]) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


def test_trained_runs(tmp_path, tiny_configs):
    """A PPL run adds its uncertainty map; a detector run gives boxes; a closed-set run refuses new classes."""
    ppl = load_engine(_args("--checkpoint", str(write_tiny_run(tmp_path / "ppl", "ppl_fpn_rn50"))), tmp_path / "o")
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    result = ppl.run(image, "")  # empty: the run's own classes
    assert result.ok and {row[0] for row in result.table} == {"red thing", "green thing", "blue thing"}
    assert result.uncertainty is not None and result.files[-1].endswith("img_uncertainty.png")
    assert "uncertainty" in json.loads(open(result.files[2]).read())
    refused = ppl.run(image, "cat; dog")
    assert not refused.ok and "fixed classes" in refused.message
    run = write_tiny_run(tmp_path / "det", "denseclip_retinanet_rn50")
    detector = load_engine(_args("--checkpoint", str(run)), tmp_path / "d")
    found = detector.run(image, "", score_threshold=0.0)
    assert found.ok and found.columns == ["class", "score", "box x0, y0, x1, y1"]
    assert len(found.table) == len(found.annotations)  # random weights may find nothing; each find is one box
    assert all(len(box) == 4 for box, _ in found.annotations)
    report = json.loads(open(found.files[1]).read())
    assert found.files[0].endswith("img_detections.png") and report["score_threshold"] == 0.0
    assert len(report["detections"]) == len(found.table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_in_a_real_browser(engine, examples, tmp_path):
    """Serve the page, upload a ShapesWorld scene in headless Chromium, type its classes, submit, and wait for the
    annotated image and the areas table; a screenshot goes to the test's temp dir."""
    pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="the browser test needs Selenium: pip install -e '.[app]'"
    )
    if not (shutil.which("chromium") or os.path.exists(CHROMIUM)) or not os.path.exists(CHROMEDRIVER):
        pytest.skip(
            "the browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
        )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from clipdense.cli.app import build_ui

    demo = build_ui(engine, examples)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1300",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(examples[0][0])
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        box = browser.find_element(By.CSS_SELECTOR, "#classes textarea, #classes input")
        box.send_keys(examples[0][1])
        browser.find_element(By.CSS_SELECTOR, "#submit").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#annotated img")))
        wait.until(lambda b: "background" in b.find_element(By.CSS_SELECTOR, "#areas").text)
        areas = browser.find_element(By.CSS_SELECTOR, "#areas").text
        status = browser.find_element(By.CSS_SELECTOR, "#status").text
        time.sleep(1)  # let the images finish painting before the screenshot
        shot = tmp_path / "app_page.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        browser.quit()
        demo.close()
    assert "128 x 128 px" in status
    for name in examples[0][1].split(";")[:-1]:  # every class of the scene is a row of the table
        assert name.strip() in areas
    assert Image.open(shot).size[0] >= 1000
