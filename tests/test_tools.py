"""The entry points, run as users run them: as scripts and under `accelerate launch` (subprocesses).

One smoke pipeline (tiny data, tiny models) runs every stage in order and checks what each leaves on
disk; the other tests check that bad input fails fast with a message that names the problem.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["train_teacher.py", "distill.py", "build_index.py", "rerank_eval.py", "search.py", "make_shapes.py",
         "serve.py", "screenshot.py"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def accelerate_launch(num_processes: int) -> list[str]:
    """`accelerate launch` with our config on a free port: the suite runs in parallel workers (pytest-xdist), and two
    launches on accelerate's default port 29500 at once would meet in one rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(ROOT / "accelerate_config.yaml"), "--num_processes", str(num_processes),
            "--main_process_port", str(port)]  # fmt: skip


def tool(name, *args, launch=None, check=True, timeout=600):
    cmd = [sys.executable, str(ROOT / "tools" / name), *args]
    if launch is not None:
        cmd = [*accelerate_launch(launch), *cmd[1:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The whole pipeline on recipe=smoke, stage by stage, in one output_dir."""
    out = tmp_path_factory.mktemp("smoke")
    args = ["recipe=smoke", f"output_dir={out}"]
    logs = {name: tool(name, *args) for name in ["train_teacher.py", "distill.py", "build_index.py", "rerank_eval.py"]}
    return out, args, logs


def test_stages_leave_self_describing_checkpoints(smoke_run):
    out, _, _ = smoke_run
    for stage in ("teacher", "student"):
        d = out / stage
        for name in ("model.safetensors", "config.yaml", "tokenizer.json"):
            assert (d / name).is_file(), (stage, name)
        assert list((d / "tb").rglob("events.out.tfevents.*")), stage
        ckpts = sorted((d / "checkpoints").glob("step_*"))
        assert ckpts and (ckpts[-1] / "trainer_state.json").is_file() and (ckpts[-1] / "config.yaml").is_file()
    for name in ("index.faiss", "manifest.json", "embeddings.npy", "tokens/tokens.npy"):
        assert (out / "index" / name).is_file(), name
    # distill.py stamps the training split's teacher tokens with the image size they were read at.
    train_tokens = json.loads((out / "cache" / "teacher_tokens_train" / "meta.json").read_text())["meta"]
    assert train_tokens["data.image_size"] == 32 and train_tokens["teacher_hash"]


def test_rerank_eval_writes_the_documented_schema(smoke_run):
    out, _, logs = smoke_run
    rows = json.loads((out / "eval" / "metrics.json").read_text())
    ks = [1, 5, 12]  # eval.k=[1,5,100] in the smoke recipe; 100 is clamped to the 12-item gallery
    assert {"fast", "fast_exact", "slow"} | {f"fast+slow@{k}" for k in ks} | {f"fuse@{k}" for k in ks} <= set(rows)
    for name, row in rows.items():
        for key in (
            "t2v_R@1",
            "t2v_R@5",
            "t2v_R@10",
            "t2v_medr",
            "t2v_meanr",
            "latency_ms_mean",
            "latency_ms_p95",
            "pairs_per_query",
        ):
            assert key in row, (name, key)
    for key in ("v2t_R@1", "v2t_R@5", "v2t_R@10", "v2t_medr"):
        assert key in rows["fast"] and key in rows["slow"]
    assert rows["fast+slow@12"]["pairs_per_query"] == 12 and rows["fast"]["pairs_per_query"] == 0
    header = (out / "eval" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("method,")
    assert (out / "eval" / "r1_vs_k.png").stat().st_size > 0 and (out / "eval" / "latency_vs_k.png").stat().st_size > 0
    assert "fast+slow@5" in logs["rerank_eval.py"].stdout  # the table is printed


def test_search_prints_ranked_results_and_html(smoke_run, tmp_path):
    out, args, _ = smoke_run
    page = tmp_path / "page.html"
    proc = tool("search.py", *args, "query=a red circle", "k=3", f"html={page}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 3 and "test_" in lines[0]
    assert page.read_text().count("<figure>") == 3
    bad = tool("search.py", *args, "query=   ", check=False)
    assert bad.returncode == 2 and "empty" in bad.stderr
    invisible = tool("search.py", *args, "query=\u200b", check=False)  # a zero-width space: no word at all
    assert invisible.returncode == 2 and "no words the tokenizer knows" in invisible.stderr
    big = tool("search.py", *args, "query=a circle", "k=1000")
    assert "larger than the gallery" in big.stderr


def test_index_from_another_student_is_refused(smoke_run, tmp_path):
    out, args, _ = smoke_run
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    try:
        (out / "index" / "manifest.json").write_text(json.dumps({**manifest, "student_hash": "0" * 16}))
        proc = tool("rerank_eval.py", *args, check=False)
        assert proc.returncode == 2 and "student_hash: saved '0000000000000000'" in proc.stderr
        assert f"to rebuild it: python tools/build_index.py recipe=smoke output_dir={out}" in proc.stderr
    finally:
        (out / "index" / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------- stale artefacts are refused


@pytest.fixture(scope="module")
def student_b_run(smoke_run, tmp_path_factory):
    """A second run beside the smoke run: the same teacher and data, another student (its weights nudged), and an
    index built by that student over the *val* split. Mixing its artefacts with the smoke run's makes the stale
    states a crash or a rebuild leaves: tokens, embeddings or a fusion weight of another gallery or model pair."""
    from safetensors.torch import load_file, save_file

    out, _, _ = smoke_run
    run = tmp_path_factory.mktemp("student_b")
    for name in ("teacher", "data", "tokenizer.json"):
        os.symlink(out / name, run / name)
    (run / "student").mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copy(out / "student" / name, run / "student" / name)
    weights = load_file(str(out / "student" / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(run / "student" / "model.safetensors"))
    tool("build_index.py", "recipe=smoke", f"output_dir={run}", "eval.split=val")
    return run


def mixed_run(base, tmp_path, *, index="copy"):
    """A run directory with `base`'s models and data, and a copy (or a link) of its index."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("teacher", "student", "data", "tokenizer.json"):
        os.symlink(base / name, run / name)
    if index == "copy":
        shutil.copytree(base / "index", run / "index")
    else:
        os.symlink(base / "index", run / "index")
    return run


def hashes(directory):
    stamp = json.loads((directory / "embeddings.stamp.json").read_text())["fields"]
    return stamp["student_hash"], stamp["gallery_hash"]


def test_stale_token_store_beside_a_rebuilt_index_is_refused(smoke_run, student_b_run, tmp_path):
    """The index was rebuilt over another gallery, the tokens were not (a crash between the two writes)."""
    out, _, _ = smoke_run
    run = mixed_run(student_b_run, tmp_path)
    shutil.rmtree(run / "index" / "tokens")
    shutil.copytree(out / "index" / "tokens", run / "index" / "tokens")  # the test gallery's tokens, same teacher
    (_, old), (_, new) = hashes(out / "index"), hashes(student_b_run / "index")
    rebuild = f"to rebuild it: python tools/build_index.py recipe=smoke output_dir={run}"
    for name, extra in (("search.py", ["query=a red circle"]), ("rerank_eval.py", ["eval.split=val"])):
        proc = tool(name, "recipe=smoke", f"output_dir={run}", *extra, check=False)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert f"gallery_hash: saved '{old}', now '{new}'" in proc.stderr, name
        assert str(run / "index" / "tokens") in proc.stderr and rebuild in proc.stderr, name


def test_embeddings_of_another_student_are_refused(smoke_run, student_b_run, tmp_path):
    out, _, _ = smoke_run
    run = mixed_run(student_b_run, tmp_path)
    for name in ("embeddings.npy", "embeddings.stamp.json"):  # the smoke student's, beside student B's index
        shutil.copy(out / "index" / name, run / "index" / name)
    (old, _), (new, _) = hashes(out / "index"), hashes(student_b_run / "index")
    proc = tool("rerank_eval.py", "recipe=smoke", f"output_dir={run}", "eval.split=val", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"student_hash: saved '{old}', now '{new}'" in proc.stderr
    assert "embeddings.npy" in proc.stderr and "python tools/build_index.py recipe=smoke" in proc.stderr
    (run / "index" / "embeddings.stamp.json").unlink()  # an index directory of an older fastslow
    proc = tool("rerank_eval.py", "recipe=smoke", f"output_dir={run}", "eval.split=val", check=False)
    assert proc.returncode == 2 and "has no stamp" in proc.stderr and "tools/build_index.py" in proc.stderr


def test_fuse_alpha_of_another_model_pair_is_refused(smoke_run, student_b_run, tmp_path):
    out, args, _ = smoke_run
    fused = tool("search.py", *args, "query=a red circle", "mode=fuse")  # the smoke run's own tuned weight is taken
    assert "(fuse, k=" in fused.stdout
    run = mixed_run(student_b_run, tmp_path, index="link")
    shutil.copytree(out / "eval", run / "eval")  # fuse_alpha.json tuned for the smoke student, not student B
    (old, _), (new, _) = hashes(out / "index"), hashes(student_b_run / "index")
    proc = tool("search.py", "recipe=smoke", f"output_dir={run}", "query=a red circle", "mode=fuse", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"student_hash: saved '{old}', now '{new}'" in proc.stderr and "fuse_alpha.json" in proc.stderr
    assert f"python tools/rerank_eval.py recipe=smoke output_dir={run}" in proc.stderr
    # A weight given on the command line needs no file; the slow mode reads none.
    tool("search.py", "recipe=smoke", f"output_dir={run}", "query=a red circle", "mode=fuse", "combiner.alpha=0.3")
    tool("search.py", "recipe=smoke", f"output_dir={run}", "query=a red circle")


@pytest.mark.parametrize("name", TOOLS)
def test_misspelled_key_fails_before_any_work(name, tmp_path):
    proc = tool(name, "recipe=shapes", "train.lrr=1", f"output_dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "lrr" in proc.stderr and "train.lr" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_misspelled_key_fails_under_accelerate_launch(tmp_path):
    proc = tool("distill.py", "recipe=shapes", "train.lrr=1", f"output_dir={tmp_path}", launch=1, check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr


@pytest.mark.parametrize(
    "recipe, missing",
    [("flickr", "dataset_flickr30k.json"), ("coco", "dataset_coco.json"), ("vatex", "vatex_training_v1.0.json")],
)
def test_real_recipe_without_data_names_the_missing_file(recipe, missing):
    proc = tool("train_teacher.py", f"recipe={recipe}", "data.root=/nonexistent", check=False)
    assert proc.returncode == 2
    assert f"/nonexistent/{missing}" in proc.stderr and "data.root" in proc.stderr


def test_plain_and_deepspeed_runs_train_the_same_weights(smoke_run, tmp_path):
    """`python tools/distill.py` and `accelerate launch` (DeepSpeed ZeRO-2, 1 process) are the same
    training: same seeded initial weights, same data order, same optimiser maths (to float rounding)."""
    from safetensors.torch import load_file

    out, _, _ = smoke_run
    weights = []
    for name, launch in (("plain", None), ("ds", 1)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        for part in ("teacher", "data", "tokenizer.json"):
            os.symlink(out / part, run_dir / part)
        tool("distill.py", "recipe=smoke", f"output_dir={run_dir}", "train.max_steps=3", "loss.distill=none",
             launch=launch)
        weights.append(load_file(str(run_dir / "student" / "model.safetensors")))
    a, b = weights
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
