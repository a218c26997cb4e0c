"""Capture sessions of a product (a shift, a day, a camera setting) after its fit: which
sessions its bank holds, which its calibration scored with a bank that had not seen them,
and a later session joining either.

A promise measured on one session says nothing about the next; a session's images scored
by a bank that never saw that session say what the next session will see. So a later
session can join the calibration once, and only while the bank has not seen it: scored
by the live bank before its own rows are added, as leave-one-session-out scores each
session with a bank of the others.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from detector.errors import UserError
from detector.scoring import Calibration, InspectionResult, calibrate

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


@dataclass
class SessionNames:
    """The named sessions behind a bank version, kept in its metadata under "sessions".
    Banks fitted without names (one unnamed session) or before names were kept list none."""

    bank: list[str] = field(default_factory=list)
    # Sessions whose calibration scores came from a bank without them.
    calibration: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> SessionNames:
        stored = metadata.get("sessions") or {}
        return cls(list(stored.get("bank", [])), list(stored.get("calibration", [])))

    def to_dict(self) -> dict[str, list[str]]:
        return {"bank": list(self.bank), "calibration": list(self.calibration)}

    def joined(self, session: str, join: str) -> SessionNames:
        """The names once `session` joins as `join` says; a session the bank has seen, or
        one the calibration has scored already, cannot join the calibration."""
        if join not in JOINS:
            raise SessionError(f"join must be one of {', '.join(JOINS)}; it is {join!r:.40}.")
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
        bank, calibration = list(self.bank), list(self.calibration)
        if join != "calibration" and session not in bank:
            bank.append(session)
        if join != "bank":
            calibration.append(session)
        return SessionNames(bank, calibration)


def check_session_name(name: str) -> str:
    if not isinstance(name, str) or not SESSION_NAME.match(name):
        raise SessionError(
            f"Session {str(name)[:64]!r} is not a valid name: up to 64 letters, digits, "
            "'-', '_' or '.', starting with a letter or digit."
        )
    return name


def fitted_names(sessions: list[str] | None, across_sessions: bool) -> SessionNames:
    """The names a fit records: every training session in the bank, and in the calibration
    too when each was scored by a bank of the others (leave one session out)."""
    names = list(dict.fromkeys(sessions or []))
    return SessionNames(names, names if across_sessions else [])


def with_later_session(
    before: Calibration, scores: list[float], profiles: list[np.ndarray], bank_sessions: int
) -> Calibration:
    """The calibration once a later session's scores (from a bank that had not seen it)
    join it, with the threshold set anew by the same rule at the same target.

    Scores already measured across sessions are kept beside the new ones; scores of the
    training sessions themselves (random folds, a random hold-out, reviewed records) say
    nothing about a new session, so the new session's scores replace them. The count of
    sessions grows by one: `bank_sessions` is what the bank held when `before` does not say.
    """
    seen = before.sessions if before.sessions is not None else max(bank_sessions, 1)
    rule = before.rule if before.rule != "explicit" else "empirical_quantile"
    if before.across_sessions:
        kept_scores = [*before.reference_scores, *scores]
        kept_profiles = [np.asarray(p) for p in before.reference_profiles] + list(profiles)
        source, rows_added_since = "leave_one_session_out", before.rows_added_since
    else:
        kept_scores, kept_profiles, source, rows_added_since = (
            list(scores),
            list(profiles),
            "session",
            0,
        )
    after = calibrate(
        kept_scores, before.false_alarm_rate, kept_profiles, rule, source, sessions=seen + 1
    )
    return replace(after, rows_added_since=rows_added_since)


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


def join_session(
    detector: AnomalyDetector, features: np.ndarray, join: str, bank_sessions: int
) -> tuple[AnomalyDetector, int, list[float]]:
    """(the detector once a later session's features join its bank, its calibration or
    both, the rows added, the session's scores from the bank before it grew); `detector`
    is untouched. The calibration's scores come first, so the session is scored by a bank
    that has not seen it."""
    from detector.anomaly_detector import AnomalyDetector
    from detector.memory_bank import MemoryBank

    calibration, scores = detector.calibration, []
    if join != "bank":
        results = scored(detector, features)
        scores = [r.score for r in results]
        profiles = [r.drift_profile for r in results]
        calibration = with_later_session(calibration, scores, profiles, bank_sessions)
    updated, added = detector.learned(features) if join != "calibration" else (detector, 0)
    if join != "bank":
        bank = updated.bank
        if updated is detector:  # the same rows: shared, with metadata of its own
            bank = MemoryBank(bank.index, bank.config, copy.deepcopy(bank.metadata))
        updated = AnomalyDetector(
            detector.extractor, bank, calibration, detector.scoring, detector.batch_size
        )
    return updated, added, scores
