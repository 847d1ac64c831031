"""Text-side embeddings for open-vocabulary dense prediction: prompt ensembles and synonyms.

MaskCLIP (Zhou et al., ECCV 2022) and its successors embed each class with the 80 CLIP
ImageNet templates plus 5 scene templates, average the l2-normalised embeddings and
renormalise. A class may carry comma-separated synonyms; it then scores the max over them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from tqdm import tqdm

from clipdense.clip.loading import LoadedCLIP
from clipdense.clip.text_cache import TextEmbeddingCache, cache_disabled
from clipdense.data.classnames import display_name
from clipdense.data.classnames import synonyms as split_synonyms

logger = logging.getLogger(__name__)

SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "ensemble": IMAGENET_TEMPLATES + SCENE_TEMPLATES,
    "imagenet": IMAGENET_TEMPLATES,
    "scene": SCENE_TEMPLATES,
    "single": ("a photo of a {}.",),
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Turn a template-set name (``ensemble``, ``imagenet``, ``scene``, ``single``) or a list of
    format strings with one ``{}`` each into a tuple of format strings."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"unknown template set '{templates}'; choose one of {sorted(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[templates]
    templates = tuple(templates)
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError("each template needs exactly one '{}' placeholder for the class name")
    return templates


_PROGRESS_PROMPTS = 300  # show a progress bar when encoding more prompts than this


def encodes_at_prompt_length(model: torch.nn.Module) -> bool:
    """Whether :func:`encode_text` can run ``model``'s text tower on the prompts' tokens only (see there)."""
    return (
        isinstance(model, open_clip.CLIP)
        and type(model).encode_text is open_clip.CLIP.encode_text
        and model.text_pool_type == "argmax"
        and model.attn_mask is not None
    )


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, computed only up to the longest prompt's end-of-text token where that is exact.

    An open_clip ``CLIP`` text tower with a causal attention mask that pools at the end-of-text token (the largest
    token id, ``text_pool_type == "argmax"``: OpenAI's CLIP and most open_clip towers) never lets a position see a
    later one, so the padding after the longest prompt cannot change any pooled feature. Its transformer is run on
    the first L positions (positional embedding and causal mask cut to L), which for ~15-token prompts in a
    77-token context is several times faster. Every other tower runs ``model.encode_text`` at the full context:
    bidirectional ones (``no_causal_mask``), other pooling (``first``, ``last``, ``eos``, ``none``),
    ``CustomTextCLIP`` (Hugging Face and custom text towers), CoCa, and subclasses that override ``encode_text``.

    Args:
        model: An open_clip model.
        tokens: N x T token ids (T: the tokenizer's context length).

    Returns:
        N x D text embeddings, not normalised, in the model's dtype.
    """
    if not encodes_at_prompt_length(model):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    text = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, text, "argmax")
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x if model.text_projection is None else x @ model.text_projection


def text_embedding_width(model: torch.nn.Module) -> int:
    """D, the width of ``model.encode_text``'s embeddings, read off the text tower without encoding anything.

    Args:
        model: An open_clip ``CLIP`` (text projection: a D-column matrix, a Linear, or None: the transformer
            width) or ``CustomTextCLIP`` (its ``text`` tower's ``output_dim``).
    """
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "output_dim"):
        return int(text.output_dim)
    proj = model.text_projection
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    return int(model.ln_final.normalized_shape[0] if proj is None else proj.shape[1])


@dataclass
class ClassEmbeddings:
    """Text embeddings of a class list in which each class may have several synonyms.

    Attributes:
        embeddings: S x D l2-normalised embeddings, one per synonym.
        class_index: S class index of each synonym (in 0..C-1).
        class_names: C display names (first synonym of each class).
    """

    embeddings: torch.Tensor
    class_index: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine scores of dense features against every class (max over its synonyms).

        Args:
            features: B x D x H x W features (not necessarily normalised).

        Returns:
            B x C x H x W cosine similarities.
        """
        return self.reduce_synonyms(self.similarities(features))

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine scores of dense features against every synonym.

        Args:
            features: B x D x H x W features (not necessarily normalised).

        Returns:
            B x S x H x W cosine similarities, in the order of ``embeddings``.
        """
        feats = F.normalize(features, dim=1)
        return torch.einsum("bdhw,sd->bshw", feats, self.embeddings.to(feats.dtype))

    def reduce_synonyms(self, sims: torch.Tensor) -> torch.Tensor:
        """B x S x ... synonym scores -> B x C x ... class scores (max over each class's synonyms)."""
        if sims.shape[1] == self.num_classes:
            return sims
        index = self.class_index.to(sims.device).view(1, -1, *([1] * (sims.dim() - 2))).expand_as(sims)
        out = sims.new_full((sims.shape[0], self.num_classes, *sims.shape[2:]), float("-inf"))
        return out.scatter_reduce(1, index, sims, reduce="amax")


class TextEmbedder:
    """Encodes class names with a CLIP text tower, with template ensembles and two caches.

    Both caches are keyed by (model weights, templates, name), so a name is encoded once per model and template
    set: in memory (an LRU of ``max_cache`` names) and on disk (a
    :class:`~clipdense.clip.text_cache.TextEmbeddingCache` shared by all processes). The disk cache is used only
    for weights whose fingerprint names the same weights in every run: a pretrained tag, the shipped weights or a
    checkpoint file (path, size and modification time). Random weights (``pretrained=None``) and
    ``hf-hub:``/``local-dir:`` models (fingerprinted by name only, whatever the folder holds) are never written
    to disk.

    Args:
        clip: A loaded CLIP model.
        templates: Template-set name or format strings (see :func:`resolve_templates`).
        chunk_size: Prompts encoded per text-tower call (bounds memory for large vocabularies).
        max_cache: Names kept in the in-memory cache.
        disk_cache: Use the on-disk cache. ``CLIPDENSE_NO_CACHE=1`` turns it off too; ``CLIPDENSE_CACHE`` moves it.
    """

    def __init__(
        self,
        clip: LoadedCLIP,
        templates: str | Sequence[str] = "ensemble",
        chunk_size: int = 256,
        max_cache: int = 10000,
        disk_cache: bool = True,
    ) -> None:
        self.clip = clip
        self.templates = resolve_templates(templates)
        self.chunk_size = chunk_size
        self.max_cache = max_cache
        self._cache: OrderedDict[tuple[str, tuple[str, ...], str], torch.Tensor] = OrderedDict()
        stable = clip.pretrained is not None  # see the class docstring
        self.disk = TextEmbeddingCache() if disk_cache and stable and not cache_disabled() else None
        # The fingerprint names the weights file; QuickGELU and precision change the embeddings too.
        dtype = next(clip.model.parameters()).dtype
        self._disk_key = f"{clip.fingerprint}|quick_gelu={clip.quick_gelu}|{dtype}"

    @torch.inference_mode()
    def _encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """P x D l2-normalised embeddings, a P-long mask of prompts that filled the whole context (the
        tokenizer cut them), and the context length in tokens."""
        model = self.clip.model
        device = next(model.parameters()).device
        tokens = self.clip.tokenizer(prompts)
        # Chunks of about equally long prompts: encode_text then computes few positions past their ends.
        order = torch.argsort((tokens != 0).sum(dim=1), stable=True)
        out = []
        with tqdm(
            total=len(prompts), desc="text", unit="prompt", disable=len(prompts) <= _PROGRESS_PROMPTS or None
        ) as bar:
            for i in range(0, len(prompts), self.chunk_size):
                chunk = tokens[order[i : i + self.chunk_size]].to(device)
                out.append(F.normalize(encode_text(model, chunk).float(), dim=-1))
                bar.update(len(chunk))
        emb = torch.cat(out)
        return emb[order.argsort().to(device)], tokens[:, -1] != 0, tokens.shape[1]

    def _encode_new(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Template-ensemble embeddings of distinct names: name -> D, l2-normalised."""
        prompts = [t.format(n) for n in names for t in self.templates]
        emb, full, context = self._encode_prompts(prompts)
        emb = emb.view(len(names), len(self.templates), -1)
        for n, cut in zip(names, full.view(len(names), -1).any(dim=1).tolist(), strict=True):
            if cut:
                logger.warning(
                    "class name %r (%d characters) does not fit the text encoder's %d-token context in its "
                    "prompts: it is cut short. Use a shorter name (synonyms go after commas)",
                    n if len(n) <= 60 else n[:57] + "...", len(n), context,
                )  # fmt: skip
        return dict(zip(names, F.normalize(emb.mean(dim=1), dim=-1), strict=True))

    def encode_names(self, names: Sequence[str]) -> torch.Tensor:
        """Embed plain names (no synonyms): N x D, l2-normalised template-ensemble means."""
        key = lambda n: (self.clip.fingerprint, self.templates, n)  # noqa: E731
        found = {n: self._cache[key(n)] for n in names if key(n) in self._cache}
        todo = [n for n in dict.fromkeys(names) if n not in found]
        if todo and self.disk is not None:
            device = next(self.clip.model.parameters()).device
            stored = self.disk.load(self._disk_key, self.templates)
            found.update({n: stored[n].to(device) for n in todo if n in stored})
            todo = [n for n in todo if n not in found]
        if todo:
            new = self._encode_new(todo)
            found.update(new)
            if self.disk is not None:
                self.disk.save(self._disk_key, self.templates, new)
        for n, e in found.items():
            self._cache[key(n)] = e
            self._cache.move_to_end(key(n))
            if len(self._cache) > self.max_cache:
                self._cache.popitem(last=False)
        return torch.stack([found[n] for n in names])

    def encode_classes(self, classes: Sequence[str]) -> ClassEmbeddings:
        """Embed a class list; each entry may hold comma-separated synonyms.

        Args:
            classes: C entries such as ``["cat, kitty", "grass", "sky"]``.

        Returns:
            The S synonym embeddings with their class index.
        """
        if not classes:
            raise ValueError("the class list is empty: name at least one class")
        synonyms = [split_synonyms(c) for c in classes]
        if not all(synonyms):
            raise ValueError(f"empty class entry in {list(classes)}")
        names = [s[0] for s in synonyms]
        lowered = [n.lower() for n in names]
        dupes = sorted({n for n in lowered if lowered.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate classes in the class list: {dupes}")
        flat = [w for s in synonyms for w in s]
        index = torch.tensor([i for i, s in enumerate(synonyms) for _ in s], dtype=torch.long)
        return ClassEmbeddings(self.encode_names(flat), index, names)


def class_text_embeddings(loaded: LoadedCLIP, class_names: Sequence[str], templates="ensemble") -> torch.Tensor:
    """C x D l2-normalised CLIP text embeddings (template ensemble; a class with synonyms gets the
    renormalised mean of its synonyms' embeddings)."""
    emb = TextEmbedder(loaded, templates).encode_classes(list(class_names))
    out = torch.zeros(emb.num_classes, emb.embeddings.shape[1]).index_add_(0, emb.class_index, emb.embeddings.float())
    return F.normalize(out, dim=-1)


def tokenize_class_names(tokenizer: Callable, class_names: Sequence[str], context_length: int = 5) -> torch.Tensor:
    """Tokenize display names with SOT/EOT in ``context_length`` tokens (DenseCLIP: 5).

    Args:
        tokenizer: An open_clip tokenizer (``tokenizer(texts, context_length=...)``).
        class_names: K class entries; entries with synonyms (``"person, people"``) use their first name.
        context_length: Tokens per name, SOT and EOT included.

    Returns:
        K x context_length token ids. Names that do not fit are truncated (EOT kept) with a warning.
    """
    names = [display_name(c) for c in class_names]
    full = tokenizer(names)
    too_long = [n for n, row in zip(names, full, strict=True) if int((row != 0).sum()) > context_length]
    if too_long:
        logger.warning(
            "%d class names exceed %d tokens with SOT/EOT and are truncated: %s",
            len(too_long),
            context_length,
            too_long[:5],
        )
    return tokenizer(names, context_length=context_length)
