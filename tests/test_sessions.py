"""Capture sessions in the training data: leave-one-session-out calibration, the promise's
session caveat, and how many images a target needs."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from scipy.stats import beta

from detector.anomaly_detector import AnomalyDetector, iter_features
from detector.banks import changes, products
from detector.banks.models import save_backbone, save_bank
from detector.banks.versions import file_sha256
from detector.commands.banks import add_images_main
from detector.data.mvtec import MVTecCategory
from detector.dino import DinoBackbone
from detector.errors import UserError
from detector.fitting import fit_detector
from detector.memory_bank import BankConfig, MemoryBank
from detector.scoring import Calibration, images_needed, make_result
from detector.sessions import SessionError, with_later_session
from devtools.in_process import bentoml_home, run_detector, run_main


def test_images_needed_is_the_smallest_count_whose_bound_reaches_the_target() -> None:
    for target in (0.01, 0.05, 0.002):
        needed = images_needed(target)
        assert beta.ppf(0.95, 1, needed) <= target < beta.ppf(0.95, 1, needed - 1)
    assert images_needed(0.01) == 299


def sessions_of_brightness(train: list[Path], root: Path) -> dict[str, list[Path]]:
    """Two capture sessions of the same parts: as captured, and under brighter lamps."""
    sessions = {"monday": root / "monday", "tuesday": root / "tuesday"}
    for folder in sessions.values():
        folder.mkdir(parents=True)
    for path in train:
        shutil.copy(path, sessions["monday"] / path.name)
        with Image.open(path) as image:
            brighter = ImageEnhance.Brightness(image.convert("RGB")).enhance(1.25)
            brighter.save(sessions["tuesday"] / path.name)
    return {name: sorted(folder.iterdir()) for name, folder in sessions.items()}


def test_each_session_is_scored_by_a_bank_of_the_others(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    captured = sessions_of_brightness(synthetic_dataset.train_paths()[:6], tmp_path)
    images = captured["monday"] + captured["tuesday"]
    config = BankConfig(coreset_ratio=0.5, seed=0)
    detector = fit_detector(
        tiny_backbone,
        images,
        sessions=["monday"] * 6 + ["tuesday"] * 6,
        bank_config=config,
        progress=False,
    )
    calibration = detector.calibration
    assert calibration.source == "leave_one_session_out" and calibration.sessions == 2
    assert detector.bank.metadata["calibration_folds"] == 2
    # Monday's scores are what a bank of Tuesday's images alone gives them.
    tuesday_only = fit_detector(
        tiny_backbone,
        captured["tuesday"],
        captured["monday"],
        calibration_source="session",
        bank_config=config,
        progress=False,
    )
    np.testing.assert_allclose(
        calibration.reference_scores[:6], tuesday_only.calibration.reference_scores, rtol=1e-5
    )
    assert tuesday_only.calibration.sessions == 2  # a calibration folder is a session too
    estimate = calibration.estimate()
    assert (
        "each scored by a bank that had not seen its session (2 sessions in all)"
        in (estimate["statement"])
    )
    assert "one capture session" not in estimate["statement"]
    assert estimate["images_needed"] == 299 and estimate["sessions_needed"] == 2
    assert "this product has 12, and its fit saw 2 sessions" in estimate["statement"]


def test_one_session_says_what_its_promise_holds_for_and_what_more_it_needs(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    detector = fit_detector(
        tiny_backbone,
        synthetic_dataset.train_paths()[:10],
        folds=3,
        sessions=["line"] * 10,  # one named session: random folds, as without sessions
        bank_config=BankConfig(coreset_ratio=0.5, seed=0),
        progress=False,
    )
    calibration = detector.calibration
    assert calibration.source == "cross_fitted" and calibration.sessions == 1
    statement = calibration.estimate()["statement"]
    assert "parts like the training images (one capture session)" in statement
    assert "a second session's images" in statement
    assert "about 299 defect-free images" in statement
    assert "this product has 10, and its fit saw 1 session." in statement
    # A target ten images can show says nothing of more images.
    relaxed = Calibration(1.0, 0.5, [0.1] * 10, source="cross_fitted")
    assert "defect-free images with none above" not in relaxed.estimate()["statement"]


def test_more_sessions_than_folds_share_folds_whole(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    """Six daily sessions, three folds: six fold banks would cost six coresets; whole
    sessions share a fold instead, and every image is still scored without its session."""
    train = synthetic_dataset.train_paths()[:12]
    days = [f"day{index // 2}" for index in range(12)]
    detector = fit_detector(
        tiny_backbone,
        train,
        folds=3,
        sessions=days,
        bank_config=BankConfig(coreset_ratio=1.0, seed=0),
        progress=False,
    )
    assert detector.bank.metadata["calibration_folds"] == 3
    assert detector.calibration.source == "leave_one_session_out"
    assert detector.calibration.sessions == 6
    # With every patch kept, an image its own fold's bank held would score 0.
    assert min(detector.calibration.reference_scores) > 1e-3


def test_random_held_out_images_of_several_sessions_keep_the_caveat(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    train = synthetic_dataset.train_paths()
    detector = fit_detector(
        tiny_backbone,
        train[:8],
        train[8:10],  # held out at random, as calibration_folds=0 does
        sessions=["a"] * 4 + ["b"] * 4,
        bank_config=BankConfig(coreset_ratio=0.5, seed=0),
        progress=False,
    )
    estimate = detector.calibration.estimate()
    assert estimate["across_sessions"] is False and estimate["sessions"] == 2
    assert "held out at random from their 2 sessions" in estimate["statement"]


def test_moving_the_operating_point_keeps_the_sessions_and_a_suggestion_says_unknown() -> None:
    from dataclasses import replace

    from detector.banks.changes import _at_target, _from_reviews

    scores = list(np.linspace(0.1, 0.5, 40))
    before = Calibration(0.5, 0.01, scores, source="leave_one_session_out", sessions=3)
    moved = _at_target(None, before, 0.05)  # type: ignore[arg-type]
    assert moved.sessions == 3 and moved.source == "leave_one_session_out"
    assert "has 40, and its fit saw 3 sessions" in moved.estimate()["statement"]
    reviewed = {"threshold": 0.4, "target": 0.05, "scores": scores}
    applied = _from_reviews(replace(before, sessions=1), reviewed)
    assert applied.sessions is None  # the line's own records (test_thresholds: suggestion)


@pytest.mark.parametrize(
    ("source", "sessions"), [("held_out", 1), ("session", 2), ("reviewed_records", None)]
)
def test_a_calibration_saved_before_sessions_were_counted_gets_them_from_its_source(
    source: str, sessions: int | None
) -> None:
    stored = {"threshold": 1.0, "false_alarm_rate": 0.01, "source": source}
    assert Calibration.from_dict(stored).sessions == sessions
    assert Calibration.from_dict({**stored, "sessions": 3}).sessions == 3


def layout(root: Path, train: list[Path]) -> MVTecCategory:
    """An MVTec category whose training images are in two session subfolders."""
    good = root / "carpet" / "train" / "good"
    for index, path in enumerate(train):
        session = good / ("day" if index % 2 else "night")
        session.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, session / path.name)
    return MVTecCategory(root, "carpet")


def test_session_subfolders_and_a_manifest_name_the_sessions(
    synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    train = synthetic_dataset.train_paths()[:4]
    dataset = layout(tmp_path / "data", train)
    good = dataset.folder / "train" / "good"
    shutil.copy(train[0], good / "loose.png")  # directly in good/: a session of its own
    (good / ".thumbnails").mkdir()
    shutil.copy(train[1], good / ".thumbnails" / "small.png")  # a tool's folder, no session
    pairs = dataset.train_sessions()
    assert sorted({session for _, session in pairs}) == ["day", "good", "night"]
    assert len(pairs) == 5 and sorted(dataset.train_paths()) == sorted(p for p, _ in pairs)

    manifest = tmp_path / "sessions.csv"
    rows = [
        f"{path.relative_to(good)},{'a' if i < 3 else 'b'}" for i, (path, _) in enumerate(pairs)
    ]
    manifest.write_text("path,session\n" + "\n".join(rows) + "\n")
    named = dataset.train_sessions(manifest)
    assert [session for _, session in named] == ["a", "a", "a", "b", "b"]
    manifest.write_text("path,session\n" + "\n".join(rows[:-1]) + "\n")
    with pytest.raises(UserError, match="names no session for 1 training image"):
        dataset.train_sessions(manifest)
    manifest.write_text("path,session\n" + "\n".join([*rows, f"{train[1]},b"]) + "\n")
    with pytest.raises(UserError, match="1 file.s. that are not training images"):
        dataset.train_sessions(manifest)  # an absolute path outside train/good
    manifest.write_text("path,session\n" + "\n".join([*rows, rows[0][:-1] + "b"]) + "\n")
    with pytest.raises(UserError, match="named in two sessions"):
        dataset.train_sessions(manifest)
    manifest.write_text("file,shift\nx.png,a\n")
    with pytest.raises(UserError, match="needs the columns path and session"):
        dataset.train_sessions(manifest)


def test_the_synthetic_line_can_span_training_sessions(tmp_path: Path) -> None:
    from detector.data.synthetic import make_dataset

    make_dataset(tmp_path, size=64, n_train=3, n_test_good=1, n_per_defect=0, sessions=3,
                 train_sessions=2)  # fmt: skip
    pairs = MVTecCategory(tmp_path, "carpet").train_sessions()
    assert [session for _, session in pairs] == ["s0"] * 3 + ["s1"] * 3

    def brightness(session: str) -> float:
        return float(np.mean([np.asarray(Image.open(p)).mean() for p, s in pairs if s == session]))

    assert brightness("s1") > brightness("s0")  # session 1's lamps are 2 % brighter


def test_fit_calibrates_leave_one_session_out_from_subfolders(
    synthetic_dataset: MVTecCategory, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    layout(tmp_path / "data", synthetic_dataset.train_paths()[:8])
    fitted = run_detector(
        tmp_path,
        "fit",
        f"data.root={tmp_path / 'data'}",
        "backbone=tiny_random",
        f"backbone.name={tiny_backbone_dir}",
        "backbone.resolution=96",
        "progress=false",
        f"model_dir={tmp_path / 'model'}",
        f"hydra.run.dir={tmp_path / 'fit'}",
    )
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    summary = json.loads((tmp_path / "fit" / "fit_summary.json").read_text())
    assert summary["sessions"] == {"day": 4, "night": 4}
    calibration = summary["calibration"]
    assert calibration["source"] == "leave_one_session_out" and calibration["folds"] == 2
    assert calibration["sessions"] == 2 and calibration["calibration_images"] == 8
    stored = json.loads((tmp_path / "model" / "bank.json").read_text())["calibration"]
    assert stored["sessions"] == 2 and stored["source"] == "leave_one_session_out"


# ----- later sessions for an existing product ---------------------------------------------
def session_folders(train: list[Path], root: Path) -> dict[str, list[Path]]:
    """Monday's parts as captured, Tuesday's under brighter lamps, Wednesday's at lower
    contrast, Thursday's at higher contrast: four capture sessions of one line."""
    captured = sessions_of_brightness(train, root)
    for day, contrast in (("wednesday", 0.8), ("thursday", 1.2)):
        (root / day).mkdir()
        for path in captured["monday"]:
            with Image.open(path) as image:
                changed = ImageEnhance.Contrast(image.convert("RGB")).enhance(contrast)
                changed.save(root / day / path.name)
        captured[day] = sorted((root / day).iterdir())
    return captured


@dataclass
class OneShift:
    """A product fitted on Monday's images alone (random folds), in the store at `home`,
    and the line's sessions captured after it."""

    captured: dict[str, list[Path]]
    home: Path
    fitted: AnomalyDetector


def one_session_product(
    tiny_backbone: DinoBackbone, dataset: MVTecCategory, tmp_path: Path, name: str
) -> OneShift:
    captured = session_folders(dataset.train_paths()[:6], tmp_path / "parts")
    first = fit_detector(
        tiny_backbone,
        captured["monday"],
        sessions=["monday"] * len(captured["monday"]),
        bank_config=BankConfig(coreset_ratio=0.5, seed=0),
        progress=False,
    )
    home = tmp_path / "home"
    with bentoml_home(home):
        backbone = save_backbone(tiny_backbone, "dino-backbone", with_graph=False)
        save_bank(first.save(tmp_path / "v1"), backbone, product=name)
    return OneShift(captured, home, first)


def session_of(tiny_backbone: DinoBackbone, paths: list[Path]) -> tuple[np.ndarray, list[str]]:
    """A session's features and its images' SHA-256, as add-images computes them."""
    features = np.concatenate(list(iter_features(tiny_backbone, paths, 4)))
    return features, [file_sha256(path) for path in paths]


def stored_calibration(model: bentoml.Model) -> Calibration:
    return Calibration.from_dict(MemoryBank.read_document(model.path)["calibration"])


def test_a_later_session_joins_the_calibration_scored_by_a_bank_that_had_not_seen_it(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    shift = one_session_product(tiny_backbone, synthetic_dataset, tmp_path, "shifts")
    captured, home, first = shift.captured, shift.home, shift.fitted
    assert first.calibration.source == "cross_fitted" and first.calibration.sessions == 1

    # Tuesday from the command line: scored by Monday's bank before its rows join it.
    added = run_main(
        add_images_main,
        home,
        "shifts",
        str(tmp_path / "parts" / "tuesday"),
        "--session",
        "tuesday",
        "--reason",
        "second shift",
    )
    assert added.returncode == 0, added.stderr
    report = json.loads(added.stdout)
    tuesday = [r.score for r in first.predict(captured["tuesday"], with_maps=False)]
    assert report["session"] == "tuesday" and report["join"] == "both" and report["rows_added"] > 0
    assert report["sessions"] == {"bank": ["monday", "tuesday"], "calibration": ["tuesday"]}
    assert report["threshold_after"] == pytest.approx(max(tuesday), rel=1e-4)  # 6 images at 1 %
    assert "one capture session" in report["before"]["statement"]
    after = report["after"]
    assert after["across_sessions"] is True and after["sessions"] == 2
    assert after["calibration_images"] == 6 and "one capture session" not in after["statement"]

    with bentoml_home(home):
        v2 = products.live_model("shifts")
        stored = stored_calibration(v2)
        assert stored.source == "session" and stored.rows_added_since == 0
        np.testing.assert_allclose(stored.reference_scores, tuesday, rtol=1e-4)
        assert len(stored.reference_profiles) == 6 + 6, "the drift reference keeps Monday's"
        assert v2.info.metadata["change"]["action"] == "add_session"
        assert v2.info.metadata["sessions"]["bank"] == ["monday", "tuesday"]

        # Wednesday joins the calibration only: scored by the bank of Monday and Tuesday,
        # beside Tuesday's scores; the bank's rows and index are the parent's.
        wednesday = AnomalyDetector.load(v2.path, tiny_backbone).predict(
            captured["wednesday"], with_maps=False
        )
        features, hashes = session_of(tiny_backbone, captured["wednesday"])
        v3, third = changes.add_session(
            "shifts", "wednesday", features, hashes, tiny_backbone, join="calibration"
        )
        calibration = stored_calibration(v3)
        assert calibration.source == "leave_one_session_out" and calibration.sessions == 3
        assert calibration.session_names == ["tuesday", "wednesday"]
        np.testing.assert_allclose(
            calibration.reference_scores, tuesday + [r.score for r in wednesday], rtol=1e-4
        )
        assert third["rows_added"] == 0
        assert v3.info.metadata["bank_size"] == v2.info.metadata["bank_size"]
        assert v3.info.metadata["files"]["index.faiss"] == v2.info.metadata["files"]["index.faiss"]
        assert "(3 sessions in all)" in third["after"]["statement"]

        # Into the bank only: the threshold stays, and says its scores predate the rows.
        thursday, thursday_hashes = session_of(tiny_backbone, captured["thursday"])
        v4, fourth = changes.add_session(
            "shifts", "thursday", thursday, thursday_hashes, tiny_backbone, join="bank"
        )
        kept = stored_calibration(v4)
        assert kept.threshold == calibration.threshold and kept.rows_added_since > 0
        assert fourth["sessions"]["bank"] == ["monday", "tuesday", "thursday"]
        assert "upper bounds" in fourth["after"]["statement"]


def test_a_session_the_product_has_seen_or_too_small_is_refused_and_nothing_is_made(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    shift = one_session_product(tiny_backbone, synthetic_dataset, tmp_path, "seen")
    captured, home = shift.captured, shift.home
    tuesday, hashes = session_of(tiny_backbone, captured["tuesday"])
    wednesday, wednesday_hashes = session_of(tiny_backbone, captured["wednesday"])
    with bentoml_home(home):
        changes.add_session("seen", "tuesday", tuesday, hashes, tiny_backbone)
        live = products.live_model("seen").tag
        refused = {
            "in the bank already": ("tuesday", wednesday, wednesday_hashes, "both"),
            "in the product already": ("friday", tuesday, hashes, "both"),
            "sent twice": ("friday", wednesday, [wednesday_hashes[0]] * 6, "both"),
            "at least 5 images": ("friday", wednesday[:3], wednesday_hashes[:3], "calibration"),
            "not a valid name": ("../etc", wednesday, wednesday_hashes, "both"),
            "join must be one of": ("friday", wednesday, wednesday_hashes, "sideways"),
        }
        for said, (session, features, names, join) in refused.items():
            with pytest.raises(UserError, match=said):
                changes.add_session("seen", session, features, names, tiny_backbone, join=join)
        assert products.live_model("seen").tag == live, "a refused change makes nothing"
        # Fewer images may join the bank only: they set no threshold.
        small, _ = changes.add_session(
            "seen", "friday", wednesday[:3], wednesday_hashes[:3], tiny_backbone, join="bank"
        )
        assert small.info.metadata["sessions"]["bank"] == ["monday", "tuesday", "friday"]


def test_a_hand_set_threshold_stays_and_new_calibration_scores_drop_the_session_names(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    shift = one_session_product(tiny_backbone, synthetic_dataset, tmp_path, "manual")
    captured, home = shift.captured, shift.home
    tuesday, hashes = session_of(tiny_backbone, captured["tuesday"])
    with bentoml_home(home):
        _, moved = changes.set_operating_point("manual", threshold=0.5, confirm=True)
        model, report = changes.add_session("manual", "tuesday", tuesday, hashes, tiny_backbone)
        calibration = stored_calibration(model)
        assert calibration.threshold == 0.5 and calibration.rule == "explicit"
        assert report["threshold_after"] == 0.5
        assert calibration.source == "session" and calibration.session_names == ["tuesday"]
        # Calibration images (no session) replace the scores, and with them the names.
        prepared = np.stack([tiny_backbone.prepare(Image.open(p)) for p in captured["thursday"]])
        thursday, thursday_hashes = session_of(tiny_backbone, captured["thursday"])
        recalibrated, _ = changes.add_images(
            "manual",
            thursday[:1],
            thursday_hashes[:1],
            tiny_backbone,
            calibration=(prepared, [(96, 96)] * len(prepared)),
        )
        assert stored_calibration(recalibrated).session_names == []
        assert recalibrated.info.metadata["sessions"]["calibration"] == []


def test_scores_that_cannot_set_a_threshold_are_a_sentence_not_a_crash() -> None:
    before = Calibration(0.3, 0.01, [0.2] * 10, source="cross_fitted", sessions=1)
    zeros = [make_result(0.0, before, (8, 8), None, np.zeros(4)) for _ in range(6)]
    with pytest.raises(SessionError, match="not a finite number above 0"):
        with_later_session(before, "copy", zeros, ["monday"])


def test_the_add_images_command_refuses_a_join_without_a_session_and_two_thresholds(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    without = run_main(add_images_main, tmp_path, "shifts", str(folder), "--join", "bank")
    assert without.returncode == 2 and "--join says what a --session joins" in without.stderr
    both = run_main(
        add_images_main, tmp_path, "shifts", str(folder), "--session", "b", "--calibration", "c"
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
