"""The training loop shared by the teacher stage and the distillation stage.

Plain Accelerate (accelerate `examples/by_feature/checkpointing.py` shape): `Accelerator` first,
`set_seed`, build, `prepare` once, `accumulate` / `backward`, save on the main process only. The same
code runs under `python tools/X.py` (one process, no DeepSpeed) and `accelerate launch --config_file
accelerate_config.yaml` (DeepSpeed ZeRO-2, any number of processes).

What the trainer guarantees:
- **Exact resume.** Batches come from a deterministic per-epoch permutation (seed + epoch) that the
  trainer itself shards across ranks, so the data position is two integers. A checkpoint holds the
  weights, optimizer, scheduler, RNG states and that position; training N steps, stopping and
  resuming for N more gives the same weights as 2N steps straight (bit-identical on CPU, one process).
- **No run is lost.** Checkpoints are written to `step_XXXXXXX.tmp` and renamed when complete;
  keep-last-K prunes only complete ones; `train.resume=auto` picks the newest complete one.
- **Loud failure.** A non-finite loss stops the run naming the step, the batch's item/text ids and
  the last good checkpoint. Samples dropped under `data.on_error=skip` are counted and reported at
  the end of every epoch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastslow.errors import UserError

CKPT_PREFIX = "step_"


@dataclass
class TrainConfig:
    """The `train` (or `teacher_train`) section of a recipe, as plain arguments."""

    max_steps: int
    batch_size: int  # per process, per micro-step
    lr: float
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_accum: int = 1
    clip_grad: float = 1.0  # 0 disables clipping
    save_every: int = 500
    keep_last: int = 2
    resume: str = "auto"  # auto | none | PATH
    log_every: int = 20
    eval_every: int = 500  # 0: only at the end


def make_accelerator(out_dir: str | os.PathLike, grad_accum: int = 1, log: bool = True) -> Accelerator:
    """The run's Accelerator: bf16 autocast when a CUDA device supports it, gloo when there is no GPU.

    Without CUDA, DeepSpeed's multi-process launch needs the gloo process group set up by accelerate
    (otherwise accelerate counts one process while DeepSpeed sees two and its batch-size check fails).
    """
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # under `accelerate launch` / torchrun
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=grad_accum,
        log_with="tensorboard" if log else None,
        project_dir=str(out_dir),
        kwargs_handlers=handlers,
    )


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EpochBatches:
    """Deterministic batches: epoch e is a permutation from `seed + e`, cut into global batches of
    `batch_size * world`, each rank taking its slice. Incomplete global batches are dropped so every
    rank runs the same number of steps (a rank waiting on a collective would hang)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise UserError(
                f"{n} training samples cannot fill one batch of {batch_size} x {world} processes; "
                "lower train.batch_size or use more data"
            )
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world)

    def epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        step = self.batch_size * self.world
        return [
            perm[i + self.rank * self.batch_size : i + (self.rank + 1) * self.batch_size]
            for i in range(0, len(self) * step, step)
        ]


@dataclass
class TrainState:
    """Everything besides tensors that resume needs; saved as JSON in every checkpoint."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches consumed (step * grad_accum)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, over the whole run
    history: list[dict[str, Any]] = field(default_factory=list)  # validation results


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed from .tmp, holding trainer_state.json), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*") if not p.name.endswith(".tmp")]
    done = [p for p in done if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as safetensors atomically (temp file + rename); shared storage is cloned."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


class Trainer:
    """Train `model` (an nn.Module whose `forward(batch)` returns a dict with a `loss` entry).

    Args:
        model: the training module; its trainable weights live in `model.model` (saved as
            `model.safetensors`); any frozen helper (the teacher) must hold no trainable parameters.
        dataset: map-style dataset of samples; `collate_fn` turns a list of samples into a batch dict.
        out_dir: the stage directory (`${output_dir}/student`): checkpoints/, tb/, model.safetensors.
        cfg: optimisation and checkpoint settings.
        seed: seeds the data order and every RNG.
        accelerator: built by `make_accelerator` when None.
        prepare_batch: `(batch, step) -> batch`, run without gradients before the forward pass
            (e.g. to attach teacher scores for distillation).
        evaluate: `(unwrapped_model) -> dict` of validation metrics; called on every process.
        on_step_end: `(trainer) -> None` after every optimizer step (e.g. to refresh mined negatives).
        extra_files: files copied into every checkpoint and the final directory (config.yaml,
            tokenizer.json), so each is self-describing.
        checkpoint_objects: objects with `state_dict()` / `load_state_dict()` saved in every
            checkpoint and restored on resume (e.g. the mined-candidate bank).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        collate_fn: Callable[[list], dict],
        out_dir: str | os.PathLike,
        cfg: TrainConfig,
        seed: int = 0,
        accelerator: Accelerator | None = None,
        prepare_batch: Callable[[dict, int], dict] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        on_step_end: Callable[[Trainer], None] | None = None,
        extra_files: dict[str, str | os.PathLike] | None = None,
        checkpoint_objects: list | None = None,
        num_workers: int = 0,
    ):
        self.cfg, self.seed, self.out_dir = cfg, seed, Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.accelerator = accelerator or make_accelerator(self.out_dir, cfg.grad_accum)
        acc = self.accelerator
        set_seed(seed)
        self.dataset, self.collate_fn, self.num_workers = dataset, collate_fn, num_workers
        self.prepare_batch, self.evaluate, self.on_step_end = prepare_batch, evaluate, on_step_end
        self.extra_files = {k: Path(v) for k, v in (extra_files or {}).items()}
        self.batches = EpochBatches(len(dataset), cfg.batch_size, seed, acc.process_index, acc.num_processes)
        self.state = TrainState()

        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                # Norms, biases, embeddings-as-scales and the temperature are not weight-decayed (CLIP practice).
                (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        if acc.state.deepspeed_plugin is not None:
            # The recipe is the single source of truth: write its values into DeepSpeed's config
            # before `prepare`, which reads them (there is no prepared DataLoader to infer from).
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
            ds["gradient_accumulation_steps"] = cfg.grad_accum
            ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * acc.num_processes
            ds["gradient_clipping"] = cfg.clip_grad
            # A torch optimizer on CPU is fine for ZeRO-2; DeepSpeed would otherwise insist on its own.
            ds["zero_force_ds_cpu_optimizer"] = False
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # The schedule is stepped by us once per optimizer step, so it is not handed to prepare()
        # (accelerate would rescale it by the number of processes).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.max_steps)
        )
        acc.register_for_checkpointing(self.scheduler)
        for obj in checkpoint_objects or []:
            acc.register_for_checkpointing(obj)
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        acc.init_trackers("tb")
        self._last_ckpt: Path | None = None
        self._resume()

    # ---------------------------------------------------------------- checkpoints

    def _resume(self) -> None:
        what = str(self.cfg.resume)
        if what == "none":
            return
        if what == "auto":
            found = list_checkpoints(self.ckpt_dir)
            if not found:
                return
            path = found[-1]
        else:
            path = Path(what)
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(
                    f"train.resume={what}: {path}/trainer_state.json not found; not a complete checkpoint"
                )
        self.accelerator.load_state(str(path / "state"))
        raw = json.loads((path / "trainer_state.json").read_text())
        self.state = TrainState(**raw)
        self._last_ckpt = path
        self.accelerator.print(f"resumed from {path} at step {self.state.step}")

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable model's weights (`model.` prefix stripped), gathered across ZeRO partitions."""
        full = self.accelerator.get_state_dict(self.model)
        return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}

    def _write_final_files(self, directory: Path) -> None:
        save_safetensors(self.model_state_dict(), directory / "model.safetensors")
        for name, src in self.extra_files.items():
            if Path(src).resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint atomically and prune old ones; returns its path."""
        acc = self.accelerator
        final = self.ckpt_dir / f"{CKPT_PREFIX}{self.state.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))  # accelerate's own files (optimizer, RNG, ZeRO shards)
        state_dict = self.model_state_dict()  # collective under ZeRO: every rank calls it
        if acc.is_main_process:
            save_safetensors(state_dict, tmp / "model.safetensors")
            for name, src in self.extra_files.items():
                shutil.copyfile(src, tmp / name)
            (tmp / "trainer_state.json").write_text(json.dumps(self.state.__dict__, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.ckpt_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self._last_ckpt = final
        return final

    # ---------------------------------------------------------------- loop

    def _batches(self) -> Iterator[dict]:
        """Batches from the current data position on, epoch after epoch, forever."""
        per_epoch = len(self.batches)
        while True:
            epoch, start = divmod(self.state.micro_step, per_epoch)
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.batches.epoch(epoch)[start:],
                collate_fn=self.collate_fn,
                num_workers=self.num_workers,
                # Its own generator: creating an iterator otherwise draws from the global RNG, so a
                # resumed run (one extra iterator) would see different dropout than a straight one.
                generator=torch.Generator().manual_seed(self.seed + epoch),
            )
            yield from loader
            self._report_skipped(epoch)

    def _report_skipped(self, epoch: int) -> None:
        if self.state.skipped:
            total = sum(self.state.skipped.values())
            parts = ", ".join(f"{n} x {reason}" for reason, n in sorted(self.state.skipped.items()))
            self.accelerator.print(f"epoch {epoch}: {total} samples skipped so far (data.on_error=skip): {parts}")

    def _next_batch(self, batches: Iterator[dict]) -> dict:
        """The next batch with at least one sample, counting samples dropped under on_error=skip."""
        while True:
            batch = next(batches)
            self.state.micro_step += 1
            for _path, reason in batch.pop("skipped", []):
                self.state.skipped[reason] = self.state.skipped.get(reason, 0) + 1
            if not batch.get("empty", False):
                return batch

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _check_finite(self, loss: torch.Tensor, batch: dict) -> None:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            ids = {k: batch[k][:16].tolist() for k in ("item_index", "text_index") if k in batch}
            last = str(self._last_ckpt) if self._last_ckpt else "none (no checkpoint written yet)"
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at step {self.state.step}, micro-step {self.state.micro_step}; "
                f"batch {ids}; last good checkpoint: {last}. Lower the learning rate or check these samples, "
                f"then resume with train.resume=auto."
            )

    def train(self) -> TrainState:
        """Run to `max_steps`, saving every `save_every` steps and at the end; returns the final state."""
        acc, cfg = self.accelerator, self.cfg
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not acc.is_local_main_process, desc="train")
        batches = self._batches()
        running: dict[str, float] = {}
        n_running, t0 = 0, time.perf_counter()
        self.model.train()
        while self.state.step < cfg.max_steps:
            for _ in range(cfg.grad_accum):
                batch = self._next_batch(batches)
                batch = self._to_device(batch)
                if self.prepare_batch is not None:
                    with torch.no_grad():
                        batch = self.prepare_batch(batch, self.state.step)
                with acc.accumulate(self.model):
                    out = self.model(batch)
                    loss = out["loss"]
                    self._check_finite(loss, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.clip_grad > 0 and acc.state.deepspeed_plugin is None:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    if torch.is_tensor(v) and v.ndim == 0:
                        running[k] = running.get(k, 0.0) + v.item()
                n_running += 1
            self.scheduler.step()
            self.state.step += 1
            bar.update(1)
            if self.on_step_end is not None:
                self.on_step_end(self)
            step = self.state.step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                logs = {f"train/{k}": v / n_running for k, v in running.items()}
                logs["train/lr"] = self.scheduler.get_last_lr()[0]
                logs["train/steps_per_s"] = cfg.log_every / max(time.perf_counter() - t0, 1e-9)
                unwrapped = self.unwrapped()
                scale = getattr(getattr(unwrapped, "model", unwrapped), "logit_scale", None)
                if scale is not None:
                    logs["train/temperature"] = 1.0 / scale.detach().exp().item()
                acc.log(logs, step=step)
                bar.set_postfix(loss=f"{logs.get('train/loss', float('nan')):.4f}")
                running, n_running, t0 = {}, 0, time.perf_counter()
            if self.evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                self.run_evaluation()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        if acc.is_main_process:
            self._write_final_files(self.out_dir)
        else:
            self.model_state_dict()  # the gather is collective: every rank takes part
        acc.wait_for_everyone()
        if self.state.skipped:
            self._report_skipped(self.state.micro_step // len(self.batches))
        acc.end_training()
        return self.state

    def run_evaluation(self) -> dict[str, float]:
        """Validate now (every process), log the metrics and keep them in the run history."""
        assert self.evaluate is not None
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.unwrapped())
        self.model.train()
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=self.state.step)
        self.state.history.append({"step": self.state.step, **metrics})
        shown = ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        self.accelerator.print(f"step {self.state.step} val: {shown}")
        return metrics
