"""A flag explained by the nearest normal patch: each bank row knows its training image and
cell, its crop is that cell as the backbone saw it, and an explanation points at the
defect and at a real row (detector/provenance.py)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.anomaly_detector import AnomalyDetector, as_image
from detector.data.mvtec import MVTecCategory, load_mask, split_calibration
from detector.memory_bank import MemoryBank, l2_normalize
from detector.provenance import (
    ADDED_LATER,
    CROP_SIDE,
    CROPS_FILE,
    NOT_EXPLAINED,
    PROVENANCE_FILE,
    Provenance,
    cell_crop,
    input_pixels,
)


def decoded(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))) as picture:
        return np.asarray(picture.convert("RGB"))


def test_each_bank_row_names_its_image_and_cell_and_its_crop_is_that_cell(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory
) -> None:
    bank, extractor = fitted_detector.bank, fitted_detector.extractor
    provenance = bank.provenance
    assert provenance is not None and len(provenance.sources) == bank.size
    bank_paths, _ = split_calibration(synthetic_dataset.train_paths(), 0.25, 0)
    assert provenance.images == [f"{p.parent.name}/{p.name}" for p in bank_paths]
    assert len(provenance.crops) == bank.size  # a small bank: every row keeps its crop
    rows = bank.vectors()
    by_name = dict(zip(provenance.images, bank_paths, strict=True))
    for row in np.random.default_rng(0).choice(bank.size, 12, replace=False):
        image, cell_row, column = (int(v) for v in provenance.sources[row])
        prepared = extractor.prepare(as_image(by_name[provenance.images[image]]))
        features = extractor.embed(prepared[None])[0]
        # The row is that image's feature at that cell, and the crop is that cell.
        np.testing.assert_allclose(
            l2_normalize(features[cell_row, column])[0], rows[row], atol=1e-5
        )
        crop = cell_crop(input_pixels(prepared), (cell_row, column), provenance.grid)
        assert crop.shape == (CROP_SIDE, CROP_SIDE, 3)
        np.testing.assert_array_equal(provenance.crops[provenance.crop_of[row]], crop)


def test_a_defects_explanation_points_at_the_defect_and_at_a_real_normal_patch(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory
) -> None:
    defects = [s for s in synthetic_dataset.test_samples() if s.label == 1]
    provenance = fitted_detector.bank.provenance
    assert provenance is not None
    hits = 0
    for sample in defects:
        image = as_image(sample.path)
        prepared = fitted_detector.extractor.prepare(image)
        (result,) = fitted_detector.score_features(
            fitted_detector.extractor.embed(prepared[None]), [image.size], with_maps=False
        )
        said = fitted_detector.explain(result, prepared)
        assert said["available"] is True
        # k = 1: the flagged cell's distance is the largest patch distance of the image.
        distances = fitted_detector.bank.distances(fitted_detector.extractor.embed(prepared[None]))[
            0
        ]
        assert said["distance"] == pytest.approx(float(distances.max()), abs=1e-5)
        left, top, right, bottom = said["flagged"]["box"]
        assert 0 <= left < right <= image.width and 0 <= top < bottom <= image.height
        mask = load_mask(sample, image.size)
        hits += bool(mask is not None and mask[top:bottom, left:right].any())
        normal = said["nearest_normal"]
        row = normal["row"]
        assert normal["image"] == provenance.images[provenance.sources[row, 0]]
        assert normal["cell"] == provenance.sources[row, 1:].tolist()
        np.testing.assert_array_equal(
            decoded(normal["crop"]), provenance.crops[provenance.crop_of[row]]
        )
        assert decoded(said["flagged"]["crop"]).shape == (CROP_SIDE, CROP_SIDE, 3)
        assert said["reading"] in ("never seen", "seen, slightly different")
    # The flagged regions lie on the defects (a random-weight backbone: allow a miss).
    assert hits >= 0.8 * len(defects), f"{hits} of {len(defects)} boxes on the defect"


def test_provenance_survives_saving_extending_and_a_bank_without_it_says_why(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    saved = fitted_detector.save(tmp_path / "bank")
    loaded = AnomalyDetector.load(saved, fitted_detector.extractor)
    provenance = loaded.bank.provenance
    assert provenance is not None and provenance.images == fitted_detector.bank.provenance.images
    np.testing.assert_array_equal(provenance.crops, fitted_detector.bank.provenance.crops)

    # Rows a later change adds have no training image: said so, never a wrong one.
    noise = np.random.default_rng(1).normal(size=(50, loaded.bank.dim)).astype(np.float32)
    learned, added = loaded.learned(noise)
    assert added > 0 and learned.bank.provenance is not None
    assert (learned.bank.provenance.sources[-added:] == ADDED_LATER).all()
    assert loaded.bank.provenance is provenance  # the serving bank is untouched
    later = learned.bank.provenance.source(learned.bank.size - 1)
    assert later["image"] is None and "added after the fit" in later["why_no_crop"]
    # Rows from named images (a reviewed false alarm's record) name it and their cell.
    sample = next(s for s in synthetic_dataset.test_samples() if s.label == 1)
    grid = loaded.extractor.embed(loaded.extractor.prepare(as_image(sample.path))[None])
    named, added = loaded.learned(grid, ["record 18ecc5d3db"])
    rows = named.bank.vectors()[-added:]
    assert added > 0 and named.bank.provenance.images[-1] == "record 18ecc5d3db"
    for offset, row in enumerate(range(named.bank.size - added, named.bank.size)):
        said = named.bank.provenance.source(row)
        assert said["image"] == "record 18ecc5d3db" and said["crop"] is None
        np.testing.assert_allclose(
            l2_normalize(grid[0][tuple(said["cell"])])[0], rows[offset], atol=1e-5
        )
    saved_named = named.save(tmp_path / "named")
    assert Provenance.load(saved_named).source(named.bank.size - 1) == said

    # Beyond the budget, crops go to rows spread over the bank; the others still name
    # their source and say why they show no crop.
    plan = provenance.crop_plan(budget_bytes=10 * CROP_SIDE * CROP_SIDE * 3)
    assert len(plan) == 10 and plan[0] == 0 and plan[-1] == len(provenance.sources) - 1
    crop_of = np.full(len(provenance.sources), -1, np.int32)
    crop_of[plan] = np.arange(10)
    few = Provenance(
        provenance.images, provenance.sources, provenance.grid, provenance.crops[:10], crop_of
    )
    assert few.source(int(plan[3]))["crop"] is not None
    beyond = few.source(int(plan[3]) + 1)
    assert beyond["image"] is not None and beyond["crop"] is None
    assert "spread over the bank" in beyond["why_no_crop"]
    # The crops file is the same bytes for the same crops: versions share it.
    again = fitted_detector.save(tmp_path / "again")
    assert (again / CROPS_FILE).read_bytes() == (saved / CROPS_FILE).read_bytes()

    # A bank saved before provenance was kept: scored the same, explained with a why.
    (saved / PROVENANCE_FILE).unlink()
    old = AnomalyDetector.load(saved, fitted_detector.extractor)
    assert old.bank.provenance is None
    sample = next(s for s in synthetic_dataset.test_samples() if s.label == 1)
    prepared = old.extractor.prepare(as_image(sample.path))
    (result,) = old.predict_prepared(prepared[None], [as_image(sample.path).size], False)
    (before,) = fitted_detector.predict_prepared(prepared[None], [result.image_size], False)
    assert result.score == pytest.approx(before.score, abs=1e-6)
    assert old.explain(result, prepared) == {"available": False, "why": NOT_EXPLAINED}
    assert MemoryBank.load(saved).provenance is None


def test_a_cross_fitted_bank_knows_its_rows_sources_too(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory
) -> None:
    """The default fit (cross-fitted, features spilled once) keeps the same record."""
    from detector.fitting import fit_detector
    from detector.memory_bank import BankConfig

    paths = synthetic_dataset.train_paths()[:6]
    extractor = fitted_detector.extractor
    detector = fit_detector(
        extractor, paths, folds=2, bank_config=BankConfig(coreset_ratio=0.1), progress=False
    )
    provenance = detector.bank.provenance
    assert provenance is not None and len(provenance.sources) == detector.bank.size
    features = extractor.embed(np.stack([extractor.prepare(as_image(p)) for p in paths]))
    image, cell_row, column = provenance.sources.T
    np.testing.assert_allclose(
        l2_normalize(features[image, cell_row, column]), detector.bank.vectors(), atol=1e-5
    )


def test_an_explanation_is_given_to_reviewers_only(tmp_path: Path) -> None:
    """Crops of the training images and the names of records reveal the bank: refused to a
    line or load-test key, and to a caller without a key even where scoring is open to
    anyone, before the upload is read."""
    import asyncio

    from detector.serving.answers import Refusal
    from detector.serving.api import InspectionEndpoints
    from detector.serving.settings import Settings

    endpoints = InspectionEndpoints(None, Settings.from_env())
    missing = tmp_path / "never-read.png"  # the refusal comes before any read
    for who, role, status in ((None, None, 401), ("line3", "line", 403), ("bot", "loadtest", 403)):
        for call in (
            endpoints.inspect(missing, "", False, who=who, explain=True, role=role),
            endpoints.heatmap(missing, "", "overlay", False, who=who, explain=True, role=role),
        ):
            with pytest.raises(Refusal) as refused:
                asyncio.run(call)
            assert refused.value.status == status and "reviewer role" in str(refused.value)
