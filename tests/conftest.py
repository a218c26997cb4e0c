"""Shared fixtures: a tiny random DINOv3 checkpoint, a small synthetic MVTec set, a fitted detector.

The environment is set before anything imports BentoML or transformers, so no test can
reach the network or a user's model store.
"""

from __future__ import annotations

import collections
import inspect
import os
import re
import shutil
import tempfile

os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Each test process (each xdist worker too) gets a model store of its own, never the user's.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentoml-home-")
# Commands track their runs with MLflow; the tests' runs go to a folder of their own.
os.environ["MLFLOW_TRACKING_URI"] = "file:" + tempfile.mkdtemp(prefix="mlruns-")
# The tests' tiny models finish a parallel region in microseconds, and OpenMP's threads then
# spin on the cores the other worker and the served processes need: sleeping halves a test
# server's runner CPU. Production keeps the libraries' default, which serves real models
# about 8 % faster (`benchmarks.wait_policy_benchmark`, docs/PERFORMANCE.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from detector.anomaly_detector import AnomalyDetector  # noqa: E402
from detector.commands.random_backbone import make_backbone  # noqa: E402
from detector.data.mvtec import MVTecCategory, split_calibration  # noqa: E402
from detector.data.synthetic import make_dataset  # noqa: E402
from detector.dino import DinoBackbone  # noqa: E402
from detector.fitting import fit_detector  # noqa: E402
from detector.memory_bank import BankConfig  # noqa: E402
from devtools.module_seconds import CACHE_KEY, committed  # noqa: E402

TEST_IMAGE_SIZE = 128
TEST_RESOLUTION = 128


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_backbone(tmp_path_factory.mktemp("backbone") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir: Path) -> DinoBackbone:
    return DinoBackbone(str(tiny_backbone_dir), resolution=TEST_RESOLUTION, device="cpu")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    make_dataset(root, "carpet", size=TEST_IMAGE_SIZE, n_train=24, n_test_good=8, n_per_defect=3)
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_root: Path) -> MVTecCategory:
    return MVTecCategory(synthetic_root, "carpet")


@pytest.fixture(scope="session")
def fitted_detector(
    tiny_backbone: DinoBackbone, synthetic_dataset: MVTecCategory
) -> AnomalyDetector:
    bank_paths, calibration_paths = split_calibration(synthetic_dataset.train_paths(), 0.25, 0)
    detector = fit_detector(
        tiny_backbone,
        bank_paths,
        calibration_paths,
        bank_config=BankConfig(coreset_ratio=0.25, seed=0),
        progress=False,
    )
    detector.bank.metadata["category"] = "carpet"  # as `detector fit` records it
    return detector


@pytest.fixture(scope="session")
def saved_detector_dir(
    fitted_detector: AnomalyDetector, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return fitted_detector.save(tmp_path_factory.mktemp("detector") / "carpet")


@pytest.fixture(scope="session")
def exported_store(saved_detector_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fitted tiny detector exported once per worker (`detector export`, run in the
    worker's process, ONNX graph included); tests get copies (`copy_of`), never this one."""
    from devtools.in_process import run_detector

    home = tmp_path_factory.mktemp("bentoml_home_exported")
    result = run_detector(home, "export", str(saved_detector_dir))
    assert result.returncode == 0, result.stderr
    return home


def copy_of(exported: Path, home: Path) -> Path:
    """A BentoML home of its own (tests add versions and records to it): the store holds no
    path of itself, so a copy is the same store."""
    shutil.copytree(exported, home, symlinks=True, dirs_exist_ok=True)
    return home


@pytest.fixture
def store_copy(exported_store: Path) -> Callable[[Path], Path]:
    """`store_copy(folder)`: a copy of the exported store at `folder`, for one test."""
    return lambda home: copy_of(exported_store, home)


@pytest.fixture(scope="module")
def store(exported_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BentoML home holding the fitted tiny detector as models, one per test module."""
    return copy_of(exported_store, tmp_path_factory.mktemp("bentoml_home"))


class PostgresServer:
    """A real PostgreSQL server in a temporary folder, run as the `postgres` user when the
    tests run as root (initdb refuses root). `stop` and `start` simulate an outage."""

    def __init__(self, bin_dir: Path, folder: Path, port: int) -> None:
        self.bin_dir, self.folder, self.port = bin_dir, folder, port
        self.data = folder / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *command: str) -> None:
        import subprocess

        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*prefix, str(self.bin_dir / command[0]), *command[1:]],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def init(self) -> None:
        if os.geteuid() == 0:
            import shutil

            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


def postgres_bin_dir() -> Path | None:
    import glob
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """Skipped, with the reason, where the Debian package `postgresql` is not installed."""
    import pwd
    import shutil

    from devtools.local_server import free_port

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
    server = PostgresServer(bin_dir, Path(tempfile.mkdtemp(prefix="pg-")), free_port())
    server.init()
    server.start()
    yield server
    try:
        server.stop()
    finally:
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def records_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty records database of each kind: an SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    import psycopg

    name = f"records_{os.getpid()}_{abs(hash(request.node.name)) % 10**8}"
    with psycopg.connect(
        f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres", autocommit=True
    ) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.url.rsplit("/", 1)[0] + "/" + name


# What starts another process (a server, a browser, a database, a command line) or runs a
# whole command in this one (devtools/in_process.py). A test that reaches one of these, in
# its body, its module's helpers or any fixture it uses, is marked `server`, so that
# `pytest -m "not server"` is the quick loop.
PROCESS_STARTERS = re.compile(
    r"\b(bentoml_serve|serve_until_exit|subprocess|Popen|sync_playwright|run_python|"
    r"postgres_server|prometheus_server|run_batch|run_command|run_cli|run_main|run_detector)\b"
)


CALLED_NAME = re.compile(r"\b([A-Za-z_]\w*)\(")


def _starts_processes(function: object, seen: dict[object, bool]) -> bool:
    """Whether `function`, or a helper of this repository's tests it calls by name (looked up
    in its module), reaches a process starter."""
    if function in seen:
        return seen[function]
    seen[function] = False  # a recursive helper
    try:
        source = inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    found = bool(PROCESS_STARTERS.search(source))
    names = getattr(function, "__globals__", {})
    for name in [] if found else CALLED_NAME.findall(source):
        helper = names.get(name)
        module = getattr(helper, "__module__", "") or ""
        if inspect.isfunction(helper) and module.startswith(("tests", "test_", "conftest")):
            found = _starts_processes(helper, seen)
            if found:
                break
    seen[function] = found
    return found


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seen: dict[object, bool] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        fixtures = [
            definition.func
            for definitions in (info.name2fixturedefs.values() if info else [])
            for definition in definitions
        ]
        test = getattr(item, "function", None)
        if any(_starts_processes(f, seen) for f in [test, *fixtures] if f is not None):
            item.add_marker(pytest.mark.server)
    # The longest modules first: xdist deals whole modules to its workers in this order, and
    # a long module dealt last runs alone while the other worker idles. How long a module took
    # in the last run here, else as measured when tests/module_seconds.json was written (a
    # fresh clone, as in CI), else how many processes its source starts.
    if not items:
        return
    cache = getattr(items[0].config, "cache", None)  # None with -p no:cacheprovider
    root = items[0].config.rootpath
    measured = {**committed(root), **(cache.get(CACHE_KEY, {}) if cache is not None else {})}
    weights = {
        path: measured.get(
            str(path.relative_to(root) if path.is_relative_to(root) else path),
            10.0 * len(PROCESS_STARTERS.findall(path.read_text())),
        )
        for path in {item.path for item in items}
    }
    items.sort(key=lambda item: -weights[item.path])


_module_seconds: collections.Counter[str] = collections.Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _module_seconds[report.fspath] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Record each module's time for the next run's order (by the controller, which sees
    every worker's reports, or by a run without workers)."""
    config = session.config
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    if hasattr(config, "workerinput") or not _module_seconds or cache is None:
        return
    # A run of some of a module's tests (-k, -m, a test's id, --lf) says nothing of the
    # module's time: it would put the module late in the next whole run.
    option = config.option
    if option.keyword or option.markexpr or getattr(option, "lf", False):
        return
    if any("::" in argument for argument in config.args):
        return
    measured = cache.get(CACHE_KEY, {})
    measured.update({str(path): round(s, 1) for path, s in _module_seconds.items()})
    cache.set(CACHE_KEY, measured)
