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
- **Resume checks what it resumes into.** A checkpoint records what its data position and shards
  mean (batch size, grad_accum, number of processes, seed, number of samples, DeepSpeed or not); a
  resume with any of them changed is refused, naming each key with its saved and current value.
  `lr`, `weight_decay`, `warmup_steps` and `max_steps` may change (e.g. a lower lr after a
  non-finite loss, more steps): the new schedule applies from the resumed step on, and is printed.
- **Nothing lost, nothing stale.** Every run has a run id (new for `train.resume=none` or a fresh
  directory, inherited on resume). Pruning (keep-last-K) removes only this run's checkpoints. At the
  start, whatever in `checkpoints/` is not this run's line (another run's checkpoints, incomplete
  ones, ones newer than the resumed step, interrupted `.tmp` writes) is moved, not deleted, to a
  sibling `checkpoints.set-aside-<time>/`, with a warning that names each and why. (Moving rather than
  refusing keeps `train.resume=none` meaning "start over here" and loses nothing.)
- **Durable checkpoints.** A checkpoint is written into `step_XXXXXXX.tmp`; every file is fsynced,
  then `manifest.json` (size and sha256 of every file, `fastslow.artefacts`) is written last, the
  directory renamed to `step_XXXXXXX` and its parent fsynced. `train.resume=auto` takes the newest
  checkpoint whose manifest verifies; one that does not (empty or truncated file, missing manifest)
  is reported and the previous complete one is used. `train.resume=PATH` to an incomplete
  checkpoint is an error naming what is wrong. Names other than `step_<digits>` are ignored.
- **Loading runs no code.** Our own state (weights, optimizer, scheduler, RNG, data position,
  checkpoint objects such as the mined-candidate bank) is safetensors + JSON: nothing of ours is
  unpickled. Under DeepSpeed its engine's files are loaded with `torch.load(weights_only=True)` and
  an allow-list of DeepSpeed's own types. The manifest is verified before any file is opened.
- **Loud failure.** A non-finite loss stops the run naming the step, the batch's item/text ids and
  the last good checkpoint.
- **No silent drops.** Samples dropped under `data.on_error=skip` are counted (per reason, at the end
  of every epoch) and their files recorded in the run's `SkipLedger`, with whatever other passes
  (load-time checks, token store, miner, validation) recorded there. At every checkpoint and at the
  end the counts are summed and the ledgers united over processes (and kept in the checkpoint, so a
  resumed run still accounts for them); the run ends with one line for every distinct file, e.g.
  "4 files skipped (1 missing, 1 empty, 1 truncated, 1 not an image), 6 caption samples", and the list
  in `out_dir/skipped_files.json`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastslow.artefacts import (
    atomic_path,
    atomic_write_json,
    commit_dir,
    load_weights,
    read_safetensors,
    verify_manifest,
    write_manifest,
)
from fastslow.data.skips import SkipLedger, captions_per_path
from fastslow.errors import CheckpointError, UserError

CKPT_PREFIX = "step_"
_CKPT_NAME = re.compile(rf"^{CKPT_PREFIX}(\d+)$")
_CKPT_OR_TMP = re.compile(rf"^{CKPT_PREFIX}(\d+)(\.tmp)?$")
_DS_TAG = "pytorch_model"  # the DeepSpeed checkpoint tag, under <checkpoint>/state/

# What the data position and the optimizer shards mean: a resume with any of these changed would
# silently read other samples (or cannot load ZeRO shards at all), so it is refused.
RESUME_FIXED = ("batch_size", "grad_accum", "num_processes", "seed", "n_samples", "deepspeed")
# Changes that are legitimate on resume; the schedule is rebuilt with them from the resumed step on.
RESUME_MAY_CHANGE = ("lr", "weight_decay", "warmup_steps", "max_steps")
_KEY_HINT = {
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "num_processes": "number of processes (accelerate launch --num_processes)",
    "seed": "seed",
    "n_samples": "number of training samples (the data)",
    "deepspeed": "DeepSpeed (accelerate launch --config_file) or not",
}


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


def skip_deepspeed_cpu_shm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce op at start-up.

    On the CPU accelerator, DeepSpeed's comm backend JIT-compiles ``deepspeed_shm_comm`` (a C++ build of a minute or
    more on 2 cores, redone for every new venv) when it initialises, though the op only serves
    ``inference_all_reduce`` (tensor-parallel inference); ZeRO training reduces through torch.distributed (gloo
    here). Marking it incompatible makes DeepSpeed fall back to the process group, as it does on a platform without
    the op. CUDA runs never build it.
    """
    if torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_accelerator(out_dir: str | os.PathLike, grad_accum: int = 1, log: bool = True) -> Accelerator:
    """The run's Accelerator: bf16 autocast when a CUDA device supports it, gloo when there is no GPU.

    Without CUDA, DeepSpeed's multi-process launch needs the gloo process group set up by accelerate
    (otherwise accelerate counts one process while DeepSpeed sees two and its batch-size check fails).
    """
    skip_deepspeed_cpu_shm_build()
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
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> samples, all processes, to the last sync
    skipped_files: dict[str, Any] = field(default_factory=dict)  # the run's SkipLedger (state_dict), ditto
    history: list[dict[str, Any]] = field(default_factory=list)  # validation results
    run_id: str = ""  # which run wrote the checkpoint: pruning and set-aside go by it
    accelerator_step: int = 0  # accelerate's micro-step counter (gradient-accumulation phase)
    config: dict[str, Any] = field(default_factory=dict)  # RESUME_FIXED + RESUME_MAY_CHANGE at save time


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint directory named exactly `step_<digits>`, else None."""
    m = _CKPT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Committed checkpoints (named exactly `step_<digits>`, holding a manifest), oldest first.

    Anything else (`step_0000500.bak`, `step_0000500.tmp`, files) is ignored. Committed is not verified:
    `checkpoint_problems` checks that a checkpoint is complete.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    done = [p for p in done if (p / "manifest.json").is_file()]
    return sorted(done, key=checkpoint_step)


def _read_trainer_state(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """What makes `path` unusable as a checkpoint (empty when it is complete): the manifest check of every
    file's size and sha256 (`fastslow.artefacts.verify_manifest`), then a readable trainer_state.json."""
    path = Path(path)
    problems = verify_manifest(path)
    if problems:
        return problems
    raw = _read_trainer_state(path)
    if raw is None or not raw.get("run_id"):
        return ["trainer_state.json is missing, unreadable or has no run_id (not written by this fastslow)"]
    return []


# The files a checkpoint may hold besides the extra files (config.yaml, tokenizer.json): our safetensors and
# JSON, and under state/ DeepSpeed's engine files (loaded with weights_only=True; zero_to_*.py is never run).
_CKPT_FILES = re.compile(
    r"^(trainer_state\.json|manifest\.json|model\.safetensors|scheduler\.json|optimizer\.(safetensors|json)"
    rf"|rng_\d+\.(safetensors|json)|object_\d+\.safetensors|state/(latest|zero_to_\w+\.py|{_DS_TAG}/[\w.-]+\.pt))$"
)


def layout_problems(path: str | os.PathLike, extra_names: tuple[str, ...] = ()) -> list[str]:
    """Files in checkpoint `path` that fastslow never writes there (e.g. a planted pickle), one sentence each."""
    path = Path(path)
    rels = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return [
        f"{rel} is not a file fastslow writes in a checkpoint (refused without being opened)"
        for rel in rels
        if rel not in extra_names and not _CKPT_FILES.match(rel)
    ]


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as safetensors atomically and durably (fsync + rename); shared storage is cloned."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(tmp))


_RESUME_FIX = "resume another checkpoint (train.resume=auto takes the newest complete one) or train.resume=none"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, _RESUME_FIX)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is not readable JSON ({e})") from e


def _split_state(state: dict[str, Any], what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A nested state dict as (flat tensors "a.b.c", JSON for everything else): no pickle needed."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if torch.is_tensor(obj):
            tensors[key] = obj
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if not all(isinstance(k, (str, int)) for k in obj):
                raise TypeError(f"{what}: state dict keys must be str or int, got {list(obj)[:5]}")
            # JSON object keys are strings: remember which were ints (torch optimizer state is keyed by int).
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(obj)]
            return {"__tuple__": items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"{what}: cannot save {type(obj).__name__} at {key!r} as safetensors/JSON")

    return tensors, walk(state, "s")


def _join_state(tensors: dict[str, torch.Tensor], meta: Any) -> Any:
    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__tuple__" in obj:
                return tuple(walk(v) for v in obj["__tuple__"])
            return {k: walk(v) for k, v in obj["__dict__"]}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    try:
        return walk(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint state does not match its tensors ({e!r})") from e


def _save_state(state: dict[str, Any], stem: Path, what: str) -> None:
    """`stem`.safetensors (tensors) + `stem`.json (structure and scalars)."""
    tensors, meta = _split_state(state, what)
    save_safetensors(tensors, stem.with_name(stem.name + ".safetensors"))
    atomic_write_json(stem.with_name(stem.name + ".json"), meta)


def _load_state(stem: Path) -> Any:
    tensors = _load_safetensors(stem.with_name(stem.name + ".safetensors"))
    return _join_state(tensors, _load_json(stem.with_name(stem.name + ".json")))


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA) as tensors and plain values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoint files, allowed under weights_only=True."""
    allowed: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, fragment_address]
    except ImportError:  # another DeepSpeed layout: weights_only=True then names the type it refuses
        pass
    return allowed


class _WeightsOnlyCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine so that its `load` unpickles tensors, containers and an
    allow-list of DeepSpeed's own types only (its TorchCheckpointEngine passes weights_only=False)."""

    def __init__(self, engine: Any):
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # UnpicklingError for a forbidden type; anything else for a corrupt file
            raise CheckpointError(
                f"checkpoint file {path} cannot be loaded with weights_only=True ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it is not a DeepSpeed file written by fastslow "
                "and is not loaded"
            ) from e


def load_deepspeed_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: str = _DS_TAG) -> None:
    """Restore a DeepSpeed engine (module, ZeRO optimizer partitions) with weights-only loads."""
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(original)
    try:
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        engine.checkpoint_engine = original
    if load_path is None:
        raise CheckpointError(f"no DeepSpeed checkpoint {tag!r} in {load_dir}")


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
            (e.g. to attach teacher scores for distillation). Samples it loads itself and cannot read (under
            ``data.on_error=skip``) it lists as ``batch["skipped"]`` (``(path, reason)`` pairs), which are
            counted and recorded like the loader's.
        evaluate: `(unwrapped_model) -> dict` of validation metrics; called on every process.
        on_step_end: `(trainer) -> None` after every optimizer step (e.g. to refresh mined negatives).
        extra_files: files copied into every checkpoint and the final directory (config.yaml,
            tokenizer.json), so each is self-describing.
        checkpoint_objects: objects with `state_dict() -> dict[str, Tensor]` / `load_state_dict()` saved
            (as safetensors, main process) in every checkpoint and restored on resume (e.g. the
            mined-candidate bank).
        num_workers: DataLoader workers.
        skip_ledger: the run's `SkipLedger` (the tool's, holding what earlier passes left out); the trainer
            adds the files its batches drop and reports the whole ledger at the end. A new one when None.
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
        skip_ledger: SkipLedger | None = None,
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
        self.skip_ledger = SkipLedger() if skip_ledger is None else skip_ledger
        self._skips_since_sync: dict[str, int] = {}  # this process's dropped samples since `_sync_skips`
        self._captions: dict[str, int] | None = None  # path -> captions of the dataset's split, on the first skip

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
        self._deepspeed = acc.state.deepspeed_plugin is not None
        if self._deepspeed:
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
        # Not registered with accelerate: its save_state pickles registered objects and loads them back with
        # weights_only=False. The scheduler (JSON) and these objects (safetensors) are saved by us instead.
        self.checkpoint_objects = list(checkpoint_objects or [])
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        acc.init_trackers("tb")
        self._last_ckpt: Path | None = None
        self._resume()

    # ---------------------------------------------------------------- checkpoints

    def _run_config(self) -> dict[str, Any]:
        """The settings a checkpoint records (see RESUME_FIXED / RESUME_MAY_CHANGE)."""
        cfg, acc = self.cfg, self.accelerator
        return {
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "num_processes": acc.num_processes,
            "seed": self.seed,
            "n_samples": len(self.dataset),
            "deepspeed": self._deepspeed,
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "warmup_steps": cfg.warmup_steps,
            "max_steps": cfg.max_steps,
        }

    def _problems(self, path: Path) -> list[str]:
        """Why `path` cannot be resumed (empty: it can): manifest, then files we never write."""
        return checkpoint_problems(path) or layout_problems(path, tuple(self.extra_files))

    def _choose_checkpoint(self) -> tuple[Path | None, list[str]]:
        """(checkpoint to resume or None, warnings); main process only. Raises CheckpointError."""
        what = str(self.cfg.resume)
        if what == "none":
            return None, []
        if what != "auto":
            path = Path(what)
            problems = self._problems(path)
            if problems:
                raise CheckpointError(
                    f"train.resume={what}: not a complete, unchanged fastslow checkpoint: {'; '.join(problems)}. "
                    "Pick another step_XXXXXXX directory, train.resume=auto (the newest complete one) or "
                    "train.resume=none"
                )
            return path, []
        said = []
        candidates = sorted(
            (p for p in self.ckpt_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir())
            if self.ckpt_dir.is_dir()
            else [],
            key=checkpoint_step,
        )
        for path in reversed(candidates):
            problems = self._problems(path)
            if not problems:
                return path, said
            said.append(f"checkpoint {path} is incomplete or changed, not resumed: {'; '.join(problems)}")
        if candidates:
            raise CheckpointError(
                f"train.resume=auto: none of the {len(candidates)} checkpoints in {self.ckpt_dir} is complete "
                f"({' | '.join(said)}). Start over with train.resume=none (they are moved aside, not deleted)"
            )
        return None, said

    def _set_aside(self, start_step: int) -> list[str]:
        """Move what in checkpoints/ is not this run's line to checkpoints.set-aside-<time>/; main only."""
        if not self.ckpt_dir.is_dir():
            return []
        moves = []
        for p in sorted(self.ckpt_dir.iterdir()):
            m = _CKPT_OR_TMP.match(p.name)
            if m is None:
                continue
            if m.group(2):
                why = "an interrupted write"
            else:
                run_id = (_read_trainer_state(p) or {}).get("run_id")
                if run_id != self.state.run_id:
                    why = f"written by another run ({run_id})" if run_id else "incomplete or from an older fastslow"
                elif int(m.group(1)) > start_step:
                    why = f"newer than the resumed step {start_step} (a line this run abandons)"
                else:
                    continue
            moves.append((p, why))
        if not moves:
            return []
        dest = self.out_dir / f"checkpoints.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
        while dest.exists():
            dest = dest.with_name(dest.name + "x")
        dest.mkdir(parents=True)
        for p, _ in moves:
            os.replace(p, dest / p.name)
        return [
            f"moved to {dest} (not deleted) so that this run (id {self.state.run_id}) neither prunes nor resumes "
            f"them: " + "; ".join(f"{p.name}: {why}" for p, why in moves)
        ]

    def _check_config(self, path: Path, saved: dict[str, Any]) -> list[str]:
        """Refuse a resume whose data position or shards would mean something else; list allowed changes."""
        now = self._run_config()
        differ = [k for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
        if differ:
            parts = ", ".join(f"{k} ({_KEY_HINT[k]}): saved {saved[k]!r}, now {now[k]!r}" for k in differ)
            raise CheckpointError(
                f"cannot resume {path}: {parts}. These fix which samples the saved data position points to and "
                "how the optimizer state is sharded; run with the saved values, or start over with "
                "train.resume=none (the old checkpoints are moved aside)"
            )
        return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_MAY_CHANGE if k in saved and saved[k] != now[k]]

    def _resume(self) -> None:
        acc = self.accelerator
        # The main process decides (verifying hashes once) and tells the others: a rank that raised alone
        # would leave the others waiting in a collective.
        decision: dict[str, Any] = {}
        failed: Exception | None = None
        if acc.is_main_process:
            try:
                path, said = self._choose_checkpoint()
                raw = _read_trainer_state(path) if path is not None else None
                # Checked before anything on disk moves: a refused resume leaves the directory as it was.
                changed = self._check_config(path, raw.get("config", {})) if raw else []
                self.state.run_id = raw["run_id"] if raw else uuid.uuid4().hex[:12]
                said += self._set_aside(int(raw["step"]) if raw else 0)
                decision = {"path": str(path) if path else None, "run_id": self.state.run_id, "said": said}
                decision["changed"] = changed
            except Exception as e:  # re-raised below, once the other ranks know (else they would wait forever)
                failed, decision = e, {"error": str(e)}
        decision = json.loads(broadcast_object_list([json.dumps(decision)])[0])
        if failed is not None:
            raise failed
        if "error" in decision:
            raise CheckpointError(f"the main process could not resume: {decision['error']}")
        if acc.is_main_process:
            for message in decision["said"]:
                warnings.warn(message, stacklevel=3)
        self.state.run_id = decision["run_id"]
        acc.wait_for_everyone()  # the set-aside moves are done before anyone reads the checkpoint
        if decision["path"] is None:
            return
        path = Path(decision["path"])
        raw = _load_json(path / "trainer_state.json")
        self._load_checkpoint(path)
        self.state = TrainState(**raw)
        self.skip_ledger.merge(self.state.skipped_files)  # what the run had left out before it stopped
        acc.step = self.state.accelerator_step
        if changed := decision["changed"]:
            self._apply_schedule()
            acc.print(
                f"resuming with changed settings (the schedule applies from step {self.state.step} on): "
                + ", ".join(changed)
            )
        self._last_ckpt = path
        acc.print(f"resumed from {path} at step {self.state.step} (run {self.state.run_id})")

    def _load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, checkpoint objects and this rank's RNG from `path`."""
        acc = self.accelerator
        if self._deepspeed:
            load_deepspeed_checkpoint(self.model, path / "state")
        else:
            weights = _load_safetensors(path / "model.safetensors")
            fix = f"resume with the recipe that wrote it, or {_RESUME_FIX}"
            load_weights(self.unwrapped().model, weights, path=path / "model.safetensors", name="model", fix=fix)
            self.optimizer.load_state_dict(_load_state(path / "optimizer"))
        self.scheduler.load_state_dict(_load_json(path / "scheduler.json"))
        n_saved = len(list(path.glob("object_*.safetensors")))
        if n_saved != len(self.checkpoint_objects):
            raise CheckpointError(
                f"{path} holds {n_saved} checkpoint objects (e.g. the mined-candidate bank) but this run has "
                f"{len(self.checkpoint_objects)}: resume with the same loss settings, or train.resume=none"
            )
        for i, obj in enumerate(self.checkpoint_objects):
            obj.load_state_dict(_load_safetensors(path / f"object_{i}.safetensors"))
        rng = path / f"rng_{acc.process_index}"
        set_rng_state(_load_state(rng))

    def _apply_schedule(self) -> None:
        """After a resume with changed lr / weight_decay / warmup / max_steps: the current schedule, now."""
        cfg, sched = self.cfg, self.scheduler
        factor = warmup_cosine(sched.last_epoch, cfg.warmup_steps, cfg.max_steps)
        sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
        for i, group in enumerate(sched.optimizer.param_groups):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * factor
            if i == 0:  # the decayed group (see __init__)
                group["weight_decay"] = cfg.weight_decay
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable model's weights (`model.` prefix stripped), gathered across ZeRO partitions."""
        full = self.accelerator.get_state_dict(self.model)
        return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}

    def _copy_extra_files(self, directory: Path) -> None:
        for name, src in self.extra_files.items():
            if Path(src).resolve() != (directory / name).resolve():
                with atomic_path(directory / name) as tmp:
                    shutil.copyfile(src, tmp)

    def _write_final_files(self, directory: Path) -> None:
        save_safetensors(self.model_state_dict(), directory / "model.safetensors")
        self._copy_extra_files(directory)

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint durably (fsync, manifest last, rename) and prune this run's old ones."""
        acc = self.accelerator
        final = self.ckpt_dir / f"{CKPT_PREFIX}{self.state.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self._deepspeed:  # every rank writes its ZeRO partition
            self.model.save_checkpoint(str(tmp / "state"), tag=_DS_TAG)
        state_dict = self.model_state_dict()  # collective under ZeRO: every rank calls it
        self._sync_skips()  # collective: the checkpoint holds every process's skips
        _save_state(rng_state(), tmp / f"rng_{acc.process_index}", "RNG state")
        if acc.is_main_process:
            save_safetensors(state_dict, tmp / "model.safetensors")
            if not self._deepspeed:
                _save_state(self.optimizer.state_dict(), tmp / "optimizer", "optimizer")
            atomic_write_json(tmp / "scheduler.json", self.scheduler.state_dict())
            for i, obj in enumerate(self.checkpoint_objects):
                state = obj.state_dict()
                bad = [k for k, v in state.items() if not torch.is_tensor(v)]
                if bad:
                    raise TypeError(f"checkpoint object {type(obj).__name__}: state_dict values {bad} are not tensors")
                save_safetensors(state, tmp / f"object_{i}.safetensors")
            self._copy_extra_files(tmp)
            self.state.accelerator_step = acc.step
            self.state.config = self._run_config()
            atomic_write_json(tmp / "trainer_state.json", self.state.__dict__)
        acc.wait_for_everyone()  # every rank's files are in tmp before the manifest lists them
        if acc.is_main_process:
            write_manifest(tmp, {"run_id": self.state.run_id, "step": self.state.step})
            commit_dir(tmp, final)
            mine = [
                p
                for p in list_checkpoints(self.ckpt_dir)
                if (_read_trainer_state(p) or {}).get("run_id") == self.state.run_id
            ]
            for old in mine[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
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

    def _skip_counts(self) -> dict[str, int]:
        """Dropped samples per reason: all processes up to the last sync, plus this process's since."""
        counts = dict(self.state.skipped)
        for reason, n in self._skips_since_sync.items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    def _report_skipped(self, epoch: int) -> None:
        # Per process between syncs: a collective here could deadlock, since the ranks need not end an epoch at
        # the same step (a rank drawing an empty batch reads one more).
        counts = self._skip_counts()
        if counts:
            total = sum(counts.values())
            parts = ", ".join(f"{n} x {reason}" for reason, n in sorted(counts.items()))
            many = self.accelerator.num_processes > 1
            where = " on this process (data.on_error=skip; summed over processes at checkpoints)" if many else ""
            self.accelerator.print(
                f"epoch {epoch}: {total} samples skipped so far{where or ' (data.on_error=skip)'}: {parts}"
            )

    def _sync_skips(self) -> None:
        """Sum the dropped-sample counts over processes into the state and unite the ledgers (a collective:
        every process calls it at the same step: at checkpoints and at the end)."""
        acc = self.accelerator
        mine = (self._skips_since_sync, self.skip_ledger.state_dict())
        for counts, files in gather_object([mine]) if acc.num_processes > 1 else [mine]:
            for reason, n in counts.items():
                self.state.skipped[reason] = self.state.skipped.get(reason, 0) + n
            self.skip_ledger.merge(files)
        self._skips_since_sync = {}
        self.state.skipped_files = self.skip_ledger.state_dict()

    def _record_skips(self, skipped: list[tuple[str, str]]) -> None:
        """Count a batch's dropped samples and record their files (with their captions) in the ledger."""
        if self._captions is None:
            split = getattr(self.dataset, "split", None)  # a PairDataset's; other datasets count no captions
            self._captions = captions_per_path(split) if split is not None else {}
        for path, reason in skipped:
            self._skips_since_sync[reason] = self._skips_since_sync.get(reason, 0) + 1
            self.skip_ledger.add(path, reason, where="train", captions=self._captions.get(path, 0))

    def _next_batch(self, batches: Iterator[dict]) -> dict:
        """The next batch with at least one sample, counting samples dropped under on_error=skip."""
        while True:
            batch = next(batches)
            self.state.micro_step += 1
            skipped = batch.pop("skipped", [])
            if skipped:
                self._record_skips(skipped)
            if not batch.get("empty", False):
                return batch

    def _final_skip_report(self) -> None:
        """The end-of-run account (after `_sync_skips`): every distinct file once, and the list on disk."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        path = self.skip_ledger.save(self.out_dir)
        if path is not None:
            acc.print(f"left out by this run (data.on_error=skip): {self.skip_ledger.report()}; list in {path}")
        if self.state.skipped:
            parts = ", ".join(f"{n} x {reason}" for reason, n in sorted(self.state.skipped.items()))
            over = f", summed over {acc.num_processes} processes" if acc.num_processes > 1 else ""
            acc.print(f"  training batches dropped {sum(self.state.skipped.values())} samples{over}: {parts}")

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
                    # Samples prepare_batch loaded itself and could not read (group-mode neighbours under
                    # data.on_error=skip) are counted like the loader's own skips.
                    self._record_skips(batch.pop("skipped", None) or [])
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
        self._sync_skips()
        self._final_skip_report()
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
        # Floats are metrics; ints are counts (e.g. left_out_items under data.on_error=skip), shown as they are.
        shown = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if isinstance(v, (int, float))
        )
        self.accelerator.print(f"step {self.state.step} val: {shown}")
        return metrics
