"""PLOT (Chen et al., ICLR 2023), CoOp (Zhou et al., IJCV 2022) and CoCoOp (Zhou et al., CVPR 2022): few-shot
prompt learning for CLIP classification.

CoOp learns ``n_ctx`` context vectors that replace a hand-written template ("a photo of a") in front of each class
name; the frozen CLIP text encoder turns the C prompts into class embeddings, compared with the global image
feature by cosine similarity. CoCoOp shifts the contexts per image by a small meta-net of the image feature. PLOT
learns N such prompt sets and compares the N text features of a class with CLIP's M *local* image features (the
attention pool at every position for ResNets, the projected patch tokens for ViTs) by entropic optimal transport:
cost 1 - cos, Sinkhorn with uniform marginals, the plan held constant for back-propagation,
logit = exp(logit_scale) * sum_mn T_mn cos_mn.

Where the papers leave a detail open, the authors' code decides (``CHENGY12/PLOT`` ``plot-coop/trainers/plot.py``,
``KaiyangZhou/CoOp`` ``trainers/coop.py`` and ``trainers/cocoop.py``): prompts "X X ... X <name>." with the Xs'
embeddings replaced, text features N-major (prompt set, then class), the Sinkhorn loop and its stopping rule
(:func:`sinkhorn`), CLIP frozen and in eval mode (only the contexts, and CoCoOp's meta-net, are trained; BatchNorm
statistics stay CLIP's), no global-feature term except for ImageNet (``global_logits``).

Everything here is a pure ``nn.Module``; the builders load CLIP through :func:`clipdense.clip.loading.load_clip`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.clip.dense import dense_clip_encoder
from clipdense.clip.loading import LoadedCLIP, load_clip
from clipdense.data.classnames import display_name
from clipdense.models._build import DEFAULT_PRETRAINED, check_classes
from clipdense.models.registry import register_model
from clipdense.models.text import FrozenCLIPTextEncoder

#: Where the class name goes relative to the learned contexts (CoOp's ``CLASS_TOKEN_POSITION``).
CLASS_TOKEN_POSITIONS: tuple[str, ...] = ("end", "middle", "front")

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- optimal transport


@torch.no_grad()
def sinkhorn(
    kernel: torch.Tensor, u: torch.Tensor, v: torch.Tensor, max_iter: int = 100, thresh: float = 1e-2
) -> torch.Tensor:
    """Entropic optimal-transport plans by Sinkhorn-Knopp iterations, as PLOT's ``Sinkhorn``.

    Starting from r = 1, c = 1, each iteration sets r = u / (K c), then c = v / (K^T r), and stops once the mean
    absolute change of r over the whole batch (all problems together, as the official code) is below ``thresh``,
    or after ``max_iter`` iterations. The plan is diag(r) K diag(c): its column marginals are exactly ``v`` (c is
    updated last), its row marginals ``u`` up to the stopping tolerance. No gradient flows through it.

    Args:
        kernel: P x M x N Gibbs kernels K = exp(-C / eps) of P problems.
        u: P x M row marginals (PLOT: 1/M, the local image features).
        v: P x N column marginals (PLOT: 1/N, the prompts).
        max_iter: Most iterations (PLOT: 100).
        thresh: Stop when mean |r - r_prev| < thresh (PLOT: 1e-2); 0 runs all ``max_iter`` iterations.

    Returns:
        P x M x N transport plans.
    """
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    kernel_t = kernel.transpose(-2, -1)
    for _ in range(max_iter):
        r_prev = r
        r = u / torch.matmul(kernel, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(kernel_t, r.unsqueeze(-1)).squeeze(-1)
        if (r - r_prev).abs().mean().item() < thresh:
            break
    return r.unsqueeze(-1) * kernel * c.unsqueeze(-2)


def transport_plans(
    local: torch.Tensor, text: torch.Tensor, eps: float = 0.1, max_iter: int = 100, thresh: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOT's cosines and transport plans between M local image features and the N prompts of every class.

    Args:
        local: B x M x D l2-normalised local image features.
        text: N x C x D l2-normalised text features (N prompt sets, C classes).
        eps: Entropic regularisation (PLOT: 0.1).
        max_iter: Sinkhorn iterations at most.
        thresh: Sinkhorn stopping threshold (see :func:`sinkhorn`).

    Returns:
        (B x C x M x N cosines cos_mn, differentiable; B x C x M x N plans T_mn, constant): the plan of class c
        moves mass 1/M out of every local feature and exactly 1/N into every prompt.
    """
    sim = torch.einsum("bmd,ncd->bcmn", local, text)
    return sim, similarity_plans(sim, eps, max_iter, thresh)


@torch.no_grad()
def similarity_plans(sim: torch.Tensor, eps: float = 0.1, max_iter: int = 100, thresh: float = 1e-2) -> torch.Tensor:
    """PLOT's transport plans for given similarities: cost 1 - sim, uniform marginals, all B x C problems in one
    Sinkhorn run (so the stopping rule is the batch's, as the official code).

    Args:
        sim: B x C x M x N similarities between M sources (local image features) and N targets (prompts).
        eps, max_iter, thresh: See :func:`transport_plans`.

    Returns:
        B x C x M x N plans, constant (no gradient).
    """
    b, c, m, n = sim.shape
    flat = sim.reshape(b * c, m, n)
    kernel = torch.exp(-(1.0 - flat) / eps)
    u = flat.new_full((b * c, m), 1.0 / m)
    v = flat.new_full((b * c, n), 1.0 / n)
    return sinkhorn(kernel, u, v, max_iter, thresh).view(b, c, m, n)


def ot_similarity(
    local: torch.Tensor, text: torch.Tensor, eps: float = 0.1, max_iter: int = 100, thresh: float = 1e-2
) -> torch.Tensor:
    """PLOT's transport similarity between M local image features and the N prompt features of every class.

    Args:
        local: B x M x D l2-normalised local image features.
        text: N x C x D l2-normalised text features (N prompt sets, C classes).
        eps, max_iter, thresh: See :func:`transport_plans`.

    Returns:
        B x C similarities sum_mn T_mn cos_mn (= 1 - the OT distance with cost 1 - cos); differentiable in the
        features, with the plans T constant.
    """
    sim, plan = transport_plans(local, text, eps, max_iter, thresh)
    return (plan * sim).sum(dim=(2, 3))


@dataclass
class TransportExplanation:
    """What PLOT's transport plans say about the top classes of B images (see :meth:`PLOT.explain`).

    Attributes:
        logits: B x C logits (those of :meth:`PLOT.forward`).
        classes: B x K class indices, best first.
        plans: B x K x N x h x w: the mass that prompt set n receives from each cell of the h x w feature grid in
            class k's plan; each prompt's map sums to 1/N (its share of the transported mass).
        shares: B x K x N: prompt set n's part of the class's transport similarity, sum_m T_mn cos_mn over
            sum_mn T_mn cos_mn (sums to 1 over n; the global term of ``global_logits`` is not included).
    """

    logits: torch.Tensor
    classes: torch.Tensor
    plans: torch.Tensor
    shares: torch.Tensor


# ------------------------------------------------------------------------------------------- prompts


class PromptLearner(nn.Module):
    """CoOp's learnable contexts, for N prompt sets (PLOT; N = 1 is CoOp).

    Each class's prompt is tokenized as "X X ... X <name>." (or "<init words> <name>.") and the embeddings of the
    ``n_ctx`` context tokens are replaced by learned vectors. Only ``ctx`` is a parameter; the token ids are a
    buffer, and their embeddings are looked up in CLIP's (frozen) token embedding at every call, so that the
    learner's state is the contexts and the ids only.

    Args:
        tokenizer: open_clip tokenizer (``tokenizer(list_of_texts)`` -> T x context_length ids).
        class_names: C class names (entries with synonyms are prompted with their first name; ``_`` -> space).
        width: Token width of the text transformer.
        n_ctx: Number of context vectors (CoOp/PLOT: 16). Ignored when ``ctx_init`` is given (see
            ``ctx_init_length``).
        ctx_init: Words whose token embeddings initialise the contexts (e.g. "a photo of a"); None draws them from
            N(0, ``ctx_std``^2).
        token_embedding: CLIP's token embedding, needed to initialise from ``ctx_init`` only.
        class_specific: One context per class (CoOp's CSC) instead of one shared by all classes.
        ctx_init_length: How an init phrase sets the contexts. ``words`` (the official code): as many contexts as
            the phrase has space-separated words, initialised from its first that many BPE tokens (a word of
            several tokens leaves the phrase's last tokens fixed, between the contexts and the class name), and
            one context shared by the classes even with ``class_specific`` (CSC is ignored with an init).
            ``tokens``: one context per BPE token of the phrase, all learned, and per class with
            ``class_specific``.
        class_token_position: ``end``, ``middle`` or ``front``.
        n_prompts: N prompt sets (PLOT: 4). Their contexts must differ, so N > 1 needs the random initialisation.
        ctx_std: Std of the random initialisation (0.02).
    """

    def __init__(
        self,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str],
        width: int,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        token_embedding: nn.Embedding | None = None,
        class_specific: bool = False,
        class_token_position: str = "end",
        n_prompts: int = 1,
        ctx_std: float = 0.02,
        ctx_init_length: str = "words",
    ) -> None:
        super().__init__()
        if ctx_init_length not in ("words", "tokens"):
            raise ValueError(f"unknown ctx_init_length {ctx_init_length!r}; use 'words' or 'tokens'")
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"unknown class_token_position {class_token_position!r}; use one of {CLASS_TOKEN_POSITIONS}"
            )
        if n_prompts < 1 or n_ctx < 1:
            raise ValueError(f"n_prompts and n_ctx must be >= 1, got {n_prompts} and {n_ctx}")
        names = [display_name(c).replace("_", " ") for c in class_names]
        if not names:
            raise ValueError("the class list is empty")
        if ctx_init:
            if n_prompts > 1:
                raise ValueError(
                    "PLOT's N prompt sets would stay identical from one init (their transport plans and gradients are "
                    "symmetric): use the random initialisation (ctx_init=None) with n_prompts > 1"
                )
            if token_embedding is None:
                raise ValueError("ctx_init needs CLIP's token_embedding")
            prefix = " ".join(ctx_init.replace("_", " ").split())
            init_ids = tokenizer([prefix])[0]
            n_ctx = len(prefix.split(" ")) if ctx_init_length == "words" else int((init_ids != 0).sum()) - 2
            with torch.no_grad():
                init = token_embedding(init_ids[1 : 1 + n_ctx]).float()
            if class_specific and ctx_init_length == "words":
                logger.warning("class_specific is ignored with ctx_init, as in the official code (one context "
                               "shared by the classes); ctx_init_length='tokens' keeps one per class")  # fmt: skip
            count = len(names) if class_specific and ctx_init_length == "tokens" else 1
            ctx = init[None, None].repeat(n_prompts, count, 1, 1)
        else:
            prefix = " ".join(["X"] * n_ctx)
            ctx = torch.empty(n_prompts, len(names) if class_specific else 1, n_ctx, width)
            nn.init.normal_(ctx, std=ctx_std)
        token_ids = tokenizer([f"{prefix} {name}." for name in names])
        if (token_ids[:, -1] != 0).any():
            raise ValueError(
                f"a prompt of {n_ctx} contexts and a class name does not fit the text encoder's {token_ids.shape[1]} "
                "tokens: use fewer contexts or shorter class names"
            )
        # Causal attention: positions after the longest prompt's EOT never change a feature, so they are dropped.
        length = int(token_ids.argmax(dim=-1).max()) + 1
        self.register_buffer("token_ids", token_ids[:, :length].long().clone())
        self.name_lens = [int((tokenizer([n])[0] != 0).sum()) - 2 for n in names]
        self.ctx = nn.Parameter(ctx)  # N x (C or 1) x n_ctx x width
        self.n_ctx, self.n_prompts, self.class_token_position = n_ctx, n_prompts, class_token_position
        self.class_names = names

    @property
    def num_classes(self) -> int:
        return self.token_ids.shape[0]

    @property
    def eot_index(self) -> torch.Tensor:
        """(N*C) positions of the EOT token, N-major."""
        return self.token_ids.argmax(dim=-1).repeat(self.n_prompts)

    def forward(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Insert the contexts into the embedded class prompts.

        Args:
            token_embeddings: C x L x width embeddings of ``token_ids``.

        Returns:
            (N*C) x L x width prompt embeddings, N-major (prompt set n's class k at row n*C + k).
        """
        n, k = self.n_prompts, self.num_classes
        ctx = self.ctx.to(token_embeddings.dtype).expand(n, k, -1, -1)
        tokens = token_embeddings[None].expand(n, -1, -1, -1)
        prefix, suffix = tokens[:, :, :1], tokens[:, :, 1 + self.n_ctx :]
        if self.class_token_position == "end":
            out = torch.cat([prefix, ctx, suffix], dim=2)
        else:
            half = self.n_ctx // 2
            rows = []
            for i, length in enumerate(self.name_lens):
                name, rest = suffix[:, i, :length], suffix[:, i, length:]
                if self.class_token_position == "middle":
                    parts = [prefix[:, i], ctx[:, i, :half], name, ctx[:, i, half:], rest]
                else:
                    parts = [prefix[:, i], name, ctx[:, i], rest]
                rows.append(torch.cat(parts, dim=1))
            out = torch.stack(rows, dim=1)
        return out.reshape(n * k, *out.shape[2:])

    def split_shared_prefix(self, token_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prompts as a prefix shared by all classes and per-class suffixes, when they have one.

        With unified contexts and the class name at the end, prompt set n's prompts all begin with [SOT] + its
        contexts: :meth:`FrozenCLIPTextEncoder.forward_shared_prefix` runs that prefix once instead of C times.

        Args:
            token_embeddings: C x L x width embeddings of ``token_ids``.

        Returns:
            (N x (1 + n_ctx) x width prefixes, C x (L - 1 - n_ctx) x width suffixes), or None for class-specific
            contexts and class names elsewhere than at the end.
        """
        if self.class_token_position != "end" or self.ctx.shape[1] != 1:
            return None
        n = self.n_prompts
        sot = token_embeddings[:1, :1].expand(n, -1, -1)
        prefix = torch.cat([sot, self.ctx[:, 0].to(token_embeddings.dtype)], dim=1)
        return prefix, token_embeddings[:, 1 + self.n_ctx :]


# ------------------------------------------------------------------------------------------- classifiers


class _PromptClassifier(nn.Module):
    """What CoOp and PLOT share: the prompt learner, CLIP's frozen text encoder and a text-feature cache.

    CLIP stays frozen and in eval mode whatever ``train()`` is asked (only ``prompt_learner.ctx`` is trained). After
    training the text features are constant: :meth:`cache_text_features` keeps them so that inference runs no text
    encoder; the cache is dropped by ``train()`` and by loading a state dict, and it is never saved.
    """

    def __init__(self, clip_model: nn.Module, prompt_learner: PromptLearner) -> None:
        super().__init__()
        self.prompt_learner = prompt_learner
        self.text_encoder = FrozenCLIPTextEncoder(clip_model, prompt_learner.token_ids.shape[1])
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().clone().reshape(()))
        self.register_buffer("text_cache", None, persistent=False)
        self.register_load_state_dict_pre_hook(lambda module, *args: module.clear_text_cache())
        self.class_names = list(prompt_learner.class_names)

    @property
    def num_classes(self) -> int:
        return self.prompt_learner.num_classes

    def frozen_modules(self) -> list[nn.Module]:
        """The CLIP parts (kept in eval mode and without gradients)."""
        return [self.text_encoder]

    def train(self, mode: bool = True) -> _PromptClassifier:
        super().train(mode)
        if mode:
            self.clear_text_cache()
        for m in self.frozen_modules():
            m.train(False)
        return self

    def clear_text_cache(self) -> None:
        self.text_cache = None

    @torch.no_grad()
    def cache_text_features(self) -> torch.Tensor:
        """Compute and keep the (N*C) x D text features of the learned contexts; returns them l2-normalised."""
        self.text_cache = None
        self.text_cache = self.raw_text_features()
        return self.text_features()

    def text_features(self) -> torch.Tensor:
        """(N*C) x D l2-normalised prompt features (N-major)."""
        return F.normalize(self.raw_text_features(), dim=-1)

    def raw_text_features(self) -> torch.Tensor:
        """(N*C) x D prompt features as the text encoder gives them, before normalisation; the cache when present."""
        if self.text_cache is not None:
            return self.text_cache
        pl = self.prompt_learner
        embedded = self.text_encoder.token_embedding(pl.token_ids).to(self.text_encoder.positional_embedding.dtype)
        split = pl.split_shared_prefix(embedded)
        if split is not None:
            text = self.text_encoder.forward_shared_prefix(*split, pl.token_ids.argmax(dim=-1)).flatten(0, 1)
        else:
            text = self.text_encoder(pl(embedded), pl.eot_index)
        return text


class CoOp(_PromptClassifier):
    """CoOp: learned prompts against CLIP's global image feature.

    Args:
        clip_model: open_clip ``CLIP`` (frozen; its image tower and text tower are used).
        prompt_learner: The contexts (``n_prompts`` 1).
    """

    def __init__(self, clip_model: nn.Module, prompt_learner: PromptLearner) -> None:
        super().__init__(clip_model, prompt_learner)
        if prompt_learner.n_prompts != 1:
            raise ValueError("CoOp learns one prompt set; use PLOT for n_prompts > 1")
        self.visual = clip_model.visual
        self.visual.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.text_encoder, self.visual]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised images -> B x D l2-normalised global features (CLIP's ``encode_image``)."""
        with torch.no_grad():
            return F.normalize(self.visual(images.to(self.logit_scale.dtype)), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            B x C logits exp(logit_scale) * cos(image, class prompt).
        """
        return self.logit_scale.exp() * self.image_features(images) @ self.text_features().t()


class CoCoOp(CoOp):
    """CoCoOp (Zhou et al., CVPR 2022): CoOp's contexts shifted per image by a meta-net of its global feature.

    As the official ``trainers/cocoop.py``: pi = meta_net(f) with f the l2-normalised global image feature,
    meta_net = Linear(D, D/16) -> ReLU -> Linear(D/16, width), and every context vector becomes ctx + pi; so each
    image has its own C prompts, and the text encoder runs per image (in training and inference: there are no
    constant text features to cache). The shared [SOT] + contexts prefix runs once per image, not once per class.

    Args:
        clip_model: open_clip ``CLIP`` (frozen).
        prompt_learner: One prompt set of unified contexts with the class name at the end (CoCoOp: 4 contexts
            initialised from "a photo of a").
    """

    def __init__(self, clip_model: nn.Module, prompt_learner: PromptLearner) -> None:
        super().__init__(clip_model, prompt_learner)
        if prompt_learner.ctx.shape[1] != 1 or prompt_learner.class_token_position != "end":
            raise ValueError("CoCoOp's contexts are shared by the classes (not class-specific) and the class name "
                             "is at the end (class_token_position='end')")  # fmt: skip
        dim, width = clip_model.visual.output_dim, prompt_learner.ctx.shape[-1]
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(dim, dim // 16), relu=nn.ReLU(inplace=True), linear2=nn.Linear(dim // 16, width)
            )
        )

    def cache_text_features(self) -> None:
        """Nothing to cache: CoCoOp's text features depend on the image."""
        return None

    def text_features(self, image_features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """B x D normalised image features -> B x C x D l2-normalised features of each image's prompts."""
        pl = self.prompt_learner
        embedded = self.text_encoder.token_embedding(pl.token_ids).to(self.text_encoder.positional_embedding.dtype)
        prefix, suffix = pl.split_shared_prefix(embedded)  # 1 x (1 + n_ctx) x width: [SOT] + contexts
        shift = self.meta_net(image_features.to(prefix.dtype))[:, None].expand(-1, pl.n_ctx, -1)
        prefix = prefix + F.pad(shift, (0, 0, 1, 0))  # B x (1 + n_ctx) x width; SOT unshifted
        text = self.text_encoder.forward_shared_prefix(prefix, suffix, pl.token_ids.argmax(dim=-1))
        return F.normalize(text, dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            B x C logits exp(logit_scale) * cos(image, the image's prompt of the class).
        """
        feats = self.image_features(images)
        if torch.is_grad_enabled():
            text = self.text_features(feats)
        else:  # bound the B x C prompts of one pass (evaluation batches of 100 images x 1000 ImageNet classes)
            text = torch.cat([self.text_features(f) for f in feats.split(max(1, 4096 // self.num_classes))])
        return self.logit_scale.exp() * torch.einsum("bd,bcd->bc", feats.to(text.dtype), text)


class PLOT(_PromptClassifier):
    """PLOT: N learned prompt sets matched to CLIP's local image features by optimal transport.

    Args:
        clip_model: open_clip ``CLIP`` (frozen).
        prompt_learner: The contexts of the N prompt sets.
        eps: Entropic regularisation of the Sinkhorn iterations (0.1).
        max_iter: Sinkhorn iterations at most (100).
        thresh: Sinkhorn stopping threshold on the mean change of the scaling vector (1e-2).
        global_logits: Add CoOp-style logits of the global image feature against the mean of the N prompt
            features. The official code does so for ImageNet only (off by default).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        prompt_learner: PromptLearner,
        eps: float = 0.1,
        max_iter: int = 100,
        thresh: float = 1e-2,
        global_logits: bool = False,
    ) -> None:
        super().__init__(clip_model, prompt_learner)
        # The local features: the attention pool with every position as a query (ResNet), or the projected
        # patch tokens (ViT); "vanilla" keeps CLIP's own attention, so the global feature is encode_image's.
        self.image_encoder = dense_clip_encoder(clip_model.visual, "vanilla")
        self.image_encoder.requires_grad_(False)
        self.eps, self.max_iter, self.thresh, self.global_logits = eps, max_iter, thresh, global_logits

    def frozen_modules(self) -> list[nn.Module]:
        return [self.text_encoder, self.image_encoder]

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 3 x H x W normalised images -> (B x D global, B x M x D local) l2-normalised features."""
        return self._encode(images)[:2]

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(B x D global, B x M x D local features, both l2-normalised; the h x w grid of the M = h * w)."""
        feats = self.image_encoder(images.to(self.logit_scale.dtype))
        local = feats.dense.flatten(2).transpose(1, 2)
        grid = (int(feats.dense.shape[-2]), int(feats.dense.shape[-1]))
        return F.normalize(feats.global_embed, dim=-1), F.normalize(local, dim=-1), grid

    def logits_from_features(
        self, global_feat: torch.Tensor, local: torch.Tensor, text: torch.Tensor, global_logits: bool | None = None
    ) -> torch.Tensor:
        """Args:
            global_feat: B x D normalised global image features (used with the global term only).
            local: B x M x D normalised local features.
            text: (N*C) x D prompt features before normalisation (:meth:`raw_text_features`), N-major.
            global_logits: Add the global term (None: the model's ``global_logits``; PLOT-Adapter always adds it).

        Returns:
            B x C logits.
        """
        text = text.view(self.prompt_learner.n_prompts, self.num_classes, -1)
        plans = transport_plans(local, F.normalize(text, dim=-1), self.eps, self.max_iter, self.thresh)
        return self._logits(global_feat, text, *plans, self.global_logits if global_logits is None else global_logits)

    def _logits(
        self, global_feat: torch.Tensor, text: torch.Tensor, sim: torch.Tensor, plan: torch.Tensor, with_global: bool
    ) -> torch.Tensor:
        """B x C logits from the N x C x D prompt features (before normalisation) and the B x C x M x N cosines and
        plans. The global term pools the prompts as the official code: the mean of the N raw prompt features, then
        normalised (not the mean of the normalised ones)."""
        scale = self.logit_scale.exp()
        logits = scale * (plan * sim).sum(dim=(2, 3))
        if with_global:
            logits = logits + scale * global_feat @ F.normalize(text.mean(dim=0), dim=-1).t()
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            B x C logits exp(logit_scale) * sum_mn T_mn cos(local_m, prompt_n of the class).
        """
        global_feat, local = self.image_features(images)
        return self.logits_from_features(global_feat, local, self.raw_text_features())

    @torch.no_grad()
    def explain(self, images: torch.Tensor, top_k: int = 3) -> TransportExplanation:
        """The transport plans of the top classes, as maps over the feature grid (the talk's "what PLOT learns").

        Args:
            images: B x 3 x H x W normalised images.
            top_k: Classes explained per image (at most C).

        Returns:
            The :class:`TransportExplanation`; ``plans`` are on CLIP's h x w feature grid (7 x 7 for RN50 at 224 px),
            row-major as the local features.
        """
        global_feat, local, (h, w) = self._encode(images)
        text = self.raw_text_features().view(self.prompt_learner.n_prompts, self.num_classes, -1)
        sim, plan = transport_plans(local, F.normalize(text, dim=-1), self.eps, self.max_iter, self.thresh)  # forward's
        logits = self._logits(global_feat, text, sim, plan, self.global_logits)
        classes = logits.topk(min(top_k, self.num_classes), dim=-1).indices  # B x K
        pick = classes[:, :, None, None].expand(-1, -1, *plan.shape[2:])
        sim, plan = sim.gather(1, pick), plan.gather(1, pick)  # B x K x M x N
        per_prompt = (plan * sim).sum(dim=2)  # B x K x N
        shares = per_prompt / per_prompt.sum(dim=-1, keepdim=True)
        b, k = classes.shape
        maps = plan.transpose(2, 3).reshape(b, k, -1, h, w)
        return TransportExplanation(logits, classes, maps, shares)


class ZeroShotClassifier(nn.Module):
    """Zero-shot CLIP: the global image feature against fixed class text embeddings (the few-shot baseline).

    Args:
        clip_model: open_clip ``CLIP`` (its image tower is used).
        text_features: C x D l2-normalised class embeddings (e.g. :func:`clipdense.clip.text.class_text_embeddings`).
    """

    def __init__(self, clip_model: nn.Module, text_features: torch.Tensor) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.register_buffer("text", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().clone().reshape(()))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised images -> B x C logits."""
        feats = F.normalize(self.visual(images.to(self.logit_scale.dtype)), dim=-1)
        return self.logit_scale.exp() * feats @ self.text.t()


# ------------------------------------------------------------------------------------------- builders

#: Few-shot methods and the model class of each.
METHODS: dict[str, type[_PromptClassifier]] = {"coop": CoOp, "cocoop": CoCoOp, "plot": PLOT}


def build_prompt_classifier(
    method: str,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    n_ctx: int = 16,
    ctx_init: str | None = None,
    class_specific: bool = False,
    class_token_position: str = "end",
    n_prompts: int | None = None,
    ctx_std: float = 0.02,
    ctx_init_length: str = "words",
    eps: float = 0.1,
    max_iter: int = 100,
    thresh: float = 1e-2,
    global_logits: bool = False,
) -> CoOp | CoCoOp | PLOT:
    """Build CoOp, CoCoOp or PLOT over a CLIP model.

    Args:
        method: ``coop``, ``cocoop`` or ``plot``.
        class_names: C class names (required: the prompts contain them).
        num_classes: C, checked against the names.
        pretrained: CLIP weights (see :func:`clipdense.clip.loading.load_clip`).
        clip_model: CLIP architecture (``RN50``, ``ViT-B-16``, ``ShapesCLIP-RN``, ...).
        n_ctx, ctx_init, class_specific, class_token_position, ctx_std, ctx_init_length: See
            :class:`PromptLearner`.
        n_prompts: Prompt sets N (default: 1 for CoOp, 4 for PLOT).
        eps, max_iter, thresh, global_logits: PLOT only; see :class:`PLOT`.

    Returns:
        The model, CLIP frozen; its ``image_size``, ``image_mean`` and ``image_std`` say how to preprocess images.
    """
    if method not in METHODS:
        raise ValueError(f"unknown few-shot method {method!r}; use one of {sorted(METHODS)}")
    names = check_classes(class_names, num_classes, need_names=True)
    options = dict(n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific,
                   class_token_position=class_token_position, n_prompts=n_prompts, ctx_std=ctx_std,
                   ctx_init_length=ctx_init_length, eps=eps, max_iter=max_iter, thresh=thresh,
                   global_logits=global_logits)  # fmt: skip
    return prompt_classifier_from_clip(method, load_clip(clip_model, pretrained), names, **options)


def prompt_classifier_from_clip(
    method: str,
    loaded: LoadedCLIP,
    names: Sequence[str],
    n_ctx: int = 16,
    ctx_init: str | None = None,
    class_specific: bool = False,
    class_token_position: str = "end",
    n_prompts: int | None = None,
    ctx_std: float = 0.02,
    ctx_init_length: str = "words",
    eps: float = 0.1,
    max_iter: int = 100,
    thresh: float = 1e-2,
    global_logits: bool = False,
) -> CoOp | CoCoOp | PLOT:
    """:func:`build_prompt_classifier` over a CLIP already loaded (its weights become the classifier's, frozen)."""
    if method == "cocoop" and class_specific:
        raise ValueError("CoCoOp's contexts are shared by the classes (not class-specific)")
    model = loaded.model
    model.requires_grad_(False)
    n_prompts = n_prompts if n_prompts is not None else (4 if method == "plot" else 1)
    learner = PromptLearner(
        loaded.tokenizer,
        names,
        width=model.token_embedding.weight.shape[1],
        n_ctx=n_ctx,
        ctx_init=ctx_init,
        token_embedding=model.token_embedding,
        class_specific=class_specific,
        class_token_position=class_token_position,
        n_prompts=n_prompts,
        ctx_std=ctx_std,
        ctx_init_length=ctx_init_length,
    )
    if method in ("coop", "cocoop"):
        out: CoOp | CoCoOp | PLOT = METHODS[method](model, learner)
    else:
        out = PLOT(model, learner, eps=eps, max_iter=max_iter, thresh=thresh, global_logits=global_logits)
    out.image_size, out.image_mean, out.image_std = loaded.image_size, tuple(loaded.mean), tuple(loaded.std)
    return out.train(False)


@register_model
def coop_rn50(**kw) -> CoOp:
    """CoOp over CLIP RN50 (16 shared contexts, class token at the end)."""
    return build_prompt_classifier("coop", **{"clip_model": "RN50", **kw})


@register_model
def coop_vitb16(**kw) -> CoOp:
    """CoOp over CLIP ViT-B/16."""
    return build_prompt_classifier("coop", **{"clip_model": "ViT-B-16", **kw})


@register_model
def cocoop_rn50(**kw) -> CoCoOp:
    """CoCoOp over CLIP RN50 (4 contexts from "a photo of a", shifted per image by the meta-net)."""
    return build_prompt_classifier("cocoop", **{"clip_model": "RN50", "n_ctx": 4, "ctx_init": "a photo of a", **kw})


@register_model
def cocoop_vitb16(**kw) -> CoCoOp:
    """CoCoOp over CLIP ViT-B/16, the paper's model (4 contexts from "a photo of a")."""
    return build_prompt_classifier("cocoop", **{"clip_model": "ViT-B-16", "n_ctx": 4, "ctx_init": "a photo of a", **kw})


@register_model
def plot_rn50(**kw) -> PLOT:
    """PLOT over CLIP RN50 (N = 4 prompt sets of 16 contexts; 49 local features at 224 px)."""
    return build_prompt_classifier("plot", **{"clip_model": "RN50", **kw})


@register_model
def plot_vitb16(**kw) -> PLOT:
    """PLOT over CLIP ViT-B/16 (local features: the 196 projected patch tokens; no PLOT++ visual prompts)."""
    return build_prompt_classifier("plot", **{"clip_model": "ViT-B-16", **kw})


__all__ = [
    "CLASS_TOKEN_POSITIONS",
    "METHODS",
    "PLOT",
    "CoCoOp",
    "CoOp",
    "PromptLearner",
    "TransportExplanation",
    "ZeroShotClassifier",
    "build_prompt_classifier",
    "ot_similarity",
    "prompt_classifier_from_clip",
    "similarity_plans",
    "sinkhorn",
    "transport_plans",
]
