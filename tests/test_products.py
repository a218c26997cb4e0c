"""Many products on one backbone, and banks that learn: versions, hot swap, history, rollback.

The store tests run in this process against the session's temporary BentoML home; the
served tests start `bentoml serve` on a store of their own (with keys set) and drive it
over HTTP, as a line's clients and an operator would.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.banks import changes, products, versions
from detector.banks.models import save_backbone, save_bank
from detector.data.mvtec import MVTecCategory
from detector.data.shifts import apply_shift
from detector.dino import DinoBackbone
from detector.errors import UserError
from detector.fitting import fit_detector, iter_features
from detector.memory_bank import BankConfig, MemoryBank
from detector.provenance import CROPS_FILE, Provenance
from detector.serving.runner import ScoringRunner
from detector.serving.settings import Settings
from devtools.http_client import http_client
from devtools.in_process import run_detector, run_main
from devtools.local_server import CHROMIUM, bentoml_serve, page_with_key, wait_for

API_KEY, ADMIN_KEY = "scoring-key-0123456", "admin-key-0123456789"


def brighter(path: Path, seed: int = 0) -> Image.Image:
    return apply_shift(Image.open(path).convert("RGB"), "brightness", 1.1, seed)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def product_dirs(
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Three products of one backbone: banks from different images and coreset sizes."""
    train = synthetic_dataset.train_paths()
    plans = {"carpet": (train[:12], 0.25), "line2": (train[8:20], 0.5), "line3": (train[2:14], 0.1)}
    root = tmp_path_factory.mktemp("products")
    dirs = {}
    for product, (paths, ratio) in plans.items():
        detector = fit_detector(
            tiny_backbone,
            paths,
            train[20:],
            bank_config=BankConfig(coreset_ratio=ratio, seed=0),
            progress=False,
        )
        detector.bank.metadata.update(category="carpet", product=product)
        dirs[product] = detector.save(root / product)
    return dirs


@pytest.fixture(scope="module")
def in_process_store(product_dirs: dict[str, Path], tiny_backbone: DinoBackbone) -> dict:
    """The products in this process's (temporary) model store, under names of their own."""
    backbone = save_backbone(tiny_backbone, "dino-backbone", with_graph=False)
    return {
        name: save_bank(folder, backbone, product=f"ip-{name}")
        for name, folder in product_dirs.items()
    }


def runner_for(names: list[str], tiny_backbone: DinoBackbone, **settings) -> ScoringRunner:
    config = dataclasses.replace(Settings.from_env(), products=names, max_batch_size=8, **settings)
    return ScoringRunner(tiny_backbone, "dino-backbone:test", names, config)


# ----- the store: versions, history, rollback, concurrency -----------------------------
def test_export_makes_version_one_of_each_product(in_process_store: dict) -> None:
    assert {"ip-carpet", "ip-line2", "ip-line3"} <= set(products.list_products())
    for model in in_process_store.values():
        assert model.tag.version == "v1" and model.info.labels["version"] == "1"
        assert model.info.metadata["change"]["action"] == "fit"
        assert "parent" not in model.info.metadata["change"]
    listed = {str(m.tag) for m in bentoml.models.list() if m.tag.name.startswith("bank-ip-")}
    assert {"bank-ip-carpet:v1", "bank-ip-line2:v1", "bank-ip-line3:v1"} <= listed


def test_a_mixed_batch_scores_each_image_with_its_product_bank(
    in_process_store: dict,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
) -> None:
    names = ["ip-carpet", "ip-line2", "ip-line3"]
    runner = runner_for(names, tiny_backbone)
    paths = [sample.path for sample in synthetic_dataset.test_samples()][:6]
    uploads = [(names[i % 3], path.read_bytes()) for i, path in enumerate(paths)]
    calls = []
    embed = tiny_backbone.embed
    tiny_backbone.embed = lambda batch: calls.append(len(batch)) or embed(batch)  # type: ignore[method-assign]
    try:
        answers = runner.score_uploads(uploads, with_maps=False)
    finally:
        del tiny_backbone.embed
    assert calls == [6], "one backbone pass for a batch that mixes products"
    for (name, _), path, answer in zip(uploads, paths, answers, strict=True):
        product = name.removeprefix("ip-")
        expected = AnomalyDetector.load(product_dirs[product], tiny_backbone).predict([path])[0]
        assert answer["product"] == name and answer["models"]["bank"] == f"bank-{name}:v1"
        assert answer["score"] == pytest.approx(expected.score, abs=1e-5)
        assert answer["threshold"] == pytest.approx(expected.threshold)
    assert [runner.drift(name, False)["images"] for name in names] == [2, 2, 2], "per product"
    unknown, unnamed = runner.score_uploads([("nope", b""), ("", b"")], with_maps=False)
    assert unknown["status"] == 404 and "ip-line2" in unknown["error"]
    assert unnamed["status"] == 400 and unnamed["reason"] == "product_required"


def test_added_images_go_live_in_a_new_version_and_rollback_restores_scores(
    in_process_store: dict, tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    runner = runner_for(["ip-line2"], tiny_backbone)
    train, good = synthetic_dataset.train_paths(), synthetic_dataset.test_samples()
    new_normal = [png(brighter(path, seed)) for seed, path in enumerate(train[:6])]
    held_out = png(brighter(next(s.path for s in good if s.label == 0), 99))
    (before,) = runner.score_uploads([("ip-line2", held_out)], with_maps=False)

    report = runner.add_images("ip-line2", new_normal, "new yarn batch", [])
    assert report["version"] == "v2" and report["rows_added"] > 0
    assert report["bank_rows_after"] == report["bank_rows_before"] + report["rows_added"]
    spec = runner.catalog.extractor.spec
    patches = 6 * (spec.resolution // spec.patch_size) ** 2
    assert report["rows_added"] < patches, "covers the new images, not all their patches"
    (after,) = runner.score_uploads([("ip-line2", held_out)], with_maps=False)
    assert after["models"]["bank"] == "bank-ip-line2:v2"
    assert after["score"] < before["score"]
    assert after["threshold"] == before["threshold"], "the threshold is kept unless asked"

    history = versions.history("ip-line2")
    assert [v["version"] for v in history] == ["v1", "v2"] and history[1]["live"]
    change = history[1]["change"]
    assert change["parent"] == "bank-ip-line2:v1" and change["reason"] == "new yarn batch"
    assert change["added_images"] == 6 and len(change["added_sha256"]) == 6
    # The new rows name their images; the fit's crops are shared, not copied again.
    v1, v2 = (Path(versions.version_model("ip-line2", v).path) for v in ("v1", "v2"))
    assert (v1 / CROPS_FILE).stat().st_ino == (v2 / CROPS_FILE).stat().st_ino
    provenance = Provenance.load(v2)
    added_rows = provenance.sources[-report["rows_added"] :, 0]
    named = {provenance.images[i] for i in added_rows}
    assert named <= {f"added image {digest[:12]}" for digest in change["added_sha256"]}

    # The kept calibration scores were measured on v1's bank: the version says so, and they
    # are upper bounds of what v2 gives the same calibration images (train[20:]).
    stated = history[1]["calibration"]
    assert stated["rows_added_since"] == report["rows_added"]
    assert (
        "upper bounds" in stated["statement"]
        and "upper bounds" not in (history[0]["calibration"]["statement"])
    )
    kept = MemoryBank.read_document(products.live_model("ip-line2").path)["calibration"]
    rescored = runner.score_uploads(
        [("ip-line2", path.read_bytes()) for path in train[20:]], with_maps=False
    )
    pairs = list(zip(rescored, kept["reference_scores"], strict=True))
    assert all(now["score"] <= then + 1e-6 for now, then in pairs)
    assert any(now["score"] < then - 1e-6 for now, then in pairs)

    restored = runner.rollback("ip-line2", "v1", "v2 hid a stain")
    assert restored["version"] == "v3"
    (rolled_back,) = runner.score_uploads([("ip-line2", held_out)], with_maps=False)
    assert rolled_back["models"]["bank"] == "bank-ip-line2:v3"
    assert rolled_back["score"] == before["score"], "exactly the earlier version's scores"
    assert versions.history("ip-line2")[-1]["change"]["restored"] == "v1"
    assert runner.rollback("ip-line2", "v9", "")["status"] == 404


def test_recalibration_sets_the_threshold_and_reports_how_scores_moved(
    in_process_store: dict, tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    runner = runner_for(["ip-line3"], tiny_backbone)
    train = synthetic_dataset.train_paths()
    added = [png(brighter(path, seed)) for seed, path in enumerate(train[:4])]
    calibration = [png(brighter(path, 50 + seed)) for seed, path in enumerate(train[20:24])]
    report = runner.add_images("ip-line3", added, "relit", calibration)
    moved = report["calibration"]
    assert moved["images"] == 4 and moved["scores_after"]["max"] <= moved["scores_before"]["max"]
    assert moved["threshold_after"] == pytest.approx(moved["scores_after"]["max"])
    live = products.live_model("ip-line3")
    assert live.info.metadata["change"]["action"] == "recalibrate"
    assert live.info.metadata["calibration"]["rows_added_since"] == 0, "measured anew"
    assert live.info.metadata["threshold"] == pytest.approx(moved["threshold_after"])
    assert runner.add_images("ip-line3", [b"not an image"], "", [])["status"] == 415
    assert products.live_model("ip-line3").tag == live.tag, "a refused change changes nothing"


def test_concurrent_adds_to_one_product_both_land(
    in_process_store: dict, tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    train = synthetic_dataset.train_paths()
    batches = [
        [png(brighter(path, seed)) for seed, path in enumerate(train[:10])],
        [png(apply_shift(Image.open(p).convert("RGB"), "contrast", 0.8, 1)) for p in train[10:20]],
    ]
    start = int(products.live_version("ip-carpet")[1:])
    runners = [runner_for(["ip-carpet"], tiny_backbone) for _ in batches]
    barrier = threading.Barrier(2)

    def add(index: int) -> dict:
        barrier.wait()
        return runners[index].add_images("ip-carpet", batches[index], f"add {index}", [])

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(add, range(2)))
    assert sorted(int(r["version"][1:]) for r in reports) == [start + 1, start + 2]
    final = versions.history("ip-carpet")[-1]
    first = versions.history("ip-carpet")[-2]
    assert final["change"]["parent"] == first["tag"], "the second add extended the first"
    hashes = {
        h
        for version in versions.history("ip-carpet")
        for h in version["change"].get("added_sha256", [])
    }
    assert len(hashes) == 20, "both adds of 10 images are in the history"
    later = reports[0] if reports[0]["version"] == final["version"] else reports[1]
    earlier = reports[1] if later is reports[0] else reports[0]
    assert later["bank_rows_before"] == earlier["bank_rows_after"]
    # The live bank covers every patch of both batches as tightly as its training patches.
    bank = MemoryBank.load(products.live_model("ip-carpet").path)
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in batches[0] + batches[1]]
    features = np.concatenate(list(iter_features(tiny_backbone, decoded, 8)))
    assert bank.distances(features).max() <= bank.covering_radius + 1e-5


def test_a_version_made_elsewhere_is_served_after_the_refresh_interval(
    in_process_store: dict, tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    runner = runner_for(["ip-line3"], tiny_backbone, bank_refresh_s=0.2)
    image = synthetic_dataset.train_paths()[0].read_bytes()
    (first,) = runner.score_uploads([("ip-line3", image)], with_maps=False)
    other = versions.rollback("ip-line3", "v1", "made by another replica")
    time.sleep(0.3)
    (second,) = runner.score_uploads([("ip-line3", image)], with_maps=False)
    assert first["models"]["bank"] != second["models"]["bank"] == str(other.tag)


def test_banks_beyond_the_memory_budget_are_evicted_least_recently_used(
    in_process_store: dict, tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> None:
    names = ["ip-carpet", "ip-line2", "ip-line3"]
    runner = runner_for(names, tiny_backbone, bank_cache_mb=0)  # room for one bank only
    image = synthetic_dataset.train_paths()[0].read_bytes()
    for name in names:
        (answer,) = runner.score_uploads([(name, image)], with_maps=False)
        assert answer["product"] == name
    assert runner.catalog.loaded() == ["ip-line3"]


def gauge(name: str, product: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"product": product})


def fresh_product(name: str, product_dirs: dict[str, Path]) -> bentoml.Model:
    return save_bank(
        product_dirs["line3"], bentoml.models.get("dino-backbone:latest"), product=name
    )


def test_a_bank_saved_before_provenance_scores_alike_and_says_why_it_explains_nothing(
    in_process_store: dict,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
    tmp_path: Path,
) -> None:
    import shutil

    from detector.provenance import NOT_EXPLAINED, PROVENANCE_FILE

    old = shutil.copytree(product_dirs["line3"], tmp_path / "old")
    for name in (PROVENANCE_FILE, CROPS_FILE):  # as every bank was saved before they were
        (old / name).unlink()
    model = save_bank(old, bentoml.models.get("dino-backbone:latest"), product="ip-old")
    assert PROVENANCE_FILE not in model.info.metadata["files"]
    runner = runner_for(["ip-old", "ip-line3"], tiny_backbone)
    image = next(s for s in synthetic_dataset.test_samples() if s.label == 1).path.read_bytes()
    asked = [("ip-old", image, True), ("ip-line3", image, True)]  # explain both
    before, now = runner.score_uploads(asked, False)
    assert before["score"] == pytest.approx(now["score"], abs=1e-6)
    assert before["explanation"] == {"available": False, "why": NOT_EXPLAINED}
    assert now["explanation"]["available"] is True
    # Its later versions stay without one: a threshold change shares its files as they are.
    changes.set_operating_point("ip-old", target=0.05, reason="a new operating point")
    assert not (Path(products.live_model("ip-old").path) / PROVENANCE_FILE).exists()


def test_a_deleted_live_version_is_refused_never_replaced_and_its_number_never_reused(
    in_process_store: dict,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
) -> None:
    fresh_product("ip-deleted", product_dirs)
    runner = runner_for(["ip-deleted"], tiny_backbone, bank_refresh_s=0.0)
    image = synthetic_dataset.train_paths()[0].read_bytes()
    (first,) = runner.score_uploads([("ip-deleted", image)], with_maps=False)
    newest = versions.rollback("ip-deleted", "v1", "to be deleted")
    bentoml.models.delete(str(newest.tag))  # what an operator might do by hand
    with pytest.raises(products.LiveVersionMissing, match="rollback"):
        products.live_version("ip-deleted")
    (answer,) = runner.score_uploads([("ip-deleted", image)], with_maps=False)
    assert answer["status"] == 503 and answer["reason"] == "bank_missing", answer
    assert gauge("inspection_bank_unavailable", "ip-deleted") == 1
    (listed,) = runner.products()
    assert listed["reason"] == "bank_missing" and "rollback" in listed["error"]
    with pytest.raises(products.LiveVersionMissing):  # no change may build on a missing bank
        changes.set_operating_point("ip-deleted", target=0.05)
    restored = versions.rollback("ip-deleted", "v1", "recover")
    assert int(restored.tag.version[1:]) == int(newest.tag.version[1:]) + 1, "never reused"
    assert restored.info.metadata["change"]["parent"] == str(newest.tag)
    (answer,) = runner.score_uploads([("ip-deleted", image)], with_maps=False)
    assert answer["models"]["bank"] == str(restored.tag)
    assert answer["score"] == pytest.approx(first["score"], abs=1e-6)
    assert gauge("inspection_bank_unavailable", "ip-deleted") == 0


def test_a_damaged_index_is_refused_with_a_sentence(
    in_process_store: dict,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
) -> None:
    model = fresh_product("ip-damaged", product_dirs)
    assert set(model.info.metadata["files"]) == {
        "index.faiss",
        "provenance.npz",
        "crops.npz",
        "bank.json",
    }
    index = Path(model.path) / "index.faiss"
    assert oct(index.stat().st_mode)[-3:] == "444", "stored files are read-only"
    index.chmod(0o644)  # what a careless hand (or root) can still do
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    with pytest.raises(products.BankCorrupt, match="index.faiss"):
        versions.load_bank(model)
    runner = runner_for(["ip-damaged"], tiny_backbone)
    image = synthetic_dataset.train_paths()[0].read_bytes()
    (answer,) = runner.score_uploads([("ip-damaged", image)], with_maps=False)
    assert answer["status"] == 503 and answer["reason"] == "bank_corrupt"
    assert "roll ip-damaged back" in answer["error"]
    assert runner.model_info()["reason"] == "bank_corrupt"  # 503, not a 500
    assert runner.drift("ip-damaged", False)["status"] == 503
    # Restoring a damaged version is refused, and a refused change uses up no number.
    refused = runner.rollback("ip-damaged", "v1", "restore the broken one")
    assert refused["status"] == 503 and refused["reason"] == "bank_corrupt"
    assert [v["version"] for v in versions.history("ip-damaged")] == ["v1"]
    fresh = save_bank(
        product_dirs["line3"], bentoml.models.get("dino-backbone:latest"), product="ip-damaged"
    )
    assert fresh.tag.version == "v2"


def test_threshold_versions_share_the_index_and_old_versions_are_pruned(
    in_process_store: dict,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = fresh_product("ip-kept", product_dirs)
    runner = runner_for(["ip-kept"], tiny_backbone)
    image = synthetic_dataset.train_paths()[0].read_bytes()
    runner.score_uploads([("ip-kept", image)], with_maps=False)  # v1 served: records name it
    restored_source = changes.set_operating_point("ip-kept", target=0.2)[0]  # v2, never served
    versions.rollback("ip-kept", "v2", "a rollback names v2")  # v3
    monkeypatch.setenv("INSPECT_KEEP_VERSIONS", "3")
    made = [changes.set_operating_point("ip-kept", target=0.05 + 0.01 * i)[0] for i in range(6)]
    index = Path(made[-1].path) / "index.faiss"
    assert index.stat().st_ino == (Path(first.path) / "index.faiss").stat().st_ino
    assert index.stat().st_nlink > 2, "one index file on disk for every threshold version"
    left = [version["version"] for version in versions.history("ip-kept")]
    assert left == ["v1", "v2", "v7", "v8", "v9"], "served, restored, and the newest three"
    assert str(restored_source.tag.version) in left
    page = versions.history("ip-kept", limit=2)
    assert [v["version"] for v in page] == ["v8", "v9"] and page[-1]["live"]
    assert [v["version"] for v in versions.history("ip-kept", limit=2, before=8)] == ["v2", "v7"]


def test_bad_product_names_and_versions_are_one_sentence() -> None:
    with pytest.raises(UserError, match="not valid"):
        products.check_product("Line 3/../x")
    with pytest.raises(products.UnknownProductError, match="Unknown product"):
        products.live_model("never-exported")
    with pytest.raises(products.UnknownProductError):
        versions.history("never-exported")
    for version in ("v01", "v0", "²", "v²", "v" + "9" * 40, "1.0"):
        with pytest.raises(products.VersionError, match="has no bank version"):
            products.version_model("ip-carpet", version)


def test_the_versions_on_the_live_scale_stop_where_the_store_does(
    in_process_store: dict, product_dirs: dict[str, Path]
) -> None:
    fresh_product("ip-orphan", product_dirs)
    middle = changes.set_operating_point("ip-orphan", target=0.2)[0]
    live = changes.set_operating_point("ip-orphan", target=0.1)[0]
    bentoml.models.delete(str(middle.tag))  # the live version's parent, by hand
    assert versions.scoring_versions("ip-orphan")[1] == [str(live.tag)]


# ----- served: one `bentoml serve`, three products, keys set ----------------------------
def export_all(folders: list[str]) -> None:
    from detector.commands.export import export_models

    for folder in folders:
        export_models(Path(folder), with_graph=False)


@pytest.fixture(scope="module")
def served_home(product_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("products_home")
    result = run_main(export_all, home, *[str(folder) for folder in product_dirs.values()])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("reusing the stored backbone") == 2, "one backbone for all"
    return home


@pytest.fixture(scope="module")
def server(served_home: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with bentoml_serve(
        served_home,
        log,
        INSPECT_API_KEY=API_KEY,
        INSPECT_ADMIN_KEY=ADMIN_KEY,
        INSPECT_MAX_BATCH_SIZE="4",  # batches that mix products, as on a GPU
    ) as url:
        yield url


def inspect(url: str, product: str | None, data: bytes, key: str = API_KEY) -> httpx.Response:
    form = {"product": product} if product is not None else {}
    files = {"image": ("part.png", data, "image/png")}
    return http_client.post(
        f"{url}/inspect", files=files, data=form, headers={"X-API-Key": key}, timeout=60
    )


def test_products_are_listed_with_their_live_version_and_keys_guard_them(server: str) -> None:
    for path in ("/products", "/products/", "/products/carpet", "/products/carpet/history/"):
        assert http_client.get(f"{server}{path}", timeout=30).status_code == 401, path
    listing = http_client.get(
        f"{server}/products", headers={"X-API-Key": API_KEY}, timeout=30
    ).json()
    assert [entry["name"] for entry in listing] == ["carpet", "line2", "line3"]
    for entry in listing:
        assert entry["version"] == "v1" and entry["tag"] == f"bank-{entry['name']}:v1"
        assert entry["bank_rows"] > 0 and entry["threshold"] > 0
        assert entry["change"]["action"] == "fit"
        assert entry["in_memory"] is False and entry["drift"] is None, "listing loads no bank"
    files = {"images": ("a.png", b"x", "image/png")}
    for key, status in ((None, 401), (API_KEY, 403)):  # a bank change needs the admin role
        headers = {"X-API-Key": key} if key else {}
        refused = http_client.post(f"{server}/products/carpet/images", files=files, headers=headers)
        assert refused.status_code == status and "admin" in refused.json()["error"]
    admin = {"X-API-Key": ADMIN_KEY}
    empty = http_client.post(f"{server}/products/carpet/rollback", json={}, headers=admin)
    assert empty.status_code == 400
    unknown = http_client.get(f"{server}/products/nope/history", headers=admin)
    assert unknown.status_code == 404 and "carpet" in unknown.json()["error"]
    # What used to be a 500 with a traceback is a sentence and a 4xx.
    for path, status in (
        ("/products/Carpet/history", 400),
        ("/products/" + "x" * 300 + "/suggestion", 400),
        ("/products/carpet/history?limit=%C2%B2", 400),
        ("/products/carpet/history?limit=" + "9" * 5000, 400),
        ("/products/carpet/suggestion?target=nan", 400),
        ("/products/carpet/suggestion?days=1e999", 400),
    ):
        answer = http_client.get(f"{server}{path}", headers=admin, timeout=30)
        assert answer.status_code == status and "error" in answer.json(), path
    for version in ("v01", "v1 ", "²", "v" + "1" * 200, 7):
        body = {"version": version}
        answer = http_client.post(f"{server}/products/carpet/rollback", json=body, headers=admin)
        assert answer.status_code in (400, 404) and "error" in answer.json(), version
    for threshold in (True, "0.3", [0.3], 1e308):
        body = {"threshold": threshold}
        answer = http_client.post(f"{server}/products/carpet/threshold", json=body, headers=admin)
        assert answer.status_code == 400, threshold
    assert http_client.get(f"{server}/products", headers=admin).json()[0]["version"] == "v1"


def test_concurrent_requests_for_different_products_equal_in_process_predict(
    server: str,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
) -> None:
    paths = [sample.path for sample in synthetic_dataset.test_samples()][:4]
    jobs = [(product, path) for product in product_dirs for path in paths]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: inspect(server, job[0], job[1].read_bytes()), jobs))
    for (product, path), response in zip(jobs, answers, strict=True):
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = AnomalyDetector.load(product_dirs[product], tiny_backbone).predict([path])[0]
        assert answer["product"] == product
        assert answer["score"] == pytest.approx(expected.score, abs=1e-5)
        assert answer["models"]["bank"] == f"bank-{product}:v1"
    data = paths[0].read_bytes()
    unknown = inspect(server, "nope", data)
    assert unknown.status_code == 404 and "line3" in unknown.json()["error"]
    unnamed = inspect(server, None, data)
    assert unnamed.status_code == 400 and unnamed.json()["reason"] == "product_required"
    metrics = http_client.get(f"{server}/metrics", timeout=30).text
    for product in product_dirs:
        assert f'inspection_verdicts_total{{product="{product}",' in metrics


def test_an_update_from_the_command_is_served_without_restart_then_rolled_back(
    server: str, served_home: Path, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    train = synthetic_dataset.train_paths()
    new_normal = tmp_path / "relit"
    new_normal.mkdir()
    for seed, path in enumerate(train[:6]):
        brighter(path, seed).save(new_normal / f"{seed}.png")
    held_out = png(
        brighter(next(s.path for s in synthetic_dataset.test_samples() if s.label == 0), 7)
    )
    before = inspect(server, "line2", held_out).json()

    added = run_detector(
        served_home, "add-images", "line2", str(new_normal), "--reason", "relit line"
    )
    assert added.returncode == 0, added.stderr[-3000:]
    done = time.monotonic()
    while (answer := inspect(server, "line2", held_out).json())["models"][
        "bank"
    ] != "bank-line2:v2":
        assert time.monotonic() - done < 5, "the new version is served within 5 s"
        time.sleep(0.2)
    assert answer["score"] < before["score"]

    admin = {"X-API-Key": ADMIN_KEY}
    body = {"version": "v1", "reason": "back to v1"}
    rolled = http_client.post(
        f"{server}/products/line2/rollback", json=body, headers=admin, timeout=60
    )
    assert rolled.status_code == 200 and rolled.json()["version"] == "v3"
    after = inspect(server, "line2", held_out).json()
    assert after["models"]["bank"] == "bank-line2:v3" and after["score"] == before["score"]
    history = http_client.get(
        f"{server}/products/line2/history", headers={"X-API-Key": ADMIN_KEY}
    ).json()
    made = [version["change"] for version in history["versions"]]
    assert [c["action"] for c in made] == ["fit", "add_images", "rollback"]
    assert made[1]["reason"] == "relit line" and made[2]["restored"] == "v1"


def test_images_added_over_http_make_a_version(
    server: str, synthetic_dataset: MVTecCategory
) -> None:
    train = synthetic_dataset.train_paths()
    files = [
        ("images", (f"{i}.png", png(brighter(p, i)), "image/png")) for i, p in enumerate(train[:3])
    ]
    admin = {"X-API-Key": ADMIN_KEY}
    url = f"{server}/products/line3/images"
    response = http_client.post(
        url, files=files, data={"reason": "false alarm"}, headers=admin, timeout=120
    )
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["version"] == "v2" and report["rows_added"] > 0
    bad = [("images", ("bad.png", b"not an image", "image/png"))]
    refused = http_client.post(url, files=bad, headers=admin, timeout=60)
    assert refused.status_code == 415
    none = http_client.post(url, data={"reason": "x"}, headers=admin, timeout=60)
    assert none.status_code in (400, 415)
    listing = http_client.get(f"{server}/products", headers={"X-API-Key": API_KEY}).json()
    assert {e["name"]: e["version"] for e in listing}["line3"] == "v2"


def test_a_later_session_over_http_sets_the_threshold_and_the_promise_is_said_again(
    server: str, synthetic_dataset: MVTecCategory
) -> None:
    train = synthetic_dataset.train_paths()
    files = [
        ("images", (f"{i}.png", png(brighter(p, 30 + i)), "image/png"))
        for i, p in enumerate(train[14:20])
    ]
    admin = {"X-API-Key": ADMIN_KEY}
    url = f"{server}/products/line3/images"

    def post(headers: dict = admin, **form: str) -> httpx.Response:
        return http_client.post(url, files=files, data=form, headers=headers, timeout=120)

    assert post({"X-API-Key": API_KEY}, session="night").status_code == 403
    for form, said in [
        ({"session": "../night"}, "not a valid name"),
        ({"session": "night", "join": "sideways"}, "join must be one of both, bank"),
        ({"join": "calibration"}, "name the session"),
    ]:
        refused = post(**form)
        assert refused.status_code == 400 and refused.json()["reason"] == "bad_session"
        assert said in refused.json()["error"]
    with_calibration = http_client.post(
        url,
        files=[*files, ("calibration_images", files[0][1])],
        data={"session": "night"},
        headers=admin,
        timeout=60,
    )
    assert with_calibration.status_code == 400
    assert "without calibration_images" in with_calibration.json()["error"]

    before = {e["name"]: e for e in http_client.get(f"{server}/products", headers=admin).json()}
    answer = post(session="night", reason="night shift")
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["session"] == "night" and report["after"]["across_sessions"] is True
    assert report["after"]["statement"] != report["before"]["statement"]
    again = post(session="night", join="calibration")
    assert again.status_code == 400 and "in the bank already" in again.json()["error"]
    listed = {e["name"]: e for e in http_client.get(f"{server}/products", headers=admin).json()}
    line3 = listed["line3"]
    assert int(line3["version"][1:]) == int(before["line3"]["version"][1:]) + 1
    assert line3["sessions"]["calibration"] == ["night"] and "night" in line3["sessions"]["bank"]
    assert line3["calibration"]["source"] == "session"
    assert line3["calibration"]["statement"] == report["after"]["statement"]
    assert line3["change"]["action"] == "add_session" and line3["change"]["reason"] == "night shift"


def test_the_operating_point_moves_over_http_with_the_admin_key(
    server: str, synthetic_dataset: MVTecCategory
) -> None:
    url, admin = f"{server}/products/line2/threshold", {"X-API-Key": ADMIN_KEY}
    image = next(s.path for s in synthetic_dataset.test_samples() if s.label == 0).read_bytes()
    before = inspect(server, "line2", image).json()
    listing = {e["name"]: e for e in http_client.get(f"{server}/products", headers=admin).json()}
    calibration = listing["line2"]["calibration"]
    assert calibration["calibration_images"] > 0 and "statement" in calibration
    denied = http_client.post(url, json={"threshold": 1e-9}, headers={"X-API-Key": API_KEY})
    assert denied.status_code == 403
    for body in ({"target": 2}, {"threshold": -1}, {"threshold": 1, "target": 0.1}, {"x": 1}):
        refused = http_client.post(url, json=body, headers=admin, timeout=60)
        assert refused.status_code == 400, body
    unconfirmed = http_client.post(
        url, json={"threshold": 1e-9, "reason": "flag all"}, headers=admin
    )
    assert unconfirmed.status_code == 400 and "confirm" in unconfirmed.json()["error"]
    flag_all = {"threshold": 1e-9, "reason": "flag all", "confirm": True}
    moved = http_client.post(url, json=flag_all, headers=admin)
    assert moved.status_code == 200, moved.text
    promise = promises(server)  # at once, before any image: no stale promise anywhere
    assert promise["products"] == promise["drift"] == pytest.approx(1.0, abs=0.1), promise
    after = inspect(server, "line2", image).json()
    assert after["is_anomalous"] and after["threshold"] == pytest.approx(1e-9)
    assert after["score"] == before["score"] and after["models"]["bank"].endswith(
        moved.json()["version"]
    )
    restore = {"version": listing["line2"]["version"], "reason": "undo"}
    back = http_client.post(f"{server}/products/line2/rollback", json=restore, headers=admin)
    assert back.status_code == 200
    again = inspect(server, "line2", image).json()
    assert (again["threshold"], again["is_anomalous"]) == (
        before["threshold"],
        before["is_anomalous"],
    )
    restored = promises(server)
    assert (
        restored["products"]
        == restored["drift"]
        == pytest.approx(calibration["expected_false_alarm_rate"])
    )


def promises(server: str, product: str = "line2") -> dict[str, float]:
    """The promised false-alarm rate as /products and /drift state it."""
    admin = {"X-API-Key": ADMIN_KEY}
    listing = {e["name"]: e for e in http_client.get(f"{server}/products", headers=admin).json()}
    drift = http_client.post(
        f"{server}/drift", json={"product": product}, headers=admin, timeout=60
    )
    assert drift.status_code == 200, drift.text
    return {
        "products": listing[product]["calibration"]["expected_false_alarm_rate"],
        "drift": drift.json()["promised_rate"],
    }


def test_the_web_page_scores_with_the_product_the_operator_picks(
    server: str,
    product_dirs: dict[str, Path],
    tiny_backbone: DinoBackbone,
    synthetic_dataset: MVTecCategory,
) -> None:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    image = next(s.path for s in synthetic_dataset.test_samples() if s.label == 1)
    listed = http_client.get(
        f"{server}/products", headers={"X-API-Key": API_KEY}, timeout=30
    ).json()
    (line2,) = [entry for entry in listed if entry["name"] == "line2"]
    assert line2["calibration"]["sessions"] == 1
    assert "(one capture session)" in line2["calibration"]["statement"]
    # What the API says for line2, whatever version is live; carpet (the first option)
    # scores the image differently, so the page's score shows which bank it used.
    expected = inspect(server, "line2", image.read_bytes()).json()["score"]
    assert inspect(server, "carpet", image.read_bytes()).json()["score"] != expected
    with page_with_key(f"{server}/ui/#inspect", API_KEY) as page:
        wait_for(page, "document.querySelectorAll('#product option').length === 3")
        page.select_option("#product", "line2")
        wait_for(page, "document.getElementById('product-info').textContent.includes('bank v')")
        # One capture session: the page says what the promise holds for, and what more
        # the target needs, as /products does.
        info = page.inner_text("#product-info")
        assert "the fit saw 1 capture session: it holds for parts like the training" in info
        assert "1.0 % target needs about 299 images from 2 sessions" in info
        page.set_input_files("#file", str(image))
        wait_for(page, "document.getElementById('d-product') !== null", timeout=60)
        assert page.inner_text("#d-product") == "line2"
        assert float(page.inner_text("#d-score")) == pytest.approx(expected, abs=1e-4)


def test_learning_a_brighter_normal_cuts_its_false_alarms_and_keeps_defects_ranked(
    fitted_detector: AnomalyDetector, synthetic_dataset: MVTecCategory
) -> None:
    from detector.metrics import image_auroc

    samples = synthetic_dataset.test_samples()
    test = [brighter(s.path, 100 + i) for i, s in enumerate(samples)]
    labels = np.array([s.label for s in samples])
    good = [image for image, label in zip(test, labels, strict=True) if label == 0]
    train = synthetic_dataset.train_paths()
    features = np.concatenate(
        list(
            iter_features(
                fitted_detector.extractor, [brighter(p, i) for i, p in enumerate(train)], 8
            )
        )
    )
    learned, added = fitted_detector.learned(features)

    def false_alarms(model: AnomalyDetector) -> float:
        return float(np.mean([r.is_anomalous for r in model.predict(good, with_maps=False)]))

    def auroc(model: AnomalyDetector) -> float:
        return image_auroc(
            labels, np.array([r.score for r in model.predict(test, with_maps=False)])
        )

    assert false_alarms(learned) < false_alarms(fitted_detector)
    assert auroc(learned) >= auroc(fitted_detector) - 0.02
    assert 0 < added < features.shape[0] * features.shape[1] * features.shape[2]
    assert fitted_detector.bank.size < learned.bank.size, "the served detector is untouched"


# ----- new products over HTTP and from the page (after the tests that count products) ---
def fit_files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "image/png")) for path in paths]


def job_end(server: str, location: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = http_client.get(f"{server}{location}", headers={"X-API-Key": ADMIN_KEY}, timeout=30)
        assert job.status_code == 200, job.text
        if job.json()["state"] != "running":
            return job.json()
        time.sleep(0.1)
    raise AssertionError(f"the fit job never ended: {job.text}")


def test_a_new_product_over_http_is_an_admins_refuses_bad_input_and_ends_as_v1(
    server: str, synthetic_dataset: MVTecCategory
) -> None:
    train = synthetic_dataset.train_paths()
    admin, line = {"X-API-Key": ADMIN_KEY}, {"X-API-Key": API_KEY}
    url = f"{server}/products"

    def post(files: list, headers: dict = admin, **form: str) -> httpx.Response:
        return http_client.post(url, files=files, data=form, headers=headers, timeout=120)

    for headers, status in (({}, 401), (line, 403)):
        refused = post(fit_files(train[:6]), headers, name="line4")
        assert refused.status_code == status and "admin" in refused.json()["error"]
    small = Image.open(train[3]).resize((40, 30))
    mixed = [*fit_files(train[:6]), ("images", ("small.png", png(small), "image/png"))]
    for files, form, status, said in (
        ([], {"name": "line4"}, 415, "multipart"),  # a form without files
        (fit_files(train[:1]), {"name": "line4"}, 400, "at least 5"),
        (mixed, {"name": "line4"}, 400, "40 x 30 (1)"),
        (fit_files(train[:6]), {"name": "carpet"}, 409, "exists already"),
        (fit_files(train[:6]), {"name": "Line 4"}, 400, "not valid"),
        (fit_files(train[:6]), {"name": "line4", "resolution": "999"}, 400, "px"),
        (fit_files(train[:6]), {"name": "line4", "target": "nan"}, 400, "target"),
    ):
        answer = post(files, **form)
        assert answer.status_code == status and said in answer.json()["error"], answer.text
    started = post(fit_files(train[:12]), name="line4", target="0.05", reason="new line")
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    assert location == f"/products/line4/jobs/{started.json()['job']}"
    job = job_end(server, location)
    assert job["state"] == "done" and job["version"] == "v1", job
    assert job["calibration"]["target_false_alarm_rate"] == 0.05
    late = http_client.delete(f"{server}{location}", headers=admin, timeout=30)
    assert late.status_code == 409 and "v1 is live" in late.json()["error"]
    gone = http_client.get(f"{server}/products/line4/jobs/0123456789ab", headers=admin, timeout=30)
    assert gone.status_code == 404 and "restart" in gone.json()["error"]
    listed = {e["name"]: e for e in http_client.get(url, headers=line, timeout=30).json()}
    assert listed["line4"]["version"] == "v1"
    assert listed["line4"]["change"]["requested_by"] == "admin"
    part = synthetic_dataset.test_samples()[0].path
    inspected = inspect(server, "line4", part.read_bytes())
    assert inspected.status_code == 200 and inspected.json()["models"]["bank"] == "bank-line4:v1"
    # A cancel mid-fit: nothing of it is saved, and the name stays free.
    started = post(fit_files(train[:24]), name="line6")
    cancel = http_client.delete(f"{server}{started.headers['location']}", headers=admin, timeout=30)
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    assert job_end(server, started.headers["location"])["state"] == "cancelled"
    assert "line6" not in {e["name"] for e in http_client.get(url, headers=line, timeout=30).json()}


def test_an_operator_makes_a_product_from_twelve_images_on_the_page_and_inspects_it(
    server: str, synthetic_dataset: MVTecCategory, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    folder = tmp_path / "line5"  # two capture sessions, as subfolders of the chosen folder
    for index, path in enumerate(synthetic_dataset.train_paths()[:12]):
        session = folder / ("day" if index < 6 else "night")
        session.mkdir(parents=True, exist_ok=True)
        (session / path.name).write_bytes(path.read_bytes())
    part = next(s.path for s in synthetic_dataset.test_samples() if s.label == 1)
    evening = [tmp_path / f"evening-{i}.png" for i in range(6)]  # a later session: new images
    for seed, path in enumerate(synthetic_dataset.train_paths()[12:18]):
        brighter(path, 60 + seed).save(evening[seed])
    with page_with_key(f"{server}/ui/#new", ADMIN_KEY) as page:
        page.fill("#new-name", "line5")
        page.set_input_files("#new-folder", str(folder))
        page.fill("#new-target", "5")
        page.click("#new-start")
        wait_for(page, "document.getElementById('fit-status').textContent.includes('Fitting')")
        wait_for(page, "document.getElementById('fit-status').textContent.includes('live')", 120)
        status = page.inner_text("#fit-status")
        progress = page.eval_on_selector("#fit-progress", "p => p.value")
        wait_for(page, "document.getElementById('product').value === 'line5'")
        page.screenshot(path=str(tmp_path / "new-product.png"))
        # The evening shift joins line5 from the same view; named twice, it is refused.
        sessions = []
        for _ in range(2):
            page.fill("#session-name", "evening")
            page.set_input_files("#session-images", [str(path) for path in evening])
            page.click("#session-add")
            wait_for(
                page,
                "/ is live|Not added/.test(document.getElementById('session-status').textContent)",
                60,
            )
            sessions.append(page.inner_text("#session-status"))
            page.evaluate("document.getElementById('session-status').textContent = ''")
        page.click("#tab-inspect")
        page.set_input_files("#file", str(part))
        wait_for(page, "document.getElementById('d-product') !== null", timeout=60)
        inspected = page.inner_text("#d-product")
    assert status.startswith("line5 v1 is live") and progress == 1
    assert "the fit saw 2 capture sessions" in status, "the folders were its sessions"
    assert inspected == "line5"
    assert sessions[0].startswith("line5 v2 is live"), sessions
    assert "had not seen its session (3 sessions in all)" in sessions[0]
    assert sessions[1].startswith("Not added: Session 'evening' is in the bank already")
    admin = {"X-API-Key": ADMIN_KEY}
    fitted, joined = http_client.get(f"{server}/products/line5/history", headers=admin).json()[
        "versions"
    ]
    assert fitted["calibration"]["source"] == "leave_one_session_out"
    assert fitted["change"]["sessions"] == ["day", "night"]
    assert joined["change"]["session"] == "evening" and joined["calibration"]["sessions"] == 3
