"""LightningDOT's auxiliary objectives for the Fast student: VMLM and SMRM (Sun et al., NAACL 2021, §3.2).

LightningDOT trains its dual encoder with two objectives besides the contrastive one (its CMR, our InfoNCE) that
teach each tower fine-grained grounding while inference stays one dot product:

* **VMLM** (visual-embedding fused masked language modelling): caption words are masked, the text tower encodes
  the masked caption, and each masked word is predicted from its output *plus the item's pooled visual embedding*
  (LightningDOT's ``cls_concat="add"``: the other tower's [CLS] added to every token). On shapes that is "which
  colour is the circle?" answered from the image: the binding that minimal pairs test.
* **SMRM** (semantic-embedding fused masked region modelling): visual tokens are masked at the input (image patches:
  pixels set to 0, the mean after normalisation; video frames: a learned placeholder), the visual tower encodes the
  masked item, and each masked token's input is regressed from its output *plus the caption's pooled embedding*
  (LightningDOT's MRFR: an MSE to the masked region's feature). Targets are standardised per token (MAE's
  ``norm_pix_loss``), so the loss does not depend on the features' scale (I3D activations, normalised pixels).

The heads live here, in the training objective (`fastslow.distill.DistillObjective(aux=...)`), not in the
student: the exported student has no auxiliary parameter and encodes exactly as a plain one. The masked passes
run only for a weight > 0 (a zero weight builds no head, so the default recipe costs nothing). Both reuse the
unmasked pass of the contrastive loss for the injected embedding (as LightningDOT does: the other modality is
never masked in the same task), so each costs one extra forward and backward of one tower.

Our tokenizers have no [MASK] token: a masked word's input embedding is a learned vector (BERT's 80/10/10 mix
reduces to 100 % [MASK] here; the mix matters for fine-tuning a pretrained MLM on unmasked text, which the
student's InfoNCE pass already is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StudentObjectives", "sample_mask", "text_mask_candidates"]


def sample_mask(eligible: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Choose positions to mask: in each row, exactly ``max(1, floor(ratio * n + 0.5))`` of its ``n`` eligible
    positions, uniformly at random; none in a row without an eligible position.

    A fixed count per row (not a Bernoulli draw per position) makes the ratio what it says on every row, up to
    rounding, and never leaves a caption or clip without a target.

    Args:
        eligible: [B, N] bool, True where a position may be masked (a real word or frame, not padding).
        ratio: share of each row's eligible positions to mask, in (0, 1].
        generator: random source (default: torch's global one, which the trainer seeds and checkpoints).

    Returns:
        [B, N] bool, a subset of ``eligible``.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"mask ratio={ratio}: must be in (0, 1]")
    eligible = eligible.bool()
    n = eligible.sum(dim=1)
    count = torch.where(n > 0, torch.floor(ratio * n + 0.5).clamp(min=1), torch.zeros_like(n, dtype=torch.float))
    keys = torch.rand(eligible.shape, generator=generator, device=eligible.device if generator is None else "cpu")
    keys = keys.to(eligible.device).masked_fill(~eligible, 2.0)  # ineligible positions sort last
    rank = keys.argsort(dim=1).argsort(dim=1)  # rank of each position among its row's keys
    return eligible & (rank < count.unsqueeze(1))


def text_mask_candidates(input_ids: Tensor, attention_mask: Tensor, special_ids: Sequence[int]) -> Tensor:
    """[B, L] bool: the caption positions VMLM may mask: real tokens that are not special (BOS/EOS/CLS/SEP/PAD).

    Predicting BOS or EOS from the image would be free (they are in every caption at fixed places).
    """
    eligible = attention_mask.bool()
    if special_ids:
        specials = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
        eligible = eligible & ~torch.isin(input_ids, specials)
    return eligible


def _prediction_head(width: int, out_dim: int) -> nn.Sequential:
    # BERT's MLM head shape (BertPredictionHeadTransform + decoder), which is also LightningDOT's region regressor:
    # dense, GELU, LayerNorm, then the output projection.
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12), nn.Linear(width, out_dim))


def _standardise(x: Tensor) -> Tensor:
    """Per-token zero mean, unit variance over the last dim (MAE's norm_pix_loss target)."""
    x = x.float()
    return (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True, unbiased=False) + 1e-6).sqrt()


class StudentObjectives(nn.Module):
    """VMLM and SMRM heads and losses for a `DualEncoder`, owned by the training objective.

    Args:
        student: the dual encoder the heads are sized for (read at construction only; not kept, so this module's
            parameters and state dict are the heads' alone).
        vmlm_weight: weight of the VMLM loss; 0 builds no VMLM head.
        smrm_weight: weight of the SMRM loss; 0 builds no SMRM head.
        vmlm_mask_ratio: share of each caption's words masked, in (0, 1] (BERT / LightningDOT: 0.15).
        smrm_mask_ratio: share of each item's patches / real frames masked, in (0, 1].
        special_ids: token ids never masked (the tokenizer's BOS, EOS, PAD).
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        vmlm_weight: float = 0.0,
        smrm_weight: float = 0.0,
        vmlm_mask_ratio: float = 0.15,
        smrm_mask_ratio: float = 0.15,
        special_ids: Sequence[int] = (),
    ) -> None:
        super().__init__()
        for name, w in (("vmlm_weight", vmlm_weight), ("smrm_weight", smrm_weight)):
            if w < 0:
                raise ValueError(f"loss.{name}={w}: must be >= 0")
        for name, r in (("vmlm_mask_ratio", vmlm_mask_ratio), ("smrm_mask_ratio", smrm_mask_ratio)):
            if not 0 < r <= 1:
                raise ValueError(f"loss.{name}={r}: must be in (0, 1]")
        cfg = student.config
        self.modality = student.modality
        self.vmlm_weight, self.smrm_weight = float(vmlm_weight), float(smrm_weight)
        self.vmlm_mask_ratio, self.smrm_mask_ratio = float(vmlm_mask_ratio), float(smrm_mask_ratio)
        self.special_ids = tuple(int(i) for i in special_ids)
        self.vmlm: nn.ModuleDict | None = None
        self.smrm: nn.ModuleDict | None = None
        self.grid = self.patch = 0
        if self.vmlm_weight > 0:
            hidden = student.text.encoder.config.hidden_size
            vocab = student.text.encoder.get_input_embeddings().num_embeddings
            self.vmlm = nn.ModuleDict(
                {
                    "inject": nn.Linear(cfg.embed_dim, hidden),  # the item's pooled embedding, into the text width
                    "predict": _prediction_head(hidden, vocab),
                }
            )
            self.mask_embedding = nn.Parameter(torch.randn(hidden) * 0.02)  # BERT's embedding init scale
        if self.smrm_weight > 0:
            if self.modality == "video":
                width, target = cfg.video_width, cfg.feature_dim  # regress the masked frame's clip feature
                self.mask_frame = nn.Parameter(torch.zeros(cfg.feature_dim))  # the masked frame's input
            else:
                width, target = self._image_grid(student, cfg.image_size)
            self.smrm = nn.ModuleDict(
                {"inject": nn.Linear(cfg.embed_dim, width), "predict": _prediction_head(width, target)}
            )

    def _image_grid(self, student: nn.Module, size: int) -> tuple[int, int]:
        """(token width C, target size 3 p^2) from one probe of the image tower at ``size``; sets grid and patch."""
        was_training = student.training
        with torch.no_grad():
            tokens = student.visual.eval().tokens(torch.zeros(1, 3, size, size))
        student.visual.train(was_training)
        n, width = tokens.shape[1:]
        grid = round(n**0.5)
        if grid * grid != n or size % grid:
            raise ValueError(
                f"SMRM needs a square token grid that divides the image: {n} tokens at image_size={size}; "
                "use another image size or loss.smrm_weight=0"
            )
        self.grid, self.patch = grid, size // grid
        return width, 3 * self.patch**2

    def forward(self, student: nn.Module, batch: dict, visual_emb: Tensor, text_emb: Tensor) -> dict[str, Tensor]:
        """The weighted auxiliary losses of one batch.

        Args:
            student: the dual encoder being trained (its towers run on the masked inputs).
            batch: the collated batch (``input_ids``, ``attention_mask``, and ``pixels`` or ``features`` +
                ``frame_mask``).
            visual_emb: [B, E] the unmasked items' embeddings (injected into VMLM), with gradients.
            text_emb: [B, E] the unmasked captions' embeddings (injected into SMRM), with gradients.

        Returns:
            ``{"vmlm_loss": ..., "smrm_loss": ...}``, each already multiplied by its weight; only the active ones.
        """
        out: dict[str, Tensor] = {}
        if self.vmlm is not None:
            out["vmlm_loss"] = self.vmlm_weight * self._vmlm(student, batch, visual_emb)
        if self.smrm is not None:
            smrm = self._smrm_video if self.modality == "video" else self._smrm_image
            out["smrm_loss"] = self.smrm_weight * smrm(student, batch, text_emb)
        return out

    def _vmlm(self, student: nn.Module, batch: dict, visual_emb: Tensor) -> Tensor:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        masked = sample_mask(text_mask_candidates(ids, attention, self.special_ids), self.vmlm_mask_ratio)
        encoder = student.text.encoder
        embeds = encoder.get_input_embeddings()(ids)
        embeds = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(embeds.dtype), embeds)
        hidden = encoder(inputs_embeds=embeds, attention_mask=attention).last_hidden_state  # [B, L, H]
        rows, cols = masked.nonzero(as_tuple=True)
        fused = hidden[rows, cols] + self.vmlm["inject"](visual_emb)[rows]  # LightningDOT: txt_seq + img_cls
        logits = self.vmlm["predict"](fused)
        if not len(rows):  # no caption has a word to mask: a zero that keeps the graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), ids[rows, cols])

    def _regress(self, tokens: Tensor, masked: Tensor, text_emb: Tensor, targets: Tensor) -> Tensor:
        """MSE of the head's prediction at the masked tokens [B, N, W] against their standardised inputs [B, N, D]."""
        rows, cols = masked.nonzero(as_tuple=True)
        fused = tokens[rows, cols] + self.smrm["inject"](text_emb)[rows]  # LightningDOT: img_seq + txt_cls
        pred = self.smrm["predict"](fused)
        if not len(rows):
            return pred.sum() * 0.0
        return F.mse_loss(pred.float(), _standardise(targets[rows, cols]))

    def _smrm_video(self, student: nn.Module, batch: dict, text_emb: Tensor) -> Tensor:
        features, real = batch["features"], batch["frame_mask"].bool()
        masked = sample_mask(real, self.smrm_mask_ratio)  # real frames only, never padding
        inputs = torch.where(masked.unsqueeze(-1), self.mask_frame.to(features.dtype), features)
        tokens, _ = student.visual.tokens(inputs, real)
        if student.visual.cls_token is not None:
            tokens = tokens[:, 1:]
        return self._regress(tokens, masked, text_emb, features)

    def _smrm_image(self, student: nn.Module, batch: dict, text_emb: Tensor) -> Tensor:
        pixels = batch["pixels"]
        b, c, h, w = pixels.shape
        g, p = self.grid, self.patch
        if h != g * p or w != g * p:
            raise ValueError(f"SMRM heads were sized for {g * p} px images; the batch has {h} x {w}")
        masked = sample_mask(torch.ones(b, g * g, dtype=torch.bool, device=pixels.device), self.smrm_mask_ratio)
        cover = masked.view(b, 1, g, g).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        tokens = student.visual.tokens(pixels.masked_fill(cover, 0.0))  # [B, g*g, C], raster order
        patches = pixels.view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        return self._regress(tokens, masked, text_emb, patches)
