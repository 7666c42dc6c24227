"""Stage 1: train the Slow teacher (a cross-attention captioner) with the bi-directional captioning loss.

    python tools/train_teacher.py recipe=shapes
    accelerate launch --config_file accelerate_config.yaml tools/train_teacher.py \
        recipe=flickr data.root=/data/flickr30k
    python tools/train_teacher.py recipe=smoke            # a few seconds: checks an install

Writes ${output_dir}/teacher/: model.safetensors, config.yaml, tokenizer.json, checkpoints/, tb/.
Validation reports the teacher's text->item retrieval on the val split (full ranking).
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def main(argv=None) -> None:
    from fastslow.config import check_data_files, load_recipe

    cfg = load_recipe(argv, prog="train_teacher.py")  # strict: a typo fails here, before any work
    check_data_files(cfg)  # a missing dataset file fails in a second, before torch loads
    configure_threads(cfg.num_threads)

    from accelerate.utils import set_seed
    from torch import nn

    from fastslow import stages
    from fastslow.config import to_kwargs
    from fastslow.data import PairDataset, SkipLedger, collate
    from fastslow.evaluation import evaluate_teacher, visual_args
    from fastslow.trainer import TrainConfig, Trainer, make_accelerator

    out = stages.stage_dir(cfg, "teacher")
    train_cfg = TrainConfig(**to_kwargs(cfg.teacher_train))
    acc = make_accelerator(out, train_cfg.grad_accum)
    set_seed(cfg.seed)  # before any model is built: the initial weights are part of the run
    ledger = SkipLedger()  # what load checks, validation and training leave out under data.on_error=skip
    # The teacher's own tokenizer (teacher.tokenizer; the student's file when the settings are the same).
    train, val, tok = stages.prepare_training(cfg, acc, ledger, kind="teacher")
    teacher = stages.build_teacher(cfg, tok)
    load_visual = stages.visual_loader(cfg, teacher)  # the teacher's backbone's mean / std and resampling
    acc.print(
        f"teacher {cfg.teacher.name}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters; "
        f"train {train.n_items} items / {train.n_texts} captions, val {val.n_items} / {val.n_texts}"
    )

    class CaptioningObjective(nn.Module):
        """forward(batch) -> the teacher's loss parts; the trainer saves `self.model`."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            visual = self.model.encode_visual(*visual_args(batch))
            return self.model.loss(visual, batch["input_ids"], batch["attention_mask"])

    def validate(objective):
        return evaluate_teacher(
            objective.model,
            val,
            load_visual,
            tok,
            max_length=cfg.data.max_length,
            text_batch=cfg.eval.text_batch,
            on_error=cfg.data.on_error,
            ledger=ledger,
            where="val",
            shard=True,  # every process (the trainer calls this on each) scores its part of the items; gathered
        )

    run_files = stages.run_files(out, teacher)  # config.yaml (and a decoder from BERT's text_config.json)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        stages.save_run_config(cfg, out, model=teacher)
    acc.wait_for_everyone()
    trainer = Trainer(
        CaptioningObjective(teacher),
        PairDataset(
            train, stages.visual_loader(cfg, teacher, train=True), tok, cfg.data.max_length, on_error=cfg.data.on_error
        ),
        collate_fn=collate,
        out_dir=out,
        cfg=train_cfg,
        seed=cfg.seed,
        accelerator=acc,
        evaluate=validate,
        extra_files={**run_files, "tokenizer.json": stages.teacher_tokenizer_path(cfg)},
        num_workers=cfg.data.num_workers,
        skip_ledger=ledger,
    )
    state = trainer.train()
    acc.print(
        f"teacher saved to {out} after {state.step} steps; last val: {state.history[-1] if state.history else '-'}"
    )


if __name__ == "__main__":
    run(main)
