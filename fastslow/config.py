"""Recipes: `recipe=NAME key=value ...` -> a strict, resolved omegaconf DictConfig.

`recipes/base.yaml` holds the keys every recipe has; `recipes/NAME.yaml` is merged over it (a recipe
may add keys). Command-line overrides are an omegaconf dotlist applied in struct mode, so a
misspelled key fails before any work with the nearest valid keys, and a value of the wrong type
fails naming the key and the type it expects (dinov2 / nanoGPT rule: the recipe defines the schema).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

RECIPE_DIR = Path(os.environ.get("FASTSLOW_RECIPES", Path(__file__).resolve().parents[1] / "recipes"))
DEFAULT_RECIPE = "shapes"

USAGE = """usage: {prog} [recipe=NAME] [key=value ...]

  recipe=NAME   one of: {recipes} (default: {default}); or a path to a .yaml file
  key=value     override any key of the recipe, e.g. train.max_steps=100 data.root=/data/flickr30k
                (dotted keys; values parsed as YAML: 1e-4, true, [1,5,10], null)

The keys every recipe has are in recipes/base.yaml; each recipe's own keys are in recipes/NAME.yaml.
"""


class ConfigError(ValueError):
    """A recipe or an override is wrong; the message names the key and what to do."""


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
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                keys.extend(_flat_keys(node, full + "."))
    return keys


def _suggest(key: str, keys: list[str]) -> str:
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


def _check_type(key: str, old: Any, new: Any) -> Any:
    """Return `new` coerced to the type of `old`, or raise naming the key and the expected type."""
    if old is None or new is None:  # null in the recipe means "any type"; null as a value unsets
        return new
    expected, got = _type_name(old), _type_name(new)
    if expected == "section":
        raise ConfigError(f"{key} is a section, not a value; set its keys instead, e.g. {key}.<name>=...")
    if expected == got:
        return new
    if expected == "float" and got == "int":
        return float(new)
    if expected == "str" and got in ("int", "float", "bool"):
        # YAML parsed e.g. `data.root=2024` as an int; a path or a name is what the key holds.
        return str(new)
    if expected == "list" and got in ("int", "float", "str"):
        raise ConfigError(f"{key} expects a list, got {new!r}; write it as {key}=[{new}]")
    raise ConfigError(f"{key} expects a {expected} (recipe value {old!r}), got {_type_name(new)} {new!r}")


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    keys = _flat_keys(cfg)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"cannot parse argument {item!r}: overrides are key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith(("+", "~")):
            raise ConfigError(f"{item!r}: adding or deleting keys is not supported; recipes define the keys")
        if key not in keys:
            raise ConfigError(f"unknown key {key!r} in {item!r}.{_suggest(key, keys)}")
        new = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        try:
            old = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        except Exception:  # an interpolation that cannot resolve yet: accept any type
            old = None
        new = _check_type(key, old, new)
        OmegaConf.update(cfg, key, new, merge=False, force_add=False)


def _validate(cfg: DictConfig) -> None:
    """Checks that no YAML schema expresses: enumerations and ranges of the shared keys."""
    choices = {"data.on_error": ("raise", "skip")}
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in ("train.max_steps", "train.batch_size", "train.save_every"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    resume = str(OmegaConf.select(cfg, "train.resume"))
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError(
            f"train.resume={resume}: no such checkpoint; use auto, none or an existing checkpoint directory"
        )


def load_recipe(argv: Sequence[str] | None = None, *, prog: str | None = None) -> DictConfig:
    """Build the run's config from `recipe=NAME key=value ...`.

    Args:
        argv: command-line arguments (default `sys.argv[1:]`); `-h`/`--help` prints usage and exits.
        prog: program name shown in the usage text.

    Returns:
        A resolved, struct-mode DictConfig with `recipe` set to the recipe's name.

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

    base = OmegaConf.load(RECIPE_DIR / "base.yaml")
    recipe = OmegaConf.load(_recipe_path(name))
    cfg = OmegaConf.merge(base, recipe)
    cfg.recipe = Path(name).stem
    OmegaConf.set_struct(cfg, True)
    _apply_overrides(cfg, overrides)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:  # e.g. ${oc.env:...} missing, a typo inside the recipe itself
        raise ConfigError(f"recipe={name}: cannot resolve the config: {e}") from e
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
    hints = {
        "karpathy": "the Karpathy split file (dataset_flickr30k.json / dataset_coco.json) and the image folder",
        "vatex": "vatex_training_v1.0.json, vatex_validation_v1.0.json and a folder of I3D <videoID>.npy features",
    }
    for key, path in wanted:
        if not Path(path).exists():
            raise FileNotFoundError(
                f"{path} not found ({key}). recipe={cfg.recipe} expects {hints[d.dataset]} under "
                f"data.root={d.root}; set data.root=/path/to/your/copy (or {key}=...). See README, 'Your own data'"
            )


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config next to a run (atomically), so the run can be rebuilt without the recipe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def load_saved_config(path: str | os.PathLike) -> DictConfig:
    """Read a `config.yaml` written by `save_config` (struct mode, so a typo'd read fails loudly)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: expected the config.yaml saved with a run; was the stage run?")
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    return cfg


def to_kwargs(section: DictConfig, drop: Sequence[str] = ()) -> dict[str, Any]:
    """A config section as plain keyword arguments for a builder (`create_teacher(**to_kwargs(cfg.teacher))`)."""
    out = OmegaConf.to_container(section, resolve=True)
    assert isinstance(out, dict)
    return {k: v for k, v in out.items() if k not in drop}
