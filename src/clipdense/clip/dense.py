"""Dense image features from CLIP image towers (DenseCLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP).

Wraps an open_clip image tower (``ModifiedResNet`` or ``VisionTransformer``) without copying
its weights and computes, for any input size, the stage maps and a dense embedding map in the
joint text space:

* ResNet: C2..C5 stage maps; the attention pool run with all HW+1 tokens as queries
  (DenseCLIP, Rao et al. CVPR 2022: global z_bar and dense z), or MaskCLIP's value path
  c_proj(v_proj(C5)) (Zhou et al. ECCV 2022).
* ViT: intermediate patch maps; the last block replaced by a training-free variant, then
  ln_post and proj on every token (DenseCLIP's "embeddings" output is the ``vanilla`` mode).

Modes of the last attention (the ResNet attention pool or the ViT's last block); q, k, v are
per-head projections and s = 1/sqrt(head_dim):

* ``vanilla``: softmax(q k^T s) v, residual and MLP kept (ViT).
* ``maskclip``: v only (no q-k attention), residual and MLP kept (ViT); ResNet: c_proj(v_proj(x)).
* ``sclip``: (softmax(q q^T s) + softmax(k k^T s)) v, residual and MLP kept (ViT).
* ``clearclip``: softmax(q q^T s) v, no residual, no MLP.
* ``naclip``: softmax(k k^T s + G) v with G a Gaussian neighbourhood bias (std 5 patches,
  peak 1, zero for the class token), no residual, no MLP.
* ``clearclip_qk``: softmax(q k^T s) v, no residual, no MLP: what ClearCLIP's shipped
  ``configs/base_config.py`` runs (``model_type='vanilla', ignore_residual=True``); its author names q-q
  (``clearclip``) as the setting of the paper's numbers.

The ResNet attention pool has no residual or MLP, so there the modes differ only in attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipdense.config import MODES


@dataclass
class DenseFeatures:
    """Output of a dense CLIP encoder.

    Attributes:
        global_embed: B x D pooled image embedding (equals open_clip's ``encode_image`` at the
            native resolution).
        dense: B x D x h x w dense embeddings in the text space (not normalised), covering the
            padded input (h = padded H / stride).
        keys: B x Ck x h x w keys of the last attention, for MaskCLIP key smoothing.
        stages: Multi-level maps: ResNet C2..C5 (B x C_i x H/4..H/32); ViT intermediate block
            outputs as B x width x h x w.
        padded_size: (H, W) of the input after padding to the stride.
        stride: Pixels per dense-map cell.
    """

    global_embed: torch.Tensor
    dense: torch.Tensor
    keys: torch.Tensor
    stages: list[torch.Tensor] = field(default_factory=list)
    padded_size: tuple[int, int] = (0, 0)
    stride: int = 32


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad B x 3 x H x W (already normalised) images at the bottom/right to a multiple."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def resize_grid_embedding(pos: torch.Tensor, grid: tuple[int, int], mode: str, rule: str = "size") -> torch.Tensor:
    """Resize a square positional-embedding grid (with a leading class position) to ``grid``.

    Args:
        pos: (N*N + 1) x C positional embedding, row 0 the class position.
        grid: Target (h, w).
        mode: Interpolation (``bilinear`` as DenseCLIP for the ResNet pool, ``bicubic`` for ViT).
        rule: ``"size"``: interpolate to exactly ``grid`` (mmseg's ``resize``, MaskCLIP and DenseCLIP);
            ``"scale"``: DINO's ``interpolate_pos_encoding`` as SCLIP, ClearCLIP and NACLIP use it, with
            ``scale_factor = (grid + 0.1) / N`` (the same output size; the sampling positions differ:
            ~10% relative at 320 x 448).

    Returns:
        (h*w + 1) x C embedding; the input itself when the grid already matches.
    """
    n = round(math.sqrt(pos.shape[0] - 1))
    if (n, n) == tuple(grid):
        return pos
    spatial = pos[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    if rule == "scale":
        scale = ((grid[0] + 0.1) / n, (grid[1] + 0.1) / n)
        spatial = F.interpolate(spatial, scale_factor=scale, mode=mode, align_corners=False)
    elif rule == "size":
        spatial = F.interpolate(spatial, size=grid, mode=mode, align_corners=False)
    else:
        raise ValueError(f"unknown resize rule {rule!r}; use 'size' or 'scale'")
    spatial = spatial.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:1], spatial])


def gaussian_neighbourhood_bias(grid: tuple[int, int], std: float, device=None) -> torch.Tensor:
    """NACLIP's attention bias: exp(-d^2 / (2 std^2)) between patch positions, 0 for the class token.

    Returns:
        (h*w + 1) x (h*w + 1) additive bias.
    """
    ys, xs = torch.meshgrid(
        torch.arange(grid[0], device=device, dtype=torch.float32),
        torch.arange(grid[1], device=device, dtype=torch.float32),
        indexing="ij",
    )
    pts = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    bias = torch.exp(-torch.cdist(pts, pts).pow(2) / (2 * std**2))
    return F.pad(bias, (1, 0, 1, 0))


def mode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The attention of each mode, per head.

    Args:
        q: B x heads x N x d queries.
        k: B x heads x N x d keys.
        v: B x heads x N x d values.
        mode: One of :data:`MODES`.
        bias: N x N additive bias (``naclip`` only).

    Returns:
        B x heads x N x d attended values.
    """
    if mode == "maskclip":
        return v
    if mode in ("vanilla", "clearclip_qk"):
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "clearclip":
        return F.scaled_dot_product_attention(q, q, v)
    if mode == "sclip":
        return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    if mode == "naclip":
        return F.scaled_dot_product_attention(k, k, v, attn_mask=bias.to(k.dtype))
    raise ValueError(f"unknown dense mode '{mode}'; choose one of {MODES}")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class DenseResNetCLIP(nn.Module):
    """Dense features from CLIP's ModifiedResNet (RN50, RN101, ...).

    Args:
        visual: open_clip ``ModifiedResNet`` (shared, not copied).
        mode: Dense mode of the attention pool (see module docstring).
        naclip_std: Std of NACLIP's Gaussian bias, in C5 cells.
    """

    stride = 32

    def __init__(self, visual: nn.Module, mode: str = "maskclip", naclip_std: float = 5.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown dense mode '{mode}'; choose one of {MODES}")
        self.visual = visual
        self.mode = mode
        self.naclip_std = naclip_std

    def forward(self, images: torch.Tensor) -> DenseFeatures:
        """Args:
            images: B x 3 x H x W normalised images (any size; padded to a multiple of 32).

        Returns:
            Dense features; ``dense`` is B x D x H/32 x W/32 for the padded input.
        """
        v = self.visual
        x = pad_to_multiple(images.to(v.conv1.weight.dtype), self.stride)
        padded = tuple(x.shape[-2:])
        x = v.stem(x)
        stages = []
        for layer in (v.layer1, v.layer2, v.layer3, v.layer4):
            x = layer(x)
            stages.append(x)
        pool = v.attnpool
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B x HW x C
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        pos_tokens = tokens + resize_grid_embedding(pool.positional_embedding, (h, w), "bilinear").to(x.dtype)
        heads = pool.num_heads
        q = _split_heads(pool.q_proj(pos_tokens), heads)
        k = _split_heads(pool.k_proj(pos_tokens), heads)
        val = _split_heads(pool.v_proj(pos_tokens), heads)
        # z_bar: the class query against all tokens, as in CLIP's own pool.
        global_embed = pool.c_proj(_merge_heads(F.scaled_dot_product_attention(q[:, :, :1], k, val)))[:, 0]
        if self.mode == "maskclip":
            # MaskCLIP drops the positional embedding on the value path.
            plain = tokens[:, 1:]
            dense = pool.c_proj(pool.v_proj(plain))
            keys = pool.k_proj(plain)
        else:
            bias = gaussian_neighbourhood_bias((h, w), self.naclip_std, x.device) if self.mode == "naclip" else None
            dense = pool.c_proj(_merge_heads(mode_attention(q, k, val, self.mode, bias)))[:, 1:]
            keys = _merge_heads(k)[:, 1:]
        to_map = lambda t: t.transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
        return DenseFeatures(global_embed, to_map(dense), to_map(keys), stages, padded, self.stride)


#: Modes whose official code resizes ViT positional embeddings by scale factor (DINO's rule).
SCALE_RESIZE_MODES = ("sclip", "clearclip", "clearclip_qk", "naclip")


class DenseViTCLIP(nn.Module):
    """Dense features from CLIP's VisionTransformer (ViT-B/16, ...).

    Args:
        visual: open_clip ``VisionTransformer`` with standard residual attention blocks.
        mode: Dense mode of the last block (see module docstring).
        out_indices: Blocks whose outputs are returned as ``stages`` (default: DenseCLIP's
            [3, 5, 7, 11] scaled to the depth).
        naclip_std: Std of NACLIP's Gaussian bias, in patches.
        pos_resize: How the positional grid is resized to the token grid (see :func:`resize_grid_embedding`);
            None: as each mode's official code (``scale`` for sclip, clearclip and naclip, ``size`` otherwise).
    """

    def __init__(
        self,
        visual: nn.Module,
        mode: str = "maskclip",
        out_indices: Sequence[int] | None = None,
        naclip_std: float = 5.0,
        pos_resize: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown dense mode '{mode}'; choose one of {MODES}")
        last = visual.transformer.resblocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention) or visual.attn_pool is not None:
            raise ValueError("only CLIP ViTs with standard attention blocks and token pooling are supported")
        self.visual = visual
        self.mode = mode
        depth = len(visual.transformer.resblocks)
        if out_indices is None:
            out_indices = sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1)})
            out_indices = [3, 5, 7, 11] if depth == 12 else out_indices
        self.out_indices = tuple(out_indices)
        self.naclip_std = naclip_std
        self.pos_resize = pos_resize or ("scale" if mode in SCALE_RESIZE_MODES else "size")
        if self.pos_resize not in ("size", "scale"):
            raise ValueError(f"unknown pos_resize {pos_resize!r}; use 'size' or 'scale'")
        self.stride = int(visual.patch_size[0])

    def _last_block(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the last block in the chosen mode; returns (B x N x width tokens, B x N x width keys)."""
        blk = self.visual.transformer.resblocks[-1]
        attn: nn.MultiheadAttention = blk.attn
        y = blk.ln_1(x)
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        keys = attn.out_proj(k)  # MaskCLIP's key-smoothing keys: the output projection applied to k, as to v
        heads = attn.num_heads
        q, k, v = (_split_heads(t, heads) for t in (q, k, v))
        if self.mode == "vanilla":
            out = blk.ls_1(attn.out_proj(_merge_heads(mode_attention(q, k, v, "vanilla"))))
            z = x + out
            return z + blk.ls_2(blk.mlp(blk.ln_2(z))), keys
        bias = gaussian_neighbourhood_bias(grid, self.naclip_std, x.device) if self.mode == "naclip" else None
        out = blk.ls_1(attn.out_proj(_merge_heads(mode_attention(q, k, v, self.mode, bias))))
        if self.mode in ("clearclip", "clearclip_qk", "naclip"):
            z = out
        else:
            z = x + out
            z = z + blk.ls_2(blk.mlp(blk.ln_2(z)))
        # The class token keeps CLIP's own attention so that the global embedding stays CLIP's.
        cls_out = blk.ls_1(attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q[:, :, :1], k, v))))
        cls = x[:, :1] + cls_out
        cls = cls + blk.ls_2(blk.mlp(blk.ln_2(cls)))
        return torch.cat([cls, z[:, 1:]], dim=1), keys

    def forward(self, images: torch.Tensor) -> DenseFeatures:
        """Args:
            images: B x 3 x H x W normalised images (any size; padded to the patch size).

        Returns:
            Dense features; ``dense`` is B x D x H/p x W/p for the padded input.
        """
        v = self.visual
        x = pad_to_multiple(images.to(v.conv1.weight.dtype), self.stride)
        padded = tuple(x.shape[-2:])
        x = v.conv1(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.view(1, 1, -1).expand(b, -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_grid_embedding(v.positional_embedding, (h, w), "bicubic", self.pos_resize).to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        stages = []
        for i, blk in enumerate(blocks[:-1]):
            x = blk(x)
            if i in self.out_indices:
                stages.append(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
        x, keys = self._last_block(x, (h, w))
        if len(blocks) - 1 in self.out_indices:
            stages.append(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
        x = v.ln_post(x) @ v.proj
        to_map = lambda t: t[:, 1:].transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
        return DenseFeatures(x[:, 0], to_map(x), to_map(keys), stages, padded, self.stride)


def dense_clip_encoder(visual: nn.Module, mode: str = "maskclip", **kwargs) -> nn.Module:
    """Build the dense encoder that matches an open_clip image tower (ResNet or ViT)."""
    if hasattr(visual, "attnpool"):
        return DenseResNetCLIP(visual, mode, **kwargs)
    if hasattr(visual, "transformer") and hasattr(visual, "class_embedding"):
        return DenseViTCLIP(visual, mode, **kwargs)
    raise ValueError(f"unsupported CLIP image tower {type(visual).__name__}: expected ModifiedResNet or ViT")
