"""Each simulated shift changes an image the way its name says, and is reproducible by seed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import laplace

from detector.data.shifts import SHIFTS, apply_shift
from detector.data.synthetic import carpet_texture


@pytest.fixture(scope="module")
def carpet() -> Image.Image:
    texture = carpet_texture(128, np.random.default_rng(3))
    return Image.fromarray((texture * 255).round().astype(np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def sharpness(image: Image.Image) -> float:
    return float(laplace(pixels(image.convert("L"))).var())


def test_brightness_moves_the_mean(carpet: Image.Image) -> None:
    brighter = apply_shift(carpet, "brightness", 1.3)
    darker = apply_shift(carpet, "brightness", 0.7)
    assert pixels(brighter).mean() > pixels(carpet).mean() * 1.2
    assert pixels(darker).mean() < pixels(carpet).mean() * 0.75


def test_contrast_changes_the_spread_not_the_mean(carpet: Image.Image) -> None:
    flat = apply_shift(carpet, "contrast", 0.5)
    grey = pixels(carpet.convert("L"))
    flat_grey = pixels(flat.convert("L"))
    assert flat_grey.std() == pytest.approx(0.5 * grey.std(), rel=0.1)
    assert flat_grey.mean() == pytest.approx(grey.mean(), abs=3)


def test_blur_removes_fine_detail_more_at_higher_severity(carpet: Image.Image) -> None:
    mild, strong = apply_shift(carpet, "blur", 1.0), apply_shift(carpet, "blur", 3.0)
    assert sharpness(strong) < sharpness(mild) < 0.8 * sharpness(carpet)


def test_noise_is_seeded_and_has_the_asked_spread(carpet: Image.Image) -> None:
    first = apply_shift(carpet, "noise", 10.0, seed=1)
    assert np.array_equal(pixels(first), pixels(apply_shift(carpet, "noise", 10.0, seed=1)))
    assert not np.array_equal(pixels(first), pixels(apply_shift(carpet, "noise", 10.0, seed=2)))
    difference = pixels(first) - pixels(carpet)
    assert difference.std() == pytest.approx(10.0, rel=0.15)


def test_jpeg_loses_more_at_lower_quality(carpet: Image.Image) -> None:
    def error(quality: float) -> float:
        return float(np.abs(pixels(apply_shift(carpet, "jpeg", quality)) - pixels(carpet)).mean())

    assert 0 < error(90) < error(30) < error(5)


def test_rotation_by_90_degrees_matches_a_transpose_and_keeps_the_frame(
    carpet: Image.Image,
) -> None:
    turned = apply_shift(carpet, "rotation", 90)
    assert turned.size == carpet.size
    expected = pixels(carpet.transpose(Image.Transpose.ROTATE_90))
    assert np.abs(pixels(turned) - expected).mean() < 2.0


def test_small_rotation_keeps_the_centre_and_fills_corners_by_reflection(
    carpet: Image.Image,
) -> None:
    turned = pixels(apply_shift(carpet, "rotation", 10))
    assert np.abs(turned[60:68, 60:68] - pixels(carpet)[60:68, 60:68]).mean() < 20
    assert turned[:4, :4].mean() > 30  # no black corner


def test_scale_zooms_into_the_centre(carpet: Image.Image) -> None:
    zoomed = apply_shift(carpet, "scale", 2.0)
    centre = carpet.crop((32, 32, 96, 96)).resize(carpet.size, Image.Resampling.BILINEAR)
    assert zoomed.size == carpet.size
    assert np.abs(pixels(zoomed) - pixels(centre)).mean() < 3.0


def test_color_cast_warms_the_image(carpet: Image.Image) -> None:
    warm = pixels(apply_shift(carpet, "color_cast", 0.1))
    original = pixels(carpet)
    assert warm[..., 0].mean() == pytest.approx(1.1 * original[..., 0].mean(), rel=0.02)
    assert warm[..., 2].mean() == pytest.approx(0.9 * original[..., 2].mean(), rel=0.02)
    assert warm[..., 1].mean() == pytest.approx(original[..., 1].mean(), abs=0.5)


def test_camera_shift_translates_the_frame(carpet: Image.Image) -> None:
    moved = pixels(apply_shift(carpet, "camera_shift", 0.125))  # 16 px on 128
    assert np.array_equal(moved[: 128 - 16, : 128 - 16], pixels(carpet)[16:, 16:])


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_every_shift_changes_the_image_and_is_reproducible(carpet: Image.Image, name: str) -> None:
    parameter = {"jpeg": 30, "rotation": 10, "scale": 1.2, "brightness": 1.2}.get(name, 0.1)
    parameter = {"blur": 2.0, "noise": 8.0, "contrast": 0.7}.get(name, parameter)
    shifted = apply_shift(carpet, name, parameter, seed=4)
    assert shifted.size == carpet.size and shifted.mode == "RGB"
    assert not np.array_equal(pixels(shifted), pixels(carpet))
    assert np.array_equal(pixels(shifted), pixels(apply_shift(carpet, name, parameter, seed=4)))


def test_unknown_shift_is_refused_with_the_choices(carpet: Image.Image) -> None:
    with pytest.raises(ValueError, match="brightness"):
        apply_shift(carpet, "fog", 1.0)
