"""Tiles at native resolution: the layout, the stitched grid, a defect on a tile border, the
nudge for large untiled frames, and one score on every surface for a tiled product."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from batch.__main__ import main as batch_main
from batch.results import read_rows
from detector import extractor as extractor_module
from detector.anomaly_detector import AnomalyDetector
from detector.banks.models import load_pair
from detector.data.synthetic import carpet_texture
from detector.dino import DinoBackbone
from detector.extractor import BackboneSpec, preprocess
from detector.fitting import fit_detector
from detector.memory_bank import BankConfig
from detector.tiling import TiledExtractor, Tiling, TilingError, layout
from devtools.http_client import http_client
from devtools.in_process import bentoml_home, run_detector, run_main
from devtools.local_server import CHROMIUM, bentoml_serve, page_with_key, wait_for

FRAME = 384  # px: three tiny-backbone inputs (128 px) across, tiled at native scale
TILE = 128
SEAM_PX = 112  # where the first tile's cells end and the second's begin (nearest centre)
LINE_KEY, ADMIN_KEY = "tiling-line-key-0123456789", "tiling-admin-key-0123456789"
LINE, ADMIN = {"X-API-Key": LINE_KEY}, {"X-API-Key": ADMIN_KEY}


def frame(seed: int, blot: tuple[int, int] | None = None) -> Image.Image:
    """A carpet frame; `blot`: a dark 24-px square centred there (x, y)."""
    pixels = carpet_texture(FRAME, np.random.default_rng(seed)) * 255
    if blot is not None:
        x, y = blot
        pixels[y - 12 : y + 12, x - 12 : x + 12] = 20
    return Image.fromarray(pixels.astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class PatchMeans:
    """A feature extractor of plain arrays: each 16-px patch's mean colour. It sees nothing
    outside its patch, so a tiled frame's grid must equal the whole frame's."""

    spec = BackboneSpec("patch-means", (-1,), resolution=128, patch_size=16, feature_dim=3)
    random_weights = False
    device = None

    def prepare(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, 128)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        b, channels, height, width = batch.shape
        cells = batch.reshape(b, channels, height // 16, 16, width // 16, 16).mean(axis=(3, 5))
        return cells.transpose(0, 2, 3, 1)


def test_the_tiles_cover_the_frame_on_the_patch_grid_and_settings_are_checked() -> None:
    grid_layout = layout(Tiling(True, TILE, 0.25, 1.0, (1000, 700)), PatchMeans.spec)
    assert grid_layout.cells == 8 and grid_layout.grid == (44, 62)  # 700 / 16, 1000 / 16
    for origins, total in (
        (grid_layout.row_origins, 44),
        (grid_layout.column_origins, 62),
    ):
        assert origins[0] == 0 and origins[-1] + 8 == total  # the last tile is flush
        assert max(np.diff(origins)) <= 6  # 25 % of 8 cells overlap: a stride of 6
    square = layout(Tiling(True, TILE, 0.25, 1.0, (FRAME, FRAME)), PatchMeans.spec)
    assert square.column_origins == (0, 6, 12, 16)  # cell 6 is tile 0's, cell 7 tile 1's
    half = layout(Tiling(True, TILE, 0.25, 0.5, (1000, 700)), PatchMeans.spec)
    assert half.grid == (22, 31)
    for bad in ({"overlap": 0.95}, {"tile": 8}, {"scale": 0.0}):
        with pytest.raises(TilingError, match=f"tiling.{next(iter(bad))}"):
            Tiling(True, **bad)


def test_the_stitched_grid_is_the_whole_frames_patch_grid() -> None:
    image = frame(3).resize((400, 272))  # 25 x 17 cells: tiles overlap unevenly at the end
    tiled = TiledExtractor(PatchMeans(), Tiling(True, TILE, 0.25, 1.0, image.size))
    (grid,) = tiled.embed(np.stack([tiled.prepare(image)]))
    # The whole frame normalised as `preprocess` normalises each tile.
    whole = np.asarray(image, np.float32).transpose(2, 0, 1)
    whole = whole * extractor_module._PIXEL_SCALE + extractor_module._PIXEL_OFFSET
    expected = PatchMeans().embed(whole[None])[0]
    assert grid.shape == expected.shape == (17, 25, 3)
    np.testing.assert_allclose(grid, expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiled_detector(tiny_backbone: DinoBackbone) -> AnomalyDetector:
    """A tiny-backbone product fitted on 384-px carpet frames in 128-px tiles at native scale."""
    tiling = Tiling(True, TILE, 0.25, 1.0).for_frame((FRAME, FRAME))
    detector = fit_detector(
        TiledExtractor(tiny_backbone, tiling),
        [frame(seed) for seed in range(6)],
        bank_config=BankConfig(coreset_ratio=0.25, seed=0),
        progress=False,
    )
    detector.bank.metadata["category"] = "carpet"
    return detector


def test_a_defect_across_a_tile_border_is_found_once_and_the_map_is_continuous_there(
    tiled_detector: AnomalyDetector,
) -> None:
    (clean,) = tiled_detector.predict([frame(100)])
    (flagged,) = tiled_detector.predict([frame(100, blot=(SEAM_PX, 200))])
    assert not clean.is_anomalous and flagged.is_anomalous
    hot = flagged.anomaly_map > (flagged.anomaly_map.max() + clean.anomaly_map.max()) / 2
    labels, regions = ndimage.label(hot)
    assert regions == 1  # one region, not one per tile
    columns = np.flatnonzero(hot.any(axis=0))
    assert columns.min() < SEAM_PX <= columns.max()
    # No step at the seams (tiles at 0, 96, 192 and 256 px; the tiny backbone's cells are
    # 8 px): the map changes there no more than it does within a tile, along either axis.
    seams = np.array([SEAM_PX, 208, 288]) - 1
    for axis in (0, 1):
        steps = np.abs(np.diff(clean.anomaly_map, axis=1 - axis)).max(axis=axis)
        assert steps[seams].max() <= np.delete(steps, seams).max()


def test_a_tiled_flag_is_explained_with_its_tile_and_a_crop_at_native_scale(
    tiled_detector: AnomalyDetector,
) -> None:
    """The frame's cell, the tile that holds its feature, and the nearest normal patch of a
    named training frame: provenance on the stitched grid."""
    image = frame(100, blot=(SEAM_PX, 200))
    prepared = tiled_detector.extractor.prepare(image)
    (result,) = tiled_detector.predict_prepared(prepared[None], [image.size], False)
    said = tiled_detector.explain(result, prepared)
    assert said["available"] is True
    left, top, right, bottom = said["flagged"]["box"]
    assert left < SEAM_PX + 20 and right > SEAM_PX - 20 and top < 220 and bottom > 180  # the blot
    layout = tiled_detector.extractor.layout
    for part in (said["flagged"], said["nearest_normal"]):
        row, column = divmod(part["tile"], len(layout.column_origins))
        cell = part["cell"]
        assert layout.row_origins[row] <= cell[0] < layout.row_origins[row] + layout.cells
        assert (
            layout.column_origins[column] <= cell[1] < layout.column_origins[column] + layout.cells
        )
    provenance = tiled_detector.bank.provenance
    assert provenance.grid == layout.grid and said["nearest_normal"]["image"].startswith("training")


def test_a_large_untiled_frame_gets_one_nudge_towards_tiling(
    fitted_detector: AnomalyDetector, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    monkeypatch.setattr(extractor_module, "_NUDGED", False)
    with caplog.at_level(logging.WARNING, logger="detector.extractor"):
        fitted_detector.predict([frame(1).resize((200, 200))], with_maps=False)  # < 2 x 128
        assert not caplog.records
        fitted_detector.predict([frame(1), frame(2)], with_maps=False)
    (nudge,) = caplog.records
    assert "384 x 384 px are resized to 128 px" in nudge.message
    assert "tiling.enabled=true" in nudge.message


def test_a_tiled_masked_product_scores_the_same_served_in_batch_predict_and_replay(
    tiled_detector: AnomalyDetector, tmp_path: Path
) -> None:
    """One server: the mask set over HTTP by an admin (not by the line), the scores of the
    tiled, masked version on every surface, the page's mask view, and replay of every
    decision, before and after the mask."""
    home = tmp_path / "home"
    exported = run_detector(home, "export", str(tiled_detector.save(tmp_path / "model")))
    assert exported.returncode == 0, exported.stderr[-3000:]
    stored = json.loads((next((home / "models" / "bank-carpet").glob("v*/bank.json"))).read_text())
    assert stored["tiling"]["frame"] == [FRAME, FRAME] and stored["tiling"]["tile"] == TILE
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [
        frame(200),
        frame(201, blot=(SEAM_PX, 100)),
        frame(202).resize((500, 420)),
        frame(203, blot=(320, 200)),  # in the third the mask ignores
    ]
    for number, image in enumerate(frames):
        image.save(folder / f"{number}.png")
    paths = sorted(folder.glob("*.png"))
    mask = np.full((FRAME, FRAME), 255, np.uint8)
    mask[:, 256:] = 0  # the right third of every frame: a fixture
    records = tmp_path / "records"
    settings = {"INSPECT_RECORDS_DIR": str(records), "INSPECT_KEEP_IMAGES": "all"}
    keys = f"cam1=line:{LINE_KEY},boss=admin:{ADMIN_KEY}"
    with bentoml_serve(home, tmp_path / "serve.log", INSPECT_API_KEYS=keys, **settings) as url:
        assert inspect(url, paths[3])["is_anomalous"] is True  # before the mask
        put = f"{url}/products/carpet/mask"
        files = {"mask": ("mask.png", png(Image.fromarray(mask)), "image/png")}
        refused = http_client.put(put, files=files, headers=LINE, timeout=60)
        assert refused.status_code == 403, refused.text
        bad = {"mask": ("mask.png", b"not an image", "image/png")}
        not_image = http_client.put(put, files=bad, headers=ADMIN, timeout=60)
        assert not_image.status_code == 415 and "image" in not_image.json()["error"]
        changed = http_client.put(put, files=files, data={"reason": "fixture"}, headers=ADMIN)
        assert changed.status_code == 200, changed.text
        with bentoml_home(home):  # `predict` on the live (tiled, masked) version
            expected = load_pair(product="carpet", device="cpu").detector.predict(paths, False)
        assert [r.is_anomalous for r in expected] == [False, True, False, False]
        for path, want in zip(paths, expected, strict=True):
            got = inspect(url, path)
            assert got["score"] == pytest.approx(want.score, abs=1e-5), path.name
            assert got["is_anomalous"] == want.is_anomalous
        wide = {"image": (paths[2].name, paths[2].read_bytes(), "image/png")}
        heatmap = http_client.post(
            f"{url}/heatmap", files=wide, data={"output": "npy"}, headers=LINE, timeout=60
        )
        heat = np.load(io.BytesIO(heatmap.content))
        assert heat.shape == (420, 500)  # the frame's own size, though it was tiled at 384
        assert heat[:, 420:].max() < 1e-3 * heat.max()  # the ignored third reads 0 (blur aside)
        (listed,) = http_client.get(f"{url}/products", headers=LINE, timeout=30).json()
        assert listed["tiling"]["tile"] == TILE  # the version says how it inspects
        batch = run_main(batch_main, home, str(folder), "--out", str(tmp_path / "out"))
        assert batch.returncode == 0, batch.stderr[-3000:]
        rows = {row["path"]: row["score"] for row in read_rows(tmp_path / "out" / "results.jsonl")}
        for path, want in zip(paths, expected, strict=True):
            assert rows[path.name] == pytest.approx(want.score, abs=1e-5), path.name
        page_says = marked_on_the_page(url, paths[0], tmp_path)
        cleared = http_client.delete(put, params={"reason": "moved"}, headers=ADMIN, timeout=60)
        assert cleared.status_code == 200 and cleared.json()["inspected_share_after"] == 1.0
    if page_says is not None:
        assert page_says["line"].startswith("Not saved: ") and "admin" in page_says["line"]
        assert (
            page_says["admin"].startswith("carpet v")
            and "is live, inspecting" in page_says["admin"]
        )
    replayed = run_detector(home, "replay", "--out", str(tmp_path / "replay.json"), **settings)
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    report = json.loads((tmp_path / "replay.json").read_text())
    # Six inspections recorded (one before the mask, the heatmap too), each decided again
    # the same way by the version that decided it.
    assert report["checked"] == 6 and report["same"] == 6 and report["other_settings"] == 0


def inspect(url: str, path: Path) -> dict:
    files = {"image": (path.name, path.read_bytes(), "image/png")}
    answer = http_client.post(f"{url}/inspect", files=files, headers=LINE, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def marked_on_the_page(url: str, example: Path, screenshots: Path) -> dict[str, str] | None:
    """What the page's mask view says after one rectangle is dragged over the left 40 % of
    `example` and saved, with the line's key and then an admin's (None without Chromium)."""
    if CHROMIUM is None:
        return None
    said = {}
    for role, key in (("line", LINE_KEY), ("admin", ADMIN_KEY)):
        with page_with_key(f"{url}/ui/#new", key) as page:
            wait_for(page, "document.getElementById('product').value === 'carpet'")
            page.set_input_files("#mask-example", str(example))
            wait_for(page, f"document.getElementById('mask-canvas').width === {FRAME}")
            canvas = page.locator("#mask-canvas")
            canvas.scroll_into_view_if_needed()  # the mouse acts where the page shows it
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + 1, box["y"] + 1)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] - 1, steps=4)
            page.mouse.up()
            wait_for(
                page, "document.getElementById('mask-status').textContent.includes('1 region')"
            )
            page.click("#mask-save")
            status = "/is live|Not saved/.test(document.getElementById('mask-status').textContent)"
            wait_for(page, status)
            page.screenshot(path=str(screenshots / f"mask-page-{role}.png"))
            said[role] = page.inner_text("#mask-status")
    return said


def test_fit_and_evaluate_commands_tile_when_the_config_says_so(
    tmp_path: Path, tiny_backbone_dir: Path
) -> None:
    common = [
        "data=synthetic",
        f"data.root={tmp_path / 'data'}",
        "data.generate.size=192",
        "data.generate.n_train=8",
        "data.generate.n_test_good=2",
        "data.generate.n_per_defect=1",
        "backbone=tiny_random",
        f"backbone.name={tiny_backbone_dir}",
        "backbone.resolution=96",
        f"model_dir={tmp_path / 'model'}",
        "progress=false",
        "tiling.enabled=true",
        "tiling.tile=96",
    ]
    fit = run_detector(tmp_path, "fit", *common, f"hydra.run.dir={tmp_path / 'fit'}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    summary = json.loads((tmp_path / "fit" / "fit_summary.json").read_text())
    assert summary["tiling"] == {
        "enabled": True, "tile": 96, "overlap": 0.25, "scale": 1.0, "frame": [192, 192]
    }  # fmt: skip
    # 192 px in 96-px tiles of 12 x 12 patches (8 px): one 24 x 24 grid per frame, each
    # patch once however many tiles cover it.
    assert summary["n_train_features"] == 8 * 24 * 24
    evaluate = run_detector(tmp_path, "evaluate", *common, f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 2 + 5 and 0.0 <= metrics["pixel_auroc"] <= 1.0


def test_the_high_resolution_set_has_small_defects_with_masks_in_the_mvtec_layout(
    tmp_path: Path,
) -> None:
    from detector.data.highres import make_highres_dataset
    from detector.data.mvtec import MVTecCategory

    root = make_highres_dataset(tmp_path, size=512, n_train=2, n_test_good=1, n_per_defect=3)
    data = MVTecCategory(root.parent, root.name)
    assert len(data.train_paths()) == 2
    defective = [s for s in data.test_samples() if s.label == 1]
    assert sorted({s.defect_type for s in defective}) == ["scratch", "spot"]
    for sample in defective:
        with Image.open(sample.path) as image:
            assert image.size == (512, 512)
        ys, xs = np.nonzero(np.asarray(Image.open(sample.mask_path)) > 127)
        assert 4 <= max(np.ptp(xs), np.ptp(ys)) + 1 <= 22  # 6-20 px: small at any input size


class Zeros:
    """A stand-in ViT-S/16 at 448 px that returns zero features at once: what a tiled
    frame holds besides the backbone's own memory."""

    spec = BackboneSpec("zeros", (-1,), resolution=448, patch_size=16, feature_dim=384)
    random_weights = True
    device = None

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch), 28, 28, 384), np.float32)


def test_a_20_mp_frame_holds_its_grid_and_one_batch_of_tiles_not_every_tile() -> None:
    import tracemalloc

    size = (5472, 3648)  # 20 MP
    tiled = TiledExtractor(Zeros(), Tiling(True, 448, 0.25, 1.0, size))
    frame_pixels = np.zeros((size[1], size[0], 3), np.uint8)
    grid_bytes = tiled.layout.grid[0] * tiled.layout.grid[1] * 384 * 4
    every_tile = tiled.layout.tiles * (3 * 448 * 448 + 28 * 28 * 384) * 4
    tracemalloc.start()
    try:
        (grid,) = tiled.embed(frame_pixels[None])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grid.shape == (228, 342, 384) and tiled.layout.tiles == 11 * 16
    # The grid (120 MB) and one batch of 8 tiles; every tile's input and features at once
    # would be about 640 MB more.
    assert peak < grid_bytes + 64 * 2**20 < every_tile


def test_the_labelled_variant_prints_a_different_label_on_every_frame_and_masks_it(
    tmp_path: Path,
) -> None:
    from detector.data.highres import MASK_FILE, label_box, make_highres_dataset
    from detector.masks import mask_grid

    root = make_highres_dataset(tmp_path, size=512, n_train=2, n_test_good=1, n_per_defect=1,
                                labelled=True)  # fmt: skip
    left, top, right, bottom = label_box(512)
    labels = [
        np.asarray(Image.open(path))[top:bottom, left:right].astype(int)
        for path in sorted((root / "train" / "good").glob("*.png"))
    ]
    assert np.abs(labels[0] - labels[1]).max() > 100  # other marks on each frame
    with Image.open(root / MASK_FILE) as mask:
        ignored = ~mask_grid(mask, (32, 32))  # 16-px cells of the 512-px frame
    assert ignored[top // 16 + 1 : bottom // 16, left // 16 + 1 : right // 16].all()
    assert 0.02 < ignored.mean() < 0.05  # the label and its margin, nothing else
