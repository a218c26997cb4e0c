"""Every kind of bad or unusual image the service, batch job and reader may meet."""

import io

import numpy as np
import pytest
from PIL import Image

from detector.images import InvalidImageError, check_image_header, decode_image, read_image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def png_bytes() -> bytes:
    return encode(Image.new("RGB", (40, 30), (200, 100, 50)))


def test_plain_rgb_png_decodes(png_bytes: bytes) -> None:
    image = decode_image(png_bytes)
    assert image.mode == "RGB" and image.size == (40, 30)


@pytest.mark.parametrize(
    ("data", "reason", "status"),
    [
        (b"", "empty", 400),
        (b"this is plain text, not a picture", "not_an_image", 415),
    ],
)
def test_empty_and_non_image_uploads_are_refused(data: bytes, reason: str, status: int) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data)
    assert caught.value.reason == reason and caught.value.status == status


def test_truncated_png_is_corrupt(png_bytes: bytes) -> None:
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    with pytest.raises(InvalidImageError) as caught:
        decode_image(big[: len(big) // 2])
    assert caught.value.reason == "corrupt" and caught.value.status == 400


def test_byte_and_pixel_limits(png_bytes: bytes) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(png_bytes, max_bytes=10)
    assert caught.value.status == 413 and caught.value.reason == "too_large"
    with pytest.raises(InvalidImageError) as caught:
        decode_image(png_bytes, max_pixels=100)
    assert caught.value.status == 413 and caught.value.reason == "too_many_pixels"


def test_decompression_bomb_is_refused_without_decoding() -> None:
    bomb = encode(Image.new("L", (12000, 12000)))  # compresses to a few kB
    with pytest.raises(InvalidImageError) as caught:
        decode_image(bomb)
    assert caught.value.status == 413


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), (80 * i, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
def test_animated_or_multi_frame_images_are_refused(fmt: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(animated(fmt))
    assert caught.value.reason == "animated" and caught.value.status == 415


@pytest.mark.parametrize("fmt", ["GIF", "ICO", "PCX", "TGA", "SGI", "IM", "PPM", "QOI"])
def test_formats_outside_the_five_never_reach_a_decoder(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), (10, 200, 30)), fmt)
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data)
    assert caught.value.reason == "not_an_image" and caught.value.status == 415


def test_any_decoder_failure_is_a_corrupt_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TIFF without dimensions raised TypeError from Pillow: any decoder exception is the
    file's fault (400), never the server's (500)."""
    from PIL import TiffImagePlugin

    def broken(self):  # noqa: ANN001
        raise TypeError("'NoneType' object cannot be interpreted as an integer")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", broken)
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(InvalidImageError) as caught:
        decode_image(tiff)
    assert caught.value.reason == "corrupt" and caught.value.status == 400


def test_header_check_refuses_what_needs_no_decoding_and_leaves_pixels_to_decode() -> None:
    """The API's check (before the runner decodes): same reasons, but corrupt pixel data
    can only be found by decoding, so a truncated file passes it and fails decode_image."""
    bomb = encode(Image.new("L", (12000, 12000)))
    for data, reason in [
        (b"", "empty"),
        (b"not a picture", "not_an_image"),
        (bomb, "too_many_pixels"),
        (animated("WEBP"), "animated"),
    ]:
        with pytest.raises(InvalidImageError) as caught:
            check_image_header(data)
        assert caught.value.reason == reason
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    truncated = encode(Image.fromarray(noise))[:-400]
    check_image_header(truncated)
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(truncated)


def test_sixteen_bit_grayscale_keeps_its_range() -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = decode_image(encode(Image.fromarray(ramp)))
    array = np.asarray(image)
    assert image.mode == "RGB"
    assert array.min() == 0 and array.max() == 255
    assert 120 < array.mean() < 135  # a linear ramp, not clipped to white


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA"])
def test_other_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(encode(Image.new("RGB", (20, 20), (10, 120, 240)).convert(mode), fmt))
    assert image.mode == "RGB" and image.size == (20, 20)


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(rgba)))[0, 0].tolist() == [255, 255, 255]


def test_missing_file_is_an_invalid_image(tmp_path) -> None:
    with pytest.raises(InvalidImageError) as caught:
        read_image(tmp_path / "nope.png")
    assert caught.value.reason == "unreadable"


def test_greyscale_is_scaled_by_bit_depth_not_by_the_brightest_pixel() -> None:
    dim = np.full((16, 16), 30000, dtype=np.uint16)
    with_one_bright_pixel = dim.copy()
    with_one_bright_pixel[0, 0] = 65535
    for array in (dim, with_one_bright_pixel):
        decoded = np.asarray(decode_image(encode(Image.fromarray(array))))
        assert decoded[8, 8].tolist() == [117, 117, 117]  # 30000 / 65535 * 255
    # 32-bit integer (mode I): full scale is 2^32 - 1, whatever the values happen to be.
    low = np.full((8, 8), 200, np.int32)
    assert np.asarray(decode_image(encode(Image.fromarray(low), "TIFF"))).max() == 0


def test_exif_orientation_is_applied_when_decoding() -> None:
    image = Image.new("RGB", (64, 32), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 8, 8))  # a blue corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image(data)
    assert upright.size == (32, 64)
    assert np.asarray(upright)[2, 29, 2] > 150  # the blue corner is now top right


def test_files_are_checked_before_they_are_read(tmp_path) -> None:
    import os

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2000)
    with pytest.raises(InvalidImageError) as caught:
        read_image(big, max_bytes=1000)
    assert caught.value.reason == "too_large"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(InvalidImageError) as caught:
        read_image(fifo)
    assert caught.value.reason == "not_a_file"
