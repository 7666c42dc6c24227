"""Per-model image loaders (issue 12 point 1): each model's mean / std / resampling come from its backbone;
training augmentation (point 2): crops, jitter, flips that swap left and right in the caption, evaluation untouched.

A ViT student expects pixels normalised with mean / std 0.5, a ResNet teacher ImageNet's statistics; both read
the same files, each through its own `ImageLoader` (`stages.visual_loader(cfg, model)`), overridable in the recipe.
"""

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fastslow import stages
from fastslow.config import load_recipe
from fastslow.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AugmentingImageLoader,
    ImageLoader,
    PairDataset,
    RetrievalSplit,
    collate,
    swap_left_right,
)
from fastslow.errors import ConfigError
from fastslow.tokenizer import train_tokenizer
from students import create_student
from teachers import create_teacher

HALF = (0.5, 0.5, 0.5)


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_vit_student_gets_half_and_resnet_teacher_imagenet_statistics():
    # dual_encoder_base's ViT-B/16 and captioner_base's ResNet-50, as timm describes them (no weights needed) ...
    assert timm.models.get_pretrained_cfg("vit_base_patch16_224").mean == HALF
    assert timm.models.get_pretrained_cfg("resnet50").mean == IMAGENET_DEFAULT_MEAN
    # ... and small models built the same way: a ViT image tower with CLS pooling, a ResNet teacher backbone.
    student = create_student("dual_encoder_tiny", image_backbone="test_vit", image_size=32, image_global_pool="token")
    teacher = create_teacher("captioner_small")
    assert student.data_config["mean"] == HALF and student.data_config["std"] == HALF
    assert teacher.data_config["mean"] == IMAGENET_DEFAULT_MEAN and teacher.data_config["std"] == IMAGENET_DEFAULT_STD
    assert student.data_config["image_size"] == 32 and teacher.data_config["image_size"] == 64


def test_each_model_of_a_recipe_gets_its_own_loader_and_the_recipe_overrides_it(photo):
    cfg = load_recipe(["recipe=smoke", "student.image_mean=[0.1,0.2,0.3]", "student.image_interpolation=bilinear"])
    tok = train_tokenizer(["a red square", "a blue circle"], vocab_size=64)
    student, teacher = stages.build_student(cfg, tok), stages.build_teacher(cfg, tok)
    s_load, t_load = stages.visual_loader(cfg, student), stages.visual_loader(cfg, teacher)
    # smoke's teacher is timm's test_resnet (mean / std 0.5, bilinear); its student test_efficientnet (ImageNet).
    assert (t_load.mean_values, t_load.std_values, t_load.interpolation) == (HALF, HALF, "bilinear")
    assert s_load.mean_values == (0.1, 0.2, 0.3) and s_load.std_values == IMAGENET_DEFAULT_STD
    assert s_load.interpolation == "bilinear"
    # The pixels handed to the student are normalised with those values.
    raw = ImageLoader(cfg.data.image_size, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear")(photo)
    expected = (raw - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    torch.testing.assert_close(s_load(photo), expected)


def test_default_loader_is_todays_imagenet_bicubic(photo):
    """Without a model (and for every CNN of the shapes recipes) the loader is the one of earlier versions."""
    loader = ImageLoader(16)
    assert (loader.mean_values, loader.std_values, loader.interpolation) == (
        IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic")  # fmt: skip
    with Image.open(photo) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.resize((round(w * 16 / h), 16), Image.Resampling.BICUBIC)
        left = (im.size[0] - 16) // 2
        im = im.crop((left, 0, left + 16, 16))
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    assert torch.equal(loader(photo), x)
    cfg = load_recipe(["recipe=shapes"])
    tok = train_tokenizer(["a red square", "a blue circle"], vocab_size=64)
    for model in (stages.build_student(cfg, tok), stages.build_teacher(cfg, tok)):
        assert stages.visual_loader(cfg, model).__dict__.keys() == loader.__dict__.keys()
        assert repr(stages.visual_loader(cfg, model)) == repr(ImageLoader(cfg.data.image_size))


# ------------------------------------------------------------------------ training augmentation (issue 12 point 2)


def _split(tmp_path, captions_per_item):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(len(captions_per_item)):
        path = tmp_path / f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    captions = [c for caps in captions_per_item for c in caps]
    text_to_visual = [i for i, caps in enumerate(captions_per_item) for _ in caps]
    ids = [f"im{i}.jpg" for i in range(len(paths))]
    return RetrievalSplit("t/train", "image", ids, paths, captions, text_to_visual)


CAPTIONS = [["a dog left of a cat", "two dogs"], ["the leftmost box is Right of a tree"]]


def test_swap_left_right_keeps_case_and_other_words():
    assert swap_left_right("A dog Left of a cat, RIGHT-hand; the leftmost box") == (
        "A dog Right of a cat, LEFT-hand; the rightmost box")  # fmt: skip
    assert swap_left_right("bright cleft lefty") == "bright cleft lefty"


def test_recipes_augment_real_photos_only_and_never_video():
    on = {name: bool(load_recipe([f"recipe={name}"]).data.augment.enabled) for name in
          ("flickr", "coco", "shapes", "shapes_video", "smoke", "smoke_video", "vatex")}  # fmt: skip
    assert on == {"flickr": True, "coco": True, "shapes": False, "shapes_video": False, "smoke": False,
                  "smoke_video": False, "vatex": False}  # fmt: skip
    with pytest.raises(ConfigError, match="reads clip features"):
        load_recipe(["recipe=smoke_video", "data.augment.enabled=true"])


def test_evaluation_stays_deterministic_while_training_is_augmented(photo):
    cfg = load_recipe(["recipe=smoke", "data.augment.enabled=true"])
    tok = train_tokenizer(["a red square", "a blue circle"], vocab_size=64)
    student = stages.build_student(cfg, tok)
    plain, train_load = stages.visual_loader(cfg, student), stages.visual_loader(cfg, student, train=True)
    assert type(plain) is ImageLoader and isinstance(train_load, AugmentingImageLoader)
    torch.manual_seed(0)
    random.seed(0)
    first = plain(photo)
    torch.manual_seed(1)
    random.seed(1)
    assert torch.equal(first, plain(photo))
    assert torch.equal(first, ImageLoader(**student.data_config)(photo))
    # The training loader of the same model does draw: two reads differ, and neither is the evaluation view.
    a, b = train_load(photo), train_load(photo)
    assert a.shape == b.shape == first.shape
    assert not torch.equal(a, b) and not torch.equal(a, first)


def test_a_flipped_image_gets_its_caption_with_left_and_right_swapped(tmp_path):
    split = _split(tmp_path, CAPTIONS)
    tok = train_tokenizer([swap_left_right(c) for c in split.captions] + split.captions, vocab_size=64)
    # Crop = the whole (square) image, no jitter: the only randomness left is the flip.
    fixed = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0.0)
    mirror = PairDataset(split, AugmentingImageLoader(16, hflip=1.0, **fixed), tok, max_length=16)
    straight = PairDataset(split, AugmentingImageLoader(16, hflip=0.0, **fixed), tok, max_length=16)
    for i, caption in enumerate(split.captions):
        m, s = mirror[i], straight[i]
        torch.testing.assert_close(m["visual"], s["visual"].flip(-1))
        for sample, text in ((m, swap_left_right(caption)), (s, caption)):
            ids, mask = tok.encode([text], 16)
            n = int(mask.sum())
            assert sample["input_ids"][:n].tolist() == ids[0, :n].tolist(), text
            assert int(sample["attention_mask"].sum()) == n
    assert tok.decode(mirror[0]["input_ids"].tolist()).split()[:4] == ["a", "dog", "right", "of"]
    assert tok.decode(mirror[1]["input_ids"].tolist()) == tok.decode(straight[1]["input_ids"].tolist())  # no side


def test_augmentation_off_gives_todays_batches_bit_for_bit(tmp_path):
    split = _split(tmp_path, CAPTIONS)
    tok = train_tokenizer(split.captions, vocab_size=64)
    cfg = load_recipe(["recipe=shapes"])
    student = stages.build_student(cfg, tok)
    train_load = stages.visual_loader(cfg, student, train=True)
    assert type(train_load) is ImageLoader
    today = PairDataset(split, ImageLoader(cfg.data.image_size), tok, max_length=16)
    now = PairDataset(split, train_load, tok, max_length=16)
    batch_today, batch_now = collate([today[i] for i in range(3)]), collate([now[i] for i in range(3)])
    for key in ("pixels", "input_ids", "attention_mask", "item_index", "text_index"):
        assert torch.equal(batch_today[key], batch_now[key]), key
