"""Prompt-ensemble text embeddings, synonyms and the embedding cache."""

import pytest
import torch
import torch.nn.functional as F

from clipdense.clip import TEMPLATE_SETS, TextEmbedder, load_clip, resolve_templates
from clipdense.clip.text import IMAGENET_TEMPLATES, SCENE_TEMPLATES


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
    original = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda t: calls.append(len(t)) or original(t))
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
