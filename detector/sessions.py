"""Capture sessions of a product (a shift, a day, a camera setting) after its fit: which
sessions its bank holds, which its calibration scored with a bank that had not seen them,
and a later session joining either.

A promise measured on one session says nothing about the next; a session's images scored
by a bank that never saw that session say what the next session will see. So a later
session can join the calibration once, only while the bank has not seen it, and only with
images new to the product: scored by the live bank before its own rows are added, as
leave-one-session-out scores each session with a bank of the others.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from detector.errors import UserError
from detector.scoring import Calibration, InspectionResult, calibrate
from detector.thresholds import rule_for_new_scores

if TYPE_CHECKING:
    from detector.anomaly_detector import AnomalyDetector


class SessionError(UserError):
    """A later session's change that cannot be made as asked (HTTP 400 bad_session)."""

    status, reason = 400, "bad_session"


# A session's name: a folder name a person would give it ("night", "2026-11-30").
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# What a later session's images join: the bank (its parts are not flagged), the
# calibration (the threshold and its promise), or both (the default).
JOINS = ("both", "bank", "calibration")


# A later session's scores set a threshold: fewer than this many say almost nothing.
MIN_SESSION_IMAGES = 5

# bank.json keys: the sessions whose images are in the bank, and the SHA-256 of the images
# the product was fitted on, added to its bank or given as a session (65 bytes each), so
# none comes back as a "new" session (scored by a bank that holds it, it would score near 0).
BANK_SESSIONS, IMAGE_HASHES = "bank_sessions", "image_sha256"


@dataclass
class SessionNames:
    """The named sessions behind a bank version. Banks fitted without names (one unnamed
    session) or before names were kept list none in the bank."""

    bank: list[str] = field(default_factory=list)
    calibration: list[str] = field(default_factory=list)  # Calibration.session_names

    @classmethod
    def of(cls, detector: AnomalyDetector) -> SessionNames:
        names = detector.bank.metadata.get(BANK_SESSIONS) or []
        return cls(list(names), list(detector.calibration.session_names))

    def to_dict(self) -> dict[str, list[str]]:
        return {"bank": list(self.bank), "calibration": list(self.calibration)}

    def check(self, session: str, join: str) -> None:
        """A session the bank has seen, or one the calibration has scored already, cannot
        join the calibration."""
        check_join(join)
        if join != "bank" and session in self.bank:
            raise SessionError(
                f"Session {session!r} is in the bank already: its images scored by this bank "
                "cannot show what a session the bank has not seen will score. Name the new "
                "session, or add its images to the bank only (join: bank)."
            )
        if join != "bank" and session in self.calibration:
            raise SessionError(
                f"Session {session!r} is in the calibration already: a session's images are "
                "counted once. Name the new session, or add them to the bank only (join: bank)."
            )


def check_join(join: str) -> str:
    if join not in JOINS:
        raise SessionError(f"join must be one of {', '.join(JOINS)}; it is {join!r:.40}.")
    return join


def check_session_name(name: str) -> str:
    if not isinstance(name, str) or not SESSION_NAME.match(name):
        raise SessionError(
            f"Session {str(name)[:64]!r} is not a valid name: up to 64 letters, digits, "
            "'-', '_' or '.', starting with a letter or digit."
        )
    return name


def check_new_images(hashes: list[str], metadata: dict[str, Any], join: str) -> None:
    """A session's images are new to the product, each sent once, and enough of them to
    score: a repeated image would count twice, a known one scores near 0 against a bank
    that holds it. Banks saved before hashes were kept can only be checked within the
    request."""
    if len(set(hashes)) < len(hashes):
        raise SessionError("The same image is sent twice: send each image of a session once.")
    known = set(metadata.get(IMAGE_HASHES) or []) & set(hashes)
    if known:
        raise SessionError(
            f"{len(known)} of these images are in the product already (training images, or "
            "images added before): a later session's images must be new to it."
        )
    if join != "bank" and len(hashes) < MIN_SESSION_IMAGES:
        raise SessionError(
            f"A session that sets the threshold needs at least {MIN_SESSION_IMAGES} "
            f"images; {len(hashes)} were sent (join: bank adds fewer to the bank only)."
        )


def remember_images(metadata: dict[str, Any], hashes: list[str]) -> None:
    """Record images the product has used, so none comes back as a new session."""
    known = dict.fromkeys(metadata.get(IMAGE_HASHES) or [])
    metadata[IMAGE_HASHES] = list({**known, **dict.fromkeys(hashes)})


def fitted_names(sessions: list[str] | None, across_sessions: bool) -> tuple[list[str], list[str]]:
    """(the bank's session names, the calibration's) a fit records: every training session
    in the bank, and in the calibration too when each was scored by a bank of the others."""
    names = list(dict.fromkeys(sessions or []))
    return names, names if across_sessions else []


def with_later_session(
    before: Calibration,
    session: str,
    results: list[InspectionResult],
    bank_names: list[str],
) -> Calibration:
    """The calibration once a later session's results (from a bank that had not seen it)
    join it, with the threshold set anew by the version's rule at its target; a hand-set
    threshold stays, and the promise is stated at it.

    Scores already measured across sessions are kept beside the new ones; scores of the
    training sessions themselves (random folds, a random hold-out, reviewed records) say
    nothing about a new session, so the new session's scores replace them. The drift
    reference keeps every profile: the line runs the old sessions too.
    """
    across = bool(before.across_sessions)
    scores = [r.score for r in results]
    kept = [*before.reference_scores, *scores] if across else scores
    names = [*before.session_names, session] if across else [session]
    # The named sessions of bank and calibration; one more than before where none is named.
    count = len(set(bank_names) | set(names)) if bank_names else (before.sessions or 1) + 1
    profiles = [np.asarray(p) for p in before.reference_profiles]
    profiles += [r.drift_profile for r in results]
    source = "leave_one_session_out" if across else "session"
    try:
        after = calibrate(
            kept,
            before.false_alarm_rate,
            profiles,
            rule_for_new_scores(before.rule),
            source,
            sessions=count,
            session_names=names,
        )
    except ValueError as error:
        raise SessionError(str(error)) from None
    if before.rule == "explicit":
        after = replace(after, threshold=before.threshold, rule="explicit")
    return replace(after, rows_added_since=before.rows_added_since if across else 0)


def scored(detector: AnomalyDetector, features: np.ndarray) -> list[InspectionResult]:
    """Each image's result from `detector`'s bank (no maps), `batch_size` images at a time:
    a later session's images, scored before any of their rows join that bank."""
    from detector.anomaly_detector import batched

    size = (detector.extractor.spec.resolution,) * 2
    return [
        result
        for chunk in batched(features, detector.batch_size)
        for result in detector.score_features(chunk, [size] * len(chunk), with_maps=False)
    ]


@dataclass
class SessionJoined:
    """What a later session's join made: the new detector, and what its answer reports."""

    detector: AnomalyDetector
    rows_added: int
    scores: list[float]
    names: SessionNames


def join_session(
    detector: AnomalyDetector,
    session: str,
    features: np.ndarray,
    hashes: list[str],
    join: str,
    image_names: list[str] | None = None,
) -> SessionJoined:
    """The detector once a later session's features join its bank, its calibration or
    both; `detector` is untouched. The session is scored first, by a bank that has not
    seen it; its rows join after."""
    from detector.anomaly_detector import AnomalyDetector
    from detector.memory_bank import MemoryBank

    check_session_name(session)
    names = SessionNames.of(detector)
    names.check(session, join)
    check_new_images(hashes, detector.bank.metadata, join)
    calibration, scores = detector.calibration, []
    if join != "bank":
        results = scored(detector, features)
        scores = [r.score for r in results]
        calibration = with_later_session(calibration, session, results, names.bank)
    joins_bank = join != "calibration"
    updated, added = detector.learned(features, image_names) if joins_bank else (detector, 0)
    bank = updated.bank
    if updated is detector:  # the same rows: shared, with metadata of its own
        bank = MemoryBank(bank.index, bank.config, copy.deepcopy(bank.metadata), bank.provenance)
    if joins_bank and session not in names.bank:
        bank.metadata[BANK_SESSIONS] = [*names.bank, session]
    remember_images(bank.metadata, hashes)
    if join != "bank":
        updated = AnomalyDetector(
            detector.extractor, bank, calibration, detector.scoring, detector.batch_size
        )
    joined = SessionNames.of(updated)
    return SessionJoined(updated, added, scores, joined)
