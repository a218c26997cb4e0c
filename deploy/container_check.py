"""Build the service's container image and run it as the Kubernetes examples do.

    python -m deploy.container_check        # or: make container-check
    python -m deploy.container_check --image-only [--tag NAME]   # the CPU image, from your
                                                                 # own model store, no checks

1. a model store with a tiny random backbone and a bank fitted on the synthetic set;
2. `bentoml build` of a CPU variant of bentofile.yaml (the CPU build of torch provided at
   build time: PyPI's torch is a CUDA build of several GB) and `bentoml containerize`;
   with podman the base image is made here from Debian (`debootstrap`, a few minutes, once),
   since Docker Hub may be out of reach; deploy/Dockerfile.template's step removes what
   serving never reads, and the image is squashed without the wheel it was built from;
3. the serving Deployment's container (deploy/k8s/serving.yaml) run with its own command,
   environment and volumes: the time from `run` to /readyz, then /inspect, /products,
   /metrics and the page; the records-migration Job's command;
4. the batch Indexed Job's command for every index, then the merge Job's;
5. the fit Job's command (`python -m detector pipeline`) on a synthetic MVTec folder, with
   the packed backbone, into the shared store the service reads: the service then serves
   the new product without a restart;
and prints the image's size, the build time and the cold start. Everything it starts is
stopped; it exits 1 on the first thing that does not work.

Settings: CONTAINER_ENGINE (podman, else docker), TORCH_WHEEL (a CPU torch wheel; else
/opt/wheels/torch-*+cpu*.whl, else PyTorch's CPU index), CONTAINER_BASE_IMAGE (skip the
Debian base), KEEP_CHECK_DIR=1 (keep the work folder).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from deploy.kube import container_run, load
from devtools.local_server import REPO, free_port

K8S = REPO / "deploy" / "k8s"
IMAGE = "localhost/dino-inspection:check"
BASE = "localhost/inspection-base:bookworm"
ADMIN_KEY = "container-check-admin-key"
LINE_KEY = "container-check-line-key"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
COLD_STARTS = 3


def say(message: str) -> None:
    print(f"[container-check] {message}", flush=True)


def sh(*command: str, **options: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(command, text=True, capture_output=True, **options)
    if done.returncode != 0:
        raise SystemExit(
            f"[container-check] failed: {' '.join(command)[:300]}\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )
    return done


def engine() -> str:
    chosen = os.environ.get("CONTAINER_ENGINE") or shutil.which("podman") or shutil.which("docker")
    if not chosen:
        raise SystemExit("[container-check] no container engine: install podman (or docker)")
    return Path(chosen).name


def base_image(tool: str, work: Path) -> str | None:
    """The image to build on: given, Debian made here (podman), or BentoML's default."""
    if os.environ.get("CONTAINER_BASE_IMAGE"):
        return os.environ["CONTAINER_BASE_IMAGE"]
    if tool != "podman":
        return None
    if subprocess.run([tool, "image", "exists", BASE]).returncode == 0:
        return BASE
    say("making a Debian base image (debootstrap, about a minute)")
    root = work / "debian"
    packages = "python3,python3-pip,python3-venv,ca-certificates,libgomp1"
    sh("debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(root))
    if Path(CA_BUNDLE).exists():  # the registries' proxy CA, where there is one
        shutil.copy(CA_BUNDLE, root / CA_BUNDLE.lstrip("/"))
    (root / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    # What a server never reads: the package lists and downloaded packages, documentation
    # and translations (about 90 MB of a 250 MB base).
    for unread in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        shutil.rmtree(root / unread, ignore_errors=True)
    for package in [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/cache/apt/*.bin")]:
        package.unlink()
    for locale in (root / "usr/share/locale").glob("*"):
        if locale.is_dir() and locale.name not in ("C", "C.UTF-8", "en", "locale.alias"):
            shutil.rmtree(locale, ignore_errors=True)
    changes = [
        f"ENV PIP_CERT={CA_BUNDLE}",
        f"ENV SSL_CERT_FILE={CA_BUNDLE}",
        f"ENV REQUESTS_CA_BUNDLE={CA_BUNDLE}",
        "ENV UV_NATIVE_TLS=1",
        "ENV UV_NO_CACHE=1",
        "ENV PIP_NO_CACHE_DIR=1",
    ]
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    arguments = [a for change in changes for a in ("--change", change)]
    subprocess.run([tool, "import", *arguments, "-", BASE], stdin=tar.stdout, check=True)
    tar.wait()
    return BASE


def torch_wheel() -> str | None:
    given = os.environ.get("TORCH_WHEEL")
    if given:
        return given
    found = sorted(glob.glob("/opt/wheels/torch-2.13.0+cpu-*.whl"))
    return found[-1] if found else None


def cpu_bentofile(build: Path, base: str | None) -> Path:
    """bentofile.yaml with torch's CPU build and, where given, another base image."""
    import yaml

    config = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    requirements = build / "requirements-cpu.txt"
    wheel = torch_wheel()
    lines = []
    if wheel:
        shutil.copy(wheel, build / Path(wheel).name)
        config["python"]["wheels"] = [str((build / Path(wheel).name).relative_to(REPO))]
        lines.append("--find-links /home/bentoml/bento/env/python/wheels")
    else:
        lines.append("--extra-index-url https://download.pytorch.org/whl/cpu")
    lines.append(f"-r {os.path.relpath(REPO / 'requirements.txt', build)}")
    requirements.write_text("\n".join(lines) + "\n")
    config["python"]["requirements_txt"] = str(requirements.relative_to(REPO))
    if base:
        config["docker"]["base_image"] = base
    # BentoML's Dockerfile plus one step: what serving never reads out of the image.
    config["docker"]["dockerfile_template"] = "deploy/Dockerfile.template"
    path = build / "bentofile.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def model_store(work: Path) -> Path:
    from benchmarks.heatmap_memory import tiny_store

    return tiny_store(work / "store")


def image_size_gb(tool: str, image: str) -> float:
    shown = sh(tool, "image", "inspect", image, "--format", "{{.Size}}").stdout
    return int(shown.strip()) / 1e9


def build_image(
    tool: str, work: Path, env: dict[str, str], image: str = IMAGE
) -> tuple[float, float, int | None]:
    """(build seconds, image GB, MB the slim step removed: what the image would weigh more)."""
    build = REPO / "build" / "container"
    build.mkdir(parents=True, exist_ok=True)
    bentofile = cpu_bentofile(build, base_image(tool, work))
    started = time.perf_counter()
    done = sh(
        sys.executable,
        "-m",
        "bentoml",
        "build",
        "-f",
        str(bentofile),
        "--output",
        "tag",
        cwd=REPO,
        env=env,
    )
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    say(f"built Bento {tag}; containerizing with {tool} (minutes)")
    built = sh(
        sys.executable,
        "-m",
        "bentoml",
        "containerize",
        tag,
        "--backend",
        tool,
        "--image-tag",
        f"{image}-layers",
        env=env,
        # BentoML 1.4.x refuses a dockerfile_template outside the working directory, and
        # containerize copies the Bento to a temporary folder (bentoml/BentoML#5566).
        cwd=tempfile.gettempdir(),
    )
    # The wheel the image was built from stays in a layer: squash it away.
    containerfile = work / "Containerfile"
    containerfile.write_text(
        f"FROM {image}-layers\nUSER root\n"
        "RUN rm -rf /home/bentoml/bento/env/python/wheels/*.whl /root/.cache\nUSER bentoml\n"
    )
    squash = ["--squash-all"] if tool == "podman" else []
    subprocess.run([tool, "rmi", image], capture_output=True)  # no dangling old check image
    sh(tool, "build", *squash, "-t", image, "-f", str(containerfile), str(work))
    sh(tool, "rmi", f"{image}-layers")
    slim = re.search(r"slim image: (\d+) MB removed", built.stdout + built.stderr)
    removed = int(slim.group(1)) if slim else None
    return time.perf_counter() - started, image_size_gb(tool, image), removed


def job(file: str, kind: str = "Job") -> dict[str, Any]:
    return next(r for _, r in load([K8S / file]) if r["kind"] == kind)


def run_container(tool: str, arguments: list[str], timeout: float = 900) -> str:
    done = subprocess.run([tool, *arguments], text=True, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(
            f"[container-check] {' '.join(arguments[-6:])} exited {done.returncode}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def writable(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o777)  # the image's user (uid 1034) writes here, as fsGroup allows
    return str(folder)


def serve(
    tool: str, work: Path, models: Path, image: str, **settings: str
) -> tuple[str, str, float]:
    """The Deployment's container, as its pod would run it (and `settings`, to compare);
    (URL, container, cold start)."""
    deployment = job("serving.yaml", "Deployment")
    port = free_port()
    secrets = {
        "INSPECT_API_KEYS": f"line3=line:{LINE_KEY}",
        "INSPECT_ADMIN_KEY": ADMIN_KEY,
        # No PostgreSQL here: SQLite in the pod, migrated when the API starts.
        "INSPECT_RECORDS_DB": "sqlite:////records/records.sqlite",
    }
    arguments = container_run(
        deployment,
        image,
        {"models": writable(models), "records": writable(work / "records")},
        secrets,
        {
            "INSPECT_RECORDS_MIGRATE": "apply",
            "INSPECT_ALLOWED_HOSTS": "127.0.0.1,localhost",
            **settings,
        },
    )
    name = f"inspection-check-{port}"
    arguments = [arguments[0], "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", *arguments[2:]]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    run_container(tool, arguments)
    with httpx.Client(timeout=2) as client:  # one TLS context, not one per poll (~50 ms CPU)
        while True:
            try:
                if client.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 300:
                logs = subprocess.run([tool, "logs", name], capture_output=True, text=True)
                raise SystemExit(
                    "[container-check] not ready in 300 s\n"
                    f"{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
                )
            time.sleep(0.1)
    return url, name, time.perf_counter() - started


def deployment_setting(name: str) -> str | None:
    """A plain value the serving Deployment's container sets."""
    container = job("serving.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return next((v.get("value") for v in container["env"] if v["name"] == name), None)


def check_serving(url: str, image: Path) -> None:
    admin, line = {"X-API-Key": ADMIN_KEY}, {"X-API-Key": LINE_KEY}
    files = {"image": ("part.png", image.read_bytes(), "image/png")}
    answer = httpx.post(f"{url}/inspect", files=files, headers=line, timeout=120)
    assert answer.status_code == 200 and "score" in answer.json(), answer.text
    assert httpx.post(f"{url}/inspect", files=files, timeout=60).status_code == 401
    listing = httpx.get(f"{url}/products", headers=admin, timeout=60).json()
    assert [product["name"] for product in listing] == ["carpet"], listing
    metrics = httpx.get(f"{url}/metrics", timeout=60).text
    assert "inspection_verdicts_total" in metrics
    assert httpx.get(f"{url}/ui/", timeout=60).status_code == 200
    # Recorded in the pod's records volume (the writer is asynchronous).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = httpx.get(f"{url}/records", headers=admin, timeout=60).json()
        scores = [record["score"] for record in listing.get("records", [])]
        if answer.json()["score"] in scores:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"[container-check] the inspection was not recorded: {listing}")
    say(f"serving: /inspect {answer.json()['score']:.4f} recorded, /products, /metrics, /ui")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-only", action="store_true", help="build the CPU image only")
    parser.add_argument("--tag", default=IMAGE, help=f"the image's name ({IMAGE})")
    args = parser.parse_args(argv)
    tool = engine()
    work = Path(tempfile.mkdtemp(prefix="container-check-"))
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1"}
    names: list[str] = []
    try:
        say(f"engine {tool}; work folder {work}")
        if not args.image_only:  # a tiny random backbone and bank; else the user's store
            env["BENTOML_HOME"] = str(model_store(work))
        build_s, size_gb, slimmed_mb = build_image(tool, work, env, args.tag)
        say(f"image {args.tag}: {size_gb:.2f} GB, built in {build_s:.0f} s")
        say(f"the slim step removed {slimmed_mb} MB (deploy/Dockerfile.template)")
        if args.image_only:
            return 0
        data = work / "data"
        mvtec = data / "mvtec"
        sh(
            sys.executable,
            "-m",
            "detector",
            "synthetic-data",
            str(mvtec),
            "--size",
            "128",
            cwd=REPO,
            env=env,
        )
        images = sorted((mvtec / "carpet" / "test").rglob("*.png"))
        shutil.copytree(mvtec / "carpet" / "test", data / "incoming")
        os.chmod(data, 0o777)
        for folder in data.rglob("*"):
            if folder.is_dir():
                os.chmod(folder, 0o777)

        migrate = container_run(
            job("migrate-records-job.yaml"),
            args.tag,
            {},
            {"INSPECT_RECORDS_DB": "sqlite:////tmp/records/records.sqlite"},
        )
        run_container(tool, migrate)
        say("migrate-records job: done")

        # Cold starts: a fresh container each time (the first also seeds the shared store),
        # alternating the Deployment's runtime with torch's; the last one stays up for the
        # checks below.
        models = work / "shared-models"
        starts: dict[str, list[float]] = {"torch": [], "manifest": []}
        for attempt in range(2 * COLD_STARTS):
            kind = "torch" if attempt % 2 == 0 else "manifest"
            extra = {"INSPECT_RUNTIME": "torch"} if kind == "torch" else {}
            url, name, seconds = serve(tool, work, models, args.tag, **extra)
            names.append(name)
            starts[kind].append(seconds)
            if attempt < 2 * COLD_STARTS - 1:
                subprocess.run([tool, "rm", "-f", name], capture_output=True)
                names.remove(name)
        median = {kind: sorted(values)[COLD_STARTS // 2] for kind, values in starts.items()}
        cold_start = median["manifest"]
        runtime = deployment_setting("INSPECT_RUNTIME") or "torch"
        for kind, values in starts.items():
            shown = ", ".join(f"{s:.1f}" for s in values)
            label = f"runtime {runtime} (the manifest's)" if kind == "manifest" else "torch"
            say(f"cold start, {label}: median {median[kind]:.1f} s of {shown}")
        say(f"cold start {runtime} / torch: {median['manifest'] / median['torch']:.2f}")
        check_serving(url, images[0])

        indexed = job("batch-indexed-job.yaml")
        count = int(indexed["spec"]["completions"])
        for index in range(count):
            arguments = container_run(
                indexed,
                args.tag,
                {"data": str(data)},
                extra_env={"JOB_COMPLETION_INDEX": str(index), "BATCH_SHARD_COUNT": str(count)},
            )
            run_container(tool, arguments)
        merge = container_run(job("batch-merge-job.yaml"), args.tag, {"data": str(data)})
        merged = json.loads(run_container(tool, merge))
        assert merged["images"] == len(images), merged
        say(f"batch: {count} shards and merge, {merged['images']} images")

        backbone = next(p for p in (models / "dino-backbone").iterdir() if p.is_dir())
        fit = container_run(
            job("fit-job.yaml"),
            args.tag,
            {"data": str(data), "models": str(models)},
            extra_env={
                "CATEGORY": "carpet",
                "BACKBONE_CONFIG": "tiny_random",
                "BACKBONE": f"/models/dino-backbone/{backbone.name}",
                "HF_HUB_OFFLINE": "1",
                "INSPECT_MODEL_STORE": "/models",
            },
        )
        (data / "runs").mkdir(exist_ok=True)
        os.chmod(data / "runs", 0o777)
        run_container(tool, fit, timeout=1800)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = httpx.get(
                f"{url}/products/carpet/history", headers={"X-API-Key": ADMIN_KEY}, timeout=60
            ).json()
            if len(listing["versions"]) > 1:
                break
            time.sleep(1)
        assert len(listing["versions"]) > 1, listing
        say(f"fit job: carpet {listing['versions'][-1]['version']} in the shared store, served")
        print(
            json.dumps(
                {
                    "image_gb": round(size_gb, 2),
                    "slim_step_removed_mb": slimmed_mb,
                    "build_s": round(build_s),
                    "cold_start_s": round(cold_start, 1),
                    "cold_start_torch_s": round(median["torch"], 1),
                }
            )
        )
        return 0
    finally:
        for name in names:
            subprocess.run([tool, "stop", "-t", "30", name], capture_output=True)
            subprocess.run([tool, "rm", "-f", name], capture_output=True)
        if not os.environ.get("KEEP_CHECK_DIR"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
