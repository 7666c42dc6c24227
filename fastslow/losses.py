"""Student losses: symmetric InfoNCE on aligned pairs and KL distillation of the teacher's rankings.

Both are modules with named tensor arguments that return a dict of `*_loss` parts; the trainer sums the
parts and logs each as is (torchtune `kd_losses.py` / open_clip `loss.py` style). Each module carries its
own `weight`, so the sum is the training objective without further bookkeeping.

Both compute in float32 whatever the input dtype (under bf16 autocast a softmax over hundreds of
candidates loses the small probabilities that the KL term is about).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ClipLoss",
    "DistillLoss",
    "TEACHER_NORMS",
    "gather_rows",
    "process_group",
    "teacher_logits",
    "teacher_matches",
]


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when there is none (one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_rows(x: Tensor, *, grad: bool = True) -> tuple[Tensor, int]:
    """Every process's ``x`` concatenated along dim 0 in rank order, and where this process's rows start.

    The cross-rank gather of open_clip's ``gather_features(local_loss=False, gather_with_grad=True)``: with
    ``grad``, `torch.distributed.nn.functional.all_gather` carries gradients back to the process that computed
    each row (its backward sums every process's gradient for our rows). Every process then computes the loss over
    the global batch, the same value, and the data-parallel average of the gradients (DDP / DeepSpeed) is the
    gradient of that global loss: training does not change with the number of GPUs. Without ``grad`` (teacher
    scores, masks, ids), a plain `all_gather`.

    Ranks may hold different numbers of rows (samples dropped under data.on_error=skip): the sizes are gathered
    first and every part padded to the largest, then trimmed. A collective: every process must call it.

    Args:
        x: [B, ...] this process's rows (bool is gathered as uint8: gloo has no bool all_gather).

    Returns:
        ``(x_all [sum_r B_r, ...], offset)`` with ``x_all[offset : offset + B] == x``; ``(x, 0)`` on one process.
    """
    rank, world = process_group()
    if world == 1:
        return x, 0
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    is_bool = x.dtype == torch.bool
    part = x.to(torch.uint8) if is_bool else x
    if part.shape[0] < max(sizes):
        part = torch.cat([part, part.new_zeros(max(sizes) - part.shape[0], *part.shape[1:])])
    if grad:
        with warnings.catch_warnings():
            # torch >= 2.10 marks it deprecated for the private _functional_collectives; it is the public
            # autograd-aware gather (gloo included: its backward sums through all-to-all), once per step.
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(dist_nn.all_gather(part))
    else:
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
    out = torch.cat([p[:size] for p, size in zip(parts, sizes)])
    return (out.bool() if is_bool else out), sum(sizes[:rank])


def _as_scale(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(logit_scale, dtype=torch.float32, device=like.device)


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """log_softmax over the last dim restricted to `mask`; finite everywhere, masked entries ≈ -3.4e38.

    The rows are first shifted so that their largest valid logit is 0 (log_softmax is shift-invariant, so the
    detached shift changes nothing), then masked entries get the most negative float32. exp() of them is an
    exact 0, and since every valid logit is <= 0 no subtraction can overflow to -inf: no inf - inf (NaN)
    can appear in the value or the gradient, whatever the score range. A row with no valid entry is uniform.
    """
    row_max = logits.detach().masked_fill(~mask, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = (logits - row_max).masked_fill(~mask, torch.finfo(torch.float32).min)
    return shifted.log_softmax(dim=-1)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) over a batch of aligned (visual, text) pairs, aware of repeated items.

    Batches are sampled per caption, so two texts of one batch can describe the same visual item. Treating
    the copies as separate columns would make each text's own item also one of its negatives. With
    `item_index`, visual items are deduplicated first (the first occurrence's embedding stands for the
    item; the copies are equal unless augmentation differs) and:

    * text -> visual: cross-entropy over the U unique items, target = the text's item;
    * visual -> text: multi-positive; for each unique item, the softmax runs over the B texts of the batch
      and the loss is the mean over the item's texts of -log p(text | item) (the "average log-probability
      of the positives" form of SupCon, Khosla et al. 2020, eq. 2 "L_out"), then averaged over the items.

    The loss is the mean of the two directions. Without repeats (or without `item_index`) this is exactly
    the CLIP loss: mean of CE(logits, arange) and CE(logits.T, arange).

    The batch is the one given: gather embeddings across ranks first (`gather_rows`) for global negatives.

    Args:
        weight: multiplies the returned loss.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(
        self,
        visual_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor | float,
        item_index: Tensor | None = None,
        exclude: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the contrastive loss.

        Args:
            visual_emb: [B, E] visual embeddings, row i aligned with text i (L2-normalised by the student).
            text_emb: [B, E] text embeddings.
            logit_scale: scalar inverse temperature, already exponentiated (`student.inverse_temperature()`).
            item_index: [B] long, id of row i's visual item (any integers; equal ids = the same item).
                None = every row is a different item.
            exclude: [B, B] bool, True where the item of pair j is *not* a negative for text i although it is
                not text i's labelled item: a teacher rated it a match (RocketQA-style denoising, see
                `teacher_matches`). Such pairs leave both softmaxes (text i's over items, item j's over texts);
                an entry on a row's own item is ignored. None = the one-hot labels as they are.

        Returns:
            {"contrastive_loss": scalar}.
        """
        if visual_emb.shape != text_emb.shape or visual_emb.dim() != 2:
            raise ValueError(
                f"visual_emb {tuple(visual_emb.shape)} and text_emb {tuple(text_emb.shape)}: expected [B, E] both"
            )
        scale = _as_scale(logit_scale, text_emb)
        visual, text = visual_emb.float(), text_emb.float()
        batch = text.shape[0]
        rows = torch.arange(batch, device=text.device)
        if exclude is not None and item_index is None:
            item_index = rows  # the denoising path below needs the item columns; distinct rows = distinct items
        if item_index is None:
            logits = scale * text @ visual.T  # [B, B]: texts x visual items
            loss = (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, rows)) / 2
            return {"contrastive_loss": self.weight * loss}

        if item_index.shape != (batch,):
            raise ValueError(f"item_index {tuple(item_index.shape)}: expected [{batch}]")
        # inverse[i] = column of text i's item among the U unique items.
        unique, inverse = torch.unique(item_index, return_inverse=True)
        first = torch.full((unique.numel(),), batch, dtype=torch.long, device=text.device)
        first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # first row holding each unique item
        logits = scale * text @ visual[first].T  # [B, U]
        if exclude is not None:
            if exclude.shape != (batch, batch):
                raise ValueError(f"exclude {tuple(exclude.shape)}: expected [{batch}, {batch}]")
            # Batch columns -> unique item columns; never the row's own item (its label stays the target).
            drop = torch.zeros(batch, unique.numel(), dtype=torch.bool, device=text.device)
            i, j = exclude.bool().nonzero(as_tuple=True)
            drop[i, inverse[j]] = True
            drop[rows, inverse] = False
            logits = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
        t2v = F.cross_entropy(logits, inverse)
        # v2t: log p(text | item) over the batch's texts, averaged over each item's positives, then over items.
        log_p = logits.T.log_softmax(dim=1)  # [U, B]
        positives = inverse.unsqueeze(0) == torch.arange(unique.numel(), device=text.device).unsqueeze(1)  # [U, B]
        v2t = -((log_p * positives).sum(dim=1) / positives.sum(dim=1)).mean()
        return {"contrastive_loss": self.weight * (t2v + v2t) / 2}


TEACHER_NORMS = ("length", "sum", "zscore")


def teacher_logits(
    scores: Tensor, n_tokens: Tensor, mask: Tensor | None = None, *, norm: str = "sum", directions: int = 2
) -> Tensor:
    """Put a captioner's scores on the scale a softmax over candidate items should see.

    `Captioner.score` is the *length-normalised* log-likelihood summed over its reading directions,
    s = sum_d (1/n) log p_d(text | item). Used as logits at a fixed τ_T, a caption of n tokens gets a target
    distribution p(item) ∝ p(text | item)^(d/n): the longer the caption, the flatter its target, so the
    target temperature would depend on the caption's length rather than on the evidence.

    - ``sum``: n / d * s, the mean over directions of the caption's *total* log-likelihood. A softmax of it
      over candidate items is Bayes' posterior p(item | text) under a uniform prior over the candidates: the
      calibrated target when the captioner is a good density model.
    - ``zscore``: (s - mean) / std over the row's valid candidates: every caption's target has the same
      spread whatever its length and the teacher's calibration (a per-query normalisation).
    - ``length``: s as it is (the scale used before; kept for comparison).

    Args:
        scores: [Q, C] teacher scores (`score` / `score_pairs`), C candidates per query.
        n_tokens: [Q] number of predicted tokens per query text (real tokens minus BOS: ``mask.sum(1) - 1``).
        mask: [Q, C] bool of valid candidates (zscore statistics use these only); None = all valid.
        norm: one of `TEACHER_NORMS`.
        directions: reading directions summed in `scores` (the teacher's `config.directions`).

    Returns:
        [Q, C] float32 logits (before the division by τ_T). Invalid entries are returned unchanged.
    """
    scores = scores.detach().float()
    if norm == "length":
        return scores
    if norm == "sum":
        return scores * (n_tokens.to(scores).clamp(min=1) / directions).unsqueeze(1)
    if norm == "zscore":
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
        count = valid.sum(1, keepdim=True).clamp(min=1)
        mean = torch.where(valid, scores, 0.0).sum(1, keepdim=True) / count
        var = torch.where(valid, (scores - mean) ** 2, 0.0).sum(1, keepdim=True) / count
        return torch.where(valid, (scores - mean) / (var.sqrt() + 1e-6), scores)
    raise ValueError(f"teacher norm {norm!r} is not one of {', '.join(TEACHER_NORMS)}")


def teacher_matches(logits: Tensor, mask: Tensor, margin: float) -> Tensor:
    """Which candidates the teacher rates as matches: within ``margin`` of the row's own item (the diagonal).

    Args:
        logits: [B, B] normalised teacher logits (`teacher_logits`) of text i against the item of pair j.
        mask: [B, B] bool, True where ``logits`` holds a teacher score. Rows whose diagonal is not scored
            have no reference and match nothing.
        margin: in units of ``logits`` (log-likelihood nats for ``sum``); 0 = at least as likely as the positive.

    Returns:
        [B, B] bool, True off the diagonal where the candidate is scored and
        ``logits[i, j] >= logits[i, i] - margin`` (the `ClipLoss` ``exclude`` argument).
    """
    diag = logits.diagonal().unsqueeze(1)
    has_ref = mask.diagonal().unsqueeze(1)
    off_diag = ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    return mask.bool() & has_ref & off_diag & (logits >= diag - margin)


class DistillLoss(nn.Module):
    """KL( softmax(s_T / τ_T) ‖ softmax(s_S / τ_S) ) over each query's candidate set, averaged over queries.

    The Fast-and-Slow distillation (Miech et al. 2021, §3.3): for a text query, the teacher's scores over a
    candidate set of visual items (the positive, in-batch and mined negatives) define a target distribution;
    the student's distribution over the same candidates is pulled to it. Forward KL (teacher first) is the
    Hinton et al. (2015) choice: mass where the teacher puts it is what the student must cover.

    Choices, documented because they change the loss's scale:

    * Temperatures. τ_T turns teacher scores (length-normalised log-likelihoods, not cosines) into a
      distribution. The student side is either a fixed τ_S (`student_temperature`) or, when it is None,
      the student's own learned scale: logits_S = s_S * student_logit_scale, so the retrieval scores the
      index will use are the ones that are distilled.
    * No T² factor. Hinton's T² keeps gradients comparable when a classifier's logits are softened with a
      large T (≫ 1). Here τ_S is small (≈ 0.01-0.07) and possibly learned: τ_S² would shrink the term by
      ~10³ and make its weight drift as the temperature is learned. The balance with the contrastive loss is
      `weight`, set in the recipe.
    * Masking. Absent candidates (`candidate_mask` False) are excluded from both softmaxes and from the
      sum. They are filled with the most negative float32 (not -inf) after a shift that makes every valid
      logit <= 0 (`_masked_log_softmax`): exp() gives an exact 0 and no inf - inf ever appears, so neither
      the value nor the gradient can become NaN, even for fully masked rows or extreme scores.
    * Degenerate rows. A query with fewer than 2 valid candidates has nothing to rank (with one candidate
      both distributions are a point mass and the KL is 0; with none it is undefined): it contributes 0 and
      is not counted in the mean, which runs over the queries with >= 2 valid candidates. If there are
      none, the loss is 0 (still attached to the graph, so a backward pass works).
    * The teacher side is detached: the teacher is frozen and its scores are targets.

    Args:
        teacher_temperature: τ_T > 0.
        student_temperature: τ_S > 0, or None to use `student_logit_scale` (1 / τ_S) passed to forward.
        weight: multiplies the returned loss.
    """

    def __init__(self, teacher_temperature: float = 1.0, student_temperature: float | None = None, weight: float = 1.0):
        super().__init__()
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature={teacher_temperature}: must be > 0")
        if student_temperature is not None and student_temperature <= 0:
            raise ValueError(f"student_temperature={student_temperature}: must be > 0 (or None for the learned scale)")
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.weight = weight

    def forward(
        self,
        student_scores: Tensor,
        teacher_scores: Tensor,
        candidate_mask: Tensor | None = None,
        student_logit_scale: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """Compute the distillation loss.

        Args:
            student_scores: [Q, C] raw student scores (cosine similarities <text, visual>), not yet scaled.
            teacher_scores: [Q, C] teacher scores for the same (query, candidate) pairs.
            candidate_mask: [Q, C] bool, False = absent candidate (padding of a ragged candidate list);
                None = all present.
            student_logit_scale: scalar inverse temperature of the student (already exponentiated); used, and
                required, only when `student_temperature` is None. Gradients flow into it.

        Returns:
            {"distill_loss": scalar}.
        """
        if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2:
            raise ValueError(
                f"student_scores {tuple(student_scores.shape)} and teacher_scores {tuple(teacher_scores.shape)}: "
                "expected [Q, C] both"
            )
        if candidate_mask is None:
            candidate_mask = torch.ones_like(student_scores, dtype=torch.bool)
        elif candidate_mask.shape != student_scores.shape:
            raise ValueError(f"candidate_mask {tuple(candidate_mask.shape)}: expected {tuple(student_scores.shape)}")
        candidate_mask = candidate_mask.bool()

        if self.student_temperature is not None:
            student_logits = student_scores.float() / self.student_temperature
        elif student_logit_scale is None:
            raise ValueError("DistillLoss(student_temperature=None) needs student_logit_scale in forward")
        else:
            student_logits = student_scores.float() * _as_scale(student_logit_scale, student_scores)
        teacher_logits = teacher_scores.detach().float() / self.teacher_temperature

        log_p_s = _masked_log_softmax(student_logits, candidate_mask)
        log_p_t = _masked_log_softmax(teacher_logits, candidate_mask)
        # Σ_c p_T (log p_T - log p_S), with log-probabilities from log_softmax (never log(0)).
        terms = log_p_t.exp() * (log_p_t - log_p_s)
        kl = torch.where(candidate_mask, terms, torch.zeros_like(terms)).sum(dim=-1)  # [Q]

        valid_rows = candidate_mask.sum(dim=-1) >= 2
        kl = torch.where(valid_rows, kl, torch.zeros_like(kl))
        loss = kl.sum() / valid_rows.sum().clamp(min=1)
        return {"distill_loss": self.weight * loss}
