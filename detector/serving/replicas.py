"""What several servers sharing one model store must not share: metrics and SQLite.

Replicas share `BENTOML_HOME` (a volume) so that a bank version made by one is served by
all. BentoML keeps its Prometheus multiprocess files in that home too, and wipes the folder
whenever a server starts: every replica then reported whatever the last one to start had
counted. `separate_metrics` gives each server a folder of its own on local disk. And the
default records database is an SQLite file in the same home, which SQLite documents as
unsafe when several hosts write it over a network file system: `check_records_location`
refuses that at start, naming the setting that fixes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from detector.errors import UserError
from detector.serving.settings import Settings

# File systems that more than one host can mount (Kubernetes ReadWriteMany volumes: NFS,
# EFS, Filestore, Azure Files, CephFS, GlusterFS; and FUSE mounts of object stores).
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "afs"}
)


def metrics_root() -> Path:
    base = os.environ.get("INSPECT_METRICS_DIR") or tempfile.gettempdir()
    return Path(base) / f"inspection-metrics-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def separate_metrics() -> Path | None:
    """Point BentoML's Prometheus multiprocess folder at one of this server's own (on
    local disk, named by its process id), before `bentoml serve` makes and wipes the
    shared one; folders of servers no longer running on this host are removed. Does
    nothing where the variable is already set (a worker, or an operator's choice)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from bentoml._internal.configuration.containers import BentoMLContainer

    root = metrics_root()
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.iterdir():
        if (
            folder.name.isdigit()
            and int(folder.name) != os.getpid()
            and not _alive(int(folder.name))
        ):
            shutil.rmtree(folder, ignore_errors=True)
    mine = root / str(os.getpid())
    BentoMLContainer.prometheus_multiproc_dir.set(str(mine))
    return mine


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the file system holding `path`, from /proc/mounts (None elsewhere)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def on_network_filesystem(path: Path, mounts: str | None = None) -> bool:
    kind = filesystem_type(path, mounts)
    return kind is not None and (kind in NETWORK_FILESYSTEMS or kind.startswith("fuse."))


def check_records_location(settings: Settings, mounts: str | None = None) -> None:
    """Refuse SQLite records on a file system several hosts can mount."""
    from detector.serving.records import records_dir, records_url

    if not settings.records or not records_url(settings).startswith("sqlite"):
        return
    folder = records_dir(settings)
    if on_network_filesystem(folder, mounts):
        raise UserError(
            f"The records database would be an SQLite file on a network file system "
            f"({folder}), which several replicas cannot share safely: set "
            "INSPECT_RECORDS_DB to a PostgreSQL URL (or INSPECT_RECORDS_DIR to local disk "
            "for one replica)."
        )
