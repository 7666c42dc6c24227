"""Recipes: merging over the base, the typed schema, strict overrides, ranges, and the library/tools boundary."""

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from fastslow import config, schema, stages
from fastslow.config import ConfigError, list_recipes, load_recipe, load_saved_config, save_config, to_kwargs

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
        ("train.batch_size=0", ">= 1"),
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
    assert "distill: listwise" in (tmp_path / "config.yaml").read_text()  # a mode is saved as its plain string
    assert again.loss.distill == cfg.loss.distill == "listwise"
    with pytest.raises(AttributeError):
        again.trian  # noqa: B018  struct mode: a typo'd read fails
    # A config saved by an older run (a key the schema has since gained is absent) still loads.
    old = OmegaConf.to_container(cfg)
    del old["student"]["video_frame_diff"]
    (tmp_path / "old.yaml").write_text(OmegaConf.to_yaml(old))
    assert load_saved_config(tmp_path / "old.yaml").student.name == "dual_encoder_tiny"


# ------------------------------------------------------------------------------- the typed schema (issue 13)

ISSUE_13_BAD = [
    ("loss.distill=bogus", "none, swap"),
    ("index.kind=bogus", "flat, ivf, ivfpq, hnsw"),
    ("combiner.mode=bogus", "slow, fuse"),
    ("data.dataset=foo", "shapes, karpathy, shapes_video, vatex"),
    ("eval.k=[0]", ">= 1"),
    ("eval.k=[]", "empty"),
    ("combiner.k=0", ">= 1"),
    ("combiner.min_gain=-1", ">= 0"),
    ("train.keep_last=0", ">= 1"),
    ("train.grad_accum=0", ">= 1"),
    ("train.lr=-1", "> 0"),
    ("combiner.alpha=abc", "float or null"),
    ("student.embed_dim=abc", "int or null"),
    ("teacher_train.grad_accum=0", ">= 1"),
    ("train.weight_decay=-0.1", ">= 0"),
    ("train.warmup_steps=-1", ">= 0"),
    ("index.nprobe=0", ">= 1"),
    ("data.max_length=2", ">= 3"),
    ("loss.distill_weight=-1", ">= 0"),
    ("loss.teacher_temperature=0", "> 0"),
    ("loss.student_temperature=0", "> 0"),
    ("combiner.alpha=1.5", "in [0, 1]"),
    ("teacher.cross_attn=fien", "Did you mean fine"),
    ("teacher.directions=3", "in [1, 2]"),
    ("student.video_pool=max", "mean, cls"),
    ("eval.split=tset", "train, val, test"),
    ("loss.teacher_norm=softmax", "length, sum, zscore"),
    ("loss.oracle=1", "bool"),
    ("loss.swaps=0", "loss.swaps >= 1"),  # distill=swap in the shapes recipe
    ("data.generate.n_train=0", ">= 1"),
    ("data.generate.n_train=abc", "int"),
    ("data.generate.partial_caption_frac=2", "in [0, 1]"),
    ("data.generate.n_trian=5", "data.generate.n_train"),
    ("data.feature_dim=16", "does not read it"),
    ("data.image_size=null", "reads data.image_size"),
    ("eval.k=null", "cannot be null"),
    ("teacher_train.resume=/no/such/ckpt", "no such checkpoint"),
    ("data.eval_captions=0", ">= 1"),
    ("data.split_file=/data/split.json", "does not read it"),  # shapes is an image dataset
    ("loss.gather=maybe", "bool"),
    ("eval.val_items=0", ">= 1"),
    ("student.image_mean=[0.5,0.5]", "give 3 values"),
    ("teacher.image_std=[0.5,0,0.5]", "> 0"),
    ("student.image_mean=[128,128,128]", "in [0, 1]"),
    ("teacher.image_interpolation=cubic", "bicubic"),
    ("data.augment.crop_scale=[0.9,0.5]", "low <= high"),
    ("data.augment.crop_scale=[0.5]", "[low, high]"),
    ("data.augment.crop_scale=[0,1]", "> 0"),
    ("data.augment.hflip=1.5", "in [0, 1]"),
    ("data.augment.color_jitter=-1", ">= 0"),
    ("serve.max_wait_ms=-1", "in [0, 10000]"),
    ("serve.max_batch=0", ">= 1"),
    ("serve.queue_size=0", ">= 1"),
    ("serve.max_k=0", ">= 1"),
    ("serve.max_query_chars=abc", "int"),
    ("loss.vmlm_weight=-1", ">= 0"),
    ("loss.smrm_weight=-0.5", ">= 0"),
    ("loss.vmlm_mask_ratio=0", "> 0 and <= 1"),
    ("loss.smrm_mask_ratio=1.5", "> 0 and <= 1"),
    ("loss.vmlm_weight=abc", "float"),
    ("student.init_from=/no/such/student", "no trained student there"),
    ("teacher.tokenizer.vocab_size=2", ">= 5"),
    ("teacher.tokenizer.vocab_size=abc", "int"),
    ("teacher.tokenizer.vocab=100", "teacher.tokenizer.vocab_size"),
]


@pytest.mark.parametrize("override, expected", ISSUE_13_BAD, ids=[o for o, _ in ISSUE_13_BAD])
def test_bad_values_fail_at_load_naming_the_key(override, expected):
    """Each of these once passed the loader and failed minutes later (or never); now load_recipe refuses it."""
    with pytest.raises(ConfigError) as err:
        load_recipe(["recipe=shapes", override])
    key = override.split("=")[0]
    assert key in str(err.value) and expected in str(err.value), str(err.value)


def test_typed_values_and_plain_strings_for_builders():
    cfg = load_recipe(["recipe=shapes", "combiner.alpha=1", "student.embed_dim=64", "data.generate.noise=0.5"])
    assert isinstance(cfg, DictConfig)
    assert cfg.combiner.alpha == 1.0 and isinstance(cfg.combiner.alpha, float)  # an int where a float is declared
    assert cfg.student.embed_dim == 64 and cfg.data.generate.noise == 0.5  # a generator argument the recipe omits
    assert cfg.loss.distill == "swap" and cfg.loss.distill in ("swap", "none") and f"{cfg.loss.distill}" == "swap"
    assert {"swap": 1}[cfg.loss.distill] == 1  # hashes as its string
    assert all(type(v) is str for v in to_kwargs(cfg.data).values() if isinstance(v, str))
    assert load_recipe(["data.root=2024"]).data.root == "2024"  # YAML read a number; the key holds a path
    assert load_recipe(["combiner.alpha=null"]).combiner.alpha is None


def _write_recipes(tmp_path, monkeypatch, base_edit=None, recipe_text="seed: 1\n"):
    base = (ROOT / "recipes" / "base.yaml").read_text()
    (tmp_path / "base.yaml").write_text(base_edit(base) if base_edit else base)
    (tmp_path / "mine.yaml").write_text(recipe_text)
    monkeypatch.setattr(config, "RECIPE_DIR", tmp_path)


@pytest.mark.parametrize(
    "recipe_text, expected",
    [
        ("data:\n  datset: shapes\n", ["recipes/mine.yaml", "data.datset", "Did you mean: data.dataset"]),
        ("index:\n  kind: bogus\n", ["recipes/mine.yaml", "index.kind='bogus'", "flat, ivf"]),
        ("train:\n  lr: abc\n", ["recipes/mine.yaml", "train.lr expects a float"]),
        ("train:\n  max_steps: ${train.lr}\n", ["train.max_steps", "Integer"]),
        ("data:\n  dataset: vatex\n", ["data.dataset=vatex reads data.ann_train"]),
        (
            "data:\n  ann_file: a\n  image_dir: b\n  image_size: 32\n  generate:\n    n_train: abc\n",
            ["data.generate.n_train expects an int"],
        ),
    ],
)
def test_a_bad_recipe_file_names_the_file_and_key(tmp_path, monkeypatch, recipe_text, expected):
    _write_recipes(tmp_path, monkeypatch, recipe_text=recipe_text)
    with pytest.raises(ConfigError) as err:
        load_recipe(["recipe=mine"])
    assert all(e in str(err.value) for e in expected), str(err.value)


def test_base_yaml_and_schema_declare_the_same_keys(tmp_path, monkeypatch):
    """A key added to base.yaml without the schema (or dropped from it) fails at load, naming where to fix it."""
    smoke = (ROOT / "recipes" / "smoke.yaml").read_text()
    _write_recipes(tmp_path, monkeypatch, recipe_text=smoke)
    assert load_recipe(["recipe=mine"]).recipe == "mine"
    add = lambda b: b.replace("\nloss:\n", "\nloss:\n  new_weight: 0.5\n")  # noqa: E731
    _write_recipes(tmp_path, monkeypatch, add, recipe_text=smoke)
    with pytest.raises(ConfigError, match=r"loss.new_weight.*fastslow/schema.py, class LossConfig"):
        load_recipe(["recipe=mine"])
    _write_recipes(tmp_path, monkeypatch, lambda b: re.sub(r"\n  swap_weight: .*", "", b), recipe_text=smoke)
    with pytest.raises(ConfigError, match="no value for loss.swap_weight"):
        load_recipe(["recipe=mine"])
    # And statically: base.yaml's keys are the schema's, less the data keys only some datasets read.
    base = OmegaConf.load(ROOT / "recipes" / "base.yaml")
    optional = {f"data.{k}" for keys in schema.DATASET_KEYS.values() for k in keys}
    assert set(config._flat_keys(base)) == set(config._schema_keys()) - optional


def _recipe_cfgs():
    return [(name, load_recipe([f"recipe={name}"])) for name in list_recipes()]


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_every_recipe_binds_to_its_builders():
    """timm / torchtune sweep: each recipe section is accepted by what consumes it, with no key left over."""
    from fastslow.data import shapes
    from fastslow.trainer import TrainConfig
    from students import DualEncoderConfig, list_students
    from teachers import CaptionerConfig, list_teachers

    for name, cfg in _recipe_cfgs():
        # teacher.tokenizer is the teacher's tokenizer (fastslow.stages makes it), not a builder argument.
        teacher = {k: v for k, v in to_kwargs(cfg.teacher, drop=stages.NOT_BUILDER_KEYS).items() if v is not None}
        assert cfg.teacher.name in list_teachers() and set(teacher) <= _fields(CaptionerConfig), name
        CaptionerConfig(**teacher)  # types and values the teacher's own __post_init__ accepts
        student = {k: v for k, v in to_kwargs(cfg.student, drop=("name", "init_from")).items() if v is not None}
        assert cfg.student.name in list_students() and set(student) <= _fields(DualEncoderConfig), name
        DualEncoderConfig(**student)
        for section in ("train", "teacher_train"):
            assert TrainConfig(**to_kwargs(cfg[section])) is not None, (name, section)
        if cfg.data.dataset in schema.GENERATORS:
            fn = shapes.generate_shapes if cfg.data.dataset == "shapes" else shapes.generate_shapes_video
            inspect.signature(fn).bind("out_dir", **to_kwargs(cfg.data.generate))
    # Every builder option the schema declares exists, for every teacher / student section.
    assert _fields(schema.TeacherConfig) - set(stages.NOT_BUILDER_KEYS) <= _fields(CaptionerConfig)
    # student.init_from says where the weights start, not what the model is (fastslow.stages drops it from the build).
    assert _fields(schema.StudentConfig) - {"name", "init_from"} <= _fields(DualEncoderConfig)
    assert _fields(schema.TrainSection) == _fields(TrainConfig)


@pytest.mark.parametrize("dataset", sorted(schema.GENERATORS))
def test_generate_schema_matches_the_generator_signature(dataset):
    from fastslow.data import shapes

    fn = shapes.generate_shapes if dataset == "shapes" else shapes.generate_shapes_video
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    cls = schema.GENERATORS[dataset]
    declared = {f.name: f for f in dataclasses.fields(cls)}
    assert list(declared) == [p for p in sig.parameters if p != "out_dir"]
    for name, f in declared.items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        want = sig.parameters[name].default
        assert (list(want) if isinstance(want, tuple) else want) == default, name
        ours, theirs = typing.get_type_hints(cls)[name], hints[name]
        if typing.get_origin(theirs) is tuple:  # YAML has lists; the generator takes any sequence
            assert typing.get_origin(ours) is list and set(typing.get_args(theirs)) == set(typing.get_args(ours))
        else:
            assert ours is theirs, name


def test_mode_enums_equal_the_library_values():
    """The schema's enums are the values the library accepts (its tuples, and what the builders take)."""
    from fastslow import combiner, distill, index, losses, stages
    from fastslow.data import INTERPOLATIONS, ON_ERROR
    from fastslow.data.karpathy import KARPATHY_SPLITS
    from students import create_student
    from teachers import CaptionerConfig

    def values(enum):
        return {m.value for m in enum}

    assert values(schema.Distill) == set(distill.DISTILL_MODES)
    assert values(schema.TeacherNorm) == set(losses.TEACHER_NORMS)
    assert values(schema.IndexKind) == set(index.KINDS)
    assert values(schema.CombinerMode) == set(combiner.MODES)
    assert values(schema.OnError) == set(ON_ERROR)
    assert values(schema.Split) == set(KARPATHY_SPLITS)
    assert values(schema.Interpolation) == set(INTERPOLATIONS)
    assert values(schema.Dataset) == set(stages.IMAGE_DATASETS + stages.VIDEO_DATASETS) == set(schema.DATASET_KEYS)
    for mode in values(schema.CrossAttn):
        CaptionerConfig(cross_attn=mode)
    with pytest.raises(ValueError):
        CaptionerConfig(cross_attn="bogus")
    for key, enum, modality in (("video_pool", schema.VideoPool, "video"), ("text_pool", schema.TextPool, "image")):
        for mode in [*values(enum), "bogus"]:
            if mode == "bogus":
                with pytest.raises(ValueError):
                    create_student("dual_encoder_tiny", modality=modality, **{key: mode})
            else:
                create_student("dual_encoder_tiny", modality=modality, **{key: mode})


def _reads(pattern):
    """`cfg.<section>.<key>` reads in the library, the tools and the benchmarks."""
    found = set()
    for pkg in ("fastslow", "tools", "benchmarks"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            found |= {(m[0], m[1], rel) for m in re.findall(pattern, path.read_text())}
    return found


def test_code_reads_only_declared_keys_and_distill_reads_every_loss_key():
    sections = {
        f.name: typing.get_type_hints(schema.RecipeConfig)[f.name] for f in dataclasses.fields(schema.RecipeConfig)
    }
    reads = _reads(r"\bcfg\.([a-z][a-z_]*)\.([a-z][a-z_]*)\b")
    undeclared = [r for r in reads if r[0] in sections and dataclasses.is_dataclass(sections[r[0]])
                  and r[1] not in _fields(sections[r[0]])]  # fmt: skip
    assert not undeclared
    # tools/distill.py hands every loss key to fastslow.distill / fastslow.losses: none is declared and unread.
    loss_reads = {key for section, key, file in reads if section == "loss" and file == "tools/distill.py"}
    assert loss_reads == _fields(schema.LossConfig)


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


def test_a_tools_own_arguments_are_split_from_the_overrides():
    own, rest = config.split_own_args(["recipe=shapes", "port=9000", "train.lr=1", "host"], {"host": "127.0.0.1",
                                      "port": "8000"})  # fmt: skip
    assert own == {"host": "127.0.0.1", "port": "9000"} and rest == ["recipe=shapes", "train.lr=1", "host"]
