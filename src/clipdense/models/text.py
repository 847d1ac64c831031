"""Text side of DenseCLIP (Rao et al., CVPR 2022): learnable contexts, a frozen CLIP text encoder,
the post-model context decoder and the pre-model prompter.

Prompts have no hand-written template: the sequence is [SOT] + n_ctx learnable context vectors +
class-name tokens + [EOT] + padding, 13 tokens for n_ctx = 8 and 5 class-name tokens (SOT and EOT
included). The CLIP text encoder is frozen; gradients flow through it into the contexts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.clip.dense import _merge_heads, _split_heads


def causal_mask(length: int) -> torch.Tensor:
    """L x L additive causal mask (-inf above the diagonal), as CLIP's text transformer uses."""
    return torch.full((length, length), float("-inf")).triu_(1)


class FrozenCLIPTextEncoder(nn.Module):
    """CLIP's text transformer on embedded token sequences, frozen (``requires_grad`` False everywhere).

    Takes over ``token_embedding``, ``transformer``, ``ln_final`` and ``text_projection`` of an
    open_clip ``CLIP`` model and keeps the first ``context_length`` rows of its positional embedding.

    Args:
        clip_model: open_clip ``CLIP`` (its text modules become this module's).
        context_length: Sequence length (DenseCLIP: 13).
    """

    def __init__(self, clip_model: nn.Module, context_length: int) -> None:
        super().__init__()
        if clip_model.positional_embedding.shape[0] < context_length:
            raise ValueError(
                f"context_length {context_length} exceeds CLIP's {clip_model.positional_embedding.shape[0]} positions"
            )
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = nn.Parameter(clip_model.positional_embedding.detach()[:context_length].clone())
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        self.context_length = context_length
        self.width = self.positional_embedding.shape[1]
        proj = self.text_projection
        self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        """Stays in eval mode: the encoder is frozen."""
        return super().train(False)

    def forward(self, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Args:
            embeddings: N x L x width token embeddings (contexts already inserted).
            eot_index: N positions of the EOT token.

        Returns:
            N x D text embeddings (EOT token after ``ln_final``, projected; not normalised).
        """
        x = embeddings + self.positional_embedding.to(embeddings.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask.to(x.dtype))
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    @property
    def can_share_prefix(self) -> bool:
        """Whether :meth:`forward_shared_prefix` can split the blocks' attention (open_clip's pre-norm
        ``ResidualAttentionBlock`` with a batch-first ``nn.MultiheadAttention``); otherwise it runs :meth:`forward`."""
        return all(
            isinstance(getattr(b, "attn", None), nn.MultiheadAttention)
            and b.attn.batch_first
            and b.attn._qkv_same_embed_dim
            and not hasattr(b, "ln_1_kv")
            and all(hasattr(b, a) for a in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
            for b in self.transformer.resblocks
        )

    def forward_shared_prefix(
        self, prefix: torch.Tensor, suffix: torch.Tensor, eot_index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` on the sequences ``cat(prefix[g], suffix[g, k])``, running the shared prefix once per group.

        Under the causal mask a position sees only the positions before it, so the hidden states of a prefix
        shared by K sequences (the learned contexts of CoOp/PLOT/DenseCLIP, before the class name) are the same in
        all K: each block computes them, and their keys and values, once per group, and the K suffixes attend to
        them. The result equals :meth:`forward` up to float rounding; the text transformer's work falls from
        G*K*(Lp+Ls) tokens to G*Lp + G*K*Ls (about 4x for CoOp's 16 contexts before a short class name).

        Args:
            prefix: G x Lp x width embeddings of the G shared prefixes (positions 0..Lp-1; SOT and contexts).
            suffix: G x K x Ls x width (or K x Ls x width, the same for every group) embeddings of the rest.
            eot_index: K positions of the EOT token in the whole sequence (>= Lp).

        Returns:
            G x K x D text embeddings (not normalised).
        """
        g, lp, width = prefix.shape
        suffix = suffix.expand(g, *suffix.shape[-3:]) if suffix.ndim == 3 else suffix
        k, ls = suffix.shape[1], suffix.shape[2]
        if not self.can_share_prefix:
            full = torch.cat([prefix[:, None].expand(-1, k, -1, -1), suffix], dim=2).flatten(0, 1)
            return self(full, eot_index.repeat(g)).view(g, k, -1)
        pos = self.positional_embedding.to(prefix.dtype)
        xp = prefix + pos[:lp]
        xs = (suffix + pos[lp : lp + ls]).reshape(g * k, ls, width)
        mask = self.attn_mask[: lp + ls, : lp + ls].to(prefix.dtype)
        for block in self.transformer.resblocks:
            attn: nn.MultiheadAttention = block.attn
            hp, hs = block.ln_1(xp), block.ln_1(xs)
            qp, kp, vp = F.linear(hp, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            qs, ks, vs = F.linear(hs, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            # The prefix attends causally to itself; each suffix to its group's prefix and causally to itself.
            heads = attn.num_heads
            op = F.scaled_dot_product_attention(
                _split_heads(qp, heads), _split_heads(kp, heads), _split_heads(vp, heads), attn_mask=mask[:lp, :lp]
            )
            ks = torch.cat([kp.repeat_interleave(k, dim=0), ks], dim=1)
            vs = torch.cat([vp.repeat_interleave(k, dim=0), vs], dim=1)
            os_ = F.scaled_dot_product_attention(
                _split_heads(qs, heads), _split_heads(ks, heads), _split_heads(vs, heads), attn_mask=mask[lp:]
            )
            xp = xp + block.ls_1(attn.out_proj(_merge_heads(op)))
            xs = xs + block.ls_1(attn.out_proj(_merge_heads(os_)))
            xp = xp + block.ls_2(block.mlp(block.ln_2(xp)))
            xs = xs + block.ls_2(block.mlp(block.ln_2(xs)))
        x = self.ln_final(xs[torch.arange(g * k, device=xs.device), (eot_index - lp).repeat(g)])
        return self._project(x).view(g, k, -1)


def _clear_cache_hook(module: ContextTextEncoder, *args) -> None:
    module.clear_text_cache()


class ContextTextEncoder(nn.Module):
    """DenseCLIP's prompt learner: learnable contexts inserted after SOT, fed through a frozen CLIP text encoder.

    The contexts are a parameter of this module (``contexts``), outside the frozen ``encoder``.
    After training the K class embeddings are constant: :meth:`cache_text_embeddings` stores them
    so that inference needs no text encoder. The cache is dropped when the module is put in train
    mode or a state dict is loaded, and it is not saved (recompute it after loading).

    Args:
        clip_model: open_clip ``CLIP`` whose text tower is used (frozen).
        token_ids: K x L_c class-name tokens (SOT, name, EOT, zero padding), tokenized with context
            length L_c (DenseCLIP: 5).
        n_ctx: Number of context vectors (DenseCLIP: 8).
        learn_contexts: Whether to own learnable contexts. False for pre-model prompting, where the
            contexts come from the image; :meth:`forward` then needs them.
        ctx_init_std: Std of the truncated-normal context initialisation (truncated at +-2 std). The
            authors' code calls ``nn.init.trunc_normal_`` with its defaults: std 1, bounds +-2.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        token_ids: torch.Tensor,
        n_ctx: int = 8,
        learn_contexts: bool = True,
        ctx_init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be K x L, got shape {tuple(token_ids.shape)}")
        self.encoder = FrozenCLIPTextEncoder(clip_model, token_ids.shape[1] + n_ctx)
        self.n_ctx = n_ctx
        self.width = self.encoder.width
        self.embed_dim = self.encoder.embed_dim
        self.register_buffer("token_ids", token_ids.long().clone())
        self.contexts = None
        if learn_contexts:
            self.contexts = nn.Parameter(torch.empty(1, n_ctx, self.width))
            nn.init.trunc_normal_(self.contexts, std=ctx_init_std, a=-2 * ctx_init_std, b=2 * ctx_init_std)
        self.register_buffer("text_cache", None, persistent=False)
        self.register_load_state_dict_pre_hook(_clear_cache_hook)

    @property
    def num_classes(self) -> int:
        return self.token_ids.shape[0]

    @property
    def eot_index(self) -> torch.Tensor:
        """K positions of EOT in the full sequence: argmax(token ids) + n_ctx."""
        return self.token_ids.argmax(dim=-1) + self.n_ctx

    def train(self, mode: bool = True) -> ContextTextEncoder:
        if mode:
            self.clear_text_cache()
        return super().train(mode)

    def clear_text_cache(self) -> None:
        self.text_cache = None

    @torch.no_grad()
    def cache_text_embeddings(self) -> torch.Tensor:
        """Compute and keep the K x D class embeddings of the learned contexts; returns them."""
        if self.contexts is None:
            raise RuntimeError("pre-model prompting makes contexts per image: there is nothing to cache")
        self.text_cache = None
        self.text_cache = self(None)[0]
        return self.text_cache

    def forward(self, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """Embed the K class prompts.

        Args:
            contexts: B x n_ctx x width per-image contexts (pre-model prompting), or None for the
                learned contexts (then the cache is used when present).

        Returns:
            B x K x D text embeddings t (B = 1 for the learned contexts); not normalised.
        """
        if contexts is None:
            if self.text_cache is not None:
                return self.text_cache[None]
            if self.contexts is None:
                raise ValueError("this encoder has no learned contexts: pass per-image contexts")
            contexts = self.contexts
        b, n, c = contexts.shape
        if n != self.n_ctx or c != self.width:
            raise ValueError(f"contexts must be B x {self.n_ctx} x {self.width}, got {tuple(contexts.shape)}")
        tokens = self.encoder.token_embedding(self.token_ids).to(contexts.dtype)  # K x L_c x width
        prefix = torch.cat([tokens[:1, :1].expand(b, -1, -1), contexts], dim=1)  # [SOT] + contexts, per image
        return self.encoder.forward_shared_prefix(prefix, tokens[:, 1:], self.eot_index)


class _Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output projection."""

    def __init__(self, dim: int, heads: int, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: B x N x C, k and v: B x M x C -> B x N x C."""
        q, k, v = (
            _split_heads(proj(t), self.heads) for proj, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v))
        )
        return self.proj_drop(self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v))))


class ContextDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention, cross-attention to memory, GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = _Attention(dim, heads, proj_drop=dropout)
        self.cross_attn = _Attention(dim, heads, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: B x N x C queries, memory: B x M x C -> B x N x C."""
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y)
        x = x + self.cross_attn(self.norm2(x), memory, memory)
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """DenseCLIP's vision-to-language context decoder: text embeddings attend to the visual context.

    memory_proj = LN(D_v) -> Linear(D_v, width) -> LN(width); text_proj = LN(D_t) -> Linear(D_t, width);
    ``layers`` pre-norm decoder layers; out_proj = LN(width) -> Linear(width, D_out). Linear weights
    get trunc_normal(0.02), biases 0.

    Args:
        visual_dim: D_v of the visual context [z_bar; z] (and default of the text and output dims).
        width: Decoder width (256).
        heads: Attention heads (4).
        layers: Decoder layers (3 in all configs; the paper text says 6).
        dropout: Dropout after attention projections and in/after the MLP (0.1).
        text_dim: D_t of the queries; default ``visual_dim``.
        out_dim: Output dimension; default ``text_dim``.
    """

    def __init__(
        self,
        visual_dim: int,
        width: int = 256,
        heads: int = 4,
        layers: int = 3,
        dropout: float = 0.1,
        text_dim: int | None = None,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        text_dim = text_dim or visual_dim
        out_dim = out_dim or text_dim
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.decoder = nn.ModuleList(ContextDecoderLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Args:
            text: B x K x D_t text embeddings (queries).
            visual: B x N x D_v visual context (N = 1 + hw: z_bar then z).

        Returns:
            B x K x D_out.
        """
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)


class PreModelPrompter(nn.Module):
    """DenseCLIP's pre-model prompting: learnable queries attend to [z_bar; z] and become the contexts.

    A :class:`ContextDecoder` maps ``n_ctx`` learnable queries (token width) through cross-attention
    to the visual context and outputs per-image context vectors, which replace the learned contexts
    at the text encoder's input (so the text encoder runs per image).

    Args:
        visual_dim: D of z_bar and z.
        token_dim: Token width of the text transformer (512 for CLIP).
        n_ctx: Number of context vectors (8).
        width, heads, layers, dropout: Decoder size, as :class:`ContextDecoder`.
    """

    def __init__(
        self,
        visual_dim: int,
        token_dim: int,
        n_ctx: int = 8,
        width: int = 256,
        heads: int = 4,
        layers: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(1, n_ctx, token_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.decoder = ContextDecoder(visual_dim, width, heads, layers, dropout, text_dim=token_dim, out_dim=token_dim)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """Args:
            visual: B x N x D visual context.

        Returns:
            B x n_ctx x token_dim contexts.
        """
        return self.decoder(self.queries.expand(visual.shape[0], -1, -1), visual)


__all__ = [
    "ContextDecoder",
    "ContextDecoderLayer",
    "ContextTextEncoder",
    "FrozenCLIPTextEncoder",
    "PreModelPrompter",
    "causal_mask",
]
