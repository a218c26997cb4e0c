"""Fitting a detector from defect-free images: the memory bank, then the threshold.

Kept apart from `AnomalyDetector` (the one scoring path) as anomalib keeps its pure model
apart from its training harness: a detector is scored the same whatever made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from detector.anomaly_detector import (
    AnomalyDetector,
    ImageSource,
    as_image,
    batched,
    iter_features,
)
from detector.extractor import FeatureExtractor
from detector.memory_bank import BankConfig, MemoryBank
from detector.provenance import CROP_SIDE, Provenance, cell_crop, image_name, input_pixels
from detector.scoring import Calibration, ScoringConfig, calibrate
from detector.sessions import BANK_SESSIONS, fitted_names
from detector.spill import Spill
from detector.tiling import TILING_KEY, tiling_of

# Told (stage, done, total) as a fit goes: "features" per image read, "folds" per fold
# scored. It may raise to stop the fit (a cancelled job): nothing is saved by a fit.
Progress = Callable[[str, int, int], None]


def _silent(stage: str, done: int, total: int) -> None:
    """No one is told."""


@dataclass(frozen=True)
class FitSteps:
    """How a fit's banks are built and its images read, the same for the final bank and
    every fold's."""

    config: BankConfig
    scoring: ScoringConfig | None
    batch_size: int
    progress: bool
    report: Progress = _silent

    def features(self, extractor: FeatureExtractor, images: Sequence[ImageSource]) -> Iterator:
        """Feature batches of `images`, each told to `report`."""
        batches = iter_features(extractor, images, self.batch_size, self.progress, "fit features")
        return reported(batches, len(images), self.report)


def fit_detector(
    extractor: FeatureExtractor,
    train_images: Sequence[ImageSource],
    calibration_images: Sequence[ImageSource] | None = None,
    *,
    folds: int = 5,
    groups: Sequence[int] | None = None,
    sessions: Sequence[str] | None = None,
    rule: str = "empirical_quantile",
    calibration_source: str = "held_out",
    bank_config: BankConfig | None = None,
    scoring: ScoringConfig | None = None,
    batch_size: int = 8,
    progress: bool = True,
    report: Progress = _silent,
) -> AnomalyDetector:
    """Build the bank from defect-free images and set the threshold by `rule`.

    With `calibration_images` (held out, or a later session's), they set the threshold
    and the drift reference. Without, the fit is cross-fitted: the bank is built from
    every training image, and every training image also gets a held-out score from a
    bank built without its fold (`folds` folds; items of one `groups` value, such as the
    augmented copies of one photo, stay in one fold). Features are extracted once.

    `sessions` names each training image's capture session (a shift, a day). With two or
    more, each session is one fold (whole sessions share one when there are more than
    `folds`): every image is scored by a bank of the other sessions (leave one session
    out), the honest estimate for parts of a session not seen yet;
    random folds of one session say nothing about the next. The calibration records how
    many sessions it spans (a separate calibration folder counts as one more).
    `report` is told how far the fit is, and may raise to stop it.
    """
    if not train_images:
        raise ValueError("fitting needs at least one defect-free training image")
    steps = FitSteps(bank_config or BankConfig(), scoring, batch_size, progress, report)
    session_of = session_indices(sessions, len(train_images))
    seen = int(session_of.max()) + 1
    if calibration_images is not None and len(calibration_images) > 0:
        detector = fit_bank(extractor, train_images, steps)
        normal = detector.predict(calibration_images, with_maps=False)
        detector.calibration = calibrate(
            [r.score for r in normal],
            detector.scoring.false_alarm_rate,
            [r.drift_profile for r in normal],
            rule,
            calibration_source,
            sessions=seen + 1 if calibration_source == "session" else seen,
        )
        named_bank, _ = fitted_names(sessions, across_sessions=False)
        detector.bank.metadata[BANK_SESSIONS] = named_bank
        if calibration_source == "session":  # the calibration folder: a session of its own
            detector.calibration.session_names = ["calibration"]
        return detector
    fold_of, source = fold_plan(session_of, folds, groups, steps.config.seed)
    detector = cross_fit(extractor, train_images, fold_of, rule, steps, source)
    detector.calibration.sessions = seen
    named_bank, named_calibration = fitted_names(sessions, source == "leave_one_session_out")
    detector.bank.metadata[BANK_SESSIONS] = named_bank
    detector.calibration.session_names = named_calibration
    return detector


def fit_bank(
    extractor: FeatureExtractor, train_images: Sequence[ImageSource], steps: FitSteps
) -> AnomalyDetector:
    """The bank of every training image, streamed; its threshold is still to be set."""
    batches = steps.features(extractor, train_images)
    first = next(batches)
    rows = int(np.prod(first.shape[1:-1])) * len(train_images)
    bank = MemoryBank.fit_stream(chain([first], batches), rows, steps.config, steps.progress)
    attach_provenance(bank, extractor, train_images, first.shape[1:3], steps.report)
    return uncalibrated(extractor, bank, len(train_images), steps.scoring, steps.batch_size)


def attach_provenance(
    bank: MemoryBank,
    extractor: FeatureExtractor,
    images: Sequence[ImageSource],
    grid: tuple[int, ...],
    report: Progress = _silent,
) -> None:
    """Name each kept row's training image and cell, and cut crops (within the budget) from
    what the backbone saw of their images (each image read once more: the features were
    streamed and are gone)."""
    if bank.kept_rows is None:
        raise ValueError("only a freshly fitted bank knows where its rows came from")
    names = [image_name(images, i) for i in range(len(images))]
    provenance = Provenance.of_rows(bank.kept_rows, (int(grid[0]), int(grid[1])), names)
    cropped = provenance.crop_plan()
    crops = np.zeros((len(cropped), CROP_SIDE, CROP_SIDE, 3), np.uint8)
    image_of = provenance.sources[cropped, 0]
    wanted = np.unique(image_of)
    for done, image in enumerate(wanted):
        pixels = input_pixels(extractor.prepare(as_image(images[int(image)])))
        for position in np.flatnonzero(image_of == image):
            _, cell_row, column = provenance.sources[cropped[position]]
            crops[position] = cell_crop(pixels, (int(cell_row), int(column)), provenance.grid)
        report("crops", done + 1, len(wanted))
    provenance.crops = crops
    provenance.crop_of[cropped] = np.arange(len(cropped), dtype=np.int32)
    bank.provenance = provenance


def fold_plan(
    session_of: np.ndarray, folds: int, groups: Sequence[int] | None, seed: int
) -> tuple[np.ndarray, str]:
    """(each image's fold, the calibration source): one fold per session with two or more
    (whole sessions share a fold when there are more than `folds`), else random folds."""
    sessions = int(session_of.max()) + 1
    if sessions < 2:
        return assign_folds(session_of.size, folds, groups, seed), "cross_fitted"
    if sessions <= max(folds, 2):
        return session_of, "leave_one_session_out"
    return assign_folds(session_of.size, folds, session_of.tolist(), seed), "leave_one_session_out"


def session_indices(sessions: Sequence[str] | None, count: int) -> np.ndarray:
    """Each training image's session as 0, 1, ... in order of first appearance (all 0
    without sessions)."""
    if sessions is None:
        return np.zeros(count, dtype=int)
    if len(sessions) != count:
        raise ValueError("sessions must name one session per training image")
    order = {name: index for index, name in enumerate(dict.fromkeys(sessions))}
    return np.array([order[name] for name in sessions], dtype=int)


def uncalibrated(
    extractor: FeatureExtractor,
    bank: MemoryBank,
    n_images: int,
    scoring: ScoringConfig | None,
    batch_size: int,
) -> AnomalyDetector:
    """A detector of this bank whose threshold is still to be set (it flags nothing)."""
    bank.metadata["extractor"] = extractor.spec.to_dict()
    bank.metadata["n_train_images"] = n_images
    if tiling := tiling_of(extractor):
        bank.metadata[TILING_KEY] = tiling.to_dict()
    placeholder = Calibration(threshold=float("inf"), false_alarm_rate=0.5)
    return AnomalyDetector(extractor, bank, placeholder, scoring, batch_size)


def cross_fit(
    extractor: FeatureExtractor,
    train_images: Sequence[ImageSource],
    fold_of: np.ndarray,
    rule: str,
    steps: FitSteps,
    source: str = "cross_fitted",
) -> AnomalyDetector:
    """The bank of every image, and each image's score from a bank without its fold."""
    count, folds = len(train_images), int(fold_of.max()) + 1
    config, scoring, batch_size = steps.config, steps.scoring, steps.batch_size
    with spilled_features(extractor, train_images, steps) as features:
        rows_per_image = int(np.prod(features.array.shape[1:-1]))
        bank = MemoryBank.fit_stream(
            features.blocks(np.arange(count), batch_size),
            rows_per_image * count,
            config,
            steps.progress,
        )
        attach_provenance(bank, extractor, train_images, features.array.shape[1:3], steps.report)
        detector = uncalibrated(extractor, bank, count, scoring, batch_size)
        scores = np.empty(count)
        profiles: list[np.ndarray] = [np.empty(0)] * count
        size = (extractor.spec.resolution, extractor.spec.resolution)
        for fold in range(folds):
            inside, held_out = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
            fold_bank = MemoryBank.fit_stream(
                features.blocks(inside, batch_size), rows_per_image * len(inside), config, False
            )
            scorer = AnomalyDetector(
                extractor, fold_bank, detector.calibration, scoring, batch_size
            )
            for chunk in batched(held_out, batch_size):
                results = scorer.score_features(
                    features.take(chunk), [size] * len(chunk), with_maps=False
                )
                for index, result in zip(chunk, results, strict=True):
                    scores[index], profiles[index] = result.score, result.drift_profile
            steps.report("folds", fold + 1, folds)
    detector.bank.metadata["calibration_folds"] = folds
    detector.calibration = calibrate(
        scores, detector.scoring.false_alarm_rate, profiles, rule, source
    )
    return detector


def spilled_features(
    extractor: FeatureExtractor, images: Sequence[ImageSource], steps: FitSteps
) -> Spill:
    """Every image's (h, w, D) features, extracted once for the bank and every fold."""
    spill: Spill | None = None
    filled = 0
    try:
        for batch in steps.features(extractor, images):
            if spill is None:
                spill = Spill((len(images), *batch.shape[1:]), prefix="fit-features-")
            spill.array[filled : filled + len(batch)] = batch
            filled += len(batch)
    except BaseException:  # a stopped fit leaves no temporary file behind
        if spill is not None:
            spill.close()
        raise
    assert spill is not None  # fit_detector refuses an empty image list
    return spill


def reported(batches: Iterator[np.ndarray], total: int, report: Progress) -> Iterator[np.ndarray]:
    """The feature batches, each told to `report` as images read."""
    done = 0
    report("features", done, total)
    for batch in batches:
        done += len(batch)
        report("features", done, total)
        yield batch


def assign_folds(count: int, folds: int, groups: Sequence[int] | None, seed: int) -> np.ndarray:
    """The fold of each of `count` items: groups shuffled by `seed`, dealt round-robin."""
    group_of = np.asarray(groups if groups is not None else range(count))
    if group_of.shape != (count,):
        raise ValueError("groups must name one group per training image")
    distinct = np.unique(group_of)
    if folds < 2 or distinct.size < folds:
        raise ValueError(
            f"Cross-fitted calibration with {folds} folds needs at least {max(folds, 2)} "
            f"distinct training images ({distinct.size} given): set calibration.folds, or "
            "calibrate on separate images (data.calibration_dir)."
        )
    order = np.random.default_rng(seed).permutation(distinct)
    fold_of_group = {group: position % folds for position, group in enumerate(order)}
    return np.array([fold_of_group[group] for group in group_of])
