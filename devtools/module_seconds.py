"""How long each test module took, for ordering the suite's modules longest first.

The last run here is kept in pytest's cache; `tests/module_seconds.json` is a committed copy,
so that a fresh clone (CI) orders modules as well. After a whole run, refresh it with

    python -m devtools.module_seconds
"""

from __future__ import annotations

import json
from pathlib import Path

CACHE_KEY = "dino_inspect/seconds_per_module"  # tests/conftest.py writes it after a run
COMMITTED = Path("tests/module_seconds.json")
REPO = Path(__file__).resolve().parents[1]


def committed(root: Path = REPO) -> dict[str, float]:
    path = root / COMMITTED
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    cache = REPO / ".pytest_cache" / "v" / CACHE_KEY  # where pytest's cache keeps the key
    measured = json.loads(cache.read_text()) if cache.exists() else {}
    if not measured:
        raise SystemExit("no module times in .pytest_cache: run `python -m pytest -q` first")
    modules = {name: measured[name] for name in sorted(measured) if (REPO / name).exists()}
    (REPO / COMMITTED).write_text(json.dumps(modules, indent=1) + "\n")
    print(f"{COMMITTED}: {len(modules)} modules, {sum(modules.values()):.0f} s in all")


if __name__ == "__main__":
    main()
