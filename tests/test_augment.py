"""Augmented training copies: the right variants, seeded jitter, and a fit that records them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from detector.commands.fit import fit
from detector.data.augment import AugmentConfig, AugmentedImages


@pytest.fixture(scope="module")
def asymmetric() -> Image.Image:
    """An image whose every rotation and flip is different."""
    y, x = np.mgrid[0:32, 0:48]
    return Image.fromarray(np.stack([x * 5, y * 7, (x * y) % 255], -1).astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_geometric_copies_are_all_rotations_then_their_mirrors(asymmetric: Image.Image) -> None:
    config = AugmentConfig(rotations=(0, 90, 180, 270), hflip=True)
    copies = AugmentedImages([asymmetric], config)
    assert len(copies) == config.copies_per_image == 8
    assert np.array_equal(pixels(copies[0]), pixels(asymmetric))
    turned = asymmetric.transpose(Image.Transpose.ROTATE_90)
    assert np.array_equal(pixels(copies[1]), pixels(turned))
    mirrored = asymmetric.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.array_equal(pixels(copies[4]), pixels(mirrored))
    distinct = {pixels(copy).tobytes() for copy in copies}
    assert len(distinct) == 8


def test_jitter_is_seeded_and_bounded(asymmetric: Image.Image) -> None:
    config = AugmentConfig(brightness=0.1, seed=5)
    first = [pixels(image) for image in AugmentedImages([asymmetric] * 6, config)]
    again = [pixels(image) for image in AugmentedImages([asymmetric] * 6, config)]
    other = [
        pixels(image)
        for image in AugmentedImages([asymmetric] * 6, AugmentConfig(brightness=0.1, seed=6))
    ]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    ratios = [image.mean() / pixels(asymmetric).mean() for image in first]
    assert all(0.88 < ratio < 1.12 for ratio in ratios)
    assert len({round(ratio, 4) for ratio in ratios}) > 1


def test_default_is_off_and_bad_strength_is_refused() -> None:
    assert not AugmentConfig().enabled and AugmentConfig().copies_per_image == 1
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=1.5)


def test_fit_with_texture_augmentation_puts_eight_copies_in_the_bank(
    tmp_path: Path, tiny_backbone_dir: Path, synthetic_root: Path
) -> None:
    summaries = {}
    for option in ("none", "texture"):
        overrides = [
            "data=synthetic",
            f"data.root={synthetic_root}",
            "backbone=tiny_random",
            f"backbone.name={tiny_backbone_dir}",
            "backbone.resolution=128",
            f"augment={option}",
            f"model_dir={tmp_path / option}",
            "progress=false",
        ]
        with initialize_config_module("detector.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        fit(cfg, tmp_path / f"run-{option}")
        summaries[option] = json.loads(
            (tmp_path / f"run-{option}" / "fit_summary.json").read_text()
        )
        bank = json.loads((tmp_path / option / "bank.json").read_text())
        assert bank["augmentation"]["hflip"] is (option == "texture")
    plain, augmented = summaries["none"], summaries["texture"]
    assert augmented["augmented_copies_per_image"] == 8
    assert augmented["n_train_features"] == 8 * plain["n_train_features"]
    assert augmented["bank_size"] > plain["bank_size"]
