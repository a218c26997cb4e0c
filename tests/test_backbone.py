from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detector.commands.random_backbone import make_backbone
from detector.dino import DinoBackbone
from detector.extractor import BackboneUnavailableError


def test_patch_grid_drops_cls_and_register_tokens(tiny_backbone: DinoBackbone) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8))
    batch = np.stack([tiny_backbone.prepare(image)])
    assert batch.shape == (1, 3, 128, 128)
    features = tiny_backbone.embed(batch)
    grid = 128 // tiny_backbone.patch_size
    assert features.shape == (1, grid, grid, 48)
    assert tiny_backbone.num_prefix_tokens == 1 + 4  # CLS + 4 registers
    with torch.inference_mode():
        hidden = tiny_backbone.model(pixel_values=torch.from_numpy(batch)).last_hidden_state
    expected = hidden[:, 5:, :].reshape(1, grid, grid, 48).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_preprocessing_normalises_with_imagenet_statistics(tiny_backbone: DinoBackbone) -> None:
    prepared = tiny_backbone.prepare(Image.new("RGB", (50, 70), (124, 116, 104)))
    assert np.abs(prepared).max() < 0.01  # that colour is the ImageNet mean


def test_several_layers_are_concatenated(tiny_backbone_dir: Path) -> None:
    backbone = DinoBackbone(str(tiny_backbone_dir), layers=[1, -1], resolution=64, device="cpu")
    features = backbone.embed(np.zeros((2, 3, 64, 64), np.float32))
    assert features.shape == (2, 8, 8, 96)
    assert backbone.spec.feature_dim == 96 and backbone.spec.layers == (1, -1)
    with pytest.raises(ValueError, match="outside"):
        DinoBackbone(str(tiny_backbone_dir), layers=[5], device="cpu")


def test_resolution_is_rounded_down_to_the_patch_size(tiny_backbone_dir: Path) -> None:
    backbone = DinoBackbone(str(tiny_backbone_dir), resolution=100, device="cpu")
    assert backbone.resolution == 96


def test_dinov2_checkpoint_with_patch_14_loads_through_the_same_path(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    backbone = DinoBackbone(str(tmp_path / "dinov2"), resolution=112, device="cpu")
    assert backbone.patch_size == 14 and backbone.num_prefix_tokens == 1
    assert backbone.embed(np.zeros((1, 3, 112, 112), np.float32)).shape == (1, 8, 8, 32)


def test_fingerprint_tells_checkpoints_apart(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    same = DinoBackbone(str(tiny_backbone_dir), device="cpu").spec.fingerprint
    again = DinoBackbone(str(tiny_backbone_dir), device="cpu").spec.fingerprint
    other_dir = make_backbone(tmp_path / "other", "tiny", seed=1)
    other = DinoBackbone(str(other_dir), device="cpu").spec.fingerprint
    assert same == again != other


def test_random_weights_are_flagged(tiny_backbone: DinoBackbone) -> None:
    assert tiny_backbone.random_weights is True


def test_missing_hub_weights_give_one_clear_sentence() -> None:
    with pytest.raises(BackboneUnavailableError) as caught:
        DinoBackbone("facebook/dinov3-vits16-pretrain-lvd1689m")
    message = str(caught.value)
    assert "HF_TOKEN" in message and "local folder" in message
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_empty_local_folder_says_what_a_checkpoint_folder_needs(tmp_path: Path) -> None:
    with pytest.raises(BackboneUnavailableError, match="save_pretrained"):
        DinoBackbone(str(tmp_path))
