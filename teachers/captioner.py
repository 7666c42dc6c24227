"""The Slow teacher: a fine-grained cross-attention captioner with gradual feature upsampling.

"Thinking Fast and Slow" (Miech et al., CVPR 2021) scores a (text, visual item) pair by how well a captioner
conditioned on the item generates the text. This file builds that captioner:

* **Visual side, images.** A timm backbone (`features_only`) gives maps at strides 8/16/32. A top-down path starts at
  the coarsest map and upsamples x2 step by step, fusing the next finer map through a lateral 1x1 projection and a 3x3
  smoothing conv (FPN, Lin et al. 2017); each level becomes tokens with a 2-D sin-cos position and a learned scale
  embedding. 64 px -> 2x2, 4x4, 8x8 grids (84 tokens); 224 px -> 7x7, 14x14, 28x28.
* **Visual side, video.** Precomputed clip features [B, T, D_in] are projected to D, given temporal positions, mixed
  by a small transformer layer (padding masked) and average-pooled by 4, 2 and 1 along time (mask-aware): T=16 ->
  4, 8, 16 tokens. The same coarse -> fine schedule then runs along time.
* **Text decoder.** Pre-norm transformer layers (causal self-attention, cross-attention, MLP) split into groups;
  group g cross-attends to the tokens of scale g, coarse first, fine last, so fine detail is read without paying
  for it in every layer (`cross_attn="gradual"`; `"coarse"` / `"fine"` make every layer read one scale, for the
  ablation). The output projection is tied to the token embedding.
* **Bi-directional captioning loss.** The decoder reads the text left-to-right and right-to-left (`BOS w_n .. w_1
  EOS`, see `reverse_tokens`). By default one decoder serves both directions, told apart by a learned direction
  embedding added to every input position (`share_directions=True`: half the parameters of two decoders, and both
  directions train the same cross-attention); `share_directions=False` gives each direction its own decoder.
* **A decoder that starts from BERT** (`text_pretrained_path`, a local Hugging Face BERT-family directory), as BLIP
  builds its captioner from bert-base (Li et al. 2022, `models/med.py`): each decoder layer takes one BERT layer's
  self-attention (made causal), feed-forward and LayerNorms, in BERT's post-norm layout, with a cross-attention
  block added fresh between the two; the token and position embeddings and the embedding LayerNorm come from BERT,
  whose hidden size, heads and depth then decide the decoder's (the depth split into the cross-attention groups).
  The visual tokens are projected to BERT's width; the direction embedding and the LM head transform are new.

Score (`Captioner.score`), the length-normalised log-likelihood summed over the directions::

    s(t, v) = sum_dir (1 / |t|) sum_{i=1}^{|t|} log p_dir(t_i | t_<i, v),   t = (w_1 .. w_n, EOS) in reading order

|t| = n + 1 counts the predicted tokens (EOS included, BOS excluded).

* **Token merging at scoring time** (`merge_ratio`, CrossGET / ToMe): before decoder group g >= 1 the visual tokens
  its layers read are merged g times, each time folding the `merge_ratio` share most similar to a partner into it
  (bipartite soft matching, `merge_tokens`), so later groups attend fewer tokens; attention to a merged token is
  weighted by how many tokens it holds (log-size bias). Training (`loss`) never merges; 0 is the unmerged model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from fastslow.data.loaders import resolve_image_config
from fastslow.errors import CheckpointError
from fastslow.pretrained import create_timm_backbone, resolve_text_dir
from teachers import register_teacher
from teachers.tokens import VisualTokens

__all__ = ["CaptionerConfig", "Captioner", "reverse_tokens", "captioner_tiny", "captioner_small", "captioner_base"]

_MODALITIES = ("image", "video")
_CROSS_ATTN = ("gradual", "coarse", "fine")


@dataclass
class CaptionerConfig:
    """Everything that defines a captioner; the size builders fill it, keyword overrides change any field."""

    modality: str = "image"  # "image" (pixels through a timm backbone) | "video" (precomputed clip features)
    vocab_size: int = 1000  # tokenizer vocabulary size; the output projection is tied to the token embedding
    max_length: int = 32  # longest tokenised text incl. BOS and EOS (size of the learned position table)
    embed_dim: int = 256  # decoder width D; every visual token is projected to D
    num_heads: int = 4  # attention heads in the decoder and the temporal encoder
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D
    group_depths: tuple[int, ...] = (1, 1, 1)  # decoder layers per group; group g attends scale g (coarse -> fine)
    cross_attn: str = "gradual"  # "gradual" (group g -> scale g) | "coarse" | "fine" (every layer -> that one scale)
    directions: int = 2  # 2 = L2R + R2L bi-directional captioning loss and score; 1 = L2R only (ablation)
    share_directions: bool = True  # one decoder + learned direction embedding; False = one decoder per direction
    label_smoothing: float = 0.0  # cross-entropy label smoothing (training loss only; the score never smooths)
    dropout: float = 0.0  # dropout on embeddings, residual branches and attention (train mode only)
    backbone: str = "test_resnet"  # image: timm model name, created with features_only=True
    backbone_args: dict[str, Any] = field(default_factory=dict)  # image: extra timm kwargs (widths, depths, ...)
    out_indices: tuple[int, ...] = (2, 3, 4)  # image: timm feature levels (fine -> coarse; ResNet strides 8/16/32)
    image_size: int = 64  # image: input side in pixels; fixes the token grid sizes that `score` slices by
    pretrained_path: str | None = None  # image: local backbone checkpoint (never a hub download)
    # image: pixel statistics and resampling filter of the image loader feeding this teacher; None = the backbone's
    # own, as timm resolves them (ResNet-50: ImageNet's), so pretrained weights see the pixels they were trained on.
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    image_interpolation: str | None = None  # nearest | bilinear | bicubic | lanczos | box | hamming
    feature_dim: int = 1024  # video: clip feature width D_in (I3D: 1024)
    temporal_pool: tuple[int, ...] = (4, 2, 1)  # video: pooling factor per temporal scale, coarse -> fine
    temporal_depth: int = 1  # video: transformer layers over frames before pooling
    merge_ratio: float = 0.0  # scoring only: share of visual tokens merged before each decoder group after the first
    # A local BERT-family directory (save_pretrained, a Hub or sentence-transformers snapshot) whose embeddings and
    # layers start the text decoder; its size replaces embed_dim / num_heads / mlp_ratio / group_depths.
    text_pretrained_path: str | None = None
    # The BERT config (`config.to_dict()`) of such a decoder: rebuilds its architecture without the directory (a
    # trained teacher keeps it as text_config.json beside its weights). Set from the directory when it is read.
    text_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Configs arrive from YAML as lists; keep them hashable and printable the same way.
        self.group_depths = tuple(int(d) for d in self.group_depths)
        self.out_indices = tuple(int(i) for i in self.out_indices)
        self.temporal_pool = tuple(int(p) for p in self.temporal_pool)
        self.backbone_args = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.backbone_args).items()}
        if self.modality not in _MODALITIES:
            raise ValueError(f"modality={self.modality!r}; expected one of {_MODALITIES}")
        if self.cross_attn not in _CROSS_ATTN:
            raise ValueError(f"cross_attn={self.cross_attn!r}; expected one of {_CROSS_ATTN}")
        if self.directions not in (1, 2):
            raise ValueError(f"directions={self.directions}; expected 1 (L2R) or 2 (L2R + R2L)")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads} and by 4")
        if min(self.group_depths, default=0) < 1:
            raise ValueError(f"group_depths={self.group_depths}: every group needs at least one layer")
        if self.cross_attn == "gradual" and len(self.group_depths) != self.num_scales:
            raise ValueError(
                f"cross_attn='gradual' needs one decoder group per visual scale: "
                f"group_depths={self.group_depths} vs {self.num_scales} scales"
            )
        if not 0.0 <= float(self.merge_ratio) <= 0.5:
            raise ValueError(
                f"merge_ratio={self.merge_ratio} must be in [0, 0.5] (bipartite matching merges at most half)"
            )
        pools = self.temporal_pool
        if any(p < 1 or pools[0] % p for p in pools) or list(pools) != sorted(pools, reverse=True):
            raise ValueError(f"temporal_pool={pools} must be decreasing divisors of its first (coarsest) factor")

    @property
    def num_scales(self) -> int:
        """Scales of the visual pyramid (before `cross_attn` picks which of them become tokens)."""
        return len(self.out_indices) if self.modality == "image" else len(self.temporal_pool)

    @property
    def depth(self) -> int:
        return sum(self.group_depths)

    @property
    def bert_layout(self) -> bool:
        """True: post-norm BERT layers (a decoder from `text_pretrained_path` / `text_config`); False: pre-norm."""
        return self.text_config is not None

    @property
    def norm_eps(self) -> float:
        return float(self.text_config.get("layer_norm_eps", 1e-12)) if self.bert_layout else 1e-5


# --------------------------------------------------------------------------------------------------- helpers
def reverse_tokens(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Reverse the words of every row between BOS and EOS: `BOS w1..wn EOS PAD..` -> `BOS wn..w1 EOS PAD..`.

    Rows are right-padded with BOS first and EOS last among the real tokens (docs/ARCHITECTURE.md); no pad id is
    needed. One gather over the batch: position j in [1, len-2] reads position len-1-j, every other position itself.

    Args:
        input_ids: [B, L] token ids.
        attention_mask: [B, L], nonzero for real tokens.

    Returns:
        [B, L] ids in right-to-left reading order (an involution: applying it twice gives `input_ids` back).
    """
    length = attention_mask.long().sum(1, keepdim=True)  # [B, 1]
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # [1, L]
    inner = (pos >= 1) & (pos <= length - 2)
    return input_ids.gather(1, torch.where(inner, length - 1 - pos, pos))


def _sincos(pos: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal embedding (Vaswani et al. 2017) of real-valued positions: [n] -> [n, dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=pos.device, dtype=torch.float32) / (dim // 2))
    angle = pos.float()[:, None] * omega[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def _sincos_2d(h: int, w: int, ref_h: int, ref_w: int, dim: int, device: torch.device) -> Tensor:
    """2-D sin-cos positions of an h x w grid's cell centres, in units of the finest (ref_h x ref_w) grid.

    Measuring every scale in finest-grid units gives a coarse cell the position of the centre of the fine cells it
    covers, so the decoder sees the scales as views of one image. Returns [h * w, dim] (half y, half x).
    """
    y = (torch.arange(h, device=device) + 0.5) * (ref_h / h)
    x = (torch.arange(w, device=device) + 0.5) * (ref_w / w)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.cat([_sincos(yy.flatten(), dim // 2), _sincos(xx.flatten(), dim // 2)], dim=1)


def _key_mask(mask: Tensor | None) -> Tensor | None:
    """[B, N] bool (True = real) -> SDPA boolean mask [B, 1, 1, N] (True = attend), or None when nothing is padded.

    An item with no real token would make every attention row -inf (NaN after softmax); it attends to its (zeroed)
    tokens instead, so its scores stay finite and meaningless rather than poisoning a whole batch.
    """
    if mask is None:
        return None
    mask = mask | ~mask.any(1, keepdim=True)
    return mask[:, None, None, :]


def _size_bias(sizes: Tensor, mask: Tensor | None) -> Tensor:
    """Proportional attention over merged tokens (ToMe): logits + log(size); padding -inf. -> [B, 1, 1, N] float."""
    bias = sizes.log()
    if mask is not None:
        mask = mask | ~mask.any(1, keepdim=True)  # as `_key_mask`: an item with no real token attends to all
        bias = bias.masked_fill(~mask, float("-inf"))
    return bias[:, None, None, :]


def merge_tokens(tokens: Tensor, sizes: Tensor, mask: Tensor | None, r: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Merge r tokens of each item into their most similar partner (bipartite soft matching, Bolya et al. 2023).

    Tokens alternate into sets A (even positions) and B (odd); each A token's partner is its most cosine-similar
    B token; the r A tokens with the most similar partners are folded into them as a size-weighted mean. Cross-
    attention has no notion of token order, so the result is [kept A tokens, B tokens]. Similarity is measured on
    the tokens themselves, not on one layer's keys as ToMe does: the merge is then computed once per item for every
    layer and decoder that reads it.

    Padding (video; mask False) weighs 0 in every mean: a padded A token merges first (it costs nothing), a real
    token merges into a real partner, and only when none is left into a padded one, which then becomes real. So
    no real token is ever dropped and the output mask says which tokens hold something.

    Args:
        tokens: [B, N, D]; sizes: [B, N] tokens each one already holds (1 before any merge); mask: [B, N] or None.
        r: tokens to remove per item (at most the size of A).

    Returns:
        (tokens [B, N - r, D], sizes [B, N - r], mask [B, N - r] or None).
    """
    B, N, D = tokens.shape
    r = min(int(r), N // 2)  # A has ceil(N/2) tokens and B floor(N/2); r <= |B| keeps B non-empty
    if r <= 0:
        return tokens, sizes, mask
    real = torch.ones(B, N, dtype=torch.bool, device=tokens.device) if mask is None else mask
    a, b, ra, rb = tokens[:, ::2], tokens[:, 1::2], real[:, ::2], real[:, 1::2]
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)  # [B, Na, Nb] in [-1, 1]
    if mask is not None:
        both = ra[:, :, None] & rb[:, None, :]
        sim = torch.where(both, sim, torch.where(ra[:, :, None], -1e4, 2.0).expand_as(sim))
    best, partner = sim.max(dim=-1)  # [B, Na]
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged, kept = order[:, :r], order[:, r:]
    weight = sizes.to(tokens.dtype) * real  # padding weighs nothing
    wa, wb = weight[:, ::2], weight[:, 1::2]
    w = torch.gather(wa, 1, merged)
    dst = torch.gather(partner, 1, merged)
    src = torch.gather(a, 1, merged[..., None].expand(-1, -1, D))
    b_sum = (b * wb[..., None]).scatter_add(1, dst[..., None].expand(-1, -1, D), src * w[..., None])
    b_size = wb.scatter_add(1, dst, w)
    holds = b_size > 0
    new_b = torch.where(holds[..., None], b_sum / b_size.clamp_min(1e-12)[..., None], b)
    out_tokens = torch.cat([torch.gather(a, 1, kept[..., None].expand(-1, -1, D)), new_b], dim=1)
    out_sizes = torch.cat(
        [torch.gather(sizes[:, ::2], 1, kept), torch.where(holds, b_size, 1.0).to(sizes.dtype)], dim=1
    )
    out_mask = None if mask is None else torch.cat([torch.gather(ra, 1, kept), holds], dim=1)
    return out_tokens, out_sizes, out_mask


# --------------------------------------------------------------------------------------------------- blocks
class SelfAttention(nn.Module):
    """Multi-head self-attention over [B, L, D]; causal for the decoder, padding-masked for the temporal encoder."""

    def __init__(self, dim: int, num_heads: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.causal, self.dropout = num_heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # Right padding + causal mask: a real position never sees a pad, so the decoder needs no key mask.
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """Multi-head attention from text positions to visual tokens, with keys/values computed once per item.

    Cross-attention never mixes query positions, so the positions of all m texts read against one item are folded
    into one query sequence of length m * L: the item's keys/values are used as they are, never copied m times.
    `groups` does the same when items are read by different numbers of rows (query-time candidates).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def memory(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of visual tokens [V, N, D] -> two [V, H, N, D/H]."""
        V, N, D = tokens.shape
        k, v = self.kv(tokens).view(V, N, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, memory: tuple[Tensor, Tensor], attn_mask: Tensor | None,
                groups: list[tuple[int, int, int, int]] | None = None) -> Tensor:  # fmt: skip
        """x [V, Q, D] (Q = texts x positions per item), memory from `memory`, attn_mask [V, 1, 1, N] -> [V, Q, D].

        groups: None = row v of x reads item v. Otherwise (r0, r1, u0, u1) tuples covering x's rows: rows r0..r1
        read items u0..u1 of the memory, (r1 - r0) / (u1 - u0) consecutive rows per item (`_groups`).
        """
        V, Q, D = x.shape
        H, p = self.num_heads, self.dropout if self.training else 0.0
        q = self.q(x).view(V, Q, H, D // H)
        if groups is None:
            x = F.scaled_dot_product_attention(q.transpose(1, 2), *memory, attn_mask=attn_mask, dropout_p=p)
            return self.proj(x.transpose(1, 2).reshape(V, Q, D))
        (k, v), x = memory, torch.empty_like(q)
        for r0, r1, u0, u1 in groups:
            n = u1 - u0  # items of this group; the c = (r1 - r0) / n rows of an item are one query sequence
            qg = q[r0:r1].view(n, (r1 - r0) // n * Q, H, D // H).transpose(1, 2)  # a view: no copy of the queries
            mask = None if attn_mask is None else attn_mask[u0:u1]
            og = F.scaled_dot_product_attention(qg, k[u0:u1], v[u0:u1], attn_mask=mask, dropout_p=p)
            x[r0:r1] = og.transpose(1, 2).reshape(r1 - r0, Q, H, D // H)
        return self.proj(x.view(V, Q, D))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: x += SA(LN x) (causal); x += CA(LN x, visual); x += MLP(LN x).

    ``post_norm=True`` is BERT's layout (and BLIP's decoder built from it): x = LN(x + SA(x)); x = LN(x + CA(x));
    x = LN(x + MLP(x)), so the layer computes what a BERT layer does once its cross-attention is added.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, post_norm: bool = False,
                 eps: float = 1e-5):  # fmt: skip
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, num_heads, causal=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, num_heads, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        # round: a BERT's intermediate_size / hidden_size ratio gives its width back exactly (int() may fall short)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), drop=dropout)
        self.drop = nn.Dropout(dropout)

    def self_block(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]."""
        if self.post_norm:
            return self.norm1(x + self.drop(self.self_attn(x)))
        return x + self.drop(self.self_attn(self.norm1(x)))

    def cross_block(self, x: Tensor, memory: tuple[Tensor, Tensor], attn_mask: Tensor | None,
                    groups: list | None = None) -> Tensor:  # fmt: skip
        """x [V, m, L, D] (m texts per visual item; with `groups`, see `CrossAttention.forward`) -> [V, m, L, D]."""
        V, m, L, D = x.shape
        if self.post_norm:
            ca = self.cross_attn(x.reshape(V, m * L, D), memory, attn_mask, groups).view(V, m, L, D)
            x = self.norm2(x + self.drop(ca))
            return self.norm3(x + self.drop(self.mlp(x)))
        ca = self.cross_attn(self.norm2(x).reshape(V, m * L, D), memory, attn_mask, groups).view(V, m, L, D)
        x = x + self.drop(ca)
        return x + self.drop(self.mlp(self.norm3(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer over frames (bidirectional self-attention with a padding mask, then MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, causal=False, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), attn_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class PyramidEncoder(nn.Module):
    """Image -> multi-scale visual tokens by gradual (top-down, x2 per stage) feature upsampling.

    With maps c_0 (coarsest) .. c_{S-1} (finest) from the backbone, the top-down path is (FPN)::

        m_0 = lateral_0(c_0),   m_g = upsample_x2(m_{g-1}) + lateral_g(c_g),   p_g = smooth_g(m_g)   (3x3 conv)

    so every finer level carries the coarser context. Token scales: all levels ("gradual"), the coarsest only
    ("coarse": the backbone stops there, no finer path is built) or the finest only ("fine": built through the whole
    top-down path, only its last level is kept).
    """

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        out_indices = cfg.out_indices[-1:] if cfg.cross_attn == "coarse" else cfg.out_indices
        # A local timm checkpoint (pretrained_path, .safetensors or a .pth state dict) is loaded by timm and checked
        # to fit the backbone (fastslow.pretrained); never a download.
        self.backbone = create_timm_backbone(
            cfg.backbone,
            cfg.pretrained_path,
            key="teacher.pretrained_path",
            features_only=True,
            out_indices=out_indices,
            **cfg.backbone_args,
        )
        channels = self.backbone.feature_info.channels()[::-1]  # timm lists fine -> coarse; the path runs coarse first
        levels = len(channels)
        self.token_levels = list(range(levels)) if cfg.cross_attn == "gradual" else [levels - 1]
        D = cfg.embed_dim
        self.lateral = nn.ModuleList(nn.Conv2d(c, D, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Conv2d(D, D, 3, padding=1) for _ in self.token_levels)
        self.scale_embed = nn.Parameter(torch.zeros(len(self.token_levels), D))
        self.norm = nn.LayerNorm(D)
        # Grid size per level, from one dry run at the configured image size (valid for any timm backbone).
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            maps = self.backbone(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        self.backbone.train(was_training)
        self.level_grids = [tuple(m.shape[-2:]) for m in maps[::-1]]
        self.image_size = cfg.image_size
        self.data_config = resolve_image_config(
            self.backbone, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_interpolation
        )

    @property
    def scale_sizes(self) -> list[int]:
        """Tokens per token scale, coarse -> fine, at the configured image size."""
        return [self.level_grids[lv][0] * self.level_grids[lv][1] for lv in self.token_levels]

    def pyramid(self, pixels: Tensor) -> list[Tensor]:
        """pixels [B, 3, H, W] -> every level of the top-down path, coarse -> fine, each [B, D, h_g, w_g]."""
        # NHWC input: CPU (oneDNN) and cuDNN convs run it faster (test_resnet, batch 64 at 64 px, 1 core: fwd+bwd
        # 123 -> 78 ms); the weights stay contiguous, so checkpoints are unaffected.
        feats = self.backbone(pixels.contiguous(memory_format=torch.channels_last))[::-1]
        out, m = [], None
        for g, (c, lateral) in enumerate(zip(feats, self.lateral)):
            lat = lateral(c)
            # `size=` rather than scale_factor=2: exact for odd grids too (e.g. 100 px -> 4, 7, 13).
            m = lat if m is None else F.interpolate(m, size=lat.shape[-2:], mode="nearest") + lat
            out.append(self.smooth[self.token_levels.index(g)](m) if g in self.token_levels else m)
        return out

    def forward(self, pixels: Tensor) -> VisualTokens:
        """pixels [B, 3, H, W] -> VisualTokens [B, sum(scale_sizes), D], mask None."""
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"teacher built for {self.image_size}px images, got {tuple(pixels.shape[-2:])}; "
                f"rebuild it with image_size={pixels.shape[-1]}"
            )
        levels = self.pyramid(pixels)
        ref_h, ref_w = levels[-1].shape[-2:]
        tokens = []
        for s, lv in enumerate(self.token_levels):
            p = levels[lv]
            pos = _sincos_2d(*p.shape[-2:], ref_h, ref_w, p.shape[1], p.device).to(p.dtype)
            tokens.append(p.flatten(2).transpose(1, 2) + pos + self.scale_embed[s])
        return VisualTokens(self.norm(torch.cat(tokens, dim=1)), None)


class TemporalEncoder(nn.Module):
    """Clip features [B, T, D_in] + mask -> multi-scale temporal tokens, coarse (pooled by 4) -> fine (every frame).

    Mask-aware pooling by f: a pooled token is the mean of its window's real frames and is real if any frame is.
    T is right-padded with masked frames to a multiple of the coarsest factor, so every scale tiles the clip.
    """

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        D = cfg.embed_dim
        self.pools = cfg.temporal_pool
        self.proj = nn.Linear(cfg.feature_dim, D)
        self.layers = nn.ModuleList(
            EncoderLayer(D, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.temporal_depth)
        )
        levels = len(self.pools)
        self.token_levels = (
            list(range(levels))
            if cfg.cross_attn == "gradual"
            else ([0] if cfg.cross_attn == "coarse" else [levels - 1])
        )
        self.scale_embed = nn.Parameter(torch.zeros(len(self.token_levels), D))
        self.norm = nn.LayerNorm(D)

    def scale_sizes(self, num_tokens: int) -> list[int]:
        """Split of `num_tokens` into token scales: scale s holds T_pad / f_s tokens, so N = T_pad * sum(1 / f_s)."""
        rel = [self.pools[0] // self.pools[lv] for lv in self.token_levels]
        unit, rest = divmod(num_tokens, sum(rel))
        if rest:
            raise ValueError(f"{num_tokens} video tokens do not split into scales with pooling {self.pools}")
        return [unit * r for r in rel]

    def forward(self, features: Tensor, mask: Tensor | None = None) -> VisualTokens:
        """features [B, T, D_in], mask [B, T] bool (None = all real) -> VisualTokens [B, N, D] with mask [B, N]."""
        B, T, _ = features.shape
        mask = torch.ones(B, T, dtype=torch.bool, device=features.device) if mask is None else mask.bool()
        pad = -T % self.pools[0]
        if pad:
            features = F.pad(features, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        T = T + pad
        # Padded frames are replaced before anything reads them: even NaN/inf padding cannot reach a real token
        # (a masked attention weight is 0, but 0 * NaN is NaN).
        features = features.masked_fill(~mask[..., None], 0.0)
        x = self.proj(features)
        x = x + _sincos(torch.arange(T, device=x.device), x.shape[-1]).to(x.dtype)
        attn_mask = _key_mask(mask)
        for layer in self.layers:
            x = layer(x, attn_mask)
        # Zero padded frames so that their outputs reach no pooled or stored token.
        x = x.masked_fill(~mask[..., None], 0.0)
        tokens, masks = [], []
        for s, lv in enumerate(self.token_levels):
            f = self.pools[lv]
            count = mask.view(B, T // f, f).sum(2, keepdim=True)  # [B, T/f, 1]
            pooled = x.view(B, T // f, f, -1).sum(2) / count.clamp(min=1)
            valid = count.squeeze(2) > 0
            tokens.append(self.norm(pooled + self.scale_embed[s]).masked_fill(~valid[..., None], 0.0))
            masks.append(valid)
        return VisualTokens(torch.cat(tokens, dim=1), torch.cat(masks, dim=1))


class TextDecoder(nn.Module):
    """Token + position (+ direction) embeddings, decoder layers, final norm and a tied output projection."""

    def __init__(self, cfg: CaptionerConfig, num_direction_embeddings: int):
        super().__init__()
        D, post, eps = cfg.embed_dim, cfg.bert_layout, cfg.norm_eps
        self.tok_embed = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_length, D))
        self.dir_embed = nn.Parameter(torch.zeros(num_direction_embeddings, D)) if num_direction_embeddings else None
        # BERT normalises its embeddings (post-norm layers expect normalised inputs); the pre-norm decoder does not.
        self.embed_norm = nn.LayerNorm(D, eps=eps) if post else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(D, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, post_norm=post, eps=eps)
            for _ in range(cfg.depth)
        )
        # Pre-norm: the final LayerNorm. Post-norm (BERT): the last layer's output is normalised already, and BERT's
        # LM head transform (dense, GELU, LayerNorm; BertLMPredictionHead, fresh here) comes before the tied softmax.
        self.norm = nn.LayerNorm(D) if not post else nn.Identity()
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=eps)) if post else nn.Identity()

    def embed(self, ids: Tensor, direction: int) -> Tensor:
        """ids [m, L] -> layer-0 self-attention output [m, L, D], which depends on the text only (not the item)."""
        x = self.tok_embed(ids) + self.pos_embed[: ids.shape[1]]
        if self.dir_embed is not None:
            x = x + self.dir_embed[direction]
        return self.layers[0].self_block(self.drop(self.embed_norm(x)))

    def memories(self, layer_tokens: list[tuple[Tensor, Tensor | None]]) -> list[tuple[tuple[Tensor, Tensor], Any]]:
        """Per layer: cross-attention keys/values of the tokens it reads, and their SDPA mask (bool or float bias).

        `layer_tokens` holds one (tokens [V, N, D], attention mask) per layer (`Captioner._layer_tokens`); computed
        once per item.
        """
        return [(layer.cross_attn.memory(tok), mask) for layer, (tok, mask) in zip(self.layers, layer_tokens)]

    def forward(self, x: Tensor, memories: list, groups: list | None = None) -> Tensor:
        """x [V, m, L, D] from `embed` (m texts per item), memories from `memories` -> final hidden [V, m, L, D].

        groups: which rows of x read which items (`CrossAttention.forward`); None = row v reads item v.
        """
        V, m, L, D = x.shape
        for i, (layer, (mem, mask)) in enumerate(zip(self.layers, memories)):
            if i:
                x = layer.self_block(x.reshape(V * m, L, D)).view(V, m, L, D)
            x = layer.cross_block(x, mem, mask, groups)
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """[..., D] -> [..., vocab] through the tied embedding (Press & Wolf 2017)."""
        return F.linear(self.head(h), self.tok_embed.weight)


# --------------------------------------------------------------------------------------------------- model
class Captioner(nn.Module):
    """Bi-directional cross-attention captioner used as the Slow retrieval teacher (see the module docstring).

    `score` and `score_pairs` run under `torch.no_grad()` and do not change the train/eval mode: put the teacher in
    eval mode first (the frozen teacher is set up once by the caller: `requires_grad_(False)`, `eval()`).
    """

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.config = cfg
        self.modality = cfg.modality
        self.visual = PyramidEncoder(cfg) if cfg.modality == "image" else TemporalEncoder(cfg)
        shared = cfg.share_directions or cfg.directions == 1
        n_dir_embed = cfg.directions if (shared and cfg.directions > 1) else 0
        self.decoders = nn.ModuleList(TextDecoder(cfg, n_dir_embed) for _ in range(1 if shared else cfg.directions))
        # Token scale read by each decoder layer: group g -> scale g ("gradual"), else the single kept scale.
        groups = range(len(cfg.group_depths)) if cfg.cross_attn == "gradual" else [0] * len(cfg.group_depths)
        self.layer_scales = [g for g, depth in zip(groups, cfg.group_depths) for _ in range(depth)]
        self.layer_groups = [g for g, depth in enumerate(cfg.group_depths) for _ in range(depth)]
        self._init_weights()
        if cfg.text_pretrained_path:
            for dec in self.decoders:
                _load_bert_decoder(dec, cfg)

    @property
    def data_config(self) -> dict[str, Any] | None:
        """`ImageLoader` keyword arguments for this teacher's backbone (`resolve_image_config`); None for video."""
        return self.visual.data_config if self.modality == "image" else None

    def _init_weights(self) -> None:
        # The backbone keeps timm's own initialisation (or its checkpoint).
        for name, module in self.named_modules():
            if name.startswith("visual.backbone"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("pos_embed", "dir_embed", "scale_embed")):
                nn.init.trunc_normal_(p, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.decoders[0].tok_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoders[0].tok_embed.weight.dtype

    def set_merge_ratio(self, ratio: float) -> None:
        """Token merging for scoring from now on (a query-time choice: the weights and token stores are unchanged)."""
        if not 0.0 <= float(ratio) <= 0.5:
            raise ValueError(f"merge_ratio={ratio} must be in [0, 0.5] (bipartite matching merges at most half)")
        self.config.merge_ratio = float(ratio)

    # ------------------------------------------------------------------------------------------ visual side
    def encode_visual(self, x: Tensor, mask: Tensor | None = None) -> VisualTokens:
        """Visual tokens for the decoder, computed once per item and cacheable (fp16 `TokenStore`).

        Args:
            x: images [B, 3, H, W] (H = W = config.image_size) or clip features [B, T, feature_dim].
            mask: video only, [B, T] bool (True = real frame); None = all real.

        Returns:
            VisualTokens: tokens [B, N, D], all token scales coarse -> fine (`scale_sizes(N)` splits them); mask
            [B, N] for video (None for images).
        """
        if self.modality == "image":
            if mask is not None:
                raise ValueError("image teachers take no mask")
            return self.visual(x.to(self.dtype))
        return self.visual(x.to(self.dtype), mask)

    def scale_sizes(self, num_tokens: int) -> list[int]:
        """Tokens per token scale (coarse -> fine) in VisualTokens with `num_tokens` tokens."""
        if self.modality == "video":
            return self.visual.scale_sizes(num_tokens)
        sizes = self.visual.scale_sizes
        if sum(sizes) != num_tokens:
            raise ValueError(
                f"{num_tokens} visual tokens, but this teacher ({self.config.image_size}px) makes "
                f"{sum(sizes)} = {sizes}; were the tokens encoded by another teacher?"
            )
        return sizes

    def _layer_tokens(self, visual: VisualTokens, merge: bool) -> list[tuple[Tensor, Tensor | None]]:
        """Per decoder layer: the tokens it reads (its scale's; merged `group` times with `merge`) and their mask."""
        starts = [0]
        for n in self.scale_sizes(visual.num_tokens):
            starts.append(starts[-1] + n)
        ratio = float(self.config.merge_ratio) if merge else 0.0
        out, merged = [], {}
        for scale, group in zip(self.layer_scales, self.layer_groups):
            sl = slice(starts[scale], starts[scale + 1])
            tokens, mask = visual.tokens[:, sl], None if visual.mask is None else visual.mask[:, sl]
            if ratio == 0.0 or group == 0:  # the unmerged model, bit for bit
                out.append((tokens, _key_mask(mask)))
                continue
            key = (scale, group)
            if key not in merged:  # merge once more than the previous group did, from its result
                prev = merged.get(
                    (scale, group - 1), (tokens, torch.ones(tokens.shape[:2], device=tokens.device), mask)
                )
                t, z, m = prev
                merged[key] = merge_tokens(t, z, m, int(t.shape[1] * ratio))
            t, z, m = merged[key]
            out.append((t, _size_bias(z, m).to(t.dtype)))
        return out

    def _memories(self, visual: VisualTokens, merge: bool = False) -> list[list]:
        layer_tokens = self._layer_tokens(visual, merge)
        return [dec.memories(layer_tokens) for dec in self.decoders]

    # ------------------------------------------------------------------------------------------ text side
    def _text_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Trim to the longest row; per direction (decoder inputs [T, L-1], targets [T, L-1]) and target mask."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        L = int(attention_mask.sum(1).max())
        if L > self.config.max_length:
            raise ValueError(f"a text of {L} tokens exceeds max_length={self.config.max_length}")
        ids, mask = input_ids[:, :L], attention_mask[:, :L]
        seqs = [ids, reverse_tokens(ids, mask)][: self.config.directions]
        # Predict w1..wn EOS from BOS..wn: inputs drop the last column, targets the first (BOS is never predicted).
        return [(s[:, :-1], s[:, 1:]) for s in seqs], mask[:, 1:]

    def _hidden(self, memories: list, seqs: list, aligned: bool, num_visual: int) -> list[tuple[Tensor, Tensor, int]]:
        """Decoder outputs for every direction.

        aligned: text i is read against item i -> hidden [n, k, L, D] (k directions of this decoder).
        otherwise: every text against every item -> hidden [V, k * T, L, D] (direction-major).
        Returns (hidden, targets broadcastable to hidden[..., 0], k) per decoder.
        """
        out = []
        plan = (
            [(self.decoders[0], memories[0], list(range(len(seqs))))]
            if len(self.decoders) == 1
            else [(dec, mem, [d]) for d, (dec, mem) in enumerate(zip(self.decoders, memories))]
        )
        for dec, mem, dirs in plan:
            x = torch.cat([dec.embed(seqs[d][0], d) for d in dirs])  # [k*T, L, D], text-only work done once
            tgt = torch.cat([seqs[d][1] for d in dirs])  # [k*T, L]
            k, (kT, L, D) = len(dirs), x.shape
            if aligned:
                x = x.view(k, kT // k, L, D).transpose(0, 1)  # [n, k, L, D]
                tgt = tgt.view(k, kT // k, L).transpose(0, 1)
            else:
                x = x.unsqueeze(0).expand(num_visual, kT, L, D)  # the same text states for every item
            out.append((dec, dec(x, mem), tgt, k))
        return out

    @staticmethod
    def _mean_log_prob(dec: TextDecoder, h: Tensor, targets: Tensor, tmask: Tensor, rows: int) -> Tensor:
        """(1/|t|) sum_i log p(t_i | t_<i, v) per sequence: h [..., L, D], targets/tmask [..., L] -> [...] float32.

        Logits only for real target positions, `rows` at a time, so memory stays bounded for large vocabularies.
        """
        tmask = tmask.expand(h.shape[:-1])
        sel_h, sel_t = h[tmask], targets.expand(h.shape[:-1])[tmask]
        logp = torch.empty(sel_t.shape[0], device=h.device, dtype=torch.float32)
        for i in range(0, sel_t.shape[0], rows):
            # log p = logit_t - logsumexp(logits): the fused cross-entropy kernel is ~1.3x faster than gather + lse.
            logits = dec.logits(sel_h[i : i + rows]).float()
            logp[i : i + rows] = -F.cross_entropy(logits, sel_t[i : i + rows], reduction="none")
        full = torch.zeros(tmask.shape, device=h.device, dtype=torch.float32)
        full[tmask] = logp
        return full.sum(-1) / tmask.sum(-1).clamp(min=1)

    def _rows(self) -> int:
        return max(1, 2**24 // self.config.vocab_size)  # <= 64 MB of float32 logits per step

    # ------------------------------------------------------------------------------------------ training
    def loss(self, visual: VisualTokens, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Bi-directional captioning loss for aligned pairs.

        Token cross-entropy of w1..wn EOS given BOS.. (L2R) and of wn..w1 EOS given BOS.. (R2L), each the mean over
        the real target tokens of the batch; `loss` is the mean of the directions (so its scale does not depend on
        `directions`). With `directions=1`, `r2l_loss` is 0 and not part of `loss`.

        Args:
            visual: VisualTokens [n] from `encode_visual`.
            input_ids: [n, L] `BOS w1..wn EOS PAD..` rows.
            attention_mask: [n, L].

        Returns:
            {"loss", "l2r_loss", "r2l_loss"}: scalar tensors.
        """
        if input_ids.shape[0] != len(visual):
            raise ValueError(f"aligned pairs need as many texts as items, got {input_ids.shape[0]} and {len(visual)}")
        seqs, tmask = self._text_inputs(input_ids, attention_mask)
        visual = visual.to(self.device, self.dtype)
        parts = []
        for dec, h, tgt, k in self._hidden(self._memories(visual), seqs, aligned=True, num_visual=len(visual)):
            for j in range(k):
                logits = dec.logits(h[:, j][tmask]).float()
                parts.append(F.cross_entropy(logits, tgt[:, j][tmask], label_smoothing=self.config.label_smoothing))
        r2l = parts[1] if len(parts) > 1 else parts[0].new_zeros(())
        return {"loss": torch.stack(parts).mean(), "l2r_loss": parts[0], "r2l_loss": r2l}

    def forward(
        self, visual_input: Tensor, input_ids: Tensor, attention_mask: Tensor, visual_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Training step entry (goes through `forward`, as DDP / DeepSpeed need): encode the items, then `loss`.

        Args:
            visual_input: images [n, 3, H, W] or clip features [n, T, feature_dim].
            input_ids, attention_mask: [n, L] captions aligned with the items.
            visual_mask: video frame mask [n, T] (None for images).
        """
        return self.loss(self.encode_visual(visual_input, visual_mask), input_ids, attention_mask)

    # ------------------------------------------------------------------------------------------ scoring
    def _by_length(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Texts on the module's device and their order by decreasing length.

        Chunks of similar length are trimmed to their own longest row, so short captions do not pay for the padding
        of long ones (causal attention: trailing pads never change a real position's output).
        """
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        return ids, mask, mask.sum(1).argsort(descending=True, stable=True)

    @torch.no_grad()
    def log_likelihood(
        self, visual: VisualTokens, input_ids: Tensor, attention_mask: Tensor, *, chunk: int = 256
    ) -> Tensor:
        """Length-normalised log-likelihood of aligned pairs per direction: [n] items, [n, L] texts -> [n, directions].

        Column 0 is left-to-right, column 1 (if any) right-to-left; `score_pairs` is their sum.
        """
        n = len(visual)
        if input_ids.shape[0] != n:
            raise ValueError(f"aligned pairs need as many texts as items, got {input_ids.shape[0]} and {n}")
        ids, mask, order = self._by_length(input_ids, attention_mask)
        out = torch.empty(n, self.config.directions, device=self.device)
        for i in range(0, n, chunk):
            idx = order[i : i + chunk]
            vis = visual[idx].to(self.device, self.dtype)
            seqs, tmask = self._text_inputs(ids[idx], mask[idx])
            cols = []
            for dec, h, tgt, _ in self._hidden(
                self._memories(vis, merge=True), seqs, aligned=True, num_visual=len(vis)
            ):
                cols.append(self._mean_log_prob(dec, h, tgt, tmask[:, None], self._rows()))  # [n_c, k]
            out[idx] = torch.cat(cols, dim=1)
        return out

    @torch.no_grad()
    def score_pairs(
        self, visual: VisualTokens, input_ids: Tensor, attention_mask: Tensor, *, chunk: int = 256
    ) -> Tensor:
        """Teacher score of aligned pairs (text i, item i): s = sum over directions of the mean token log-prob.

        Args:
            visual: VisualTokens [n].
            input_ids, attention_mask: [n, L].
            chunk: pairs per decoder pass.

        Returns:
            [n] float32 scores (higher = better match). No grad; the train/eval mode is the caller's.
        """
        return self.log_likelihood(visual, input_ids, attention_mask, chunk=chunk).sum(1)

    @torch.no_grad()
    def score_candidates(
        self,
        visual: VisualTokens,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        chunk: int = 256,
        index: Tensor | None = None,
        autocast: torch.dtype | None = None,
    ) -> Tensor:
        """Teacher score of each query against its own k candidates (query time: the student's top-k).

        The same scores as `score_pairs` on each text repeated k times, with the work that does not depend on the
        pair done once: a text's embedding and its layer-0 self-attention (which do not see the item) once per text
        and shared by its k candidates, and an item's cross-attention keys/values (and token merging) once per
        distinct item of a pass, however many of the pass's queries retrieved it. The queries of one batch are
        mostly similar, so their top-k lists overlap: the keys/values are the largest item-only cost (a third of a
        pair's FLOPs on captioner_small) and are then paid per item, not per pair.

        Args:
            visual: VisualTokens [Q * k], row-major: query q's candidates are rows q*k .. q*k + k - 1; or, with
                `index`, the distinct items only (any order, any count).
            input_ids, attention_mask: [Q, L], one row per query.
            chunk: pairs per decoder pass (rounded down to whole queries, at least one).
            index: optional [Q * k] long, row-major like `visual` above: pair p reads item ``visual[index[p]]``
                (`StoreTeacherScorer.candidates` reads each distinct row of the store once and passes this).
            autocast: None = the module's dtype throughout; torch.bfloat16 / torch.float16 = the decoder's matmuls
                in that dtype (`torch.autocast` on the module's device type); the log-softmax stays float32.

        Returns:
            [Q, k] float32 scores on the module's device. No grad; the train/eval mode is the caller's.
        """
        q = input_ids.shape[0]
        n_pairs = len(visual) if index is None else len(index)
        if q == 0 or n_pairs % q:
            raise ValueError(f"score_candidates needs k candidates per query: {n_pairs} pairs for {q} queries")
        k = n_pairs // q
        index = torch.arange(n_pairs) if index is None else torch.as_tensor(index).long().cpu().reshape(-1)
        ids, mask, order = self._by_length(input_ids, attention_mask)
        out = torch.empty(q, k, device=self.device)
        per_pass = max(1, chunk // k)
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            for i in range(0, q, per_pass):
                self._score_pass(visual, ids, mask, order[i : i + per_pass], k, index, out)
        return out

    def _score_pass(self, visual, ids, mask, qi, k, index, out) -> None:
        """One pass of `score_candidates`: the queries ``qi`` against their k candidates each, into ``out[qi]``."""
        rows = (qi[:, None].cpu() * k + torch.arange(k)).reshape(-1)  # the pass's pairs, query-major
        items, perm, groups = self._groups(index[rows])
        memories = self._memories(visual[items].to(self.device, self.dtype), merge=True)  # once per item
        perm = perm.to(self.device)
        text_of = perm // k  # pair perm[j] (sorted by item) is a pair of the pass's query perm[j] // k
        seqs, tmask = self._text_inputs(ids[qi], mask[qi])
        plan = (
            [(self.decoders[0], memories[0], list(range(len(seqs))))]
            if len(self.decoders) == 1
            else [(dec, mem, [d]) for d, (dec, mem) in enumerate(zip(self.decoders, memories))]
        )
        total = 0.0
        for dec, mem, dirs in plan:
            x = torch.stack([dec.embed(seqs[d][0], d) for d in dirs], 1)  # [n_q, dirs, L, D], once per text
            tgt = torch.stack([seqs[d][1] for d in dirs], 1)  # [n_q, dirs, L]
            # Every pair reads its query's text states, pairs ordered as `groups` wants them: [pairs, dirs, L, D].
            h = dec(x[text_of], mem, groups)
            ll = self._mean_log_prob(dec, h, tgt[text_of], tmask[text_of][:, None], self._rows())  # [pairs, dirs]
            total = total + ll.sum(1)
        scores = torch.empty_like(total)
        scores[perm] = total  # back to query-major order
        out[qi] = scores.view(len(qi), k)

    @staticmethod
    def _groups(pair_items: Tensor) -> tuple[Tensor, Tensor, list[tuple[int, int, int, int]]]:
        """How `score_candidates` lays out the pairs of a pass so that each item's keys/values serve all its pairs.

        pair_items [P]: the item each pair reads. Returns the distinct items ordered by how many pairs read them
        (ascending), the pair order `perm` (pairs grouped by item, items in that order) and the groups of
        `CrossAttention.forward`: items read by the same number c of pairs are adjacent, so one attention call reads
        them all, each with its c pairs' positions as one query sequence, and no keys/values are copied.
        """
        items, inverse, counts = torch.unique(pair_items, return_inverse=True, return_counts=True)
        by_count = torch.argsort(counts, stable=True)
        rank = torch.empty_like(by_count)
        rank[by_count] = torch.arange(len(by_count))
        perm = torch.argsort(rank[inverse], stable=True)
        groups, r0, u0 = [], 0, 0
        values, repeats = torch.unique_consecutive(counts[by_count], return_counts=True)
        for c, n in zip(values.tolist(), repeats.tolist()):
            groups.append((r0, r0 + c * n, u0, u0 + n))
            r0, u0 = r0 + c * n, u0 + n
        return items[by_count], perm, groups

    @torch.no_grad()
    def score(
        self,
        visual: VisualTokens,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        text_chunk: int = 32,
        visual_chunk: int = 16,
    ) -> Tensor:
        """Teacher scores of every (text, item) pair: s(t, v) = sum_dir (1/|t|) sum_i log p_dir(t_i | t_<i, v).

        Work is shared wherever the math allows: per visual chunk the cross-attention keys/values of every layer are
        computed once and reused by all text chunks; per text chunk the embeddings and the layer-0 self-attention
        (which do not see the item) are computed once and broadcast to all items; texts are chunked by length; one
        decoder pass covers text_chunk x visual_chunk x directions sequences, so memory is bounded for any T, V.

        Args:
            visual: VisualTokens [V] (fresh or read from a `TokenStore`; cast to the module's dtype here).
            input_ids, attention_mask: [T, L].
            text_chunk, visual_chunk: texts and items per decoder pass.

        Returns:
            [T, V] float32 scores on the module's device. No grad; the train/eval mode is the caller's.
        """
        ids, mask, order = self._by_length(input_ids, attention_mask)
        T, V = ids.shape[0], len(visual)
        chunks = [order[t0 : t0 + text_chunk] for t0 in range(0, T, text_chunk)]
        texts = [(idx, *self._text_inputs(ids[idx], mask[idx])) for idx in chunks]
        out = torch.empty(T, V, device=self.device)
        for v0 in range(0, V, visual_chunk):
            vis = visual[v0 : v0 + visual_chunk].to(self.device, self.dtype)
            memories = self._memories(vis, merge=True)
            for idx, seqs, tmask in texts:
                total = 0.0
                for dec, h, tgt, k in self._hidden(memories, seqs, aligned=False, num_visual=len(vis)):
                    tgt_k, tm_k = tgt.unsqueeze(0), tmask.repeat(k, 1).unsqueeze(0)  # [1, k*t, L], direction-major
                    ll = self._mean_log_prob(dec, h, tgt_k, tm_k, self._rows())  # [v, k*t]
                    total = total + ll.view(len(vis), k, -1).sum(1)  # sum over directions -> [v, t]
                out[idx, v0 : v0 + visual_chunk] = total.T
        return out


# --------------------------------------------------------------------------------------------------- from BERT
_BERT_KEY = "teacher.text_pretrained_path"
_BERT_ACTS = ("gelu",)  # the decoder's MLP is timm's Mlp with nn.GELU (exact erf): BERT's "gelu"


def _bert_config(path: str, fix: str) -> dict[str, Any]:
    """The `transformers` config of the BERT-family model in the directory ``path`` (`resolve_text_dir`), checked to
    be one the decoder can take its layers from."""
    from transformers import AutoConfig

    directory = resolve_text_dir(path, key=_BERT_KEY)
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True).to_dict()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{_BERT_KEY}={path}: {directory}/config.json does not load ({e}); {fix}") from e
    problems = []
    if config.get("model_type") != "bert":
        problems.append(f"model_type={config.get('model_type')!r}, not a BERT-family encoder ('bert')")
    if config.get("hidden_act") not in _BERT_ACTS:
        problems.append(f"hidden_act={config.get('hidden_act')!r} (the decoder's MLP is exact GELU: 'gelu')")
    if config.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={config['position_embedding_type']!r} (absolute only)")
    if problems:
        raise CheckpointError(f"{_BERT_KEY}={path}: {'; '.join(problems)}; {fix}")
    return config


def _bert_sizes(text_config: dict[str, Any], kwargs: dict[str, Any], fix: str) -> dict[str, Any]:
    """The decoder sizes a BERT config decides: width, heads, MLP ratio, vocabulary, and its depth split into the
    builder's cross-attention groups as evenly as possible (the first groups take the remainder), so the
    coarse-to-fine schedule keeps one group per visual scale."""
    groups = len(kwargs.get("group_depths", CaptionerConfig.group_depths))
    depth, width = int(text_config["num_hidden_layers"]), int(text_config["hidden_size"])
    if depth < groups:
        raise CheckpointError(
            f"{_BERT_KEY}: a {depth}-layer BERT cannot fill the decoder's {groups} cross-attention groups (one per "
            f"visual scale, coarse to fine); {fix}"
        )
    vocab, tokens = int(text_config["vocab_size"]), int(kwargs.get("vocab_size", CaptionerConfig.vocab_size))
    if tokens > vocab:
        raise CheckpointError(
            f"{_BERT_KEY}: the tokenizer has {tokens} tokens but the BERT has {vocab} embeddings (size mismatch): use "
            f"the tokenizer saved with it (teacher.tokenizer.path=null); {fix}"
        )
    max_pos, length = int(text_config["max_position_embeddings"]), int(kwargs.get("max_length", 32))
    if length > max_pos:
        raise CheckpointError(
            f"{_BERT_KEY}: data.max_length={length} exceeds the BERT's max_position_embeddings={max_pos}; {fix}"
        )
    base, extra = divmod(depth, groups)
    return {
        "embed_dim": width,
        "num_heads": int(text_config["num_attention_heads"]),
        "mlp_ratio": int(text_config["intermediate_size"]) / width,
        "group_depths": tuple(base + (g < extra) for g in range(groups)),
        "vocab_size": vocab,  # the model's table (ids of its own tokenizer are below it)
    }


@torch.no_grad()
def _load_bert_decoder(dec: TextDecoder, cfg: CaptionerConfig) -> None:
    """Copy a local BERT's embeddings and layers into ``dec`` (BLIP's decoder from bert-base, `models/med.py`):
    layer i's self-attention (q, k, v into one projection), its output dense and LayerNorm, the feed-forward and
    its LayerNorm; the token, position (+ token type 0, folded in: the decoder reads one segment) embeddings and
    their LayerNorm. Cross-attention, its LayerNorm, the direction embedding and the LM head stay fresh."""
    from transformers import AutoModel

    fix = "point it at a save_pretrained BERT directory (config.json and its weights), or set it to null"
    directory = resolve_text_dir(cfg.text_pretrained_path, key=_BERT_KEY)
    try:
        bert = AutoModel.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # no weights file; torch's size mismatch against config.json
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise CheckpointError(
            f"{_BERT_KEY}={cfg.text_pretrained_path}: {directory} does not load ({first}); {fix}"
        ) from e
    w = bert.state_dict()
    emb = "embeddings."

    def put(dst: Tensor, src: Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise CheckpointError(
                f"{_BERT_KEY}={cfg.text_pretrained_path}: {name} is {tuple(src.shape)} in {directory}, the decoder "
                f"needs {tuple(dst.shape)} (size mismatch); {fix}"
            )
        dst.copy_(src)

    put(dec.tok_embed.weight, w[emb + "word_embeddings.weight"], "word_embeddings")
    pos = w[emb + "position_embeddings.weight"][: dec.pos_embed.shape[0]]
    types = w.get(emb + "token_type_embeddings.weight")
    put(dec.pos_embed, pos + (types[0] if types is not None else 0), "position_embeddings")
    put(dec.embed_norm.weight, w[emb + "LayerNorm.weight"], "embeddings.LayerNorm")
    put(dec.embed_norm.bias, w[emb + "LayerNorm.bias"], "embeddings.LayerNorm")
    for i, layer in enumerate(dec.layers):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        for kind in ("weight", "bias"):
            qkv = torch.cat([w[a + f"{n}.{kind}"] for n in ("query", "key", "value")])
            put(getattr(layer.self_attn.qkv, kind), qkv, a + "query/key/value")
            put(getattr(layer.self_attn.proj, kind), w[p + f"attention.output.dense.{kind}"], p + "attention.output")
            put(getattr(layer.norm1, kind), w[p + f"attention.output.LayerNorm.{kind}"], p + "attention LayerNorm")
            put(getattr(layer.mlp.fc1, kind), w[p + f"intermediate.dense.{kind}"], p + "intermediate")
            put(getattr(layer.mlp.fc2, kind), w[p + f"output.dense.{kind}"], p + "output")
            put(getattr(layer.norm3, kind), w[p + f"output.LayerNorm.{kind}"], p + "output LayerNorm")


# --------------------------------------------------------------------------------------------------- builders
def _create_captioner(variant: str, **kwargs: Any) -> Captioner:
    valid = [f.name for f in fields(CaptionerConfig)]
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3)
            raise TypeError(
                f"{variant}: unknown option {key!r}"
                + (f"; did you mean {near}?" if near else "")
                + f" Valid options: {valid}"
            )
    if kwargs.get("text_config") is None and kwargs.get("text_pretrained_path"):
        fix = "point teacher.text_pretrained_path at a BERT-family directory, or set it to null"
        kwargs["text_config"] = _bert_config(kwargs["text_pretrained_path"], fix)
    if kwargs.get("text_config") is not None:  # the BERT decides the decoder's size (a saved config: a moved run)
        fix = "point teacher.text_pretrained_path at another BERT, or set it to null"
        kwargs.update(_bert_sizes(kwargs["text_config"], kwargs, fix))
    return Captioner(CaptionerConfig(**kwargs))


@register_teacher
def captioner_tiny(modality: str = "image", vocab_size: int = 1000, max_length: int = 32, **kwargs: Any) -> Captioner:
    """Tests and smoke runs: timm `test_resnet` at 64 px, D=32, 3 groups x 1 layer."""
    args = dict(
        embed_dim=32,
        num_heads=2,
        mlp_ratio=2.0,
        group_depths=(1, 1, 1),
        backbone="test_resnet",
        image_size=64,
        temporal_depth=1,
    )
    return _create_captioner(
        "captioner_tiny", modality=modality, vocab_size=vocab_size, max_length=max_length, **dict(args, **kwargs)
    )


@register_teacher
def captioner_small(modality: str = "image", vocab_size: int = 1000, max_length: int = 32, **kwargs: Any) -> Captioner:
    """Shapes on CPU: slim ResNet-10-T (widths 32-64-128-256) at 64 px, D=128, 3 groups x 1 layer."""
    args = dict(
        embed_dim=128,
        num_heads=4,
        mlp_ratio=2.0,
        group_depths=(1, 1, 1),
        backbone="resnet10t",
        backbone_args=dict(channels=(32, 64, 128, 256), stem_width=16),
        image_size=64,
        temporal_depth=1,
    )
    return _create_captioner(
        "captioner_small", modality=modality, vocab_size=vocab_size, max_length=max_length, **dict(args, **kwargs)
    )


@register_teacher
def captioner_base(modality: str = "image", vocab_size: int = 1000, max_length: int = 32, **kwargs: Any) -> Captioner:
    """Real data (GPU): ResNet-50 at 224 px (optional local `pretrained_path`), D=512, 3 groups x 2 layers."""
    args = dict(
        embed_dim=512,
        num_heads=8,
        mlp_ratio=4.0,
        group_depths=(2, 2, 2),
        backbone="resnet50",
        image_size=224,
        dropout=0.1,
        temporal_depth=2,
    )
    return _create_captioner(
        "captioner_base", modality=modality, vocab_size=vocab_size, max_length=max_length, **dict(args, **kwargs)
    )
