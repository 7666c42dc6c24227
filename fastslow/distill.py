"""Distillation from the Slow teacher into the Fast student (DESIGN.md stage 3).

Per text query, the teacher's scores over a candidate set become softmax(s_T / tau_T); the student's
scores over the same candidates are pulled to it by KL divergence, added to the symmetric InfoNCE loss.
Two candidate sets:

- **in-batch**: every (unique) item of the batch. Captions that fit several items (partial captions,
  near-duplicates) make some in-batch "negatives" positives; one-hot InfoNCE punishes the student for
  them, the teacher's soft scores do not.
- **listwise over mined hard negatives**: the student's own index over the training items returns each
  caption's top-K (refreshed every `mine_every` steps); the teacher ranks those K. The student scores
  them with its fresh text embedding against the item embeddings of the last refresh (a memory bank,
  no gradient on that side: encoding B*K extra items per step would cost K times the batch), except
  the positive, which uses the fresh, differentiable item embedding of the batch.

Teacher scores of (text, item) pairs are deterministic for a given teacher, so they are computed once,
batched, and kept in `TeacherScoreCache` stamped with the teacher's weights hash; a later run (another
student size, another loss weight) reuses them. The teacher's visual tokens for the training items are
computed once into a `TokenStore`, so scoring a pair never runs the backbone.

The frozen teacher is set up in exactly one place: `TeacherPairScorer.__init__`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastslow.data import RetrievalSplit, captions_per_path
from fastslow.evaluation import build_token_store, encode_items, encode_texts_student, visual_args
from fastslow.losses import TEACHER_NORMS, ClipLoss, DistillLoss, gather_rows, teacher_logits, teacher_matches
from fastslow.mining import inbatch_candidates, listwise_candidates, mine_hard_negatives, swap_words
from fastslow.score_cache import TeacherScoreCache
from fastslow.tokenizer import TextTokenizer

DISTILL_MODES = ("none", "inbatch", "listwise", "group", "swap")


def split_hash(split: RetrievalSplit) -> str:
    """Identifies a split's content for caches: the ordered item ids and captions."""
    h = hashlib.sha256()
    h.update(json.dumps([split.item_ids, split.captions, split.text_to_visual]).encode())
    return h.hexdigest()[:16]


class TeacherPairScorer:
    """Scores (text, item) pairs of one split with the frozen teacher, from its stored visual tokens.

    Args:
        teacher: a trained teacher; frozen here (eval mode, no gradients) -- the one place it is set up.
        teacher_hash: hash of the teacher's weights file; stamps the token store.
        split: the split whose captions and items are scored (usually train).
        load_visual: the item loader (images or clip features).
        tokenizer, max_length: how captions become the teacher's ids: the teacher's own tokenizer (the one saved
            beside its weights, `stages.load_trained`), which may differ from the student's.
        ids_tokenizer: the tokenizer of the ids `score_ids` is handed (the student's: swapped captions are made from
            the student's ids), when it is not ``tokenizer``: those rows are decoded to text and encoded with the
            teacher's tokenizer, so the teacher never reads ids of another vocabulary. None: they are the teacher's.
        store_dir: where the teacher's visual tokens for the split's items live (built when absent or
            built by another teacher).
        chunk: pairs per teacher call (bounds memory).
        accelerator: the run's, when several processes build the store (each extracts its shard of the rows).
        on_error, ledger: ``data.on_error`` and the run's `SkipLedger`: under ``"skip"`` an item that cannot be
            read gets a placeholder row the store refuses to hand out (`TokenStore`); such a store is rebuilt by a
            run under ``"raise"``, which wants every item.
        settings: the recipe settings the items' tokens depend on besides the files, by recipe key
            (`fastslow.stages.visual_stamp`: ``{"data.image_size": 224}``, or the clip length and feature size),
            stamped into the store beside the teacher and split hashes: a store built at another image size is
            rebuilt, and refused by a reader that expects this one.
    """

    def __init__(
        self,
        teacher: nn.Module,
        teacher_hash: str,
        split: RetrievalSplit,
        load_visual,
        tokenizer: TextTokenizer,
        max_length: int,
        store_dir: str | Path,
        chunk: int = 2048,
        accelerator=None,
        on_error: str = "raise",
        ledger=None,
        settings: dict | None = None,
        ids_tokenizer: TextTokenizer | None = None,
    ):
        self.teacher = teacher.eval().requires_grad_(False)
        is_main = accelerator is None or accelerator.is_main_process
        self.device = next(teacher.parameters()).device
        self.chunk = chunk
        self.tokenizer, self.ids_tokenizer, self.max_length = tokenizer, ids_tokenizer, max_length
        self.ids, self.mask = tokenizer.encode(split.captions, max_length)
        store_dir = Path(store_dir)
        stamp = {"teacher_hash": teacher_hash, "split_hash": split_hash(split), **(settings or {})}
        meta_path = store_dir / "meta.json"
        info = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        built, left_out = info.get("meta", {}), {int(r): why for r, why in info.get("skipped", {}).items()}
        stale = any(built.get(k) != v for k, v in stamp.items()) or bool(left_out and on_error == "raise")
        if stale:  # absent, made by another teacher, or with rows a run under "raise" must not lack
            # Every process extracts its shard of the rows (`build_token_store`): none waits out the others'.
            build_token_store(self.teacher, split, load_visual, store_dir, meta=stamp, batch_size=64,
                              device=self.device, accelerator=accelerator, on_error=on_error,
                              ledger=ledger)  # fmt: skip
        elif is_main and ledger is not None:  # a reused store still lacks the items it could not read then
            captions = captions_per_path(split)
            for row, why in left_out.items():
                path = split.item_paths[row]
                ledger.add(path, why, where="teacher tokens", captions=captions.get(path, 0))
        self.store_dir, self.stamp = store_dir, stamp
        self._store = None

    @property
    def store(self):
        from teachers import TokenStore

        if self._store is None:  # every process opens the store checked against the stamp it was (re)built with
            rebuild = f"tools/distill.py (it rebuilds {self.store_dir} when the stamp differs)"
            self._store = TokenStore.open(self.store_dir, expect=self.stamp, rebuild=rebuild)
        return self._store

    @torch.no_grad()
    def __call__(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Teacher scores of aligned pairs: text_idx [P], item_idx [P] -> [P] float32 (CPU)."""
        text_idx = torch.as_tensor(text_idx).long()
        return self._score(self.ids[text_idx], self.mask[text_idx], item_idx)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Teacher scores of aligned (token ids, item) pairs for texts that are not in the split (e.g. captions with
        two words swapped): [P, L] ids (of ``ids_tokenizer`` when one was given), [P] items -> [P] float32 (CPU)."""
        if self.ids_tokenizer is not None:  # the student's ids: back to text, then the teacher's own ids
            pad = self.ids_tokenizer.pad_id
            texts = self.ids_tokenizer.decode_batch(torch.where(attention_mask.bool(), input_ids, pad))
            input_ids, attention_mask = self.tokenizer.encode(texts, self.max_length)
        return self._score(input_ids, attention_mask, item_idx)

    def _score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """[P, L] teacher ids, [P] items -> [P] float32 (CPU), `chunk` pairs per teacher call."""
        item_idx = torch.as_tensor(item_idx).long()
        out = torch.empty(len(item_idx), dtype=torch.float32)
        for s in range(0, len(item_idx), self.chunk):
            i = item_idx[s : s + self.chunk]
            visual = self.store[i.numpy()].to(device=self.device)
            ids = input_ids[s : s + self.chunk].to(self.device)
            mask = attention_mask[s : s + self.chunk].to(self.device)
            out[s : s + len(i)] = self.teacher.score_pairs(visual, ids, mask).float().cpu()
        return out

    @torch.no_grad()
    def block(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Teacher scores of every text against every item: [T] x [U] -> [T, U] float32 (CPU).

        Uses `teacher.score` (all pairs), which shares the per-text work across items: about twice
        the pairs per second of `score_pairs` on aligned pairs (docs/BENCHMARKS.md).
        """
        text_idx, item_idx = torch.as_tensor(text_idx).long(), torch.as_tensor(item_idx).long()
        visual = self.store[item_idx.numpy()].to(device=self.device)
        ids, mask = self.ids[text_idx].to(self.device), self.mask[text_idx].to(self.device)
        return self.teacher.score(visual, ids, mask).float().cpu()


class OracleScorer:
    """Ground-truth "teacher" for the built-in shapes data: 0 when the caption is true of the item, else
    ``-penalty``. Distilling from it shows how much of the teacher's gap the student can close at all (its
    ceiling); it is a benchmark instrument, never a default.

    Args:
        truth: a `fastslow.data.shapes.GroundTruth` for the training split.
        penalty: score of a caption that does not fit (the KL target puts ~exp(-penalty) on it).
    """

    def __init__(self, truth, penalty: float = 20.0, tokenizer: TextTokenizer | None = None):
        self.truth, self.penalty, self.tokenizer = truth, penalty, tokenizer

    def _scores(self, fits) -> torch.Tensor:
        return torch.where(torch.from_numpy(fits), 0.0, -self.penalty).float()

    def __call__(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return self._scores(self.truth.fits(torch.as_tensor(text_idx).tolist(), torch.as_tensor(item_idx).tolist()))

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Texts outside the split (swapped captions): decoded, parsed, and checked against the item's scene."""
        if self.tokenizer is None:
            raise RuntimeError("OracleScorer.score_ids needs the tokenizer that encoded the ids (tokenizer=...)")
        texts = self.tokenizer.decode_batch(torch.where(attention_mask.bool(), input_ids, self.tokenizer.pad_id))
        return self._scores(self.truth.fits_text(texts, torch.as_tensor(item_idx).tolist()))

    def block(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        t, i = torch.as_tensor(text_idx), torch.as_tensor(item_idx)
        return self(t.repeat_interleave(len(i)), i.repeat(len(t))).view(len(t), len(i))


class CandidateMiner:
    """Each training caption's top-K items by the current student (a memory bank of item embeddings).

    Every rank encodes the whole training split (simple and identical on every rank; the cost is
    one gallery encoding per refresh), so no collective is needed to look candidates up.

    Under ``on_error="skip"`` an item that cannot be read is recorded in ``ledger``, its bank row is zeros
    and it is in ``left_out``, which every search excludes: it is never anyone's hard negative.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        load_visual,
        tokenizer: TextTokenizer,
        max_length: int,
        k: int,
        on_error: str = "raise",
        ledger=None,
    ):
        self.split, self.load_visual, self.tokenizer, self.max_length, self.k = (
            split,
            load_visual,
            tokenizer,
            max_length,
            k,
        )
        self.on_error, self.ledger = on_error, ledger
        self.item_emb: torch.Tensor | None = None
        self.mined: torch.Tensor | None = None
        self.left_out = torch.zeros(0, dtype=torch.long)  # items of the bank that could not be read
        self.rounds = 0

    @torch.no_grad()
    def refresh(self, student: nn.Module, texts: bool = True) -> None:
        """Re-encode the split's items (the bank) and, with ``texts``, every caption's top-K from it.

        ``texts=False`` refreshes the bank only: encoding every caption costs ~5x the items on shapes (30k
        captions vs 6k images), and group batches search the bank with live anchor embeddings instead
        (`search`)."""
        was_training = student.training
        student.eval()
        out, kept = encode_items(
            student.encode_visual, self.split, self.load_visual, 128, next(student.parameters()).device,
            on_error=self.on_error, ledger=self.ledger, where="miner")  # fmt: skip
        emb = torch.cat([o.float().cpu() for o in out])
        if len(kept) < self.split.n_items:  # unreadable items keep zero rows, and every search excludes them
            emb = torch.zeros(self.split.n_items, emb.shape[1]).index_copy_(0, kept, emb)
        self.item_emb = emb
        self.left_out = torch.from_numpy(np.setdiff1d(np.arange(self.split.n_items), kept.numpy()))
        if texts:
            text_emb = encode_texts_student(student, self.tokenizer, self.split.captions, max_length=self.max_length)
            positives = torch.as_tensor(self.split.text_to_visual)
            self.mined = mine_hard_negatives(
                text_emb.numpy(), self.item_emb.numpy(), positives, self.k, exclude=self.left_out
            )
        self.rounds += 1
        student.train(was_training)

    @torch.no_grad()
    def search(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_index):
        """[A, K] top-K bank items (own item removed) for A captions embedded now by ``student`` (eval mode)."""
        was_training = student.training
        student.eval()
        text_emb = student.encode_text(input_ids, attention_mask).float().cpu()
        student.train(was_training)
        positives = torch.as_tensor(self.split.text_to_visual)[torch.as_tensor(text_index).cpu()]
        return mine_hard_negatives(text_emb.numpy(), self.item_emb.numpy(), positives, self.k, exclude=self.left_out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bank travels with checkpoints: a resumed run must mine from the same embeddings."""
        if self.item_emb is None:
            return {}
        state = {"item_emb": self.item_emb, "rounds": torch.tensor(self.rounds)}
        if len(self.left_out):
            state["left_out"] = self.left_out
        return state if self.mined is None else {**state, "mined": self.mined}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.item_emb, self.mined, self.rounds = state["item_emb"], state.get("mined"), int(state["rounds"])
            self.left_out = state.get("left_out", torch.zeros(0, dtype=torch.long))

    def candidates(self, text_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cand [B, K+1] item indices with the positive first, mask [B, K+1]) for the batch's texts."""
        assert self.mined is not None, "call refresh() first"
        t = text_index.cpu()
        positive = torch.as_tensor(self.split.text_to_visual)[t]
        return listwise_candidates(self.mined[t], positive)


class DistillObjective(nn.Module):
    """forward(batch) -> {"loss", "contrastive_loss", "<term>_distill_loss"...}: the terms combine, each weighted.

    The batch carries what `DistillBatcher` attached without gradients:

    - ``inbatch_teacher`` [B, B] raw teacher scores and ``inbatch_mask`` (in-batch KL; in group mode the
      mask is each row's group, whose columns are the anchor's mined neighbours, all encoded live);
    - ``listwise_teacher`` [B, K+1], ``listwise_mask`` and ``listwise_emb`` [B, K+1, E] (memory bank).

    Args:
        student: the dual encoder being trained.
        contrastive_weight: weight of the symmetric InfoNCE.
        distill_weight: weight of the KL over ``inbatch_*`` (in-batch or group candidates) and ``listwise_*``.
        teacher_temperature: τ_T applied after `teacher_logits` normalisation.
        student_temperature: a fixed τ_S for the KL (the KL then cannot move the InfoNCE temperature);
            None: the student's own learnable scale.
        teacher_norm: how raw teacher scores become logits (`fastslow.losses.teacher_logits`).
        teacher_directions: reading directions summed in the teacher's scores (for ``sum``).
        denoise_margin: None, or drop from InfoNCE the negatives the teacher rates within this margin of the
            positive (in normalised teacher logits, before τ_T); see `teacher_matches`.
        margin_mse_weight: weight of margin-MSE (Hofstätter et al. 2020) on (positive - candidate) margins of
            the ``inbatch_*`` candidates: student margins in its scaled logits, teacher margins in normalised
            logits / τ_T. 0 = off.
        swap_weight: weight of the KL over each item's caption and its word-swapped copies (``swap_*`` keys
            attached by `DistillBatcher` with ``swaps > 0``): the teacher's p(text | item) over the texts.
        gather: InfoNCE and the in-batch KL (and margin-MSE, denoising) over every process's rows, gathered with
            their gradients (`fastslow.losses.gather_rows`): the loss of one process given the global batch.
            The `DistillBatcher` must then attach ``inbatch_*`` with a column per pair of the global batch.
        aux: LightningDOT's VMLM / SMRM heads (`students.aux_heads.StudentObjectives`), added to the loss with their
            own weights; held here, not by the student, so the exported student has none of their parameters.
            None (the default): no masked passes at all.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        contrastive_weight: float = 1.0,
        distill_weight: float = 1.0,
        teacher_temperature: float = 1.0,
        student_temperature: float | None = None,
        fresh_positive: bool = True,
        teacher_norm: str = "length",
        teacher_directions: int = 2,
        denoise_margin: float | None = None,
        margin_mse_weight: float = 0.0,
        swap_weight: float = 1.0,
        gather: bool = False,
        aux: nn.Module | None = None,
    ):
        super().__init__()
        self.gather = gather
        self.aux = aux
        if teacher_norm not in TEACHER_NORMS:
            raise ValueError(f"loss.teacher_norm={teacher_norm!r} is not one of {', '.join(TEACHER_NORMS)}")
        self.model = student
        # fresh_positive=False scores the positive from the memory bank too: every candidate then comes
        # from the same (stale) encoder, so the softmax cannot separate the positive by staleness alone;
        # the price is no distillation gradient into the visual tower.
        self.fresh_positive = fresh_positive
        self.contrastive_weight, self.distill_weight = contrastive_weight, distill_weight
        self.teacher_norm, self.teacher_directions = teacher_norm, teacher_directions
        self.teacher_temperature, self.student_temperature = teacher_temperature, student_temperature
        self.denoise_margin, self.margin_mse_weight, self.swap_weight = denoise_margin, margin_mse_weight, swap_weight
        self.clip = ClipLoss()
        self.kl = DistillLoss(teacher_temperature, student_temperature)

    def _logits(self, raw: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        return teacher_logits(raw, n_tokens, mask, norm=self.teacher_norm, directions=self.teacher_directions)

    def _margin_mse(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, scale) -> torch.Tensor:
        """Mean over valid (row, candidate != own) pairs of ((s_ii - s_ij) * scale - (t_ii - t_ij) / τ_T)²."""
        s_scaled = s.float() / self.student_temperature if self.student_temperature else s.float() * scale
        t_scaled = t / self.teacher_temperature
        pairs = mask & mask.diagonal().unsqueeze(1) & ~torch.eye(len(s), dtype=torch.bool, device=s.device)
        ds = s_scaled.diagonal().unsqueeze(1) - s_scaled
        dt = t_scaled.diagonal().unsqueeze(1) - t_scaled
        err = torch.where(pairs, (ds - dt) ** 2, torch.zeros_like(ds))
        return err.sum() / pairs.sum().clamp(min=1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        v_own = self.model.encode_visual(*visual_args(batch))  # [B, E] this process's rows
        t_own = self.model.encode_text(batch["input_ids"], batch["attention_mask"])  # [B, E]
        scale = self.model.inverse_temperature()
        # Tokens the teacher predicted per caption (all but BOS): its own count when it has its own tokenizer.
        n_tokens = batch["teacher_n_tokens"] if "teacher_n_tokens" in batch else batch["attention_mask"].sum(1) - 1
        # The InfoNCE and in-batch terms run over the global batch (every process's rows, gradients carried back by
        # the gather) when `gather` is on: the same loss on every process, the loss of one process given the
        # whole batch. The per-row terms below (swap, listwise) stay on the own rows: the data-parallel average of
        # their gradients is already the global one.
        v, t, items = v_own, t_own, batch["item_index"]
        if self.gather:
            (v, _), (t, _) = gather_rows(v_own), gather_rows(t_own)
            items = gather_rows(items, grad=False)[0]
        out: dict[str, torch.Tensor] = {}
        exclude = None
        if "inbatch_teacher" in batch:
            mask = batch["inbatch_mask"].bool()  # [B, B], or [B, N] columns of the global batch under gather
            if mask.shape[1] != len(v):
                raise ValueError(
                    f"inbatch_mask {tuple(mask.shape)} has a column per pair of a batch of {mask.shape[1]}, the "
                    f"objective sees {len(v)} pairs: DistillBatcher and DistillObjective need the same `gather`"
                )
            logits_t = self._logits(batch["inbatch_teacher"], mask, n_tokens)  # row-wise: before the gather
            if self.gather:
                logits_t, mask = gather_rows(logits_t, grad=False)[0], gather_rows(mask, grad=False)[0]
            if self.denoise_margin is not None:
                exclude = teacher_matches(logits_t, mask, self.denoise_margin)
                out["denoised_negatives"] = exclude.sum().float().detach()
            s = t @ v.T
            d = self.kl(s, logits_t, mask, student_logit_scale=scale)
            out["inbatch_distill_loss"] = d["distill_loss"]
            if self.margin_mse_weight:
                out["margin_mse_loss"] = self._margin_mse(s, logits_t, mask, scale)
        out.update(self.clip(v, t, scale, items, exclude=exclude))
        loss = self.contrastive_weight * out["contrastive_loss"]
        if "inbatch_distill_loss" in out:
            loss = loss + self.distill_weight * out["inbatch_distill_loss"]
        if "margin_mse_loss" in out:
            loss = loss + self.margin_mse_weight * out["margin_mse_loss"]
        if "swap_teacher" in batch:
            b, n, width = batch["swap_ids"].shape
            swap_mask = batch["attention_mask"][:b, None, :width].expand(b, n, width).reshape(b * n, width)
            t_swap = self.model.encode_text(batch["swap_ids"].reshape(b * n, width), swap_mask).view(b, n, -1)
            t_rows, v_rows = t_own[:b], v_own[:b]  # the first b rows carry swaps (`DistillBatcher` swap_rows)
            s = torch.cat([(t_rows * v_rows).sum(-1, keepdim=True), torch.einsum("bne,be->bn", t_swap, v_rows)], 1)
            mask = batch["swap_mask"].bool()
            logits_t = self._logits(batch["swap_teacher"], mask, n_tokens[:b])
            d = self.kl(s, logits_t, mask, student_logit_scale=scale)
            out["swap_distill_loss"] = d["distill_loss"]
            loss = loss + self.swap_weight * d["distill_loss"]
        if "listwise_teacher" in batch:
            bank = batch["listwise_emb"].to(t_own.dtype)  # [B, K+1, E], no gradient (memory bank)
            # the positive is fresh and differentiable unless fresh_positive=False
            cand = torch.cat([v_own.unsqueeze(1), bank[:, 1:]], dim=1) if self.fresh_positive else bank
            s = torch.einsum("be,bke->bk", t_own, cand)
            mask = batch["listwise_mask"].bool()
            logits_t = self._logits(batch["listwise_teacher"], mask, n_tokens)
            d = self.kl(s, logits_t, mask, student_logit_scale=scale)
            out["listwise_distill_loss"] = d["distill_loss"]
            loss = loss + self.distill_weight * d["distill_loss"]
        if self.aux is not None:  # VMLM / SMRM on this process's rows, the unmasked embeddings injected
            parts = self.aux(self.model, batch, v_own, t_own)
            out.update(parts)
            loss = loss + sum(parts.values())
        out["loss"] = loss
        return out


def step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """A generator for one step's draws, the same on a resumed run, distinct per process and per use."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + rank) * 17 + stream)


def group_mask(group: torch.Tensor, item_index: torch.Tensor) -> torch.Tensor:
    """[B, B] candidates of each row in a grouped batch: the items of its own group, each item once.

    Row i's candidates are the columns j of its group (``group[j] == group[i]``); the row's own column is kept,
    another column holding the row's own item is dropped (it is the positive, not a negative), and a repeated
    item counts once (its first column) -- `inbatch_candidates` applied within each group.
    """
    n_items = int(item_index.max()) + 1 if len(item_index) else 1
    key = group.long() * n_items + item_index.long()  # distinct across groups, equal for one item in one group
    same_group = group[:, None] == group[None, :]
    return inbatch_candidates(key) & same_group


class GroupComposer:
    """Batches made of anchor captions and captions of their mined neighbours (TAS-B-style composition).

    The trainer's loader supplies A anchor pairs; each anchor caption is embedded by the current student and
    searched against the miner's bank of item embeddings (refreshed every `mine_every` steps: cheap, the
    items are 1/5 of the captions on shapes), ``group_size - 1`` neighbour items are drawn without
    replacement from its top-K, and one caption of each neighbour is drawn; those pairs are loaded and
    appended, so the batch has ``A * group_size`` rows. Every column is then encoded live by the student in
    train mode (the bank only *chooses* the neighbours), and the in-batch KL and InfoNCE see the student's own
    confusions. Before the first refresh the neighbours are random items (a random batch). The draws come
    from a generator seeded by (seed, step, rank), so a resumed run composes the same batches.

    Args:
        split: the training split.
        dataset: the `PairDataset` over ``split`` (sample i = caption i and its item).
        miner: the candidate miner whose bank the anchors are searched against.
        group_size: rows per group (the anchor and ``group_size - 1`` neighbours).
        seed, rank: make the draws deterministic per step and distinct per process.
        student: the model being trained (embeds the anchors); None: use the miner's ``mined`` table.
    """

    def __init__(
        self,
        split: RetrievalSplit,
        dataset,
        miner: CandidateMiner,
        group_size: int,
        seed: int,
        rank: int = 0,
        student: nn.Module | None = None,
    ):
        if group_size < 2:
            raise ValueError(f"loss.group_size={group_size}: a group needs an anchor and at least one neighbour")
        self.split, self.dataset, self.miner, self.group_size, self.seed, self.rank = (
            split, dataset, miner, group_size, seed, rank)  # fmt: skip
        t2v = torch.as_tensor(split.text_to_visual, dtype=torch.long)
        order = torch.argsort(t2v, stable=True)  # texts grouped by item: CSR layout item -> its captions
        self.item_texts = order
        self.item_start = torch.searchsorted(t2v[order], torch.arange(split.n_items))
        self.item_count = torch.bincount(t2v, minlength=split.n_items)
        self.text_to_visual = t2v
        self.student = student

    def pool(self, batch: dict) -> torch.Tensor:
        """[A, K] mined items of the batch's anchors (-1: none yet)."""
        anchor_text = batch["text_index"].cpu()
        if self.student is not None and self.miner.item_emb is not None:
            return self.miner.search(self.student, batch["input_ids"], batch["attention_mask"], anchor_text)
        if self.student is None and self.miner.mined is not None:
            return self.miner.mined[anchor_text]
        return torch.full((len(anchor_text), 0), -1, dtype=torch.long)

    def neighbours(self, anchor_text: torch.Tensor, step: int, pool: torch.Tensor) -> torch.Tensor:
        """[A * (group_size - 1)] text indices: for each anchor in order, captions of neighbours from ``pool``."""
        g = step_generator(self.seed, step, self.rank, stream=0)
        n, a = self.group_size - 1, len(anchor_text)
        positive = self.text_to_visual[anchor_text]
        # A random order of each row's valid entries (padding last), then the first n of it.
        keys = torch.rand(pool.shape, generator=g) + (pool < 0).float()
        picked = pool.gather(1, keys.argsort(dim=1)[:, :n]) if pool.shape[1] else pool
        if picked.shape[1] < n:
            picked = torch.cat([picked, torch.full((a, n - picked.shape[1]), -1, dtype=torch.long)], dim=1)
        # Missing neighbours (before the first mining, or a gallery smaller than K): random other items.
        random_items = positive[:, None] + 1 + torch.randint(0, max(self.split.n_items - 1, 1), (a, n), generator=g)
        random_items = random_items % self.split.n_items
        items = torch.where(picked >= 0, picked, random_items).flatten()
        offset = (torch.rand(len(items), generator=g) * self.item_count[items]).long()
        return self.item_texts[self.item_start[items] + offset]

    def compose(self, batch: dict, step: int) -> tuple[dict, torch.Tensor]:
        """The grouped batch (anchors first, then each anchor's neighbours) and each row's group id.

        The batch's ``"skipped"`` lists ``(path, reason)`` of the neighbours that could not be read under
        ``data.on_error=skip`` (left out of the batch, their rows gone); under ``"raise"`` such a neighbour raises
        the loader's `DataError`, naming the file.
        """
        from fastslow.data import collate

        anchors = batch["text_index"].cpu()
        texts = self.neighbours(anchors, step, self.pool(batch))
        samples = [self.dataset[int(i)] for i in texts]
        # Neighbour k of `texts` belongs to anchor k // n; collate keeps the loaded samples in order.
        n = self.group_size - 1
        loaded = [k for k, sample in enumerate(samples) if sample is not None and "skipped" not in sample]
        extra = collate(samples)
        # Neighbours that could not be read (data.on_error=skip) are left out of the batch and listed under
        # "skipped", which the trainer records after prepare_batch like its loader's skips: in the run's SkipLedger
        # and its per-reason counts, summed over processes and kept across resume.
        skipped = extra.pop("skipped", [])
        group = torch.arange(len(anchors))
        if extra.get("empty", False):
            return {**batch, "skipped": skipped}, group
        extra_group = torch.tensor(loaded, dtype=torch.long) // n
        merged = concat_batches(batch, extra)  # moves `extra` to the batch's device
        merged["skipped"] = skipped
        return merged, torch.cat([group, extra_group])


def concat_batches(a: dict, b: dict) -> dict:
    """Rows of two collated pair batches in one (captions padded to the longer of the two widths)."""
    out = {}
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    for key, va in a.items():
        if not torch.is_tensor(va) or key not in b:
            continue
        vb = b[key].to(va.device)
        if key in ("input_ids", "attention_mask"):
            va = torch.nn.functional.pad(va, (0, width - va.shape[1]))
            vb = torch.nn.functional.pad(vb, (0, width - vb.shape[1]))
        out[key] = torch.cat([va, vb])
    return out


class DistillBatcher:
    """Attaches teacher targets to each batch (the trainer's `prepare_batch`) and refreshes mined
    candidates (its `on_step_end`).

    Args:
        mode: "none" | "inbatch" | "listwise" | "group" | "swap" (random batches; the only teacher targets are
            those over each caption's swapped copies).
        scorer: the teacher pair scorer (None when mode is "none").
        cache: teacher-score cache for this candidate source (None: score online every time).
        miner: the candidate miner (listwise and group).
        mine_every: steps between refreshes.
        inbatch_rows: in-batch mode: only the first this-many captions of each batch get teacher targets
            (the teacher's cost is rows x batch pairs per step); None: every caption.
        composer: group mode: the `GroupComposer` that appends each anchor's mined neighbours.
        mine_start: first step at which the miner refreshes (before it, group mode draws random neighbours);
            a warm student mines better candidates than a random one.
        swaps: per caption, this many copies with two words swapped (`fastslow.mining.swap_words`), scored by
            the teacher against the caption's own item (``swap_*`` keys); 0 = off. Any mode but "none".
        swap_rows: only the first this-many captions of a batch get swaps (each swap is one more text through
            the student's text tower, its largest cost); None: every caption.
        swappable: [V, V] bool, the token pairs that may be swapped (`fastslow.mining.swappable_tokens`: words
            of one role, e.g. two colours); None: any two tokens.
        seed, rank: make the swap draws deterministic per step and distinct per process.
        gather: in-batch and group targets get a column per pair of the global batch (every process's rows, in
            rank order), as `DistillObjective(gather=True)` needs: in-batch mode then scores this process's rows
            against every process's items (B x world B pairs per process, where B x B without it); group mode
            keeps its own groups' columns and masks the others.
    """

    def __init__(
        self,
        mode: str,
        scorer: TeacherPairScorer | None = None,
        cache: TeacherScoreCache | None = None,
        miner: CandidateMiner | None = None,
        mine_every: int = 500,
        inbatch_rows: int | None = None,
        composer: GroupComposer | None = None,
        mine_start: int = 0,
        swaps: int = 0,
        seed: int = 0,
        rank: int = 0,
        swap_rows: int | None = None,
        swappable: torch.Tensor | None = None,
        gather: bool = False,
    ):
        self.gather = gather
        if mode not in DISTILL_MODES:
            raise ValueError(f"loss.distill={mode!r} is not one of {', '.join(DISTILL_MODES)}")
        if mode == "group" and composer is None:
            raise ValueError("loss.distill=group needs a GroupComposer")
        if mode == "swap" and swaps < 1:
            raise ValueError("loss.distill=swap distils over swapped-word captions: set loss.swaps >= 1")
        self.mode, self.scorer, self.cache, self.miner, self.mine_every = mode, scorer, cache, miner, mine_every
        self.inbatch_rows, self.composer, self.mine_start = inbatch_rows, composer, mine_start
        self.swaps, self.seed, self.rank, self.swap_rows, self.swappable = swaps, seed, rank, swap_rows, swappable
        if swaps and not hasattr(scorer, "score_ids"):
            raise ValueError(f"loss.swaps={swaps} needs a teacher that scores any text; {type(scorer).__name__} cannot")
        self.pairs_scored = 0  # teacher calls actually made (cache misses)
        self.pairs_looked_up = 0  # pairs whose teacher score was needed (hits + misses)

    @property
    def cache_hits(self) -> int:
        return self.pairs_looked_up - self.pairs_scored

    def _teacher(self, text_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        def compute(t, i):
            self.pairs_scored += len(t)
            return self.scorer(torch.as_tensor(t), torch.as_tensor(i))

        self.pairs_looked_up += len(text_idx)
        if self.cache is None:
            return compute(text_idx, item_idx)
        return torch.as_tensor(self.cache.get_or_compute(text_idx.numpy(), item_idx.numpy(), compute)).float()

    def _inbatch(self, text: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[R, B] teacher scores of R captions against the batch's B items: from the cache when every pair is
        there, else one all-pairs teacher call for the block (cheaper than scoring the missing pairs one by one)."""
        r, b = len(text), len(item)
        rows, cols = text.repeat_interleave(b), item.repeat(r)
        self.pairs_looked_up += r * b
        if self.cache is not None:
            found_scores, found = self.cache.lookup(rows.numpy(), cols.numpy())
            if found.all():
                return torch.as_tensor(found_scores).float().view(r, b)
        scores = self.scorer.block(text, item)
        self.pairs_scored += r * b
        if self.cache is not None:
            self.cache.add(rows.numpy(), cols.numpy(), scores.flatten().numpy())
        return scores

    def __call__(self, batch: dict, step: int) -> dict:
        if self.mode == "none":
            return batch
        if self.mode == "group":
            batch, group = self.composer.compose(batch, step)
            batch["group"] = group.to(batch["input_ids"].device)
        text, item = batch["text_index"].cpu(), batch["item_index"].cpu()
        device = batch["input_ids"].device
        if getattr(self.scorer, "ids_tokenizer", None) is not None:
            # The teacher has its own tokenizer: teacher_norm=sum scales its scores by the tokens *it* predicted.
            batch["teacher_n_tokens"] = (self.scorer.mask[text].sum(1) - 1).to(device)
        # The global batch's items (every process's, in rank order) and where ours start, under gather.
        items, offset = item, 0
        if self.gather and self.mode in ("group", "inbatch"):
            items, offset = gather_rows(batch["item_index"], grad=False)
            items = items.cpu()
        if self.mode == "group":
            mask = group_mask(batch["group"].cpu(), item)
            i, j = mask.nonzero(as_tuple=True)
            scores = torch.zeros(mask.shape)
            scores[i, j] = self._teacher(text[i], item[j])  # B x group_size pairs, cached across steps and runs
            if self.gather:  # a group's candidates are its own rows: our block of the global columns
                own = slice(offset, offset + len(item))
                wide_scores, wide_mask = (
                    torch.zeros(len(item), len(items)),
                    torch.zeros(len(item), len(items), dtype=torch.bool),
                )
                wide_scores[:, own], wide_mask[:, own] = scores, mask
                scores, mask = wide_scores, wide_mask
            batch["inbatch_teacher"], batch["inbatch_mask"] = scores.to(device), mask.to(device)
        elif self.mode == "swap":
            pass  # no item-side candidates: the swap targets below are the whole distillation signal
        elif self.mode == "inbatch":
            mask = inbatch_candidates(items)[offset : offset + len(item)]  # our rows x the (global) batch's items
            r = len(text) if self.inbatch_rows is None else min(self.inbatch_rows, len(text))
            scores = torch.zeros(mask.shape)
            scores[:r] = self._inbatch(text[:r], items)
            mask[r:] = False  # rows without teacher targets contribute no KL term
            batch["inbatch_teacher"], batch["inbatch_mask"] = scores.to(device), mask.to(device)
        else:
            cand, mask = self.miner.candidates(text)
            safe = cand.clamp(min=0)  # -1 pads (tiny galleries) are masked; score a real item in their place
            rows = text.unsqueeze(1).expand_as(cand)
            scores = torch.zeros(cand.shape)
            scores[mask] = self._teacher(rows[mask], safe[mask])
            batch["listwise_teacher"], batch["listwise_mask"] = scores.to(device), mask.to(device)
            batch["listwise_emb"] = self.miner.item_emb[safe].to(device)
        if self.swaps:
            self._attach_swaps(batch, step)
        return batch

    def _attach_swaps(self, batch: dict, step: int) -> None:
        """``swap_ids`` [B, n, L], ``swap_teacher`` [B, n+1] (column 0: the caption itself) and ``swap_mask``."""
        g = step_generator(self.seed, step, self.rank, stream=1)
        r = len(batch["text_index"]) if self.swap_rows is None else min(self.swap_rows, len(batch["text_index"]))
        ids, mask = batch["input_ids"][:r].cpu(), batch["attention_mask"][:r].cpu()
        text, item = batch["text_index"][:r].cpu(), batch["item_index"][:r].cpu()
        swapped, valid = swap_words(ids, mask, self.swaps, g, self.swappable)
        b, n, width = swapped.shape
        scores = torch.zeros(b, n + 1)
        scores[:, 0] = self._teacher(text, item)  # the caption itself: cached like every split pair
        rows = valid.nonzero(as_tuple=True)
        if len(rows[0]):
            flat_mask = mask[:, None, :].expand(b, n, width)[rows]
            scores[:, 1:][rows] = self.scorer.score_ids(swapped[rows], flat_mask, item[rows[0]])
            self.pairs_scored += len(rows[0])
            self.pairs_looked_up += len(rows[0])
        device = batch["input_ids"].device
        batch["swap_ids"] = swapped.to(device)
        batch["swap_teacher"] = scores.to(device)
        batch["swap_mask"] = torch.cat([torch.ones(b, 1, dtype=torch.bool), valid], dim=1).to(device)

    def on_step_end(self, trainer) -> None:
        step = trainer.state.step
        if self.mode in ("listwise", "group") and step >= self.mine_start and step % self.mine_every == 0:
            # group batches search the bank with live caption embeddings: only the items need re-encoding
            self.miner.refresh(trainer.unwrapped().model, texts=self.mode == "listwise")
