"""Thresholds that hold: the rules, cross-fitted calibration, and an operating point that
moves without a refit (a new bank version, with rollback)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.banks import changes, products, versions
from detector.banks.models import save_backbone, save_bank
from detector.data.mvtec import MVTecCategory
from detector.dino import DinoBackbone
from detector.errors import UserError
from detector.fitting import assign_folds, fit_detector
from detector.memory_bank import BankConfig, MemoryBank
from detector.serving.runner import ScoringRunner
from detector.serving.settings import Settings
from detector.thresholds import RULES, EmpiricalQuantile, Margin, NormalTail, ParetoTail


# ----- rules ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.01, 0.05])
def test_each_rule_lands_near_its_target_on_the_distribution_it_assumes(target: float) -> None:
    rng = np.random.default_rng(0)
    normal, exponential = rng.normal(1.0, 0.1, 20000), rng.exponential(0.1, 20000)
    fresh_normal, fresh_exponential = rng.normal(1.0, 0.1, 200000), rng.exponential(0.1, 200000)
    for rule, scores, fresh in [
        (EmpiricalQuantile(), normal, fresh_normal),
        (NormalTail(), normal, fresh_normal),
        (ParetoTail(), exponential, fresh_exponential),  # a Pareto tail of shape 0
    ]:
        rate = float(np.mean(fresh > rule.threshold(scores, target)))
        assert rate == pytest.approx(target, rel=0.15), rule.name
    assert Margin().threshold(normal, target) == pytest.approx(1.421 * np.quantile(normal, 0.95))


def test_a_pareto_tail_with_too_few_scores_falls_back_to_the_quantile() -> None:
    scores = np.linspace(0.0, 1.0, 20)
    assert ParetoTail().threshold(scores, 0.01) == EmpiricalQuantile().threshold(scores, 0.01)


@pytest.mark.parametrize("target", [0, 1, -0.1, 1.5, math.nan, math.inf])
def test_a_target_outside_zero_to_one_is_one_sentence(target: float) -> None:
    for rule in RULES.values():
        with pytest.raises(ValueError, match="between 0 and 1"):
            rule.threshold(np.linspace(0, 1, 50), target)


# ----- cross-fitted calibration -----------------------------------------------------------
def test_folds_keep_groups_together_and_need_enough_images() -> None:
    groups = [0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    folds = assign_folds(10, 3, groups, seed=0)
    for group in set(groups):
        assert len({folds[i] for i in range(10) if groups[i] == group}) == 1
    assert set(folds) == {0, 1, 2}
    with pytest.raises(ValueError, match="needs at least 5 distinct training images"):
        assign_folds(8, 5, [0, 0, 1, 1, 2, 2, 3, 3], seed=0)


def test_cross_fitted_scores_come_from_banks_without_their_own_image(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    """With every patch in the bank (coreset 100 %) a training image scores 0 against the
    final bank; its cross-fitted score is above 0, so its fold's bank did not hold it, and
    neither did it hold a duplicate of it in the same group."""
    train = list(synthetic_dataset.train_paths()[:9])
    duplicate = tmp_path / "duplicate.png"
    Image.open(train[0]).save(duplicate)
    images = [*train, duplicate]
    groups = [*range(len(train)), 0]  # the duplicate belongs with the image it copies
    detector = fit_detector(
        tiny_backbone,
        images,
        folds=3,
        groups=groups,
        bank_config=BankConfig(coreset_ratio=1.0, seed=0),
        progress=False,
    )
    calibration = detector.calibration
    assert calibration.source == "cross_fitted" and len(calibration.reference_scores) == 10
    assert len(calibration.reference_profiles) == 10
    assert min(calibration.reference_scores) > 1e-3
    assert calibration.reference_scores[-1] == pytest.approx(calibration.reference_scores[0])
    final = detector.predict(images, with_maps=False)
    assert max(result.score for result in final) < 1e-3, "the final bank holds every image"
    assert detector.bank.size >= 9 * (128 // 16) ** 2  # every patch kept
    assert detector.bank.metadata["calibration_folds"] == 3
    assert calibration.threshold == max(calibration.reference_scores)  # 10 < 1 / 0.01


# ----- moving the operating point -----------------------------------------------------------
@pytest.fixture(scope="module")
def operated(tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory, tmp_path_factory):
    train = synthetic_dataset.train_paths()
    detector = fit_detector(
        tiny_backbone,
        train[:16],
        folds=4,
        bank_config=BankConfig(coreset_ratio=0.25, seed=0),
        progress=False,
    )
    detector.bank.metadata.update(category="carpet", product="op-carpet")
    folder = detector.save(tmp_path_factory.mktemp("operated") / "op-carpet")
    backbone = save_backbone(tiny_backbone, "dino-backbone", with_graph=False)
    return save_bank(folder, backbone, product="op-carpet")


def version_names() -> list[str]:
    return [version["version"] for version in versions.history("op-carpet")]


def test_a_new_target_is_a_new_version_and_rollback_restores_the_old_verdicts(
    operated, tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    config = dataclasses.replace(Settings.from_env(), products=["op-carpet"], max_batch_size=8)
    runner = ScoringRunner(tiny_backbone, "dino-backbone:test", ["op-carpet"], config)
    uploads = [("op-carpet", s.path.read_bytes()) for s in synthetic_dataset.test_samples()]
    before = runner.score_uploads(uploads, with_maps=False)
    first = version_names()[-1]

    report = runner.set_threshold("op-carpet", {"target": 0.3, "reason": "too many alarms"})
    assert report["version"] == version_names()[-1] != first
    stored = products.live_model("op-carpet").info.metadata
    assert stored["change"]["action"] == "operating_point"
    assert stored["change"]["reason"] == "too many alarms" and stored["change"]["target"] == 0.3
    scores = MemoryBank.load(products.live_model("op-carpet").path).metadata["calibration"]
    expected = float(np.quantile(scores["reference_scores"], 0.7, method="higher"))
    assert report["threshold_after"] == pytest.approx(expected)
    assert report["threshold_after"] < report["threshold_before"]
    assert stored["calibration"]["expected_false_alarm_rate"] > 0.2
    moved = runner.score_uploads(uploads, with_maps=False)
    assert [a["score"] for a in moved] == [a["score"] for a in before], "same bank rows"
    assert sum(a["is_anomalous"] for a in moved) > sum(a["is_anomalous"] for a in before)

    unconfirmed = runner.set_threshold("op-carpet", {"threshold": 10.0})
    assert unconfirmed["status"] == 400 and "confirm" in unconfirmed["error"]
    explicit = runner.set_threshold("op-carpet", {"threshold": 10.0, "confirm": True})
    assert explicit["threshold_after"] == 10.0
    assert not any(a["is_anomalous"] for a in runner.score_uploads(uploads, with_maps=False))

    restored = runner.rollback("op-carpet", first, "back to the fitted point")
    again = runner.score_uploads(uploads, with_maps=False)
    assert restored["restored"] == first
    assert [(a["score"], a["threshold"], a["is_anomalous"]) for a in again] == [
        (a["score"], a["threshold"], a["is_anomalous"]) for a in before
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": 0}, "between 0 and 1"),
        ({"target": 1.2}, "between 0 and 1"),
        ({"target": math.nan}, "between 0 and 1"),
        ({"threshold": -0.5}, "finite number above 0"),
        ({"threshold": math.inf}, "finite number above 0"),
        ({"threshold": 0}, "finite number above 0"),
        ({"target": 0.1, "threshold": 1.0}, "not both"),
        ({}, "not both"),
        ({"threshold": True}, "must be a number; it is bool"),
        ({"target": "0.05"}, "must be a number; it is str"),
        ({"threshold": 1e308}, "far outside"),
        ({"threshold": 1e-300}, "far outside"),
    ],
)
def test_a_bad_operating_point_is_one_sentence_and_changes_nothing(
    operated, change: dict, message: str
) -> None:
    before = version_names()
    with pytest.raises(UserError, match=message):
        changes.set_operating_point("op-carpet", **change)
    assert version_names() == before


# ----- the session-shift set ------------------------------------------------------------------
def test_later_sessions_drift_and_the_training_session_stays_as_it_was(tmp_path: Path) -> None:
    from detector.data.synthetic import make_dataset

    plain = make_dataset(tmp_path / "a", size=64, n_train=16, n_test_good=16, n_per_defect=1)
    shifted = make_dataset(
        tmp_path / "b", size=64, n_train=16, n_test_good=16, n_per_defect=1, sessions=3,
        n_calibration=16,
    )  # fmt: skip
    for name in ("000.png", "001.png", "002.png"):  # session 0 is untouched
        assert (plain / "train/good" / name).read_bytes() == (
            shifted / "train/good" / name
        ).read_bytes()
    assert len(list((shifted / "calibration/good").glob("*.png"))) == 16
    assert not (plain / "calibration").exists()

    def brightness(folder: Path) -> float:
        return float(np.mean([np.asarray(Image.open(p)).mean() for p in folder.glob("*.png")]))

    train, calibration = (
        brightness(shifted / "train/good"),
        brightness(shifted / "calibration/good"),
    )
    test = brightness(shifted / "test/good")
    assert calibration > train and test / train > 1.02  # session 2: 4 % more light
    assert len(list((shifted / "test").iterdir())) == 6  # good + five defect kinds


# ----- suggesting a threshold from reviewed records ----------------------------------------------
def test_a_suggestion_uses_reviewed_and_unflagged_parts_and_leaves_open_alarms_out() -> None:
    from detector.records.suggest import suggest_threshold

    rng = np.random.default_rng(4)
    good = [
        {"score": s, "is_anomalous": s > 0.5, "review_label": None} for s in rng.uniform(0, 0.5, 95)
    ]
    shadows = [
        {"score": s, "is_anomalous": True, "review_label": "false_alarm"} for s in (0.55, 0.6, 0.62)
    ]
    defects = [
        {"score": s, "is_anomalous": True, "review_label": "confirmed_defect"} for s in (0.9, 1.2)
    ]
    open_alarms = [{"score": 2.0, "is_anomalous": True, "review_label": None}] * 4
    report = suggest_threshold([*good, *shadows, *defects, *open_alarms], current=0.5, target=0.01)
    assert report["defect_free_records"] == 98 and report["confirmed_defects"] == 2
    assert report["unreviewed_alarms_left_out"] == 4
    assert report["current"]["false_alarm_rate"] == pytest.approx(3 / 98, abs=1e-6)
    assert report["current"]["detection_rate"] == 1.0
    scores = [record["score"] for record in [*good, *shadows]]
    assert report["suggested"]["threshold"] == pytest.approx(
        np.quantile(scores, 0.99, method="higher")
    )
    assert (
        report["suggested"]["false_alarm_rate"] <= 0.01
        and report["suggested"]["detection_rate"] == 1.0
    )
    assert "defect-free records" in report["suggested"]["statement"]
    # Records come from whatever sessions the line ran: as the version it makes says.
    assert "its fit saw an unknown number of sessions" in report["suggested"]["statement"]
    # The trade-off's histograms: at every bin edge, the counts from that bin up are the
    # parts the service would flag there (a score equal to the threshold is not flagged).
    trade = report["trade_off"]
    edges = trade["edges"]
    at_edges = [*good, *shadows, {"score": edges[40], "is_anomalous": False, "review_label": None}]
    tied = suggest_threshold([*at_edges, *defects], current=0.5, target=0.01)["trade_off"]
    assert tied["edges"] == edges
    good_scores = np.array([r["score"] for r in at_edges])
    for index, edge in enumerate(edges[:-1]):
        assert sum(tied["defect_free"][index:]) == int((good_scores > edge).sum())
        assert sum(tied["defective"][index:]) == sum(s > edge for s in (0.9, 1.2))
    assert suggest_threshold([], 0.5, 0.01)["suggested"] is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        suggest_threshold(good, 0.5, 0.0)


def test_features_beyond_the_memory_budget_are_spilled_and_read_back_the_same() -> None:
    from detector.spill import Spill

    rng = np.random.default_rng(5)
    everything = rng.normal(size=(12, 4, 4, 8)).astype(np.float32)
    budget = everything.nbytes // 2
    with Spill(everything.shape, budget) as spilled, Spill((2, 4), budget) as small:
        assert isinstance(spilled.array, np.memmap) and not isinstance(small.array, np.memmap)
        spilled.array[:] = everything
        np.testing.assert_array_equal(spilled.take([0, 5, 11, 7]), everything[[0, 5, 7, 11]])
        blocks = list(spilled.blocks([1, 2, 9, 10, 11], 2))
        assert [block.shape[0] for block in blocks] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate(blocks), everything[[1, 2, 9, 10, 11]])
        handle = spilled._file
    assert handle is not None and handle.closed, "the spilled features go with the fit"
