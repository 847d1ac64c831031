"""Tests for ShapesCLIP contrastive pre-training (tiny CPU models)."""

import json
import math
from dataclasses import replace

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clipdense.data.shapesworld import ShapesWorldConfig, class_names, generate_scene
from clipdense.training.clip_pretrain import (
    MODEL_NAME,
    RECIPES,
    PretrainConfig,
    config_from_args,
    create_model,
    get_tokenizer,
    main,
    register_model_config,
    resolve_model_config,
    train,
    zero_shot_accuracy,
)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"width": 32, "heads": 2, "layers": 1},
}


def _tiny_config(out_dir, **kwargs) -> PretrainConfig:
    base = {
        "out_dir": str(out_dir),
        "steps": 6,
        "batch_size": 8,
        "image_size": 32,
        "num_scenes": 64,
        "workers": 0,
        "log_every": 1,
        "ckpt_every": 100,
        "eval_images": 8,
        "eval_scenes": 2,
        "device": "cpu",
        "model_overrides": TINY,
        # steps 1-4: one-object scenes, text transformer locked; step 5: image tower locked; step 6: both train.
        # The resumed runs below stop at step 3 and cross both boundaries.
        "single_object_warmup_frac": 0.67,
        "locked_image_frac": 0.17,
    }
    return PretrainConfig(**{**base, **kwargs})


def _logged_losses(out_dir) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, train(_tiny_config(out))


def test_tokenizer_has_context_24_and_captions_fit():
    cfg = PretrainConfig()
    tokenizer = get_tokenizer(cfg)
    assert resolve_model_config(cfg)["text_cfg"]["context_length"] == 24
    assert tokenizer(["a red circle"]).shape == (1, 24)
    world = ShapesWorldConfig(image_size=32)
    longest = max(len(tokenizer.encode(generate_scene(seed, world).caption)) for seed in range(300))
    assert longest <= 22, f"captions need {longest} tokens + SOT/EOT > 24"


def test_resolve_model_config_merges_overrides():
    cfg = _tiny_config("unused")
    resolved = resolve_model_config(cfg)
    assert resolved["vision_cfg"] == {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}
    assert resolved["text_cfg"]["context_length"] == 24 and resolved["text_cfg"]["width"] == 32
    assert resolved["embed_dim"] == 32


def test_training_runs_and_writes_outputs(uninterrupted):
    out, result = uninterrupted
    assert result.finished and result.step == 6
    assert [s for s, _ in result.losses] == list(range(1, 7))
    assert all(math.isfinite(loss) for _, loss in result.losses)
    assert _logged_losses(out) == result.losses
    for name in ("train.log", "metrics.jsonl", "last.pt", "shapesclip_rn.safetensors", "open_clip_config.json"):
        assert (out / name).is_file(), name
    assert 0.0 <= result.zero_shot_accuracy <= 1.0
    assert "zero_shot_accuracy" in (out / "metrics.jsonl").read_text().splitlines()[-1]


def test_resume_reproduces_uninterrupted_losses(uninterrupted, tmp_path):
    full_out, full = uninterrupted
    first = train(_tiny_config(tmp_path, stop_at_step=3))
    assert not first.finished and first.step == 3 and first.weights_path is None
    assert first.losses == full.losses[:3]
    second = train(_tiny_config(tmp_path))
    assert [s for s, _ in second.losses] == [4, 5, 6]
    assert second.losses == full.losses[3:]  # bitwise-equal floats on CPU
    assert _logged_losses(tmp_path) == full.losses
    a = load_file(str(full_out / "shapesclip_rn.safetensors"))
    b = load_file(str(tmp_path / "shapesclip_rn.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_phases_lock_text_then_image(tmp_path):
    from clipdense.training.clip_pretrain import _UNLOCKED_TEXT

    torch.manual_seed(0)
    initial = create_model(_tiny_config("unused")).state_dict()
    states = {}
    for stop in (4, 5, 6):
        train(_tiny_config(tmp_path, stop_at_step=stop, eval_images=0, eval_scenes=0))
        states[stop] = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    text_body = [k for k in initial if not k.startswith("visual.") and k not in _UNLOCKED_TEXT and k != "attn_mask"]
    visual = [k for k in initial if k.startswith("visual.")]
    assert "token_embedding.weight" in text_body and "visual.bn1.running_mean" in visual

    def same(a, b, keys):
        return all(torch.equal(a[k], b[k]) for k in keys)

    assert same(states[4], initial, text_body)  # warm-up: text transformer untouched ...
    assert not torch.equal(states[4]["text_projection"], initial["text_projection"])  # ... its projection trains
    assert not same(states[4], initial, ["visual.conv1.weight"])
    assert same(states[5], states[4], visual)  # locked image tower: weights and BatchNorm statistics kept
    assert not same(states[5], states[4], ["token_embedding.weight"])
    assert not same(states[6], states[5], ["visual.conv1.weight", "visual.bn1.running_mean"])  # both train


def test_scene_cache_trains_exactly_like_rendering_on_the_fly(uninterrupted, tmp_path):
    full_out, full = uninterrupted
    assert not (full_out / "scene_cache").exists()  # the default cache is removed when the run is done
    shared = tmp_path / "shared_cache"
    cached = train(_tiny_config(tmp_path / "cached", cache_dir=str(shared), stop_at_step=3))
    assert cached.losses == full.losses[:3]
    assert {p.name for p in shared.iterdir()} == {"single_object_32px", "scenes_32px"}  # both streams cached
    on_the_fly = train(_tiny_config(tmp_path / "cached", cache=False))  # resumes without the cache
    assert on_the_fly.losses == full.losses[3:]
    assert (shared / "scenes_32px" / "images.npy").is_file()  # a cache folder given by the user is kept


def test_recipes_from_the_command_line():
    assert config_from_args([]) == PretrainConfig()
    gpu = config_from_args(["--recipe", "gpu", "--steps", "5", "--no-cache", "--grad-clip-norm", "0"])
    assert gpu == PretrainConfig(**{**RECIPES["gpu"], "steps": 5, "cache": False, "grad_clip_norm": None})
    assert gpu.image_size == 160 and gpu.batch_size == 512
    cpu = config_from_args(["--single-object-captions", "0.9", "--threads", "1", "--no-channels-last"])
    assert (cpu.single_object_caption_prob, cpu.threads, cpu.channels_last) == (0.9, 1, False)
    assert cpu.world().single_object_caption_prob == 0.9
    with pytest.raises(ValueError, match="single_object_caption_prob"):
        config_from_args(["--single-object-captions", "1.5"])


def test_resume_with_different_config_is_refused(tmp_path):
    train(_tiny_config(tmp_path, steps=4, stop_at_step=1, eval_images=0))
    with pytest.raises(ValueError, match="batch_size"):
        train(_tiny_config(tmp_path, steps=4, batch_size=4, eval_images=0))


def test_safetensors_loads_strictly_with_open_clip(uninterrupted):
    out, _ = uninterrupted
    saved = json.loads((out / "open_clip_config.json").read_text())
    register_model_config()
    weights = str(out / "shapesclip_rn.safetensors")
    model = open_clip.create_model(MODEL_NAME, pretrained=weights, **saved["model_cfg"])
    state = load_file(weights)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    local = open_clip.create_model(f"local-dir:{out}")
    assert all(torch.equal(v, state[k]) for k, v in local.state_dict().items())


def test_overfits_a_fixed_batch(tmp_path):
    cfg = _tiny_config(tmp_path, steps=12, num_scenes=8, lr=2e-3, warmup_frac=0.2, eval_images=0, eval_scenes=0)
    cfg = replace(cfg, single_object_warmup_frac=0.0, locked_image_frac=0.0)  # one fixed batch from the start
    losses = [loss for _, loss in train(cfg).losses]
    assert losses[-1] < 0.25 * losses[0], losses


class _ConstantModel(torch.nn.Module):
    """Every image embeds like the first prompt: predicts class 0 for every image."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens, normalize=True):
        out = torch.zeros(tokens.shape[0], 4)
        out[:, 1] = 1.0
        out[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        return out

    def encode_image(self, images, normalize=True):
        return torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(images.shape[0], 4)


def test_zero_shot_accuracy_uses_balanced_classes():
    cfg = ShapesWorldConfig(image_size=32)
    num_classes = len(class_names(cfg))
    prompts = []

    def tokenizer(texts):
        prompts.extend(texts)
        return torch.zeros(len(texts), 24, dtype=torch.long)

    accuracy = zero_shot_accuracy(_ConstantModel(), tokenizer, cfg, num_images=2 * num_classes, batch_size=50)
    assert accuracy == pytest.approx(1.0 / num_classes)
    assert prompts == [f"a photo of a {name}" for name in class_names(cfg)]


def test_main_cli(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--image-size", "32", "--num-scenes", "8"]
    args += ["--workers", "0", "--eval-images", "0", "--device", "cpu", "--model-overrides", json.dumps(TINY)]
    assert main(args) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert (tmp_path / "shapesclip_rn.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--model-overrides", "{not json"])


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        PretrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="warmup_frac"):
        replace(PretrainConfig(), warmup_frac=1.5)


def test_ctrl_c_mid_step_stops_at_the_boundary_and_resumes_exactly(uninterrupted, tmp_path, monkeypatch):
    """A real SIGINT sent inside step 3's forward pass: the step finishes, last.pt holds step 3, and the
    resumed run reproduces the uninterrupted losses and weights bit for bit."""
    import os
    import signal

    import clipdense.training.clip_pretrain as pretrain

    full_out, full = uninterrupted
    set_phase = pretrain._set_phase

    def interrupt_at_step_2(model, cfg, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        set_phase(model, cfg, step)

    monkeypatch.setattr(pretrain, "_set_phase", interrupt_at_step_2)
    first = train(_tiny_config(tmp_path))
    assert not first.finished and first.step == 3 and first.losses == full.losses[:3]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(pretrain, "_set_phase", set_phase)
    second = train(_tiny_config(tmp_path))
    assert second.losses == full.losses[3:]
    a = load_file(str(full_out / "shapesclip_rn.safetensors"))
    b = load_file(str(tmp_path / "shapesclip_rn.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_last_pt_is_a_clear_error(tmp_path):
    train(_tiny_config(tmp_path, stop_at_step=2, eval_images=0, eval_scenes=0))
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        train(_tiny_config(tmp_path))


def test_vit_recipe_trains_a_vit_against_the_shipped_text_tower_locked(tmp_path):
    """The `vit` recipe: ShapesCLIP-ViT's text tower starts as the shipped ShapesCLIP-RN's and stays fixed (LiT);
    only the image tower and the logit scale train; the weights are saved under the architecture's name."""
    from clipdense.clip.loading import load_clip

    vit = config_from_args(["--recipe", "vit"])
    assert (vit.model_name, vit.init_text_from, vit.lock_text) == ("ShapesCLIP-ViT", "ShapesCLIP-RN:shapesworld", True)
    assert resolve_model_config(vit)["vision_cfg"] == {
        "image_size": 128, "layers": 6, "width": 128, "head_width": 32, "patch_size": 8}  # fmt: skip
    teacher = load_clip("ShapesCLIP-RN", "shapesworld").model.state_dict()
    tiny_vit = {"vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8}}
    cfg = _tiny_config(tmp_path, **{k: getattr(vit, k) for k in ("model_name", "init_text_from", "lock_text")},
                       model_overrides=tiny_vit, single_object_warmup_frac=0.0, locked_image_frac=0.0, steps=3,
                       eval_images=0, eval_scenes=0)  # fmt: skip
    result = train(cfg)
    assert result.finished and result.weights_path == tmp_path / "shapesclip_vit.safetensors"
    saved = load_file(result.weights_path)
    text_keys = [k for k in teacher if not k.startswith("visual.") and k != "logit_scale"]
    assert text_keys and all(torch.equal(saved[k], teacher[k].half()) for k in text_keys)  # locked all along
    initial = create_model(cfg)  # the same seed: the initial image tower
    assert not torch.equal(saved["visual.conv1.weight"], initial.state_dict()["visual.conv1.weight"].half())
    clip = load_clip(f"local-dir:{tmp_path}", None)
    assert not clip.is_resnet and clip.model.visual.patch_size == (8, 8)


def test_text_init_that_does_not_fit_is_a_clear_error(tmp_path):
    cfg = _tiny_config(tmp_path, init_text_from="ShapesCLIP-RN:shapesworld", lock_text=True)  # TINY: text width 32
    with pytest.raises(ValueError, match="does not fit this model"):
        train(cfg)
    with pytest.raises(ValueError, match="lock_text needs init_text_from"):
        _tiny_config(tmp_path, lock_text=True)


def test_distillation_adds_the_cosine_distances_to_the_teacher():
    """Global term: 1 - cos to the teacher's image embedding; dense term: 1 - cos per teacher cell of the
    student's MaskCLIP dense map average-pooled to the teacher's grid. A student that is its own teacher adds 0."""
    from open_clip.loss import ClipLoss

    from clipdense.clip.dense import dense_clip_encoder
    from clipdense.training.clip_pretrain import _Objective

    torch.manual_seed(0)
    cfg = PretrainConfig(model_name="ShapesCLIP-ViT", image_size=32, model_overrides={
        "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8}})  # fmt: skip
    model, teacher = create_model(cfg).eval(), create_model(cfg).eval()
    images, texts = torch.randn(4, 3, 32, 32), get_tokenizer(cfg)(["a red circle", "a blue star", "x", "y"])
    with torch.no_grad():
        image, text, scale = model(images, texts)
        contrastive = ClipLoss()(image, text, scale)
        assert torch.allclose(_Objective()(model, images, texts), contrastive)
        assert torch.allclose(_Objective(model, 0.5, 2.0)(model, images, texts), contrastive, atol=1e-5)
        target = teacher.encode_image(images, normalize=True)
        glob = 0.5 * (1 - (image * target).sum(-1)).mean()
        assert torch.allclose(_Objective(teacher, 0.5)(model, images, texts), contrastive + glob, atol=1e-5)
        mine, theirs = (dense_clip_encoder(m.visual, "maskclip")(images).dense for m in (model, teacher))
        dense = 2.0 * (1 - torch.nn.functional.cosine_similarity(mine, theirs, dim=1)).mean()  # same 4 x 4 grid
        both = _Objective(teacher, 0.5, 2.0)(model, images, texts)
        assert torch.allclose(both, contrastive + glob + dense, atol=1e-5)
    with pytest.raises(ValueError, match="distill_from must be MODEL:TAG"):
        PretrainConfig(distill_from="ShapesCLIP-RN")
