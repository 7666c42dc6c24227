"""Write the built-in shapes data (images, Karpathy format) or shapes_video (VATEX format) to data.root.

    python tools/make_shapes.py recipe=shapes
    python tools/make_shapes.py recipe=shapes_video
    python tools/make_shapes.py recipe=shapes data.generate.n_train=20000 data.root=data/shapes20k

Optional: every tool generates the data itself when data.root does not hold it yet. Deterministic
from data.generate.seed; regenerated only when the generator settings change.
"""

from fastslow.runtime import configure_threads, run  # before torch is imported: it sizes its thread pools once


def main(argv=None) -> None:
    from fastslow import stages
    from fastslow.config import ConfigError, load_recipe

    cfg = load_recipe(argv, prog="make_shapes.py")
    configure_threads(cfg.num_threads)
    if cfg.data.dataset not in ("shapes", "shapes_video"):
        raise ConfigError(
            f"recipe={cfg.recipe} reads {cfg.data.dataset} data from disk; make_shapes.py only writes "
            "the built-in shapes / shapes_video data"
        )
    stages.ensure_shapes(cfg)
    for split in ("train", "val", "test"):
        s = stages.load_split(cfg, split)
        print(f"{cfg.data.dataset} {split}: {s.n_items} items, {s.n_texts} captions  ({cfg.data.root})")


if __name__ == "__main__":
    run(main)
