"""Recipes: `recipe=NAME key=value ...` -> a strict, typed, resolved omegaconf DictConfig.

`recipes/base.yaml` holds the keys every recipe has; `recipes/NAME.yaml` is merged over it. Both are
merged into the typed schema of `fastslow.schema` (one dataclass per section, OmegaConf structured
configs), so a key the schema does not declare fails, in a recipe file or on the command line, with the
nearest valid keys; a value of the wrong type fails naming the key and the type it expects; a mode
outside its enum, a number outside its range, or a dataset key the dataset does not read fails naming
the key, the value and what is allowed. All of it runs once, at load, after the overrides and the
interpolations, before any work (dinov2 / nanoGPT rule: the schema, not the code that reads a key later,
says what a key may hold).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fastslow import schema
from fastslow.artefacts import atomic_write_text
from fastslow.errors import ConfigError, MissingFileError

RECIPE_DIR = Path(os.environ.get("FASTSLOW_RECIPES", Path(__file__).resolve().parents[1] / "recipes"))
DEFAULT_RECIPE = "shapes"

USAGE = """usage: {prog} [recipe=NAME] [key=value ...]

  recipe=NAME   one of: {recipes} (default: {default}); or a path to a .yaml file
  key=value     override any key of the recipe, e.g. train.max_steps=100 data.root=/data/flickr30k
                (dotted keys; values parsed as YAML: 1e-4, true, [1,5,10], null)

The keys every recipe has are in recipes/base.yaml; each recipe's own keys are in recipes/NAME.yaml;
their types and ranges are in fastslow/schema.py.
"""


def list_recipes() -> list[str]:
    """Names accepted by `recipe=` (every YAML in recipes/ except the shared base)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if p.stem != "base")


def _recipe_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
    else:
        path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"recipe={name}: no such recipe ({path} does not exist). Choose one of: {', '.join(list_recipes())}"
        )
    return path


def _flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of `cfg`, sections included (`train`, `train.lr`)."""
    keys = []
    if isinstance(cfg, DictConfig) and not cfg._is_none() and not cfg._is_missing():
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                keys.extend(_flat_keys(node, full + "."))
    return keys


def _node(cfg: DictConfig, key: str) -> Any:
    """The node of a dotted key, without resolving it."""
    *path, leaf = key.split(".")
    for part in path:
        cfg = cfg._get_node(part)
    return cfg._get_node(leaf)


def _where(path: Path) -> str:
    return f"recipes/{path.name}" if path.parent.resolve() == RECIPE_DIR.resolve() else str(path)


def _suggest(key: str, keys: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # a right leaf name in the wrong section: `lr=1` -> `train.lr`
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:3]
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (ListConfig, list, tuple)):
        return "list"
    if isinstance(value, (DictConfig, dict)):
        return "section"
    return type(value).__name__


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------- the schema's types, by dotted key

_UNKNOWN = object()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(`int`, True) for `int | None`; (`list[int]`, False) for `list[int]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(tp))
    return tp, False


def _is_section(tp: Any) -> bool:
    base, _ = _unwrap(tp)
    return dataclasses.is_dataclass(base) or typing.get_origin(base) is dict


def _annotation(key: str, dataset: Any = None) -> Any:
    """The declared type of a dotted key (`Any` inside a free-form section), or `_UNKNOWN`.

    `data.generate.X` is typed by the generator of `dataset` (`schema.GENERATORS`)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[:2] == ["data", "generate"] and str(dataset) in schema.GENERATORS:
        return _hints(schema.GENERATORS[str(dataset)]).get(parts[2], _UNKNOWN)
    cls: Any = schema.RecipeConfig
    tp: Any = _UNKNOWN
    for part in parts:
        if cls is Any:
            return Any
        if cls is None or part not in _hints(cls):
            return _UNKNOWN
        tp = _hints(cls)[part]
        base, _ = _unwrap(tp)
        cls = base if dataclasses.is_dataclass(base) else Any if typing.get_origin(base) is dict else None
    return tp


def _schema_keys(cls: type = schema.RecipeConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares, sections included."""
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        base, _ = _unwrap(tp)
        if dataclasses.is_dataclass(base):
            keys += _schema_keys(base, f"{prefix}{name}.")
    return keys


def _section_class(key: str) -> str:
    """The schema dataclass that declares `key`'s section (for the message: declare it there)."""
    cls: Any = schema.RecipeConfig
    for part in key.split(".")[:-1]:
        base, _ = _unwrap(_hints(cls).get(part, None))
        if not dataclasses.is_dataclass(base):
            break
        cls = base
    return cls.__name__


def _describe(tp: Any) -> str:
    base, optional = _unwrap(tp)
    if isinstance(base, type) and issubclass(base, Enum):
        text = "one of " + ", ".join(m.value for m in base)
    elif typing.get_origin(base) is list:
        text = f"a list of {_describe(typing.get_args(base)[0])}"
    else:
        text = {int: "an int", float: "a float", bool: "a bool (true | false)", str: "a str"}.get(base, str(base))
    return text + (" or null" if optional else "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """`value` converted to the declared type `tp` (int -> float, a YAML number -> str), or ConfigError.

    Stricter than OmegaConf on purpose, which takes `1` or `yes` for a bool."""
    base, optional = _unwrap(tp)
    if base is Any:
        return value
    if _is_section(tp):
        if value is None and optional:
            return None
        raise ConfigError(f"{key} is a section, not a value; set its keys instead, e.g. {key}.<name>=...")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null: it expects {_describe(tp)}")
    if isinstance(base, type) and issubclass(base, Enum):
        allowed = [m.value for m in base]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if isinstance(value, (list, dict, ListConfig, DictConfig)) or text not in allowed:
            near = difflib.get_close_matches(text, allowed, n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]}?" if near else ""
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}.{hint}")
        return text
    if typing.get_origin(base) is list:
        if isinstance(value, (ListConfig, tuple)):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {value!r}; write it as {key}=[{value}]")
        (item,) = typing.get_args(base)
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    got = _type_name(value)
    ok = {
        bool: got == "bool",
        int: got == "int",
        float: got in ("int", "float"),
        # YAML parsed e.g. `data.root=2024` as an int; a path or a name is what the key holds.
        str: got in ("str", "int", "float", "bool"),
    }.get(base, False)
    if not ok:
        raise ConfigError(f"{key} expects {_describe(tp)}, got {got} {value!r}")
    return float(value) if base is float else str(value) if base is str else value


# ---------------------------------------------------------------- recipe files and overrides


def _raw(node: Any) -> Any:
    """A node's value without resolving interpolations (a list or a dict as plain containers)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return None if node._is_none() else OmegaConf.to_container(node, resolve=False)
    return node._value()


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, (list, tuple)):
        return any(_has_interpolation(v) for v in value)
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    return False


def _check_file(path: Path, cfg: DictConfig, prefix: str = "") -> None:
    """Every key of one YAML file is declared by the schema and holds a value of its type."""
    for k in cfg.keys():
        full = f"{prefix}{k}"
        tp = _annotation(full)
        if tp is _UNKNOWN:
            where = _where(path)
            if path.name == "base.yaml":
                raise ConfigError(
                    f"{where}: key {full!r} is not in the schema; declare it (type and range) in "
                    f"fastslow/schema.py, class {_section_class(full)}"
                )
            raise ConfigError(
                f"{where}: unknown key {full!r}.{_suggest(full, _schema_keys())} A recipe may only set the keys "
                f"declared in fastslow/schema.py (class {_section_class(full)})"
            )
        node = cfg._get_node(k)
        base, _ = _unwrap(tp)
        if dataclasses.is_dataclass(base) and isinstance(node, DictConfig) and not node._is_none():
            _check_file(path, node, full + ".")
            continue
        value = _raw(node)
        if base is Any or (typing.get_origin(base) is dict and isinstance(value, dict)) or _has_interpolation(value):
            continue  # free-form (data.generate: checked after resolution) or resolved later
        try:
            _coerce(full, tp, value)
        except ConfigError as e:
            raise ConfigError(f"{_where(path)}: {e}") from None


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"cannot parse argument {item!r}: overrides are key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith(("+", "~")):
            raise ConfigError(f"{item!r}: adding or deleting keys is not supported; recipes define the keys")
        dataset = cfg.data.dataset
        keys = _flat_keys(cfg)
        generator = schema.GENERATORS.get(str(dataset)) if not cfg.data._get_node("generate")._is_none() else None
        if generator is not None:  # any argument of the generator, set in the recipe or not
            keys += [f"data.generate.{f}" for f in _hints(generator) if f"data.generate.{f}" not in keys]
        if key not in keys:
            raise ConfigError(f"unknown key {key!r} in {item!r}.{_suggest(key, keys)}")
        new = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        tp = _annotation(key, dataset)
        if tp is not _UNKNOWN:  # unknown only under data.generate of a dataset without a generator: refused later
            new = _coerce(key, tp, new)
        try:
            with open_dict(cfg.data.generate) if key.startswith("data.generate.") else contextlib.nullcontext():
                OmegaConf.update(cfg, key, new, merge=False, force_add=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{item}: {_first_line(e)}") from None


# ---------------------------------------------------------------- values: ranges, datasets, cross-key rules


def _range_text(meta: dict[str, float]) -> str:
    if "ge" in meta and "le" in meta:
        return f"in [{meta['ge']}, {meta['le']}]"
    return " and ".join(f"{op} {meta[name]}" for name, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if name in meta)


def _in_range(value: float, meta: dict[str, float]) -> bool:
    return (
        ("ge" not in meta or value >= meta["ge"])
        and ("gt" not in meta or value > meta["gt"])
        and ("le" not in meta or value <= meta["le"])
    )


def _check_ranges(section: Any, cls: type, prefix: str) -> None:
    """Every number of `section` lies in the range its schema field declares (for a list: every entry)."""
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        value = section[f.name]
        base, _ = _unwrap(_hints(cls)[f.name])
        if dataclasses.is_dataclass(base):
            _check_ranges(value, base, full + ".")
            continue
        meta = dict(f.metadata)
        if not meta or value is None:
            continue
        if isinstance(value, (ListConfig, list, tuple)):
            if not value:
                raise ConfigError(f"{full}=[] is empty: give at least one value, e.g. {full}=[1]")
            if not all(_in_range(v, meta) for v in value):
                raise ConfigError(f"{full}={list(value)} is out of range: every entry must be {_range_text(meta)}")
        elif not _in_range(value, meta):
            raise ConfigError(f"{full}={value!r} is out of range: must be {_range_text(meta)}")


def _check_dataset_keys(cfg: DictConfig) -> None:
    """The optional data keys the dataset reads are set, and the ones it does not read are not."""
    d = cfg.data
    dataset = str(d.dataset)
    wanted = schema.DATASET_KEYS[dataset]
    optional = {k for keys in schema.DATASET_KEYS.values() for k in keys}
    for name in [k for k in _hints(schema.DataConfig) if k in optional]:
        is_set = not d._get_node(name)._is_none()
        if name in wanted and not is_set:
            raise ConfigError(
                f"data.dataset={dataset} reads data.{name}, which is null; set it in the recipe or as data.{name}=..."
            )
        if name not in wanted and is_set:
            users = [ds for ds, keys in schema.DATASET_KEYS.items() if name in keys]
            raise ConfigError(
                f"data.{name} is set but data.dataset={dataset} does not read it (only {', '.join(users)} do); "
                f"remove it from the recipe or set data.{name}=null"
            )


def _check_generate(cfg: DictConfig) -> None:
    """`data.generate` holds arguments of its dataset's generator, each of its type and in its range."""
    dataset = str(cfg.data.dataset)
    if dataset not in schema.GENERATORS:
        return
    cls = schema.GENERATORS[dataset]
    given = OmegaConf.to_container(cfg.data.generate, resolve=True)
    valid = [f"data.generate.{f}" for f in _hints(cls)]
    values = {}
    for k, v in given.items():
        full = f"data.generate.{k}"
        if full not in valid:
            fn = "generate_shapes" if dataset == "shapes" else "generate_shapes_video"
            raise ConfigError(
                f"unknown key {full!r}: not an argument of fastslow.data.shapes.{fn}.{_suggest(full, valid)}"
            )
        values[k] = _coerce(full, _hints(cls)[k], v)
    gen = OmegaConf.merge(OmegaConf.structured(cls), values)
    _check_ranges(gen, cls, "data.generate.")
    if dataset == "shapes_video" and gen.n_val_groups * gen.group_size != cfg.data.n_val:
        raise ConfigError(
            f"data.n_val={cfg.data.n_val} but the generator writes data.generate.n_val_groups x group_size = "
            f"{gen.n_val_groups} x {gen.group_size} = {gen.n_val_groups * gen.group_size} val videos: "
            f"set data.n_val={gen.n_val_groups * gen.group_size}"
        )


def _validate(cfg: DictConfig) -> None:
    """Checks on the resolved values: ranges, the dataset's keys, data.generate, rules across keys."""
    _check_ranges(cfg, schema.RecipeConfig, "")
    _check_dataset_keys(cfg)
    _check_generate(cfg)
    if cfg.data.split_file is not None and str(cfg.data.dataset) not in ("vatex", "shapes_video"):
        raise ConfigError(
            f"data.split_file={cfg.data.split_file} is set but data.dataset={cfg.data.dataset} does not read it (only "
            "vatex and shapes_video do; the Karpathy file carries its own split): set data.split_file=null"
        )
    aug = cfg.data.augment
    if aug.enabled and str(cfg.data.dataset) not in ("shapes", "karpathy"):
        raise ConfigError(
            f"data.augment.enabled=true augments images, but data.dataset={cfg.data.dataset} reads clip features: "
            f"set data.augment.enabled=false"
        )
    for name in ("crop_scale", "crop_ratio"):
        value = list(aug[name])
        if len(value) != 2 or value[0] > value[1]:
            raise ConfigError(f"data.augment.{name}={value}: give [low, high] with low <= high")
    for section in ("teacher", "student"):
        for name in ("image_mean", "image_std"):
            value = cfg[section][name]
            if value is not None and len(value) != 3:
                raise ConfigError(
                    f"{section}.{name}={list(value)}: give 3 values (R, G, B), e.g. {section}.{name}=[0.5,0.5,0.5], "
                    f"or null for the backbone's own"
                )
    if cfg.loss.distill == "swap" and cfg.loss.swaps < 1:
        raise ConfigError(f"loss.distill=swap needs loss.swaps >= 1 (got {cfg.loss.swaps}); or pick another mode")
    init_from = cfg.student.init_from
    if init_from is not None and not (Path(init_from) / "model.safetensors").is_file():
        raise ConfigError(
            f"student.init_from={init_from}: no trained student there (no model.safetensors); give the student "
            "directory a tools/distill.py run wrote (its ${output_dir}/student), or student.init_from=null"
        )
    for section in ("train", "teacher_train"):
        resume = str(cfg[section].resume)
        if resume not in ("auto", "none") and not Path(resume).exists():
            raise ConfigError(
                f"{section}.resume={resume}: no such checkpoint; use auto, none or an existing checkpoint directory"
            )


def split_own_args(argv: Sequence[str], defaults: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """A tool's own ``name=value`` arguments (those named in ``defaults``, e.g. ``host``, ``port``) apart from the
    recipe and its overrides: ``(own values over the defaults, the rest for load_recipe)``."""
    own, rest = dict(defaults), []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in defaults and eq:
            own[key] = value
        else:
            rest.append(arg)
    return own, rest


def load_recipe(argv: Sequence[str] | None = None, *, prog: str | None = None) -> DictConfig:
    """Build the run's config from `recipe=NAME key=value ...`.

    Args:
        argv: command-line arguments (default `sys.argv[1:]`); `-h`/`--help` prints usage and exits.
        prog: program name shown in the usage text.

    Returns:
        A resolved DictConfig typed by `fastslow.schema.RecipeConfig` (struct mode: unknown keys fail), with
        `recipe` set to the recipe's name. Mode keys hold str enums equal to their strings.

    Raises:
        ConfigError: an unknown recipe, unknown key, wrong type or invalid value; the message names it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(
            USAGE.format(prog=prog or Path(sys.argv[0]).name, recipes=", ".join(list_recipes()), default=DEFAULT_RECIPE)
        )
        raise SystemExit(0)
    names = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    if len(names) > 1:
        raise ConfigError(f"recipe= given {len(names)} times ({', '.join(names)}); give it once")
    name = names[0] if names else DEFAULT_RECIPE
    overrides = [a for a in args if not a.startswith("recipe=")]
    if not name:
        raise ConfigError(f"recipe= is empty. Choose one of: {', '.join(list_recipes())}")

    files = [RECIPE_DIR / "base.yaml", _recipe_path(name)]
    loaded = []
    for path in files:
        try:
            part = OmegaConf.load(path)
        except Exception as e:  # YAML syntax
            raise ConfigError(f"{path}: cannot read it: {e}") from e
        if not isinstance(part, DictConfig):
            raise ConfigError(f"{path}: a recipe is a mapping of sections and keys, not a {type(part).__name__}")
        _check_file(path, part)
        loaded.append(part)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema.RecipeConfig), *loaded)
    except OmegaConfBaseException as e:  # what _check_file does not see, e.g. a list inside a typed list
        raise ConfigError(f"recipe={name}: {_first_line(e)} (key {getattr(e, 'full_key', '?')})") from None
    cfg.recipe = Path(name).stem
    OmegaConf.set_struct(cfg, True)
    _apply_overrides(cfg, overrides)
    missing = [k for k in _flat_keys(cfg) if _node(cfg, k)._is_missing()]
    if missing:
        raise ConfigError(
            f"recipe={name}: no value for {', '.join(missing)}; recipes/base.yaml sets every key the schema "
            "(fastslow/schema.py) declares without a default"
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:  # ${oc.env:...} missing, a typo inside an interpolation, a wrong type
        key = getattr(e, "full_key", None)
        raise ConfigError(f"recipe={name}: cannot resolve {key or 'the config'}: {_first_line(e)}") from None
    _validate(cfg)
    return cfg


def check_data_files(cfg: DictConfig) -> None:
    """Fail before any work when a dataset file the recipe names is absent (seconds, not minutes in)."""
    d = cfg.data
    if d.dataset in ("shapes", "shapes_video"):
        return
    if d.dataset == "karpathy":
        wanted = [("data.ann_file", d.ann_file), ("data.image_dir", d.image_dir)]
    else:
        wanted = [("data.ann_train", d.ann_train), ("data.ann_val", d.ann_val), ("data.feature_dir", d.feature_dir)]
        if d.split_file is not None:
            wanted.append(("data.split_file", d.split_file))
    hints = {
        "karpathy": "the Karpathy split file (dataset_flickr30k.json / dataset_coco.json) and the image folder",
        "vatex": "vatex_training_v1.0.json, vatex_validation_v1.0.json and a folder of I3D <videoID>.npy features",
    }
    for key, path in wanted:
        if not Path(path).exists():
            raise MissingFileError(
                f"{path} not found ({key}). recipe={cfg.recipe} expects {hints[d.dataset]} under "
                f"data.root={d.root}; set data.root=/path/to/your/copy (or {key}=...). See README, 'Your own data'"
            )


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config next to a run (atomically), so the run can be rebuilt without the recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def load_saved_config(path: str | os.PathLike, fix: str | None = None) -> DictConfig:
    """Read a `config.yaml` written by `save_config` (struct mode, so a typo'd read fails loudly).

    Read as plain YAML, not through the schema: it records what a past run used, and must load back after the
    schema gains or loses keys (a builder's option missing from an older config takes the builder's default).
    The modes come back as plain strings, which compare equal to the enums of a freshly loaded recipe.

    Args:
        path: the file.
        fix: what to do when it is missing or unreadable (default: run the stage).

    Raises:
        ConfigError: the file is missing, does not parse, or is not a mapping (the message names it and ``fix``).
    """
    path = Path(path)
    fix = fix or "was the stage run?"
    if not path.is_file():
        raise ConfigError(f"{path} not found: expected the config.yaml saved with a run; {fix}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml's parser and scanner errors, a binary file, ...
        raise ConfigError(f"{path}: cannot read it ({type(e).__name__}: {_first_line(e)}); {fix}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a saved config is a mapping of sections, not a {type(cfg).__name__}; {fix}")
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_kwargs(section: DictConfig, drop: Sequence[str] = ()) -> dict[str, Any]:
    """A config section as plain keyword arguments for a builder (`create_teacher(**to_kwargs(cfg.teacher))`)."""
    out = OmegaConf.to_container(section, resolve=True, enum_to_str=True)  # modes as plain strings
    assert isinstance(out, dict)
    return {k: v for k, v in out.items() if k not in drop}
