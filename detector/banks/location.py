"""Which folder is the model store: one answer for BentoML, the service, the batch job and
every command.

In order:
1. `INSPECT_MODEL_STORE`: a store shared by replicas (a ReadWriteMany volume). Inside a
   Bento image it is seeded, once, with the models the Bento packs (versions already there
   are kept: a bank version made by any replica stays live for all of them);
2. the store BentoML chose: a Bento's packed models when `bentoml serve` serves a Bento
   (in a container, /home/bentoml/bento/models);
3. the packed models of the Bento image this process runs in (`$BENTO_PATH/models`), for the
   batch job and the commands run in that image;
4. `$BENTOML_HOME/models`.

BentoML is told the answer (`BentoMLContainer.model_store`), so `bentoml.models.get` and
`create` see the same versions as the code that reads the folder itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from detector.files import exclusive

_selected: Path | None = None


def choose(current: Path, default: Path, environ: Mapping[str, str]) -> tuple[Path, Path | None]:
    """(the store to use, the Bento's packed models to seed it from, if any)."""
    packed = current if current != default else None
    bento = environ.get("BENTO_PATH")
    if packed is None and bento and (Path(bento) / "models").is_dir():
        packed = Path(bento) / "models"
    shared = environ.get("INSPECT_MODEL_STORE", "").strip()
    if shared:
        return Path(shared), packed
    return packed or default, None


def seed(shared: Path, packed: Path) -> list[str]:
    """Copy into `shared` each model version of `packed` it lacks (under a lock: replicas
    start together); returns the versions copied."""
    shared.mkdir(parents=True, exist_ok=True)
    copied = []
    with exclusive(shared / ".seed.lock"):
        for model in sorted(p for p in packed.iterdir() if p.is_dir()):
            for version in sorted(p for p in model.iterdir() if p.is_dir()):
                target = shared / model.name / version.name
                if target.exists():
                    continue
                partial = shared / model.name / f".seeding-{version.name}"
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(version, partial)
                os.replace(partial, target)
                copied.append(f"{model.name}:{version.name}")
            latest = model / "latest"
            if latest.exists() and not (shared / model.name / "latest").exists():
                shutil.copy2(latest, shared / model.name / "latest")
    return copied


def model_store_dir() -> Path:
    """The model store folder (see the module's docstring), chosen once per process."""
    global _selected
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    store = BentoMLContainer.model_store.get()
    current = Path(getattr(store, "_path", BentoMLContainer.model_store_dir.get()))
    if _selected is not None and current == _selected:
        return _selected
    default = Path(BentoMLContainer.model_store_dir.get())
    chosen, packed = choose(current, default, os.environ)
    if packed is not None and packed.resolve() != chosen.resolve():
        seed(chosen, packed)
    if chosen != current:
        BentoMLContainer.model_store.set(ModelStore(chosen))
    _selected = chosen
    return chosen
