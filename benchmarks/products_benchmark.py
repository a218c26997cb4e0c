"""Many products on one server, and a bank that learns a new normal: the issue's measurements.

    python -m benchmarks.products_benchmark [--resolution 224] [--out docs/products.json]

Everything with a random-weight ViT-S/16 (the released model's shape) on synthetic carpet
sets made here (three products: three generator seeds). Prints, from one run:

1. new normal: defect-free images 10 % brighter, before and after adding 20 of them to the
   bank (false alarms on other brightened defect-free images, image AUROC on the brightened
   test set, the bank's growth in rows);
2. memory: the runner's RSS as each product's bank is first used, against the bank's bytes;
3. update cost: POST /products/{name}/images with 20 images until it answers (the version is
   then live in the runner), over 1.2 x the backbone time of those images + 2 s;
4. a Locust run across an update and a rollback: failed requests, and how long after each
   change its version answered.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from detector.anomaly_detector import AnomalyDetector
from detector.backbone import build_extractor
from detector.commands.random_backbone import make_backbone
from detector.data.mvtec import MVTecCategory
from detector.data.shifts import apply_shift
from detector.data.synthetic import make_dataset
from detector.fitting import fit_detector, iter_features
from detector.memory_bank import BankConfig
from detector.metrics import image_auroc
from devtools.local_server import (
    REPO,
    bentoml_serve,
    locust_command,
    service_env,
    service_rss_mib,
)

PRODUCTS = ("carpet", "line2", "line3")
EXPORT_ALL = """
import sys
from pathlib import Path
from detector.commands.export import export_models
for folder in sys.argv[1:]:
    export_models(Path(folder), with_graph=False)
"""


def brighter(path: Path, seed: int) -> Image.Image:
    return apply_shift(Image.open(path).convert("RGB"), "brightness", 1.1, seed)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def fit_products(work: Path, extractor, size: int) -> dict[str, tuple[Path, MVTecCategory]]:
    """Three products: a bank from 30 images each, calibrated on 10 others."""
    fitted = {}
    for seed, product in enumerate(PRODUCTS):
        root = make_dataset(
            work / product, n_train=60, n_test_good=20, n_per_defect=4, size=size, seed=seed
        )
        dataset = MVTecCategory(Path(root).parent, "carpet")
        train = dataset.train_paths()
        detector = fit_detector(
            extractor,
            train[:30],
            train[30:40],
            bank_config=BankConfig(coreset_ratio=0.1),
            progress=False,
        )
        detector.bank.metadata.update(category="carpet", product=product)
        fitted[product] = (detector.save(work / "models" / product), dataset)
    return fitted


def new_normal(extractor, model_dir: Path, dataset: MVTecCategory) -> dict:
    """False alarms and AUROC on 10 % brighter parts, before and after learning 20 of them."""
    detector = AnomalyDetector.load(model_dir, extractor)
    train = dataset.train_paths()
    samples = dataset.test_samples()
    test = [brighter(s.path, 100 + i) for i, s in enumerate(samples)]
    labels = np.array([s.label for s in samples])
    good_held_out = [brighter(p, 200 + i) for i, p in enumerate(train[40:60])]

    def measure(model: AnomalyDetector) -> dict:
        flags = [r.is_anomalous for r in model.predict(good_held_out, with_maps=False)]
        scores = [r.score for r in model.predict(test, with_maps=False)]
        return {
            "false_alarms": round(float(np.mean(flags)), 3),
            "image_auroc": round(image_auroc(labels, np.asarray(scores)), 4),
        }

    unshifted = [Image.open(p).convert("RGB") for p in train[40:60]]
    baseline = float(
        np.mean([r.is_anomalous for r in detector.predict(unshifted, with_maps=False)])
    )
    before = measure(detector)
    added = [brighter(p, i) for i, p in enumerate(train[:20])]  # the line's new normal
    features = np.concatenate(list(iter_features(extractor, added, 8)))
    learned, rows = detector.learned(features)
    after = measure(learned)
    return {
        "false_alarms_unshifted_before": round(baseline, 3),
        "before": before,
        "after": after,
        "auroc_drop": round(before["image_auroc"] - after["image_auroc"], 4),
        "bank_rows": {
            "before": detector.bank.size,
            "added": rows,
            "patches_offered": int(features.shape[0] * features.shape[1] * features.shape[2]),
        },
    }


def runner_rss(url: str) -> float:
    return sum(v for k, v in service_rss_mib(url).items() if k.startswith("runner"))


def memory_per_product(url: str, images: list[bytes], models: dict[str, Path]) -> list[dict]:
    """The runner's RSS after each product's bank is first used (each scored a few times)."""
    rows = []
    for product in PRODUCTS:
        before = runner_rss(url)
        for data in images:
            inspect(url, product, data)
        after = runner_rss(url)
        bank_mib = (models[product] / "index.faiss").stat().st_size / 2**20
        rows.append(
            {
                "product": product,
                "rss_before_mib": before,
                "rss_after_mib": after,
                "bank_mib": round(bank_mib, 2),
                "rss_rise_minus_bank_mib": round(after - before - bank_mib, 1),
            }
        )
    return rows


def inspect(url: str, product: str, data: bytes) -> dict:
    response = httpx.post(
        f"{url}/inspect",
        files={"image": ("x.png", data, "image/png")},
        data={"product": product},
        timeout=120,
    )
    response.raise_for_status()
    return response.json()


def update_cost(url: str, extractor, images: list[Image.Image]) -> dict:
    """Seconds to make a version live, over the backbone's time for the same images."""
    prepared = np.stack([extractor.prepare(image) for image in images])
    started = time.perf_counter()
    for row in prepared:  # the runner embeds one image at a time on CPU (batch size 1)
        extractor.embed(row[None])
    backbone_s = time.perf_counter() - started
    files = [("images", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]
    started = time.perf_counter()
    response = httpx.post(
        f"{url}/products/line3/images", files=files, data={"reason": "benchmark"}, timeout=600
    )
    update_s = time.perf_counter() - started
    response.raise_for_status()
    return {
        "images": len(images),
        "backbone_s": round(backbone_s, 2),
        "update_s": round(update_s, 2),
        "update_over_allowed": round(update_s / (1.2 * backbone_s + 2.0), 3),
        "rows_added": response.json()["rows_added"],
    }


def locust_across_changes(url: str, work: Path, images: list[Image.Image], probe: bytes) -> dict:
    """Load on every product while line2 gets a new version, then is rolled back."""
    prefix = work / "locust"
    command = locust_command(
        url,
        4,
        40,
        prefix,
        "--products",
        ",".join(PRODUCTS),
        "--image-count",
        "6",
        "--image-size",
        "224",
    )
    load = subprocess.Popen(
        command,
        cwd=REPO,
        env=service_env(work / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    switches: dict[str, float] = {}

    def wait_for(tag: str, since: float) -> None:
        while inspect(url, "line2", probe)["models"]["bank"] != tag:
            time.sleep(0.1)
        switches[tag] = round(time.perf_counter() - since, 2)

    time.sleep(12)
    files = [("images", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]
    response = httpx.post(f"{url}/products/line2/images", files=files, timeout=600)
    answered = time.perf_counter()
    wait_for(f"bank-line2:{response.json()['version']}", answered)
    time.sleep(8)
    rolled = httpx.post(f"{url}/products/line2/rollback", json={"version": "v1"}, timeout=600)
    answered = time.perf_counter()
    wait_for(f"bank-line2:{rolled.json()['version']}", answered)
    load.wait(timeout=300)
    rows = list((prefix.parent / f"{prefix.name}_stats.csv").read_text().splitlines())
    header, *lines = [row.split(",") for row in rows]
    total = dict(zip(header, lines[-1], strict=True))
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "seconds_until_served_after_answer": switches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="products-bench-") as scratch:
        work = Path(scratch)
        backbone = make_backbone(work / "vits16", "vits16", 0)
        extractor = build_extractor(str(backbone), resolution=args.resolution, num_threads=2)
        fitted = fit_products(work, extractor, args.resolution)
        report: dict = {"backbone": f"random ViT-S/16 at {args.resolution} px, 2 threads"}
        report["new_normal"] = new_normal(extractor, *fitted["carpet"])
        print(json.dumps(report["new_normal"], indent=2), flush=True)
        folders = [str(folder) for folder, _ in fitted.values()]
        export = subprocess.run(
            [sys.executable, "-c", EXPORT_ALL, *folders],
            cwd=REPO,
            env=service_env(work / "home"),
            capture_output=True,
            text=True,
        )
        if export.returncode:
            raise SystemExit(export.stderr[-2000:])
        train = fitted["line3"][1].train_paths()
        sample = [p.read_bytes() for p in train[40:43]]
        with bentoml_serve(work / "home", work / "serve.log") as url:
            models = {product: folder for product, (folder, _) in fitted.items()}
            report["memory"] = memory_per_product(url, sample, models)
            report["update"] = update_cost(
                url, extractor, [brighter(p, i) for i, p in enumerate(train[:20])]
            )
            relit = [
                brighter(p, 50 + i) for i, p in enumerate(fitted["line2"][1].train_paths()[:10])
            ]
            report["locust"] = locust_across_changes(url, work, relit, sample[0])
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
