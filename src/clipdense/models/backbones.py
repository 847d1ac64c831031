"""Image backbones of DenseCLIP (Rao et al., CVPR 2022): CLIP ResNet, CLIP ViT and any timm backbone.

Every backbone maps B x 3 x H x W images to a dict with

* ``features``: four maps at strides 4/8/16/32 (``out_channels`` lists their channels), and, when
  built ``with_embeddings``,
* ``global_embed``: B x D global image embedding z_bar in the joint text space,
* ``dense_embed``: B x D x h x w dense embeddings z (stride ``dense_stride``: 32 for ResNets and
  timm backbones, the patch size for ViTs).

The CLIP backbones take over the modules of an open_clip image tower (no copy: the tower's weights
are the backbone's weights) under the same attribute names, so an open_clip ``visual.*`` state dict
loads into them directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from clipdense.clip.dense import _merge_heads, _split_heads, resize_grid_embedding

_RESNET_STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool")


def attention_pool_all_tokens(
    pool: nn.Module, x: torch.Tensor, interpolation: str = "bilinear"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's attention pool with all HW+1 tokens as queries (DenseCLIP).

    The HW tokens of ``x`` are prepended with their mean, the positional embedding (class position
    kept, spatial grid resized to h x w) is added, and multi-head attention runs with every token as
    a query; ``c_proj`` is the output projection.

    Args:
        pool: A module with CLIP's pool layout: ``positional_embedding`` ((N*N + 1) x C),
            ``q_proj``/``k_proj``/``v_proj`` (C -> C), ``c_proj`` (C -> D), ``num_heads``.
        x: B x C x h x w feature map.
        interpolation: Mode used to resize the positional grid.

    Returns:
        z_bar (B x D, token 0) and z (B x D x h x w, tokens 1..).
    """
    b, _, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # B x hw x C
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    tokens = tokens + resize_grid_embedding(pool.positional_embedding, (h, w), interpolation).to(tokens.dtype)
    q, k, v = (_split_heads(proj(tokens), pool.num_heads) for proj in (pool.q_proj, pool.k_proj, pool.v_proj))
    out = pool.c_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
    return out[:, 0], out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)


class AttentionPool(nn.Module):
    """A randomly initialised CLIP-style attention pool that projects a feature map into the text space.

    Used by DenseCLIP's "any backbone" setting (ImageNet ResNet / Swin): same math as CLIP's pool
    (:func:`attention_pool_all_tokens`), with a learnable positional embedding on a
    ``spatial_dim`` x ``spatial_dim`` grid that is resized bilinearly at run time.

    Args:
        in_channels: Channels C of the input map.
        num_heads: Attention heads (must divide C).
        output_dim: Output dimension D (the text embedding width).
        spatial_dim: Side of the stored positional grid.
    """

    def __init__(self, in_channels: int, num_heads: int, output_dim: int, spatial_dim: int = 7) -> None:
        super().__init__()
        if in_channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide in_channels={in_channels}")
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, in_channels) / in_channels**0.5)
        self.k_proj = nn.Linear(in_channels, in_channels)
        self.q_proj = nn.Linear(in_channels, in_channels)
        self.v_proj = nn.Linear(in_channels, in_channels)
        self.c_proj = nn.Linear(in_channels, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x: B x C x h x w.

        Returns:
            z_bar (B x D) and z (B x D x h x w).
        """
        return attention_pool_all_tokens(self, x)


def _resize_parameter(param: nn.Parameter, grid: int, mode: str) -> nn.Parameter:
    return nn.Parameter(resize_grid_embedding(param.detach(), (grid, grid), mode).clone())


class CLIPResNetBackbone(nn.Module):
    """CLIP's ModifiedResNet as a dense backbone (DenseCLIP's ``CLIPResNetWithAttention``).

    BatchNorm layers stay trainable (convert to SyncBN under DDP in the training code).

    Args:
        visual: open_clip ``ModifiedResNet``; its modules become this backbone's.
        with_embeddings: Keep the attention pool and return z_bar and z. Without it the pool is
            dropped (CLIP + Semantic FPN baseline) and not counted as a parameter.
        input_resolution: If given, resize the pool's stored positional grid once, bilinearly, to
            ``input_resolution // 32`` per side (DenseCLIP: 512 -> 16 x 16); None keeps CLIP's grid.
            It is resized again to the actual C5 size at run time either way.
    """

    dense_stride = 32
    strides = (4, 8, 16, 32)

    def __init__(self, visual: nn.Module, with_embeddings: bool = True, input_resolution: int | None = None) -> None:
        super().__init__()
        if not hasattr(visual, "attnpool"):
            raise ValueError(f"expected open_clip's ModifiedResNet, got {type(visual).__name__}")
        for name in (*_RESNET_STEM, "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(visual, name))
        self.with_embeddings = with_embeddings
        self.attnpool = visual.attnpool if with_embeddings else None
        if with_embeddings and input_resolution is not None:
            pool = self.attnpool
            pool.positional_embedding = _resize_parameter(pool.positional_embedding, input_resolution // 32, "bilinear")
        self.out_channels = [
            layer[-1].conv3.out_channels for layer in (self.layer1, self.layer2, self.layer3, self.layer4)
        ]
        self.embed_dim = visual.attnpool.c_proj.out_features if with_embeddings else None
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass (BatchNorm statistics are then updated twice per step)."""
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``features``: [C2, C3, C4, C5], B x C_i x H/4 .. H/32; with embeddings also
            ``global_embed`` (B x D) and ``dense_embed`` (B x D x H/32 x W/32).
        """
        x = images.to(self.conv1.weight.dtype)
        for name in _RESNET_STEM:
            x = getattr(self, name)(x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            features.append(x)
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"features": features}
        if self.with_embeddings:
            out["global_embed"], out["dense_embed"] = attention_pool_all_tokens(self.attnpool, x, "bilinear")
        return out


def default_out_indices(depth: int) -> tuple[int, ...]:
    """DenseCLIP's ViT taps (3, 5, 7, 11) for depth 12, the same fractions of any other depth."""
    return tuple(max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1))


def vit_adapters(width: int, patch_size: int) -> nn.ModuleList:
    """The four adapters that turn ViT token maps into a stride 4/8/16/32 pyramid.

    Patch 16 (DenseCLIP's ViT-B/16): stride 4: GN -> ConvT2x2 -> BN -> GELU -> ConvT2x2;
    stride 8: GN -> ConvT2x2; stride 16: GN; stride 32: GN -> MaxPool2. Patch 8 (also in the
    authors' code; used by the tiny test towers): GN -> ConvT2x2, GN, GN -> MaxPool2, GN -> MaxPool4.
    """
    gn = lambda: nn.GroupNorm(1, width)  # noqa: E731
    up = lambda: nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)  # noqa: E731
    if patch_size == 16:
        return nn.ModuleList(
            [
                nn.Sequential(gn(), up(), nn.BatchNorm2d(width), nn.GELU(), up()),
                nn.Sequential(gn(), up()),
                gn(),
                nn.Sequential(gn(), nn.MaxPool2d(kernel_size=2, stride=2)),
            ]
        )
    if patch_size == 8:
        return nn.ModuleList(
            [
                nn.Sequential(gn(), up()),
                gn(),
                nn.Sequential(gn(), nn.MaxPool2d(kernel_size=2, stride=2)),
                nn.Sequential(gn(), nn.MaxPool2d(kernel_size=4, stride=4)),
            ]
        )
    raise ValueError(f"ViT adapters are defined for patch size 16 (DenseCLIP) and 8, not {patch_size}")


class CLIPViTBackbone(nn.Module):
    """CLIP's VisionTransformer as a dense backbone (DenseCLIP's ``CLIPVisionTransformer``).

    Block outputs at ``out_indices`` (patch tokens, before ``ln_post``) are reshaped to maps and
    passed through :func:`vit_adapters`. With embeddings, ``ln_post`` and ``proj`` are applied to all
    final tokens: token 0 is z_bar, the rest z at the patch stride.

    Args:
        visual: open_clip ``VisionTransformer`` with standard (batch-first) residual attention
            blocks and class-token pooling; its modules become this backbone's.
        out_indices: The four blocks tapped for the pyramid (indices may repeat in shallow towers).
            Default: (3, 5, 7, 11) for 12 blocks, the same fractions otherwise.
        drop_path: Stochastic-depth rate of the last block, increasing linearly from 0 over the
            blocks (DenseCLIP: 0.1).
        with_embeddings: Keep ``ln_post``/``proj`` and return z_bar and z.
        input_resolution: If given, resize the stored positional grid once to
            ``input_resolution // patch`` per side (DenseCLIP ViT-B/16: 640 -> 40 x 40); None keeps
            CLIP's grid. It is resized to the actual token grid at run time either way.
        class_embedding_twice: Reproduce the authors' code, which adds the class embedding to the
            class position a second time. Off by default (CLIP's behaviour).
        pos_interpolation: Mode of both positional-grid resizes: ``"bilinear"`` (the authors' code,
            default) or ``"bicubic"``.
    """

    strides = (4, 8, 16, 32)

    def __init__(
        self,
        visual: nn.Module,
        out_indices: Sequence[int] | None = None,
        drop_path: float = 0.1,
        with_embeddings: bool = True,
        input_resolution: int | None = None,
        class_embedding_twice: bool = False,
        pos_interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        blocks = visual.transformer.resblocks
        if (
            not getattr(visual.transformer, "batch_first", True)
            or getattr(visual, "attn_pool", None) is not None
            or not all(hasattr(b, "attention") and hasattr(b, "ls_1") for b in blocks)
        ):
            raise ValueError(
                "only batch-first CLIP ViTs with standard attention blocks and token pooling are supported"
            )
        depth = len(blocks)
        self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(depth)
        if len(self.out_indices) != 4 or not all(0 <= i < depth for i in self.out_indices):
            raise ValueError(f"need four out_indices in [0, {depth}), got {self.out_indices}")
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.dense_stride = self.patch_size
        width = visual.conv1.out_channels
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        if input_resolution is not None:
            self.positional_embedding = _resize_parameter(
                visual.positional_embedding, input_resolution // self.patch_size, pos_interpolation
            )
        self.pos_interpolation = pos_interpolation
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.drop_paths = nn.ModuleList(
            StochasticDepth(float(p), "row") if p > 0 else nn.Identity() for p in torch.linspace(0, drop_path, depth)
        )
        self.class_embedding_twice = class_embedding_twice
        self.with_embeddings = with_embeddings
        self.ln_post = visual.ln_post if with_embeddings else None
        self.proj = visual.proj if with_embeddings else None
        self.embed_dim = visual.proj.shape[1] if with_embeddings else None
        self.adapters = vit_adapters(width, self.patch_size)
        self.out_channels = [width] * 4
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass."""
        self.grad_checkpointing = enable

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk, drop = self.transformer.resblocks[i], self.drop_paths[i]
        x = x + drop(blk.ls_1(blk.attention(q_x=blk.ln_1(x))))
        return x + drop(blk.ls_2(blk.mlp(blk.ln_2(x))))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args:
            images: B x 3 x H x W normalised images (H, W multiples of the patch size).

        Returns:
            ``features``: four B x width maps at strides 4/8/16/32 (patch 16 or 8); with embeddings
            also ``global_embed`` (B x D) and ``dense_embed`` (B x D x H/p x W/p).
        """
        x = self.conv1(images.to(self.conv1.weight.dtype))
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = resize_grid_embedding(self.positional_embedding, (h, w), self.pos_interpolation).to(x.dtype)
        if self.class_embedding_twice:
            pos = torch.cat([pos[:1] + self.class_embedding.to(x.dtype), pos[1:]])
        x = self.ln_pre(x + pos)
        taps = {}
        for i in range(len(self.transformer.resblocks)):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block, i, x, use_reentrant=False)
            else:
                x = self._block(i, x)
            if i in self.out_indices:
                taps[i] = x[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        features = [adapter(taps[i]) for adapter, i in zip(self.adapters, self.out_indices, strict=True)]
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"features": features}
        if self.with_embeddings:
            x = self.ln_post(x) @ self.proj
            out["global_embed"] = x[:, 0]
            out["dense_embed"] = x[:, 1:].transpose(1, 2).reshape(b, -1, h, w)
        return out


class TimmBackbone(nn.Module):
    """Any timm backbone with a randomly initialised attention pool (DenseCLIP's "any backbone").

    The trunk is ``timm.create_model(name, features_only=True)`` (NHWC outputs, e.g. Swin, are
    permuted to NCHW); the pool (:class:`AttentionPool`) projects the last stage into the text space.

    Args:
        name: timm model name, e.g. ``"resnet50"``, ``"swin_tiny_patch4_window7_224"``.
        pretrained: False for random weights; True for timm's pretrained weights (downloaded or from
            the Hugging Face cache); a path to a local checkpoint file (loaded by timm with the model's
            own checkpoint filter). Never falls back to random weights when weights were asked for.
        output_dim: Output dimension D of the attention pool (the text embedding width); None builds
            no pool (features only).
        out_indices: timm feature indices of the stride 4/8/16/32 stages; default: the last four.
        pool_heads: Heads of the attention pool; default: last-stage channels // 64.
        pool_grid: Side of the pool's stored positional grid.
        timm_kwargs: Passed to ``timm.create_model`` (e.g. ``img_size``, ``strict_img_size``).

    Raises:
        RuntimeError: Weights were asked for but cannot be loaded.
    """

    dense_stride = 32

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        output_dim: int | None = None,
        out_indices: Sequence[int] | None = None,
        pool_heads: int | None = None,
        pool_grid: int = 7,
        timm_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        import timm

        timm_kwargs = dict(timm_kwargs or {})

        if out_indices is None:
            out_indices = (-4, -3, -2, -1)
        kwargs = dict(features_only=True, out_indices=tuple(out_indices), **timm_kwargs)
        self.trunk = _create_timm(timm, name, pretrained, kwargs)
        info = self.trunk.feature_info
        self.out_channels = list(info.channels())
        self.strides = tuple(info.reduction())
        if self.strides != (4, 8, 16, 32):
            raise ValueError(
                f"{name} out_indices={tuple(out_indices)} give strides {self.strides}, need (4, 8, 16, 32)"
            )
        self.channels_last = str(getattr(self.trunk, "output_fmt", "NCHW")).endswith("NHWC")
        self.embed_dim = output_dim
        self.attnpool = None
        if output_dim is not None:
            c = self.out_channels[-1]
            heads = pool_heads or max(1, c // 64)
            self.attnpool = AttentionPool(c, heads, output_dim, pool_grid)
        self.with_embeddings = output_dim is not None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the timm trunk's stages in the backward pass."""
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Args:
            images: B x 3 x H x W normalised images.

        Returns:
            ``features``: four B x C_i x H/4 .. H/32 maps; with a pool also ``global_embed``
            (B x D) and ``dense_embed`` (B x D x H/32 x W/32).
        """
        features = self.trunk(images)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"features": list(features)}
        if self.attnpool is not None:
            out["global_embed"], out["dense_embed"] = self.attnpool(features[-1])
        return out


def _create_timm(timm, name: str, pretrained: bool | str, kwargs: dict) -> nn.Module:
    """timm.create_model that raises instead of silently returning random weights."""
    if pretrained is False or pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if isinstance(pretrained, str) or hasattr(pretrained, "__fspath__"):
        if not os.path.isfile(pretrained):
            raise RuntimeError(
                f"backbone checkpoint not found: {pretrained}. Pass an existing file or pretrained=False."
            )
        kwargs = dict(kwargs, pretrained_cfg_overlay=dict(file=str(pretrained)))
        source = f"the local file {pretrained}"
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise RuntimeError(
                f"timm has no pretrained weights for '{name}': pass pretrained=False or a checkpoint path"
            )
        source = f"timm's pretrained weights ({cfg.hf_hub_id or cfg.url})"
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise RuntimeError(
            f"could not load {source} for timm model '{name}' ({type(e).__name__}: {e}). Download the "
            "checkpoint on a machine with network access and pass its path as the backbone's pretrained "
            "weights, or pass pretrained=False for random weights."
        ) from e


def dense_level_index(backbone: nn.Module) -> int:
    """Index of the pyramid level whose stride equals the backbone's dense stride (where DenseCLIP
    concatenates the score map: C5 for ResNets, the stride-16 map for ViT-B/16)."""
    strides = list(getattr(backbone, "strides", (4, 8, 16, 32)))
    if backbone.dense_stride not in strides:
        raise ValueError(f"dense stride {backbone.dense_stride} is not one of the pyramid strides {strides}")
    return strides.index(backbone.dense_stride)


__all__ = [
    "AttentionPool",
    "CLIPResNetBackbone",
    "CLIPViTBackbone",
    "TimmBackbone",
    "attention_pool_all_tokens",
    "default_out_indices",
    "dense_level_index",
    "vit_adapters",
]
