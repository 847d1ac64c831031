"""Prompt-ensemble text embeddings, synonyms and the embedding cache."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipdense.clip import TEMPLATE_SETS, TextEmbedder, load_clip, resolve_templates
from clipdense.clip import text as text_module
from clipdense.clip.text import IMAGENET_TEMPLATES, SCENE_TEMPLATES, encode_text, encodes_at_prompt_length
from tiny_models import TINY_CONFIGS, TINY_TEXT


@pytest.fixture(scope="module")
def clip(tiny_configs):
    torch.manual_seed(0)
    return load_clip("tiny-ViT", None)


def test_template_sets():
    assert len(IMAGENET_TEMPLATES) == 80 and len(SCENE_TEMPLATES) == 5
    assert len(TEMPLATE_SETS["ensemble"]) == 85
    assert "there is a {} in the scene." in TEMPLATE_SETS["ensemble"]
    assert all(t.count("{}") == 1 for t in TEMPLATE_SETS["ensemble"])
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("nope")
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["no placeholder"])


def test_ensemble_is_mean_of_normalised_prompt_embeddings(clip):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{} in the scene"]
    emb = TextEmbedder(clip, templates).encode_names(["cat", "sky"])
    with torch.no_grad():
        for i, name in enumerate(["cat", "sky"]):
            e = F.normalize(clip.model.encode_text(clip.tokenizer([t.format(name) for t in templates])), dim=-1)
            torch.testing.assert_close(emb[i], F.normalize(e.mean(0), dim=0), atol=1e-6, rtol=0)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_chunking_does_not_change_embeddings(clip):
    names = ["cat", "dog", "grass", "sky", "road"]
    a = TextEmbedder(clip, "scene", chunk_size=3).encode_names(names)
    b = TextEmbedder(clip, "scene", chunk_size=1000).encode_names(names)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_cache_encodes_each_name_once(clip, monkeypatch):
    embedder = TextEmbedder(clip, "single")
    calls = []
    original = text_module.encode_text
    monkeypatch.setattr(text_module, "encode_text", lambda m, t: calls.append(len(t)) or original(m, t))
    first = embedder.encode_names(["cat", "sky"])
    second = embedder.encode_names(["sky", "cat", "tree"])
    assert calls == [2, 1]
    torch.testing.assert_close(second[:2], first.flip(0))


def test_synonyms_score_the_max(clip):
    embedder = TextEmbedder(clip, "single")
    classes = embedder.encode_classes(["cat, kitty, feline", "sky"])
    assert classes.class_names == ["cat", "sky"]
    assert classes.class_index.tolist() == [0, 0, 0, 1]
    feats = torch.randn(2, 32, 3, 4)
    scores = classes.scores(feats)
    syn = torch.einsum("bdhw,sd->bshw", F.normalize(feats, dim=1), classes.embeddings)
    torch.testing.assert_close(scores[:, 0], syn[:, :3].amax(1))
    torch.testing.assert_close(scores[:, 1], syn[:, 3])


def test_bad_class_lists(clip):
    embedder = TextEmbedder(clip, "single")
    with pytest.raises(ValueError, match="empty"):
        embedder.encode_classes([])
    with pytest.raises(ValueError, match="duplicate"):
        embedder.encode_classes(["cat", "Cat"])


def test_a_name_too_long_for_the_context_is_warned_about(clip, caplog):
    text = TextEmbedder(clip, "single")
    long_name = "very " * 80 + "long name"
    with caplog.at_level("WARNING", logger="clipdense.clip.text"):
        text.encode_classes(["cat", long_name])
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "409 characters" in message and "77-token context" in message and "cat" not in message


PROMPTS = [
    t.format(n)
    for n in ["cat", "traffic light", "a very long and unusual class name"]
    for t in TEMPLATE_SETS["ensemble"][::7]
]


def _tiny_clip(cls=open_clip.CLIP, **text_cfg):
    torch.manual_seed(0)
    return cls(32, TINY_CONFIGS["tiny-ViT"]["vision_cfg"], {**TINY_TEXT, **text_cfg}).eval()


def _count_encode_text(model, monkeypatch):
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda t: calls.append(t.shape) or original(t))
    return calls


@pytest.mark.parametrize("name", ["tiny-RN", "tiny-ViT"])
def test_prompt_length_encoding_equals_full_context(name, monkeypatch):
    model = load_clip(name, None).model
    tokens = open_clip.get_tokenizer(name)(PROMPTS)
    with torch.no_grad():
        ref = model.encode_text(tokens)
        calls = _count_encode_text(model, monkeypatch)
        out = encode_text(model, tokens)
    assert encodes_at_prompt_length(model) and calls == []  # the short path, not open_clip's
    assert tokens.shape[1] == 77 and int(tokens.argmax(-1).max()) < 20
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_prompt_length_encoding_with_a_linear_projection(monkeypatch):
    model = _tiny_clip(proj_bias=True)
    assert isinstance(model.text_projection, torch.nn.Linear) and encodes_at_prompt_length(model)
    tokens = open_clip.get_tokenizer("tiny-ViT")(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _tiny_clip(pool_type="last"),
        lambda: _tiny_clip(pool_type="first"),
        lambda: _tiny_clip(no_causal_mask=True),
        lambda: _tiny_clip(open_clip.CustomTextCLIP),
    ],
    ids=["last-pool", "first-pool", "bidirectional", "CustomTextCLIP"],
)
def test_other_text_towers_fall_back_to_open_clip(build, monkeypatch):
    model = build()
    tokens = open_clip.get_tokenizer("tiny-ViT")(PROMPTS)
    with torch.no_grad():
        ref = model.encode_text(tokens)
        calls = _count_encode_text(model, monkeypatch)
        out = encode_text(model, tokens)
    assert not encodes_at_prompt_length(model) and calls == [tokens.shape]  # full context, through open_clip
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_length_sorted_chunks_keep_the_prompt_order(clip):
    """Prompts of mixed lengths, sorted into chunks by length, come back in their order and equal one-by-one."""
    embedder = TextEmbedder(clip, "single", chunk_size=4)
    prompts = PROMPTS[::-1]
    emb, cut, context = embedder._encode_prompts(prompts)
    with torch.no_grad():
        ref = F.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)
    assert context == 77 and not cut.any()
