"""PPL (Kwon et al., "Probabilistic Prompt Learning for Dense Prediction", CVPR 2023) on top of DenseCLIP.

K class-agnostic attribute prompts give K embeddings per class (w: K x C x D, one batched pass of the
frozen CLIP text encoder). Each class is a mixture of K Gaussians N(mu_c^k, sigma_c^k^2 I) with
mu = w and sigma predicted per image by a visual-context probabilistic decoder (eq. 7). Training
draws N samples per class by reparameterisation, evenly from the K components, and matches them
with the dense image embeddings (eq. 10, 11); a diversity loss (eq. 5) and a KL prior (eq. 12)
regularise the prompts and the variances.

No official code exists: the paper's equations are the specification, and each open point is an
argument documented where it is defined ("Choice:"). Shapes: B images, K attributes, C classes,
D joint embedding width, N samples, h x w the dense grid of z, H x W the label size.

The builder :func:`build_ppl` and the registered names ``ppl_fpn_*`` (see
:func:`clipdense.models.registry.create_model`) live here too; the PPL detectors (``ppl_maskrcnn_*``) are
built in :mod:`clipdense.models.detectors` with :func:`ppl_text_side`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipdense.clip.loading import LoadedCLIP, load_clip
from clipdense.clip.text import tokenize_class_names
from clipdense.models._build import DEFAULT_PRETRAINED, build_decoder, check_classes, clip_backbone, with_defaults
from clipdense.models.backbones import dense_level_index
from clipdense.models.registry import register_model
from clipdense.models.segmentors import VIT_B16_PAPER, segmentation_cross_entropy
from clipdense.models.text import ContextDecoder, ContextDecoderLayer, ContextTextEncoder, _Attention

SIGMA_TYPES: tuple[str, ...] = ("isotropic", "diagonal")
POSITIVITY: tuple[str, ...] = ("exp", "softplus")


class AttributePromptEncoder(ContextTextEncoder):
    """K attribute prompts, shared by all C classes, through the frozen CLIP text encoder.

    The sequences are [SOT] + p^k (n_ctx learnable vectors) + class-name tokens + [EOT]; all K*C of
    them go through the frozen encoder in one batched call (the DenseCLIP prompt learner with K
    context sets in place of one). Learnable prompts live in ``contexts`` (K x n_ctx x width); the
    encoder under ``encoder`` is frozen. :meth:`cache_text_embeddings` stores w (K x C x D).

    Args:
        clip_model: open_clip ``CLIP`` whose text tower is used (frozen).
        token_ids: C x L_c class-name tokens (SOT, name, EOT, padding).
        num_attributes: K (3).
        n_ctx: Context vectors per attribute prompt (8).
        ctx_init_std: Std of the Gaussian initialisation. Choice: 0.02 (CoOp's Gaussian init, which
            PPL's "Gaussian init" follows); DenseCLIP's single context uses a truncated normal, std 1.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        token_ids: torch.Tensor,
        num_attributes: int = 3,
        n_ctx: int = 8,
        ctx_init_std: float = 0.02,
    ) -> None:
        super().__init__(clip_model, token_ids, n_ctx=n_ctx, learn_contexts=False)
        if num_attributes < 1:
            raise ValueError(f"num_attributes must be >= 1, got {num_attributes}")
        self.contexts = nn.Parameter(torch.empty(num_attributes, n_ctx, self.width))
        nn.init.normal_(self.contexts, std=ctx_init_std)

    @property
    def num_attributes(self) -> int:
        return self.contexts.shape[0]

    @torch.no_grad()
    def cache_text_embeddings(self) -> torch.Tensor:
        """Compute and keep w (K x C x D); returns it."""
        self.text_cache = None
        self.text_cache = self()
        return self.text_cache

    def forward(self, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Embed the K*C attribute-class prompts.

        Args:
            contexts: K' x n_ctx x width prompts, or None for the learned ones (cached when present).

        Returns:
            K' x C x D embeddings w (not normalised).
        """
        if contexts is None and self.text_cache is not None:
            return self.text_cache
        return super().forward(contexts)


def diversity_loss(w: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Attribute diversity loss (eq. 5): (1/C) sum_c max(||W_c W_c^T - I||_F^2 - b_c, 0).

    Args:
        w: K x C x D attribute embeddings (W_c = w[:, c]).
        b: C learnable margins (b near 0 asks for orthogonal attributes).
        normalize: l2-normalise the rows of W_c first (choice: True, so that the identity target is
            reachable; without it the loss also pushes the norms to 1).

    Returns:
        Scalar loss.
    """
    wc = w.transpose(0, 1)  # C x K x D
    if normalize:
        wc = F.normalize(wc, dim=-1)
    gram = wc @ wc.transpose(1, 2)  # C x K x K
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return F.relu((gram - eye).pow(2).sum((1, 2)) - b).mean()


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, sigma^2 I) || N(0, I)) (eq. 12), averaged over all but the last dim of mu.

    Args:
        mu: ... x D means.
        log_var: ... (isotropic, one log sigma^2 per Gaussian) or ... x D (diagonal) log variances.

    Returns:
        Scalar: mean over Gaussians (components, classes, images) of the per-Gaussian KL (summed over D).
    """
    d = mu.shape[-1]
    if log_var.dim() == mu.dim():
        kl = 0.5 * (log_var.exp() + mu.pow(2) - 1 - log_var).sum(-1)
    else:
        kl = 0.5 * (d * log_var.exp() + mu.pow(2).sum(-1) - d - d * log_var)
    return kl.mean()


def sample_mixture(
    mu: torch.Tensor, log_var: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Reparameterised samples of the class mixtures (eq. 8, 9), n_samples / K from each component.

    Args:
        mu: B x K x C x D component means.
        log_var: B x K x C (isotropic) or B x K x C x D (diagonal) log variances.
        n_samples: N, a multiple of K.
        generator: Random generator (None: torch's default one).

    Returns:
        B x N x C x D samples, component-major (sample n comes from component n // (N / K)).

    Raises:
        ValueError: N is not a multiple of K.
    """
    b, k, c, d = mu.shape
    if n_samples % k:
        raise ValueError(f"n_samples={n_samples} must be a multiple of the number of attributes K={k}")
    std = (0.5 * log_var).exp()
    if std.dim() == 3:
        std = std[..., None]
    eps = torch.randn(b, k, n_samples // k, c, d, generator=generator, device=mu.device, dtype=mu.dtype)
    return (mu[:, :, None] + std[:, :, None] * eps).reshape(b, n_samples, c, d)


def _target_log_prob(score: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(score / tau)[y] at label resolution: B x C x h x w, B x H x W -> B x H x W."""
    logits = F.interpolate(score.float() / tau, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]


def mc_pixel_nll(
    score_maps: torch.Tensor, labels: torch.Tensor, tau: float = 0.07, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel Monte-Carlo pixel-text loss (eq. 10): -log (1/N) sum_n softmax(s^n / tau)[y].

    Each sample's map is upsampled bilinearly to the label size (as DenseCLIP's auxiliary loss).
    Under autograd each sample is checkpointed, so only N x B x H x W values are kept, not N full
    B x C x H x W maps.

    Args:
        score_maps: B x N x C x h x w cosine similarities of z and the samples.
        labels: B x H x W class indices.
        tau: Temperature (0.07).
        ignore_index: Unlabelled value.

    Returns:
        B x H x W losses (0 at ignored pixels) and the B x H x W mask of labelled pixels.
    """
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    n = score_maps.shape[1]
    grad = torch.is_grad_enabled() and score_maps.requires_grad
    logp = []
    for i in range(n):
        s = score_maps[:, i]
        if grad:
            logp.append(checkpoint(_target_log_prob, s, safe, tau, use_reentrant=False))
        else:
            logp.append(_target_log_prob(s, safe, tau))
    nll = -(torch.logsumexp(torch.stack(logp), dim=0) - math.log(n))
    return nll * valid, valid


class ProbabilisticDecoder(nn.Module):
    """Visual-context probabilistic decoder (eq. 7, Fig. 3): per-image variances of the K*C Gaussians.

    queries = text_proj(w) (K*C tokens), memory v = memory_proj([z_bar; z]); ``layers`` pre-norm
    decoder layers of DenseCLIP's :class:`ContextDecoderLayer` (self-attention, cross-attention to v,
    MLP); then multi-head self-attention over the queries (pre-norm, residual) gives q, and
    log sigma^2 (or softplus's sigma^2) = MLP(LN(q)) + MLP(MHA(q, v, v)). Linear layers use
    DenseCLIP's trunc_normal(0.02) init, so the output starts at ``log_var_init``.

    Args:
        visual_dim: D_v of [z_bar; z].
        text_dim: D_t of the queries; default ``visual_dim``.
        width: Decoder width (256, DenseCLIP's context decoder).
        heads: Attention heads (4).
        layers: Decoder layers (5, the paper).
        dropout: Dropout in the decoder layers (0.1).
        sigma_type: ``"isotropic"`` (default, the paper's sigma I: one variance per Gaussian) or
            ``"diagonal"`` (one per dimension).
        positivity: ``"exp"`` (default: the MLPs predict log sigma^2, clamped to ``log_var_range``,
            PCME-style) or ``"softplus"`` (sigma^2 = softplus(.), its log clamped likewise).
        log_var_init: Initial log sigma^2. Choice: -5 (sigma ~ 0.08: sample noise of norm
            0.08 sqrt(D) ~ 2.6 for D = 1024, a fraction of CLIP text-embedding norms).
        log_var_range: Clamp of log sigma^2 (keeps exp finite and sigma away from 0).
    """

    def __init__(
        self,
        visual_dim: int,
        text_dim: int | None = None,
        width: int = 256,
        heads: int = 4,
        layers: int = 5,
        dropout: float = 0.1,
        sigma_type: str = "isotropic",
        positivity: str = "exp",
        log_var_init: float = -5.0,
        log_var_range: tuple[float, float] = (-10.0, 5.0),
    ) -> None:
        super().__init__()
        if sigma_type not in SIGMA_TYPES:
            raise ValueError(f"unknown sigma_type '{sigma_type}'; choose one of {SIGMA_TYPES}")
        if positivity not in POSITIVITY:
            raise ValueError(f"unknown positivity '{positivity}'; choose one of {POSITIVITY}")
        if not log_var_range[0] <= log_var_init <= log_var_range[1]:
            raise ValueError(f"log_var_init {log_var_init} is outside log_var_range {log_var_range}")
        text_dim = text_dim or visual_dim
        out = 1 if sigma_type == "isotropic" else text_dim
        self.sigma_type = sigma_type
        self.positivity = positivity
        self.log_var_range = tuple(log_var_range)
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.decoder = nn.ModuleList(ContextDecoderLayer(width, heads, dropout) for _ in range(layers))
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads, proj_drop=dropout)
        self.query_norm = nn.LayerNorm(width)
        self.query_mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))
        self.visual_attn = _Attention(width, heads, proj_drop=dropout)
        self.visual_mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))
        self.apply(ContextDecoder._init_weights)
        var_init = math.exp(log_var_init)
        raw_init = log_var_init if positivity == "exp" else math.log(math.expm1(var_init))
        nn.init.constant_(self.query_mlp[-1].bias, raw_init)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Args:
            text: B x Q x D_t queries (Q = K*C Gaussian means).
            visual: B x M x D_v visual context (M = 1 + hw: z_bar then z).

        Returns:
            log sigma^2: B x Q (isotropic) or B x Q x D_t (diagonal).
        """
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        y = self.self_norm(x)
        q = x + self.self_attn(y, y, y)
        raw = self.query_mlp(self.query_norm(q)) + self.visual_mlp(self.visual_attn(q, memory, memory))
        lo, hi = self.log_var_range
        if self.positivity == "exp":
            log_var = raw.float().clamp(lo, hi)
        else:
            log_var = (F.softplus(raw.float()) + 1e-12).log().clamp(lo, hi)
        log_var = log_var.to(raw.dtype)
        return log_var[..., 0] if self.sigma_type == "isotropic" else log_var


class PPLGuidance(nn.Module):
    """PPL's probabilistic language guidance: the text side of every PPL model (segmentor or detector).

    Per image: w = text_encoder() (K x C x D); mu = w (the paper's "mu_c^k = w_c^k"; with
    ``context_decoder`` given, DenseCLIP's post-model update mu = w + gamma * ContextDecoder(w, v)
    is applied per image first); log sigma^2 = prob_decoder(mu, [z_bar; z]); N samples from the
    equal-weight mixture of the K components; score maps s^n = <l2norm(z), l2norm(z_c^n)> and the
    score map of the mixture mean (mean_k mu_c^k), which the task's neck reads (C extra channels, as
    in DenseCLIP).

    Attribute contract as DenseCLIP's :class:`~clipdense.models.guidance.LanguageGuidance`:
    ``backbone``, ``text_encoder`` (frozen ``text_encoder.encoder``, prompts ``text_encoder.contexts``),
    ``context_decoder`` (None by default), ``gamma`` (with it), ``prob_decoder``, ``class_names``,
    ``num_classes``; plus ``diversity_bias`` (b of eq. 5).

    Args:
        backbone: Image backbone returning ``features``, ``global_embed`` (B x D), ``dense_embed``
            (B x D x h x w).
        text_encoder: :class:`AttributePromptEncoder` over the C classes.
        prob_decoder: :class:`ProbabilisticDecoder`.
        class_names: C class names.
        context_decoder: Optional DenseCLIP :class:`ContextDecoder` updating mu per image (default None).
        n_samples: N samples per class (15), a multiple of K.
        tau: Temperature of the pixel-text losses (0.07).
        alpha: Weight of L_div (choice: 1.0; the paper does not state it).
        beta: Weight of L_KL (1e-5).
        use_div_loss, use_kl_loss: Loss switches (Table 4).
        normalize_div: l2-normalise rows in L_div (see :func:`diversity_loss`).
        eval_seed: In eval mode, draw samples from a generator seeded with this value on every call
            (identical outputs across calls, e.g. sliding windows); None uses torch's global RNG
            (deterministic given ``torch.manual_seed``).
        score_concat_index: Pyramid level that gets the score map.
        gamma_init: Initial gamma when ``context_decoder`` is given.
        concat_scale: If given, :meth:`forward` returns ``features`` with ``concat_scale * score_map``
            appended to level ``score_concat_index`` (detectors: 1 / tau); None (segmentor) returns the
            backbone's maps unchanged, for the segmentor to append per-sample maps itself.
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_encoder: AttributePromptEncoder,
        prob_decoder: ProbabilisticDecoder,
        class_names: Sequence[str],
        context_decoder: ContextDecoder | None = None,
        n_samples: int = 15,
        tau: float = 0.07,
        alpha: float = 1.0,
        beta: float = 1e-5,
        use_div_loss: bool = True,
        use_kl_loss: bool = True,
        normalize_div: bool = True,
        eval_seed: int | None = None,
        score_concat_index: int = 3,
        gamma_init: float = 1e-4,
        concat_scale: float | None = None,
    ) -> None:
        super().__init__()
        if len(class_names) != text_encoder.num_classes:
            raise ValueError(f"{len(class_names)} class names but the text encoder has {text_encoder.num_classes}")
        if n_samples < 1 or n_samples % text_encoder.num_attributes:
            raise ValueError(
                f"n_samples={n_samples} must be a positive multiple of K={text_encoder.num_attributes} "
                "(samples are drawn evenly from the K components)"
            )
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.context_decoder = context_decoder
        if context_decoder is not None:
            self.gamma = nn.Parameter(torch.full((text_encoder.embed_dim,), gamma_init))
        else:
            self.register_parameter("gamma", None)
        self.prob_decoder = prob_decoder
        self.diversity_bias = nn.Parameter(torch.zeros(text_encoder.num_classes))
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.num_attributes = text_encoder.num_attributes
        self.n_samples = n_samples
        self.tau = tau
        self.alpha = alpha
        self.beta = beta
        self.use_div_loss = use_div_loss
        self.use_kl_loss = use_kl_loss
        self.normalize_div = normalize_div
        self.eval_seed = eval_seed
        self.score_concat_index = score_concat_index
        self.concat_scale = concat_scale

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.training or self.eval_seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.eval_seed)

    def concat_scores(self, features: list[torch.Tensor], score_map: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid with ``score_map`` (B x C x h x w) appended to level ``score_concat_index``."""
        i = self.score_concat_index
        features = list(features)
        features[i] = torch.cat([features[i], score_map.to(features[i].dtype)], dim=1)
        return features

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``features``: the backbone's four maps (with ``concat_scale * score_map`` appended when
            ``concat_scale`` is set); ``score_map``: B x C x h x w
            cosine map of the mixture means; ``score_maps``: B x N x C x h x w maps of the samples;
            ``text_embeddings``: B x C x D mixture means; ``attribute_embeddings``: K x C x D w;
            ``means``: B x K x C x D mu; ``log_var``: B x K x C (isotropic) or B x K x C x D log sigma^2;
            ``sigma``: B x C geometric mean of sigma over attributes (and dims), the class uncertainty
            of Sec. 5.4; ``uncertainty``: B x h x w entropy of the mean of the samples'
            softmax(s^n / tau), in [0, log C].
        """
        out = self.backbone(images)
        z_bar, z = out["global_embed"], out["dense_embed"]
        b = z.shape[0]
        visual = torch.cat([z_bar[:, None], z.flatten(2).transpose(1, 2)], dim=1)  # B x (1+hw) x D
        w = self.text_encoder().to(visual.dtype)  # K x C x D
        k, c, d = w.shape
        mu = w[None].expand(b, -1, -1, -1)
        if self.context_decoder is not None:
            mu = mu + self.gamma * self.context_decoder(mu.reshape(b, k * c, d), visual).reshape(b, k, c, d)
        log_var = self.prob_decoder(mu.reshape(b, k * c, d), visual)
        log_var = log_var.reshape(b, k, c, *log_var.shape[2:])
        mean = mu.mean(dim=1)  # B x C x D
        zn = F.normalize(z, dim=1)
        score_map = torch.einsum("bdhw,bcd->bchw", zn, F.normalize(mean, dim=-1))
        samples = sample_mixture(mu, log_var.to(mu.dtype), self.n_samples, self._generator(z.device))
        score_maps = torch.einsum("bdhw,bncd->bnchw", zn, F.normalize(samples, dim=-1))
        with torch.no_grad():
            p = (score_maps.float() / self.tau).softmax(dim=2).mean(dim=1)  # B x C x h x w
            uncertainty = (-torch.special.xlogy(p, p).sum(dim=1)).clamp(0, math.log(c))
            per_gaussian = log_var.float().mean(dim=3) if log_var.dim() == 4 else log_var.float()  # B x K x C
            sigma = (0.5 * per_gaussian.mean(dim=1)).exp()
        features = list(out["features"])
        if self.concat_scale is not None:
            features = self.concat_scores(features, score_map * self.concat_scale)
        return {
            "features": features,
            "score_map": score_map,
            "score_maps": score_maps,
            "text_embeddings": mean,
            "attribute_embeddings": w,
            "means": mu,
            "log_var": log_var,
            "sigma": sigma,
            "uncertainty": uncertainty,
        }

    def regularisers(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``div`` = alpha * L_div (eq. 5) and ``kl`` = beta * L_KL (eq. 12, mean over images, components
        and classes); switched-off terms are absent."""
        losses = {}
        if self.use_div_loss:
            w = outputs["attribute_embeddings"].float()
            losses["div"] = self.alpha * diversity_loss(w, self.diversity_bias, self.normalize_div)
        if self.use_kl_loss:
            losses["kl"] = self.beta * gaussian_kl(outputs["means"].float(), outputs["log_var"].float())
        return losses

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone stages/blocks and the (frozen) text transformer's blocks in the backward pass."""
        self.backbone.set_grad_checkpointing(enable)
        self.text_encoder.encoder.transformer.grad_checkpointing = enable

    def cache_text_embeddings(self) -> torch.Tensor:
        """Cache w (K x C x D): inference then runs no text encoder (the decoders still run per image)."""
        return self.text_encoder.cache_text_embeddings()


class PPLSegmentor(PPLGuidance):
    """PPL semantic segmentor: DenseCLIP's pipeline with probabilistic attribute prompts.

    :class:`PPLGuidance`, then the neck and decode head on the pyramid with the mixture-mean score map;
    the decode head is trained with CE on it.

    Inference (eval mode): ``mc_inference=True`` (eq. 14) runs neck + head once per sample, with the
    sample's score map in place of the mean map (the backbone, text side and probabilistic decoder
    run once), and returns ``logits`` = log of the N averaged softmax probabilities (so softmax /
    argmax of ``logits`` are the MC prediction); ``mc_inference=False`` returns the mean-map logits
    (one pass, deterministic). Either way samples also give ``uncertainty``.

    Args:
        backbone, text_encoder, prob_decoder, class_names, context_decoder, n_samples, tau, alpha, beta,
            use_div_loss, use_kl_loss, normalize_div, eval_seed, score_concat_index, gamma_init: See
            :class:`PPLGuidance`.
        neck: Maps the four levels (one with C extra channels) to the head's input.
        decode_head: Returns B x C x H/4 x W/4 logits.
        pixel_weight: Weight of L_pixel / L_prob (1.0 as eq. 13; DenseCLIP's auxiliary loss used 0.4).
        use_pixel_loss, use_prob_loss: Loss switches (Table 4). With ``use_prob_loss`` the pixel term is
            reported inside ``"prob"`` (eq. 11 contains L_pixel), not as ``"pixel"``; ``use_prob_loss``
            needs ``use_pixel_loss``.
        mc_inference: Monte-Carlo inference (eq. 14) in eval mode; False: mean-only.
        ignore_index: Unlabelled pixel value.
        avg_non_ignore: See :func:`segmentation_cross_entropy` (False: average over all pixels).
    """

    def __init__(
        self,
        backbone: nn.Module,
        text_encoder: AttributePromptEncoder,
        prob_decoder: ProbabilisticDecoder,
        neck: nn.Module,
        decode_head: nn.Module,
        class_names: Sequence[str],
        context_decoder: ContextDecoder | None = None,
        n_samples: int = 15,
        tau: float = 0.07,
        alpha: float = 1.0,
        beta: float = 1e-5,
        pixel_weight: float = 1.0,
        use_pixel_loss: bool = True,
        use_prob_loss: bool = True,
        use_div_loss: bool = True,
        use_kl_loss: bool = True,
        normalize_div: bool = True,
        mc_inference: bool = True,
        eval_seed: int | None = None,
        score_concat_index: int = 3,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        gamma_init: float = 1e-4,
    ) -> None:
        if use_prob_loss and not use_pixel_loss:
            raise ValueError("use_prob_loss weights the pixel loss (eq. 11): it needs use_pixel_loss=True")
        super().__init__(
            backbone,
            text_encoder,
            prob_decoder,
            class_names,
            context_decoder=context_decoder,
            n_samples=n_samples,
            tau=tau,
            alpha=alpha,
            beta=beta,
            use_div_loss=use_div_loss,
            use_kl_loss=use_kl_loss,
            normalize_div=normalize_div,
            eval_seed=eval_seed,
            score_concat_index=score_concat_index,
            gamma_init=gamma_init,
        )
        self.neck = neck
        self.decode_head = decode_head
        self.pixel_weight = pixel_weight
        self.use_pixel_loss = use_pixel_loss
        self.use_prob_loss = use_prob_loss
        self.mc_inference = mc_inference
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore

    def _decode(self, features: list[torch.Tensor], score_map: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.neck(self.concat_scores(features, score_map)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``logits``: B x C x H/4 x W/4 (eval with ``mc_inference``: log of the MC-averaged
            probabilities), and the :class:`PPLGuidance` outputs except ``features``.
        """
        out = super().forward(images)
        features = out.pop("features")
        if not self.training and self.mc_inference:
            score_maps = out["score_maps"]
            probs = sum(self._decode(features, score_maps[:, n]).float().softmax(dim=1) for n in range(self.n_samples))
            logits = (probs / self.n_samples).clamp_min(1e-12).log()
        else:
            logits = self._decode(features, out["score_map"])
        return {"logits": logits, **out}

    def losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses (eq. 13); the training engine sums them.

        Args:
            outputs: The dict returned by :meth:`forward`.
            labels: B x H x W class indices (``ignore_index`` where unlabelled).

        Returns:
            ``decode``: CE of the logits (L_task). With ``use_prob_loss``, ``prob`` = pixel_weight *
            mean_b [L_pixel,b / g_b + (1/2) log g_b] (eq. 11; g_b = geometric mean of image b's
            sigma^2 over classes, attributes and dims, so (1/2C) sum_c log sigma_c^2 = (1/2) log g_b;
            choice: computed per image, since sigma is per image); otherwise ``pixel`` = pixel_weight
            * L_pixel (eq. 10). ``div`` and ``kl``: :meth:`PPLGuidance.regularisers`. Switched-off
            terms are absent.
        """
        losses = {
            "decode": segmentation_cross_entropy(outputs["logits"], labels, self.ignore_index, self.avg_non_ignore)
        }
        if self.use_pixel_loss:
            nll, valid = mc_pixel_nll(outputs["score_maps"], labels, self.tau, self.ignore_index)
            if self.use_prob_loss:
                if self.avg_non_ignore:
                    l_pixel = nll.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)  # B
                else:
                    l_pixel = nll.flatten(1).mean(1)
                losses["prob"] = self.pixel_weight * uncertainty_weighted(l_pixel, outputs["log_var"])
            else:
                denom = valid.sum() if self.avg_non_ignore else nll.numel()
                losses["pixel"] = self.pixel_weight * nll.sum() / max(int(denom), 1)
        return {**losses, **self.regularisers(outputs)}


def uncertainty_weighted(l_pixel: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Eq. 11 per image, averaged: mean_b [L_pixel,b / g_b + (1/2) log g_b].

    Args:
        l_pixel: B pixel-text losses, one per image.
        log_var: B x K x C (or B x K x C x D) log sigma^2; g_b is the geometric mean of image b's sigma^2.

    Returns:
        Scalar loss.
    """
    log_g = log_var.float().flatten(1).mean(1)  # B
    return (l_pixel * torch.exp(-log_g) + 0.5 * log_g).mean()


# --- Builders and registered models --------------------------------------------------------------------------


def ppl_text_side(
    loaded: LoadedCLIP,
    class_names: Sequence[str],
    image_embed_dim: int,
    *,
    num_attributes: int,
    n_ctx: int,
    class_context_length: int,
    ctx_init_std: float,
    sigma_type: str,
    positivity: str,
    log_var_init: float,
    log_var_range: tuple[float, float],
    prob_decoder_width: int,
    prob_decoder_heads: int,
    prob_decoder_layers: int,
    post_model_context: bool,
    context_decoder_layers: int,
    dropout: float,
) -> tuple[AttributePromptEncoder, ProbabilisticDecoder, ContextDecoder | None]:
    """PPL's attribute prompts, probabilistic decoder and optional context decoder, shared by :func:`build_ppl`
    and the PPL detectors (options as :func:`build_ppl`; ``image_embed_dim`` must equal the text width D)."""
    text_encoder = AttributePromptEncoder(
        loaded.model,
        tokenize_class_names(loaded.tokenizer, class_names, class_context_length),
        num_attributes=num_attributes,
        n_ctx=n_ctx,
        ctx_init_std=ctx_init_std,
    )
    d = text_encoder.embed_dim
    if image_embed_dim != d:
        raise ValueError(f"image embedding width {image_embed_dim} != text embedding width {d}")
    prob_decoder = ProbabilisticDecoder(
        d,
        width=prob_decoder_width,
        heads=prob_decoder_heads,
        layers=prob_decoder_layers,
        dropout=dropout,
        sigma_type=sigma_type,
        positivity=positivity,
        log_var_init=log_var_init,
        log_var_range=log_var_range,
    )
    context_decoder = None
    if post_model_context:
        context_decoder = ContextDecoder(d, prob_decoder_width, prob_decoder_heads, context_decoder_layers, dropout)
    return text_encoder, prob_decoder, context_decoder


def build_ppl(
    *,
    class_names: Sequence[str] | None,
    num_classes: int | None = None,
    pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
    clip_model: str = "RN50",
    decoder: str = "fpn",
    input_resolution: int | None = 512,
    num_attributes: int = 3,
    n_ctx: int = 8,
    class_context_length: int = 5,
    ctx_init_std: float = 0.02,
    n_samples: int = 15,
    tau: float = 0.07,
    alpha: float = 1.0,
    beta: float = 1e-5,
    pixel_weight: float = 1.0,
    use_pixel_loss: bool = True,
    use_prob_loss: bool = True,
    use_div_loss: bool = True,
    use_kl_loss: bool = True,
    normalize_div: bool = True,
    sigma_type: str = "isotropic",
    positivity: str = "exp",
    log_var_init: float = -5.0,
    log_var_range: tuple[float, float] = (-10.0, 5.0),
    prob_decoder_width: int = 256,
    prob_decoder_heads: int = 4,
    prob_decoder_layers: int = 5,
    post_model_context: bool = False,
    context_decoder_layers: int = 3,
    decoder_dropout: float | None = None,
    mc_inference: bool = True,
    eval_seed: int | None = None,
    dropout: float = 0.1,
    drop_path: float = 0.1,
    out_indices: Sequence[int] | None = None,
    class_embedding_twice: bool = False,
    pos_interpolation: str = "bilinear",
    fpn_channels: int = 256,
    head_channels: int | None = None,
    avg_non_ignore: bool = False,
) -> PPLSegmentor:
    """Build a PPL segmentor (see :func:`~clipdense.models.registry.create_model` and
    :func:`~clipdense.models.segmentors.build_denseclip` for the common arguments).

    Args:
        num_attributes: K attribute prompts (3).
        ctx_init_std: Std of the Gaussian prompt init (0.02, CoOp's).
        n_samples: N samples per class (15; a multiple of K).
        alpha, beta: Weights of L_div (1.0) and L_KL (1e-5).
        use_pixel_loss, use_prob_loss, use_div_loss, use_kl_loss: Loss switches (paper Table 4).
        sigma_type: ``"isotropic"`` or ``"diagonal"``; positivity: ``"exp"`` or ``"softplus"``;
            log_var_init, log_var_range: see :class:`ProbabilisticDecoder`.
        prob_decoder_width, prob_decoder_heads, prob_decoder_layers: Probabilistic decoder size (256, 4, 5).
        post_model_context: Also apply DenseCLIP's post-model context update to the means (default
            False: mu = w, as the paper's eq. 6).
        context_decoder_layers: Layers of that context decoder (3).
        decoder_dropout: Dropout of the probabilistic/context decoders; default ``dropout``.
        mc_inference, eval_seed, avg_non_ignore: See :class:`PPLSegmentor`.
    """
    class_names = check_classes(class_names, num_classes, need_names=True)
    loaded = load_clip(clip_model, pretrained)
    k = len(class_names)
    backbone = clip_backbone(
        loaded.model.visual, True, input_resolution, drop_path, out_indices, class_embedding_twice, pos_interpolation
    )
    text_encoder, prob_decoder, context_decoder = ppl_text_side(
        loaded,
        class_names,
        backbone.embed_dim,
        num_attributes=num_attributes,
        n_ctx=n_ctx,
        class_context_length=class_context_length,
        ctx_init_std=ctx_init_std,
        sigma_type=sigma_type,
        positivity=positivity,
        log_var_init=log_var_init,
        log_var_range=log_var_range,
        prob_decoder_width=prob_decoder_width,
        prob_decoder_heads=prob_decoder_heads,
        prob_decoder_layers=prob_decoder_layers,
        post_model_context=post_model_context,
        context_decoder_layers=context_decoder_layers,
        dropout=dropout if decoder_dropout is None else decoder_dropout,
    )
    index = dense_level_index(backbone)
    in_channels = list(backbone.out_channels)
    in_channels[index] += k
    neck, head = build_decoder(decoder, in_channels, k, fpn_channels, head_channels, dropout)
    return PPLSegmentor(
        backbone,
        text_encoder,
        prob_decoder,
        neck,
        head,
        class_names,
        context_decoder=context_decoder,
        n_samples=n_samples,
        tau=tau,
        alpha=alpha,
        beta=beta,
        pixel_weight=pixel_weight,
        use_pixel_loss=use_pixel_loss,
        use_prob_loss=use_prob_loss,
        use_div_loss=use_div_loss,
        use_kl_loss=use_kl_loss,
        normalize_div=normalize_div,
        mc_inference=mc_inference,
        eval_seed=eval_seed,
        score_concat_index=index,
        avg_non_ignore=avg_non_ignore,
    )


@register_model
def ppl_fpn_rn50(**kw) -> PPLSegmentor:
    """PPL + Semantic FPN, CLIP RN50 (ADE20K: 44.7 mIoU; paper: 51.8M params, 421.4 GFLOPs)."""
    return build_ppl(**with_defaults(dict(clip_model="RN50", input_resolution=512), kw))


@register_model
def ppl_fpn_rn101(**kw) -> PPLSegmentor:
    """PPL + Semantic FPN, CLIP RN101 (ADE20K: 46.4 mIoU)."""
    return build_ppl(**with_defaults(dict(clip_model="RN101", input_resolution=512), kw))


@register_model
def ppl_fpn_vitb16(**kw) -> PPLSegmentor:
    """PPL + Semantic FPN, CLIP ViT-B/16, 640 crops, drop path 0.1 (ADE20K: 51.6 mIoU); the DenseCLIP
    authors' backbone forward (class embedding added twice), which PPL's code reuses."""
    return build_ppl(**with_defaults(VIT_B16_PAPER, kw))


__all__ = [
    "POSITIVITY",
    "SIGMA_TYPES",
    "AttributePromptEncoder",
    "PPLGuidance",
    "PPLSegmentor",
    "ProbabilisticDecoder",
    "build_ppl",
    "diversity_loss",
    "gaussian_kl",
    "mc_pixel_nll",
    "ppl_text_side",
    "sample_mixture",
    "uncertainty_weighted",
]
