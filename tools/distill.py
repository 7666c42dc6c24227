"""Stage 2: distil the Slow teacher into the Fast student (symmetric InfoNCE + KL to the teacher).

    accelerate launch --config_file accelerate_config.yaml tools/distill.py recipe=shapes
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 tools/distill.py \
        recipe=coco data.root=/data/coco
    python tools/distill.py recipe=shapes loss.distill=none         # the plain dual encoder, for comparison
    python tools/distill.py recipe=smoke

Reads the teacher from ${output_dir}/teacher/ (tools/train_teacher.py) and writes ${output_dir}/student/:
model.safetensors, config.yaml, tokenizer.json, checkpoints/, tb/. Teacher scores are cached in
${output_dir}/cache/ and reused by later runs with the same teacher.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def main(argv=None) -> None:
    from fastslow.config import check_data_files, load_recipe

    cfg = load_recipe(argv, prog="distill.py")  # strict: a typo fails here, before any work
    check_data_files(cfg)  # a missing dataset file fails in a second, before torch loads
    configure_threads(cfg.num_threads)

    import dataclasses
    from pathlib import Path

    from accelerate.utils import set_seed

    from fastslow import stages
    from fastslow.artefacts import file_hash
    from fastslow.config import ConfigError, to_kwargs
    from fastslow.data import PairDataset, SkipLedger, collate
    from fastslow.distill import (
        CandidateMiner,
        DistillBatcher,
        DistillObjective,
        GroupComposer,
        OracleScorer,
        TeacherPairScorer,
        split_hash,
    )
    from fastslow.evaluation import evaluate_student
    from fastslow.score_cache import TeacherScoreCache
    from fastslow.trainer import TrainConfig, Trainer, make_accelerator

    out, cache_dir = stages.stage_dir(cfg, "student"), stages.stage_dir(cfg, "cache")
    train_cfg = TrainConfig(**to_kwargs(cfg.train))
    mode = cfg.loss.distill
    if mode == "group":
        # The loader supplies the anchors; each brings group_size - 1 mined neighbours, so a step still
        # trains on train.batch_size pairs, as the other modes do.
        if train_cfg.batch_size % cfg.loss.group_size:
            raise ConfigError(
                f"train.batch_size={train_cfg.batch_size} is not a multiple of loss.group_size={cfg.loss.group_size}"
            )
        train_cfg = dataclasses.replace(train_cfg, batch_size=train_cfg.batch_size // cfg.loss.group_size)
    acc = make_accelerator(out, train_cfg.grad_accum)
    set_seed(cfg.seed)  # before any model is built: the initial weights are part of the run
    teacher_dir = stages.stage_dir(cfg, "teacher")
    # Every pass that reads items (load checks, token store, miner, validation, training) records in this one
    # ledger what it leaves out under data.on_error=skip; the trainer reports it at the end of the run.
    ledger, on_error = SkipLedger(), cfg.data.on_error
    train, val, tok = stages.prepare_training(cfg, acc, ledger)
    student = stages.build_student(cfg, tok)
    if cfg.student.init_from is not None:  # warm start (a resumed checkpoint, if any, still overrides it)
        stages.init_student_from(student, cfg, cfg.student.init_from)
        acc.print(f"student initialised from {cfg.student.init_from}")
    load_visual = stages.visual_loader(cfg, student)  # the student's backbone's mean / std (ViT-B/16: 0.5)
    acc.print(
        f"student {cfg.student.name}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters; "
        f"distillation: {mode}"
    )

    batcher, checkpoint_objects, teacher_directions, composer, cache = DistillBatcher("none"), [], 2, None, None
    # Training pairs augmented under data.augment.enabled; every other pass (mining, tokens, validation) reads them
    # plain.
    train_load = stages.visual_loader(cfg, student, train=True)
    dataset = PairDataset(train, train_load, tok, cfg.data.max_length, on_error=on_error)
    if mode != "none" and cfg.loss.oracle:
        # The student's ceiling: targets from the generator's ground truth instead of a teacher (shapes only).
        from fastslow.data.shapes import GroundTruth

        if cfg.data.dataset not in ("shapes", "shapes_video"):
            raise ConfigError(f"loss.oracle=true needs the built-in shapes data, not data.dataset={cfg.data.dataset}")
        meta = Path(cfg.data.root) / ("shapes_meta.json" if cfg.data.dataset == "shapes" else "shapes_video_meta.json")
        scorer = OracleScorer(GroundTruth(meta, train.item_ids, train.text_to_visual), tokenizer=tok)
        cache = None  # cheap, and never to be mixed with a teacher's scores
    elif mode != "none":
        # The teacher reads texts through its own tokenizer (saved beside its weights), which may not be the
        # student's (a BERT student, a teacher with a small caption vocabulary: teacher.tokenizer).
        teacher, _, teacher_tok = stages.load_trained(teacher_dir, "teacher")
        teacher_tok_hash = file_hash(teacher_dir / "tokenizer.json")
        same_tok = teacher_tok_hash == file_hash(stages.tokenizer_path(cfg))
        teacher_hash = stages.weights_hash(teacher_dir / "model.safetensors")
        teacher_directions = teacher.config.directions
        scorer = TeacherPairScorer(
            teacher.to(acc.device),
            teacher_hash,
            train,
            stages.visual_loader(cfg, teacher),  # the teacher reads the items as it was trained to (its mean / std)
            teacher_tok,
            cfg.data.max_length,
            cache_dir / "teacher_tokens_train",
            accelerator=acc,
            on_error=on_error,
            ledger=ledger,
            settings=stages.visual_stamp(cfg),  # the tokens are of the items at this image size (clip length)
            ids_tokenizer=None if same_tok else tok,  # swapped captions come as the student's ids
        )
        acc.wait_for_everyone()
        cache = TeacherScoreCache(
            cache_dir / f"teacher_scores_{mode}",
            teacher_hash=teacher_hash,
            source=mode,
            dataset_hash=split_hash(train),
            n_items=train.n_items,
            tokenizer_hash=teacher_tok_hash,  # the scorer encodes captions with the teacher's tokenizer
            max_length=cfg.data.max_length,
            settings=stages.visual_stamp(cfg),  # the teacher saw the items at this size
        )
    if mode != "none":
        miner = None
        if mode in ("listwise", "group"):
            miner = CandidateMiner(
                train, load_visual, tok, cfg.data.max_length, cfg.loss.listwise_k, on_error=on_error, ledger=ledger
            )
            checkpoint_objects.append(miner)
        if mode == "group":
            composer = GroupComposer(
                train, dataset, miner, cfg.loss.group_size, cfg.seed, acc.process_index, student=student
            )
        swappable = None
        if cfg.loss.swaps and cfg.loss.swap_similarity is not None:
            from fastslow.mining import swappable_tokens

            swappable = swappable_tokens(
                dataset.input_ids, dataset.attention_mask, tok.vocab_size, threshold=cfg.loss.swap_similarity
            )
        batcher = DistillBatcher(
            mode,
            scorer,
            cache,
            miner,
            cfg.loss.mine_every,
            cfg.loss.inbatch_rows,
            composer=composer,
            mine_start=cfg.loss.mine_start,
            swaps=cfg.loss.swaps,
            swap_rows=cfg.loss.swap_rows,
            swappable=swappable,
            seed=cfg.seed,
            rank=acc.process_index,
            gather=cfg.loss.gather,
        )

    aux = None
    if cfg.loss.vmlm_weight > 0 or cfg.loss.smrm_weight > 0:  # LightningDOT's VMLM / SMRM: heads of the loop only
        from students.aux_heads import StudentObjectives

        aux = StudentObjectives(
            student,
            vmlm_weight=cfg.loss.vmlm_weight,
            smrm_weight=cfg.loss.smrm_weight,
            vmlm_mask_ratio=cfg.loss.vmlm_mask_ratio,
            smrm_mask_ratio=cfg.loss.smrm_mask_ratio,
            special_ids=(tok.bos_id, tok.eos_id, tok.pad_id),
        )
        checkpoint_objects.append(aux)  # not in model.safetensors (the student's): resumed from its own file

    objective = DistillObjective(
        student,
        contrastive_weight=cfg.loss.contrastive_weight,
        distill_weight=cfg.loss.distill_weight,
        teacher_temperature=cfg.loss.teacher_temperature,
        student_temperature=cfg.loss.student_temperature,
        fresh_positive=cfg.loss.listwise_fresh_positive,
        teacher_norm=cfg.loss.teacher_norm,
        teacher_directions=teacher_directions,
        denoise_margin=cfg.loss.denoise_margin,
        margin_mse_weight=cfg.loss.margin_mse_weight,
        swap_weight=cfg.loss.swap_weight,
        gather=cfg.loss.gather,
        aux=aux,
    )

    def validate(obj):
        # Every process validates its part of the val items and texts (the trainer calls this on each); gathered.
        kw = dict(max_length=cfg.data.max_length, on_error=on_error, ledger=ledger, where="val", shard=True)
        return evaluate_student(obj.model, val, load_visual, tok, **kw)

    run_files = stages.run_files(out, student)  # config.yaml (and a pretrained text tower's text_config.json)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        stages.save_run_config(cfg, out, model=student)
    acc.wait_for_everyone()
    trainer = Trainer(
        objective,
        dataset,
        collate_fn=collate,
        out_dir=out,
        cfg=train_cfg,
        seed=cfg.seed,
        accelerator=acc,
        prepare_batch=batcher,
        evaluate=validate,
        on_step_end=batcher.on_step_end,
        extra_files={**run_files, "tokenizer.json": stages.tokenizer_path(cfg)},
        checkpoint_objects=checkpoint_objects,
        num_workers=cfg.data.num_workers,
        skip_ledger=ledger,
    )
    if mode == "listwise" and batcher.miner.item_emb is None:  # a fresh run: mine with the initial student
        batcher.miner.refresh(trainer.unwrapped().model)
    state = trainer.train()  # its last lines account for every file left out, group neighbours included
    acc.print(
        f"student saved to {out} after {state.step} steps; teacher pairs scored this run: "
        f"{batcher.pairs_scored}; cache hits: {batcher.cache_hits}; "
        f"last val: {state.history[-1] if state.history else '-'}"
    )
    if cache is not None:
        cache.close()  # the last connection to close folds the write-ahead log into the database


if __name__ == "__main__":
    run(main)
