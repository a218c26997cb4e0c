"""Trim the container image as it is built (deploy/Dockerfile.template runs this once).

PyPI's wheels carry what a server never reads: torch's C++ headers, test programs and test
suite, every package's `tests` folder, and bytecode for every module (uv compiles them all:
about 360 MB, most of it for modules serving never imports, such as the other transformers
models or sympy's printers). This removes them, then imports what the service, its runner,
the batch job and the commands import, so that exactly those modules get bytecode again and
a container's cold start compiles nothing.

    python -m detector.serving.slim_image      # as root, in the image, after the install
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

# Relative to site-packages: read by compilers and test runners, never by a running service.
UNREAD = (
    "torch/include",
    "torch/test",
    "torch/share/cmake",
    "torch/bin/protoc*",
    "torch/bin/test_*",
    "torch/bin/*Test",
    "openvino/include",
)
# Imported only when first needed (a bank loaded, a drift statistic, a records migration, a
# runtime chosen): named here so their bytecode is compiled too.
LATER_IMPORTS = (
    "service",
    "detector.traced",
    "transformers.models.dinov3_vit.modeling_dinov3_vit",
    "transformers.models.auto.modeling_auto",
    "faiss",
    "scipy.ndimage",
    "scipy.stats",
    "sklearn.metrics",
    "psutil",
    "httpx",
    "alembic.command",
    "alembic.runtime.migration",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql.psycopg",
    "onnxruntime",
    "openvino",
    "_bentoml_impl.worker.service",
    "_bentoml_impl.server.app",
    "_bentoml_impl.server.serving",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.lifespan.on",
    "uvicorn.loops.uvloop",
    "batch.__main__",
    "detector.__main__",
)


def remove_unread(site: Path) -> int:
    """Bytes freed by removing headers, tests, test programs and all bytecode."""
    freed = 0
    found = [path for pattern in UNREAD for path in site.glob(pattern)]
    found += [*site.rglob("tests"), *site.rglob("__pycache__")]
    for path in found:
        if not path.exists():  # inside a folder removed before it
            continue
        if path.is_dir():
            freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
        else:
            freed += path.stat().st_size
            path.unlink()
    return freed


def compile_used_modules() -> list[str]:
    """Import what serving imports; return those that could not be (an optional runtime)."""
    missing = []
    for name in LATER_IMPORTS:
        try:
            importlib.import_module(name)
        except BaseException as error:  # noqa: BLE001 - service.py exits on a bad setting
            missing.append(f"{name} ({type(error).__name__})")
    return missing


def main() -> int:
    if os.environ.get("BENTOML_CONTAINERIZED") != "true":  # set by BentoML's Dockerfile
        print("slim_image removes files from site-packages: it runs only in an image build")
        return 2
    site = Path(sysconfig.get_paths()["purelib"])
    freed = remove_unread(site)
    missing = compile_used_modules()
    print(f"slim image: {freed / 1e6:.0f} MB removed from {site}", flush=True)
    if missing:
        print(f"slim image: not compiled (not importable here): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
