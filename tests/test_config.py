"""Recipes: merging over the base, strict overrides, types, and the library/tools boundary."""

import ast
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastslow.config import ConfigError, list_recipes, load_recipe, load_saved_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_loads_and_has_the_shared_keys():
    shared = [
        "output_dir",
        "seed",
        "data.root",
        "data.on_error",
        "teacher.name",
        "student.name",
        "train.max_steps",
        "train.batch_size",
        "train.lr",
        "train.save_every",
        "train.resume",
        "eval.k",
    ]
    names = list_recipes()
    assert {"smoke", "shapes", "shapes_video", "flickr", "coco", "vatex"} <= set(names)
    for name in names:
        cfg = load_recipe([f"recipe={name}"])
        assert cfg.recipe == name
        for key in shared:
            assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", (name, key)


def test_recipe_merges_over_base_and_overrides_apply():
    cfg = load_recipe(["recipe=flickr", "train.lr=3e-4", "data.root=/data/f30k", "eval.k=[1,10]"])
    assert cfg.train.lr == 3e-4 and cfg.eval.k == [1, 10]
    assert cfg.data.ann_file == "/data/f30k/dataset_flickr30k.json"  # interpolation resolved after the override
    assert cfg.loss.contrastive_weight == 1.0  # from base.yaml, untouched by the recipe
    assert cfg.teacher_train.batch_size == cfg.train.batch_size  # teacher stage follows train.* unless set


def test_misspelled_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_recipe(["recipe=shapes", "train.lrr=1"])
    assert "lrr" in str(err.value) and "train.lr" in str(err.value)
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_recipe(["max_steps=5"])  # right leaf, missing section


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=abc", "int"),
        ("train.lr=fast", "float"),
        ("data.on_error=ignore", "raise, skip"),
        ("train.batch_size=0", "> 0"),
        ("eval.k=5", "list"),
        ("train=3", "section"),
        ("train.max_steps=1.5", "int"),
    ],
)
def test_wrong_type_or_value_names_key_and_expectation(override, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(["recipe=shapes", override])
    assert override.split("=")[0] in str(err.value) and expected in str(err.value)


def test_int_for_float_is_accepted_and_bad_syntax_rejected():
    assert load_recipe(["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(["train.lr"])
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(["recipe=flikr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_recipe(["recipe=smoke", "seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    with pytest.raises(AttributeError):
        again.trian  # noqa: B018  struct mode: a typo'd read fails


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_library_never_imports_tools():
    offenders = []
    for pkg in ("fastslow", "teachers", "students"):
        for path in (ROOT / pkg).rglob("*.py"):
            offenders += [f"{path}: {m}" for m in _imports(path) if m == "tools" or m.startswith("tools.")]
    assert not offenders
    assert not (ROOT / "tools" / "__init__.py").exists()  # tools are run, never imported


def test_ruff_is_clean():
    """The one linter configured in pyproject.toml passes on the whole tree (as `make lint` runs it)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
