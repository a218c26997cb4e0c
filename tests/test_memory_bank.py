import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.centre_distances import CentreGraph, nearest_centre
from detector.coreset import chunk_share_indices, coreset_size, streaming_coreset
from detector.greedy import continue_greedy, farthest_points, greedy_k_center, random_projection
from detector.memory_bank import BankConfig, MemoryBank, l2_normalize


@pytest.fixture
def features() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.normal(size=(3000, 32)).astype(np.float32)


def covering_radius(points: np.ndarray, centres: np.ndarray) -> float:
    squared = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None]
    return float(np.sqrt(np.maximum(squared.min(axis=1), 0)).max())


def test_flat_knn_equals_brute_force_cosine(features: np.ndarray) -> None:
    bank = MemoryBank.fit(features, BankConfig(coreset_ratio=1.0, k=3))
    queries = np.random.default_rng(4).normal(size=(50, 32)).astype(np.float32)
    similarity = l2_normalize(queries) @ l2_normalize(features).T
    expected = 1.0 - np.sort(similarity, axis=1)[:, -3:].mean(axis=1)
    np.testing.assert_allclose(bank.distances(queries), expected, atol=1e-5)


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_indexes_agree_with_exact_on_most_queries(
    features: np.ndarray, index: str
) -> None:
    exact = MemoryBank.fit(features, BankConfig(coreset_ratio=1.0))
    approximate = MemoryBank.fit(
        features, BankConfig(coreset_ratio=1.0, index=index, ivf_nlist=16, ivf_nprobe=8)
    )
    queries = features[:200] + 0.05
    agree = np.isclose(exact.distances(queries), approximate.distances(queries), atol=1e-5)
    assert agree.mean() > 0.9


def test_coreset_is_a_deterministic_subset(features: np.ndarray) -> None:
    first = greedy_k_center(features, 100, seed=5)
    again = greedy_k_center(features, 100, seed=5)
    other = greedy_k_center(features, 100, seed=6)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len(set(first.tolist())) == 100
    assert first.min() >= 0 and first.max() < len(features)


def test_covering_radius_shrinks_as_ratio_grows(features: np.ndarray) -> None:
    radii = []
    for ratio in (0.01, 0.05, 0.2):
        kept = streaming_coreset(
            [features], len(features), coreset_size(len(features), ratio), chunk_rows=1024
        ).rows
        rows = {row.tobytes() for row in features}
        assert all(row.tobytes() in rows for row in kept), "coreset rows must come from the input"
        radii.append(covering_radius(features, kept))
    assert radii[0] > radii[1] > radii[2]


def test_greedy_covers_better_than_random_choice(features: np.ndarray) -> None:
    chosen = features[greedy_k_center(features, 60, seed=0)]
    random_rows = features[np.random.default_rng(0).choice(len(features), 60, replace=False)]
    assert covering_radius(features, chosen) < covering_radius(features, random_rows)


def test_streaming_keeps_exact_count_across_uneven_blocks(features: np.ndarray) -> None:
    blocks = [features[:700], features[700:701], features[701:]]
    kept = streaming_coreset(blocks, len(features), 301, chunk_rows=512, progress=False).rows
    assert kept.shape == (301, 32)
    with pytest.raises(ValueError, match="announced"):
        streaming_coreset([features[:10]], 20, 5, progress=False)


def test_coreset_size_rules() -> None:
    assert coreset_size(1000, ratio=0.1) == 100
    assert coreset_size(1000, ratio=0.1, size=42) == 42
    assert coreset_size(10, size=500) == 10
    with pytest.raises(ValueError):
        coreset_size(10, ratio=0.0)


def test_save_load_round_trip_gives_identical_distances(
    features: np.ndarray, tmp_path: Path
) -> None:
    for index in ("flat", "hnsw", "ivf"):
        config = BankConfig(coreset_ratio=0.5, index=index, ivf_nlist=16)
        bank = MemoryBank.fit(features, config)
        bank.metadata["note"] = "kept"
        loaded = MemoryBank.load(bank.save(tmp_path / index))
        assert loaded.config == config
        assert loaded.metadata["note"] == "kept"
        np.testing.assert_array_equal(
            bank.distances(features[:64]), loaded.distances(features[:64])
        )


def test_loading_a_folder_that_is_not_a_bank_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved memory bank"):
        MemoryBank.load(tmp_path)


def test_query_dimension_mismatch_is_refused(features: np.ndarray) -> None:
    bank = MemoryBank.fit(features, BankConfig(coreset_ratio=0.1))
    with pytest.raises(ValueError, match="dimension"):
        bank.distances(np.zeros((2, 16), np.float32))


def clustered(rows: int, seed: int) -> np.ndarray:
    """Rows around 40 shared centres: every chunk holds the same patterns, as image chunks do."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 32))
    return l2_normalize(centres[rng.integers(0, 40, rows)] + 0.15 * rng.normal(size=(rows, 32)))


def test_coreset_covers_like_plain_greedy_and_better_than_chunk_shares() -> None:
    rows = clustered(8000, 0)
    blocks = [rows[start : start + 500] for start in range(0, len(rows), 500)]
    ours = streaming_coreset(blocks, len(rows), 80, chunk_rows=500, progress=False)
    plain = rows[greedy_k_center(rows, 80)]
    # Each chunk keeping its own share: what the fit did before (above 4,096 centres, until
    # the global pass continued from such shares).
    shares = rows[chunk_share_indices(rows, 80, chunk_rows=500)]
    assert covering_radius(rows, ours.rows) <= 1.05 * covering_radius(rows, plain)
    assert covering_radius(rows, ours.rows) < covering_radius(rows, shares)
    # Beyond `global_limit` the start comes from the chunks' shares, and the global pass
    # still continues over every row (through a graph of the centres): as tight as from the
    # sample.
    many = streaming_coreset(blocks, len(rows), 80, chunk_rows=500, global_limit=10)
    assert not np.array_equal(many.rows, ours.rows)  # the other start was taken
    assert covering_radius(rows, many.rows) <= 1.05 * covering_radius(rows, plain)
    assert covering_radius(rows, many.rows) < covering_radius(rows, shares)
    # The recorded radius is the cosine distance scoring sees, to the worst-covered row.
    for coreset in (ours, many):
        measured = 1 - (coreset.rows @ rows.T).max(axis=0)
        assert coreset.radius == pytest.approx(float(measured.max()), abs=1e-5)


def test_spilled_rows_give_the_same_coreset() -> None:
    rows = clustered(3000, 6)
    for limit in (4096, 10):  # from a sample; from the chunks' shares, through a graph
        in_memory = streaming_coreset([rows], len(rows), 60, global_limit=limit)
        spilled = streaming_coreset(
            [rows], len(rows), 60, in_memory_bytes=0, global_limit=limit, progress=False
        )
        np.testing.assert_array_equal(in_memory.rows, spilled.rows)
        assert in_memory.radius == spilled.radius


def test_continuing_on_the_worst_rows_equals_plain_greedy() -> None:
    points = torch.from_numpy(clustered(6000, 5))
    start = np.array([0, 1, 2])
    nearest = nearest_centre(points, points[torch.from_numpy(start)])
    nearest[torch.from_numpy(start)] = -1.0
    plain = farthest_points(points, nearest, 150)
    picked, radius = continue_greedy(points, start, 150)
    np.testing.assert_array_equal(picked, plain)
    assert radius == pytest.approx(float(nearest.max().sqrt()), rel=1e-4)
    # Starting from upper bounds (distances to the centre nearest on a projection) and
    # measuring only the rows that look worst changes nothing.
    bounded, bounded_radius = continue_greedy(points, start, 150, random_projection(32, 8, 1))
    np.testing.assert_array_equal(bounded, plain)
    assert bounded_radius == pytest.approx(radius, rel=1e-5)


def test_graph_continuation_covers_as_plain_greedy_and_records_the_exact_radius(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    points = torch.from_numpy(clustered(6000, 5))
    start = np.array([0, 1, 2])
    nearest = nearest_centre(points, points[torch.from_numpy(start)])
    nearest[torch.from_numpy(start)] = -1.0
    plain = farthest_points(points, nearest, 150)
    plain_radius = float(nearest.max().sqrt())
    picked, radius = continue_greedy(points, start, 150, per_round=32, graph=True)
    assert len(set(picked.tolist()) | set(start.tolist())) == 153
    assert len(set(picked.tolist()) & set(plain.tolist())) >= 0.9 * len(plain)
    kept = points[torch.from_numpy(np.concatenate([start, picked]))]
    assert radius == pytest.approx(float(nearest_centre(points, kept).max().sqrt()), rel=1e-5)
    assert radius <= 1.02 * plain_radius
    # The same rows again. (This graph finds every nearest centre, so a graph linked on
    # several threads, in another order, would give these rows too: not shown here.)
    again, _ = continue_greedy(points, start, 150, per_round=32, graph=True)
    np.testing.assert_array_equal(again, picked)

    # A weak graph misses many rows' nearest centres; its values are upper bounds.
    monkeypatch.setattr(CentreGraph, "LINKS", 2)
    monkeypatch.setattr(CentreGraph, "SEARCH_WIDTH", 1)
    centres = list(range(0, 6000, 40))
    weak = CentreGraph(points, centres).measure()
    exact = nearest_centre(points, points[torch.tensor(centres)])
    assert bool((weak >= exact - 1e-5).all()) and float(weak.max()) > float(exact.max()) + 1e-3
    # Kept however often it misses, the radius returned is still the exact one.
    monkeypatch.setattr(CentreGraph, "MISS_LIMIT", 1.0)
    _, radius = continue_greedy(points, np.array(centres), 0, graph=True)
    assert radius == pytest.approx(float(exact.max().sqrt()), rel=1e-5)
    # With its check, a graph that is fine with 3 centres and misses as it grows gives way
    # to matrix products when its centres have doubled, and the rest is plain greedy's.
    monkeypatch.setattr(CentreGraph, "MISS_LIMIT", 0.01)
    with caplog.at_level(logging.WARNING, logger="detector.greedy"):
        picked, radius = continue_greedy(points, start, 150, per_round=32, graph=True)
    assert "measuring rows by matrix products instead" in caplog.text
    kept = points[torch.from_numpy(np.concatenate([start, picked]))]
    assert radius == pytest.approx(float(nearest_centre(points, kept).max().sqrt()), rel=1e-5)
    assert radius <= 1.02 * plain_radius


def test_a_graph_that_misses_gives_way_to_matrix_products(caplog: pytest.LogCaptureFixture) -> None:
    # 1,000 nearly orthogonal clusters: a graph search has nothing to follow towards the
    # right one, and misses the nearest centre of some rows.
    rng = np.random.default_rng(0)
    clusters = rng.normal(size=(1000, 128))
    noisy = clusters[rng.integers(0, 1000, 8000)] + 0.3 * rng.normal(size=(8000, 128))
    points = torch.from_numpy(l2_normalize(noisy.astype(np.float32)))
    start = np.arange(600)
    nearest = nearest_centre(points, points[:600])
    nearest[:600] = -1.0
    plain = farthest_points(points, nearest, 200)
    with caplog.at_level(logging.WARNING, logger="detector.greedy"):
        picked, radius = continue_greedy(points, start, 200, per_round=64, graph=True)
    assert "measuring rows by matrix products instead" in caplog.text
    np.testing.assert_array_equal(picked, plain)  # exactly plain greedy's continuation
    assert radius == pytest.approx(float(nearest.max().sqrt()), rel=1e-5)


def test_extend_covers_new_patches_as_tightly_as_the_training_patches() -> None:
    train = clustered(4000, 1)
    bank = MemoryBank.fit(train, BankConfig(coreset_ratio=0.05))
    before = bank.vectors().copy()
    radius = bank.covering_radius
    shifted = l2_normalize(clustered(600, 2) + 0.8)  # a new normal the bank has not seen
    assert bank.distances(shifted).max() > radius
    added = bank.extend(shifted)
    assert 0 < added < len(shifted), "covers the new patches without keeping them all"
    assert bank.size == len(before) + added == bank.metadata["bank_size"]
    np.testing.assert_array_equal(bank.vectors()[: len(before)], before)
    assert bank.distances(shifted).max() <= radius + 1e-5
    assert bank.extend(train[:300]) == 0, "patches already covered add nothing"


def test_extend_works_on_a_copy_and_without_a_recorded_radius(tmp_path: Path) -> None:
    train = clustered(3000, 3)
    bank = MemoryBank.fit(train, BankConfig(coreset_ratio=0.05, index="hnsw"))
    del bank.metadata["covering_radius"]  # a bank saved before the radius was recorded
    estimate = bank.covering_radius
    assert 0 < estimate < 1
    copy = bank.copy()
    copy.extend(l2_normalize(clustered(300, 4) - 0.8))
    assert copy.size > bank.size == bank.metadata["bank_size"]


def test_bank_json_is_upgraded_in_one_place_and_a_newer_format_is_refused(tmp_path) -> None:
    from detector.memory_bank import FORMAT_VERSION, upgraded
    from detector.scoring import Calibration

    old = {  # as banks were saved before format_version was kept
        "bank": {"coreset_ratio": 0.1},
        "extractor": {
            "source": "/models/dinov3",
            "resolution": 448,
            "patch_size": 16,
            "feature_dim": 384,
        },
        "calibration": {"threshold": 0.3, "false_alarm_rate": 0.01, "reference_scores": [0.1]},
    }
    current = upgraded(old)
    assert current["format_version"] == FORMAT_VERSION and "format_version" not in old
    assert current["extractor"]["backbone"] == "/models/dinov3"
    assert current["extractor"]["layers"] == [-1] and current["extractor"]["fingerprint"] is None
    calibration = Calibration.from_dict(current["calibration"])
    assert (calibration.rule, calibration.source) == ("empirical_quantile", "held_out")
    assert upgraded(current) == current
    with pytest.raises(ValueError, match="upgrade this project"):
        upgraded({**current, "format_version": FORMAT_VERSION + 1})
    bank = MemoryBank.fit(
        np.random.default_rng(0).normal(size=(40, 8)), BankConfig(coreset_ratio=None)
    )
    saved = json.loads((bank.save(tmp_path / "bank") / "bank.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION
