"""Per-model image loaders (issue 12 point 1): each model's mean / std / resampling come from its backbone.

A ViT student expects pixels normalised with mean / std 0.5, a ResNet teacher ImageNet's statistics; both read
the same files, each through its own `ImageLoader` (`stages.visual_loader(cfg, model)`), overridable in the recipe.
"""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fastslow import stages
from fastslow.config import load_recipe
from fastslow.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageLoader
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
