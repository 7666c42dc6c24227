"""Fast student: a dual encoder (image or video tower + text tower) with L2-normalised embeddings.

The Fast model of "Thinking Fast and Slow" (Miech et al., CVPR 2021): texts and visual items are embedded
independently, so the gallery is embedded once, offline, and a query costs one text forward plus a
dot-product search (faiss). Scores are `logit_scale.exp() * <text, visual>` as in CLIP / open_clip.

Towers:
    * image: a timm backbone (`num_classes=0`, global pooling; or its feature map through flatten or an
      attention pool with position embeddings) + a linear projection to E.
    * video: precomputed clip features [B, T, D] -> linear input projection, learned temporal position
      embedding, a pre-norm transformer encoder with a key-padding mask, masked mean pooling (or a CLS
      token), projection to E; optionally each frame also carries its difference to the previous frame.
    * text: a `transformers` encoder (a BertModel built from a BertConfig, or any AutoModel loaded from a
      local directory) -> masked mean pooling (or first-token pooling) -> projection to E.

Only one visual tower is built (`modality="image"` or `"video"`), so a checkpoint holds no unused weights.
Nothing is downloaded: timm backbones are built with `pretrained=False` unless `image_pretrained_path`
names a local weights file, and the text tower is built from a config unless `text_pretrained_path` names
a local `save_pretrained` directory.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import AttentionPool2d
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from fastslow.data.loaders import resolve_image_config
from fastslow.errors import CheckpointError
from fastslow.pretrained import create_timm_backbone, resolve_text_dir

from . import register_student

__all__ = ["DualEncoder", "DualEncoderConfig", "dual_encoder_tiny", "dual_encoder_small", "dual_encoder_base"]

MODALITIES = ("image", "video")


@dataclass
class DualEncoderConfig:
    """Everything needed to rebuild a dual encoder (saved beside the weights as part of the recipe)."""

    modality: str = "image"  # the one visual tower built: "image" (pixels) or "video" (clip features)
    embed_dim: int = 256  # E: size of the shared embedding space (the faiss index dimension)
    # Image tower
    image_backbone: str = "resnet18"  # timm model name, created with num_classes=0 (pooled features)
    image_size: int = 224  # input resolution; passed to timm only for fixed-input-size backbones (ViT)
    image_backbone_args: dict[str, Any] | None = None  # extra timm create_model kwargs (e.g. slimmer widths)
    image_global_pool: str = "avg"  # timm global pooling ("avg"; "token" = CLS token for ViTs), "flatten" or "attn"
    image_output_stride: int | None = None  # CNNs: timm output_stride (16/8 dilate the last stages: a finer final map)
    image_pretrained_path: str | None = None  # local timm weights file (.safetensors/.pth); None = random init
    # Pixel statistics and resampling filter the image loader uses for this tower; None = the backbone's own, as timm
    # resolves them (ViT-B/16: mean / std 0.5; ResNets: ImageNet's), so pretrained weights see the pixels they know.
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    image_interpolation: str | None = None  # nearest | bilinear | bicubic | lanczos | box | hamming
    # Video tower
    feature_dim: int = 1024  # D of the precomputed clip features (VATEX I3D: 1024)
    max_frames: int = 64  # longest T accepted; size of the learned temporal position table
    video_width: int = 256  # transformer width of the temporal encoder
    video_depth: int = 2  # transformer layers of the temporal encoder
    video_heads: int = 4  # attention heads of the temporal encoder
    video_pool: str = "mean"  # "mean": mean over real frames; "cls": output of a learned token prepended to T
    video_frame_diff: bool = False  # also feed x_t - x_{t-1} (motion) beside each frame's features x_t
    # Text tower
    vocab_size: int = 30522  # token ids are < vocab_size (the tokenizer's vocab_size)
    max_length: int = 32  # longest tokenised text (BOS .. EOS), size of the position table
    text_width: int = 256  # BERT hidden size (ignored when text_pretrained_path is set)
    text_depth: int = 4  # BERT layers (ignored when text_pretrained_path is set)
    text_heads: int = 4  # BERT attention heads (ignored when text_pretrained_path is set)
    text_pool: str = "mean"  # "mean": mean over real tokens; "first": the first token (BOS / [CLS])
    # local Hugging Face model dir (save_pretrained, Hub or sentence-transformers snapshot); None = built from config
    text_pretrained_path: str | None = None
    # A transformers config (its to_dict()) to build the text encoder from, without weights: how a trained student
    # whose text tower came from text_pretrained_path is rebuilt once that directory is gone (its weights are in the
    # student's own checkpoint; fastslow.stages saves this as text_config.json). Takes precedence over the path.
    text_config: dict[str, Any] | None = None
    # Shared
    mlp_ratio: float = 4.0  # MLP hidden size / width, in the video and (config-built) text transformers
    dropout: float = 0.0  # dropout in the video and (config-built) text transformers
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP init: temperature 0.07
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped here when used (open_clip caps it at 100)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` [B, N, C] over the positions where `mask` [B, N] is True -> [B, C].

    Padded positions are zeroed by a multiply (shape-static, no host sync), so whatever finite values they
    hold cannot leak into the result; a row without any True position returns zeros.
    """
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class ImageTower(nn.Module):
    """timm backbone with global pooling, then a linear projection: pixels [B, 3, H, W] -> [B, E]."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        kwargs: dict[str, Any] = dict(cfg.image_backbone_args or {})
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.image_backbone)
        # ViTs size their position table from img_size; CNNs take any resolution and reject the argument.
        if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
            kwargs["img_size"] = cfg.image_size
        if cfg.image_output_stride is not None:
            kwargs["output_stride"] = cfg.image_output_stride
        # "flatten" keeps the final feature map's layout (which object is where), which average pooling
        # discards: spatial relations then reach the projection instead of having to survive the pool.
        # "attn" is CLIP's ResNet head (timm's AttentionPool2d): the map's mean, as query, attends over the cells
        # with a learned position embedding, so *where* a feature is reaches the embedding through a weighted
        # sum instead of a fixed-layout linear (flatten), which is both smaller and order-aware.
        self.pool = cfg.image_global_pool
        own_pool = self.pool in ("flatten", "attn")
        # A local timm checkpoint (image_pretrained_path) is loaded by timm, which drops the classifier
        # (num_classes=0) and adapts position embeddings; the file is checked to fit (fastslow.pretrained).
        self.backbone = create_timm_backbone(
            cfg.image_backbone,
            cfg.image_pretrained_path,
            key="student.image_pretrained_path",
            num_classes=0,
            global_pool="" if own_pool else self.pool,
            **kwargs,
        )
        # Some timm models (e.g. MobileNetV3) have a pre-logits head wider than num_features.
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.attn_pool: nn.Module | None = None
        if own_pool:
            was_training = self.backbone.training
            with torch.no_grad():
                probe = self.backbone.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
            self.backbone.train(was_training)
            if probe.ndim != 4:
                raise ValueError(
                    f"image_global_pool={self.pool!r} needs a CNN feature map; {cfg.image_backbone} "
                    f"returns {tuple(probe.shape)}"
                )
            if self.pool == "flatten":
                width = probe.flatten(1).shape[1]
            else:
                channels, h, w = probe.shape[1:]
                heads = max(1, channels // 64)
                self.attn_pool = AttentionPool2d(channels, feat_size=(h, w), out_features=channels, num_heads=heads)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)
        self.data_config = resolve_image_config(
            self.backbone, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.image_interpolation
        )

    def tokens(self, pixels: Tensor) -> Tensor:
        """The backbone's final feature map as visual tokens, for training-only heads (never on the query path).

        Args:
            pixels: [B, 3, H, W] normalised.

        Returns:
            [B, N, C]: a CNN's h x w cells in raster order (N = h * w), or a ViT's patch tokens (prefix tokens such
            as CLS dropped); cell n covers the n-th (H / h) x (W / w) patch of the image.
        """
        feats = self.backbone.forward_features(pixels.contiguous(memory_format=torch.channels_last))
        if feats.ndim == 4:  # CNN: [B, C, h, w]
            return feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(self.backbone, "num_prefix_tokens", 0) :]

    def forward(self, pixels: Tensor) -> Tensor:
        """Args: pixels [B, 3, H, W] normalised. Returns: [B, E], not normalised."""
        # NHWC input: oneDNN / cuDNN convs run it faster (dual_encoder_small, batch 64 at 64 px, 1 core: encode
        # 55 -> 40 ms, fwd+bwd 175 -> 122 ms), as in the teacher; weights stay contiguous, checkpoints unchanged.
        feats = self.backbone(pixels.contiguous(memory_format=torch.channels_last))
        if self.attn_pool is not None:
            feats = self.attn_pool(feats)
        return self.proj(feats.flatten(1))


class VideoTower(nn.Module):
    """Temporal transformer over clip features: ([B, T, D], mask [B, T]) -> [B, E]."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        if cfg.video_pool not in ("mean", "cls"):
            raise ValueError(f"video_pool={cfg.video_pool!r}: expected 'mean' or 'cls'")
        self.max_frames = cfg.max_frames
        width = cfg.video_width
        # No LayerNorm on the raw features: it would erase each frame's overall activation level (a per-frame
        # mean / scale), which carries information; the pre-norm blocks normalise what they read anyway.
        # Frame differences: per-frame features say where things are, not where they go. Direction and order
        # of motion are then a difference the encoder would first have to learn to take (a 2-layer student
        # does not in 1,000 steps on shapes_video); given x_t - x_{t-1}, motion is one linear read-out away
        # (temporal-difference inputs, as in TSN's RGB-diff / TDN). Still one vector per clip, offline.
        self.frame_diff = cfg.video_frame_diff
        self.input_proj = nn.Linear(cfg.feature_dim * (2 if self.frame_diff else 1), width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.video_pool == "cls" else None
        num_pos = cfg.max_frames + (1 if self.cls_token is not None else 0)
        self.pos_embed = nn.Parameter(torch.randn(1, num_pos, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            cfg.video_heads,
            dim_feedforward=int(width * cfg.mlp_ratio),
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,  # pre-norm: stable without warm-up tricks, hence the final norm below
        )
        # Nested tensors would drop padded frames in eval only; keep one code path for train and eval.
        self.encoder = nn.TransformerEncoder(layer, cfg.video_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.embed_dim, bias=False)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embed clips.

        Args:
            features: [B, T, D] clip features, T <= max_frames.
            mask: [B, T] bool, True = real frame; None = every frame is real. A row with no real frame
                is treated as if its first frame were real, so the output stays finite.

        Returns:
            [B, E], not normalised.
        """
        x, mask = self.tokens(features, mask)
        pooled = x[:, 0] if self.cls_token is not None else _masked_mean(x, mask)
        return self.proj(pooled)

    def tokens(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The temporal encoder's per-frame outputs, before pooling (what `forward` pools; training heads read them).

        Args: as `forward`.

        Returns:
            x [B, T', W] (T' = T + 1 with a CLS token, which comes first) and its mask [B, T'] (True = real).
        """
        batch, frames, _ = features.shape
        if frames > self.max_frames:
            raise ValueError(f"video with T={frames} frames; this student accepts at most max_frames={self.max_frames}")
        if mask is None:
            mask = torch.ones(batch, frames, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        # Empty rows would make every attention key masked (softmax of all -inf = NaN); without a host sync.
        first = torch.zeros_like(mask)
        first[:, 0] = True
        mask = mask | (first & ~mask.any(dim=1, keepdim=True))

        if self.frame_diff:
            # Zero where there is no previous real frame (t = 0) and on padding, so padded frames stay inert.
            prev = torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], dim=1)
            has_prev = torch.cat([mask.new_zeros(batch, 1), mask[:, :-1]], dim=1) & mask
            features = torch.cat([features, (features - prev) * has_prev.unsqueeze(-1).to(features.dtype)], dim=-1)
        x = self.input_proj(features)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
            mask = torch.cat([mask.new_ones(batch, 1), mask], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        # src_key_padding_mask uses the opposite convention: True = ignore this key.
        return self.norm(self.encoder(x, src_key_padding_mask=~mask)), mask


class TextTower(nn.Module):
    """A transformers encoder, pooled and projected: (input_ids [B, L], attention_mask [B, L]) -> [B, E]."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        if cfg.text_pool not in ("mean", "first"):
            raise ValueError(f"text_pool={cfg.text_pool!r}: expected 'mean' or 'first'")
        self.pool = cfg.text_pool
        if cfg.text_config is not None:
            config = dict(cfg.text_config)
            self.encoder = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        elif cfg.text_pretrained_path:
            self.encoder = self._load_pretrained(cfg)
        else:
            config = BertConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.text_width,
                num_hidden_layers=cfg.text_depth,
                num_attention_heads=cfg.text_heads,
                intermediate_size=int(cfg.text_width * cfg.mlp_ratio),
                max_position_embeddings=cfg.max_length,
                type_vocab_size=1,  # single-segment inputs
                hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout,
                # Padding is handled by attention_mask alone (ARCHITECTURE.md: models never need the pad id),
                # so no embedding row is frozen as padding_idx.
                pad_token_id=None,
            )
            self.encoder = BertModel(config, add_pooling_layer=False)
        if getattr(self.encoder, "pooler", None) is not None:
            # BERT's [CLS] pooler is trained for next-sentence prediction; we pool and project ourselves,
            # and an unused module would get no gradient (and trip DDP's unused-parameter check).
            self.encoder.pooler = None
        self.proj = nn.Linear(self.encoder.config.hidden_size, cfg.embed_dim, bias=False)

    @staticmethod
    def _load_pretrained(cfg: DualEncoderConfig) -> nn.Module:
        # A save_pretrained directory, a Hub snapshot or a sentence-transformers snapshot (its Transformer module).
        path = resolve_text_dir(cfg.text_pretrained_path)
        try:
            encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:  # transformers' "no file named model.safetensors ...", bad config.json
            raise CheckpointError(
                f"student.text_pretrained_path={cfg.text_pretrained_path}: {path} does not load as a Hugging Face "
                f"model ({str(e).strip().splitlines()[0]}); point it at a save_pretrained directory"
            ) from e
        vocab = encoder.config.vocab_size
        if cfg.vocab_size > vocab:
            raise ValueError(
                f"vocab_size={cfg.vocab_size} but the text model at {path} has {vocab} embeddings; "
                "use the tokenizer saved with that model"
            )
        max_pos = getattr(encoder.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.max_length > max_pos:
            raise ValueError(f"max_length={cfg.max_length} exceeds the text model's max_position_embeddings={max_pos}")
        return encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Args: input_ids [B, L] long, attention_mask [B, L] (1 = real token). Returns: [B, E], not normalised."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = hidden[:, 0] if self.pool == "first" else _masked_mean(hidden, attention_mask.bool())
        return self.proj(pooled)


class DualEncoder(nn.Module):
    """Fast student: one visual tower (image or video) and a text tower in a shared, L2-normalised space.

    Attributes:
        config: the `DualEncoderConfig` it was built from.
        modality: "image" or "video".
        embed_dim: E.
        visual: `ImageTower` or `VideoTower`.
        text: `TextTower`.
        logit_scale: learnable scalar; `exp()` is 1 / temperature (init log(1 / 0.07), CLIP).
    """

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        if cfg.modality not in MODALITIES:
            raise ValueError(f"modality={cfg.modality!r}: expected one of {MODALITIES}")
        self.config = cfg
        self.modality = cfg.modality
        self.embed_dim = cfg.embed_dim
        self.visual = ImageTower(cfg) if cfg.modality == "image" else VideoTower(cfg)
        self.text = TextTower(cfg)
        # Shape [1], not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))

    @property
    def data_config(self) -> dict[str, Any] | None:
        """`ImageLoader` keyword arguments for this student's image tower (`resolve_image_config`); None for video."""
        return self.visual.data_config if self.modality == "image" else None

    def _require(self, modality: str) -> None:
        if self.modality != modality:
            raise RuntimeError(f"this student was built with modality={self.modality!r}; it has no {modality} tower")

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """Embed images.

        Args:
            pixels: [B, 3, H, W] float, normalised with the backbone's mean / std.
            normalize: L2-normalise the output.

        Returns:
            [B, E].
        """
        self._require("image")
        x = self.visual(pixels)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_video(self, features: Tensor, mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """Embed videos from precomputed clip features.

        Args:
            features: [B, T, D] float clip features.
            mask: [B, T] bool, True = real frame (padded frames do not change the output); None = all real.
            normalize: L2-normalise the output.

        Returns:
            [B, E].
        """
        self._require("video")
        x = self.visual(features, mask)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_visual(self, visual: Tensor, frame_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """Embed a batch of visual items, whatever the modality (`batch["pixels"]` or `batch["features"]`).

        Args:
            visual: [B, 3, H, W] pixels (image student) or [B, T, D] clip features (video student).
            frame_mask: [B, T] bool for video (`batch["frame_mask"]`); ignored for images.
            normalize: L2-normalise the output.

        Returns:
            [B, E].
        """
        if self.modality == "image":
            return self.encode_image(visual, normalize=normalize)
        return self.encode_video(visual, frame_mask, normalize=normalize)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
        """Embed texts.

        Args:
            input_ids: [B, L] long token ids (`BOS w1 .. wn EOS PAD ..`).
            attention_mask: [B, L], 1 / True = real token; padded tokens do not change the output.
            normalize: L2-normalise the output.

        Returns:
            [B, E].
        """
        x = self.text(input_ids, attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def inverse_temperature(self) -> Tensor:
        """exp(logit_scale) clamped at `max_logit_scale` -> scalar tensor (what multiplies the cosine scores).

        The clamp (open_clip practice, at 100) stops the temperature collapsing, which would make the
        contrastive loss degenerate; the gradient is zero while the cap is active.
        """
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale).squeeze(0)

    def forward(
        self, visual: Tensor, input_ids: Tensor, attention_mask: Tensor, frame_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Embed aligned (visual, text) pairs for a contrastive loss.

        Args:
            visual: [B, 3, H, W] pixels or [B, T, D] clip features (see `encode_visual`).
            input_ids: [B, L] long.
            attention_mask: [B, L].
            frame_mask: [B, T] bool for video; ignored for images.

        Returns:
            visual_emb [B, E] and text_emb [B, E] (L2-normalised), and the scalar inverse temperature
            (`inverse_temperature()`, already exponentiated).
        """
        visual_emb = self.encode_visual(visual, frame_mask)
        text_emb = self.encode_text(input_ids, attention_mask)
        return visual_emb, text_emb, self.inverse_temperature()

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm convention): the temperature and learned tokens."""
        return {
            name
            for name, _ in self.named_parameters()
            if name.split(".")[-1] in ("logit_scale", "pos_embed", "cls_token")
        }

    def config_dict(self) -> dict[str, Any]:
        """The config as a plain dict (`create_student(name, **student.config_dict())` rebuilds the model)."""
        return asdict(self.config)


def _create_dual_encoder(variant: str, defaults: dict[str, Any], **kwargs: Any) -> DualEncoder:
    """Merge a size's defaults with the caller's overrides and build; unknown keys fail with suggestions."""
    valid = [f.name for f in fields(DualEncoderConfig)]
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3)
            raise TypeError(
                f"{variant}: unknown argument {key!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
            )
    return DualEncoder(DualEncoderConfig(**{**defaults, **kwargs}))


@register_student
def dual_encoder_tiny(**kwargs: Any) -> DualEncoder:
    """Tests and the smoke recipe: timm's 0.1M-param test CNN, one-layer width-32 towers, E=32."""
    args = dict(embed_dim=32, image_backbone="test_efficientnet", image_size=32, feature_dim=16, max_frames=16,
                video_width=32, video_depth=1, video_heads=2, vocab_size=512, max_length=16, text_width=32,
                text_depth=1, text_heads=2)  # fmt: skip
    return _create_dual_encoder("dual_encoder_tiny", args, **kwargs)


@register_student
def dual_encoder_small(**kwargs: Any) -> DualEncoder:
    """Shapes on CPU: captioner_small's slim ResNet-10-T at 64 px (a fair Fast/Slow pair), 4-layer BERT, E=256."""
    args = dict(embed_dim=256, image_backbone="resnet10t", image_size=64, feature_dim=1024, max_frames=32,
                image_backbone_args=dict(channels=(32, 64, 128, 256), stem_width=16), video_width=256, video_depth=2,
                video_heads=4, vocab_size=8000, max_length=32, text_width=256, text_depth=4, text_heads=4,
                dropout=0.1)  # fmt: skip
    return _create_dual_encoder("dual_encoder_small", args, **kwargs)


@register_student
def dual_encoder_base(**kwargs: Any) -> DualEncoder:
    """Real data (Flickr30K, COCO, VATEX): ViT-B/16 at 224 (CLS pooling), BERT-base-shaped text, E=512."""
    args = dict(embed_dim=512, image_backbone="vit_base_patch16_224", image_size=224, image_global_pool="token",
                feature_dim=1024, max_frames=64, video_width=512, video_depth=4, video_heads=8, vocab_size=30522,
                max_length=64, text_width=768, text_depth=12, text_heads=12, dropout=0.1)  # fmt: skip
    return _create_dual_encoder("dual_encoder_base", args, **kwargs)
