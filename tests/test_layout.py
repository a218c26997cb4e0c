"""One home per concept: the result schema, the backbone spec, the command dispatcher, and
the README's commands all resolve to the one definition they name."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detector import schema
from detector.backbone import BackboneSpec, DinoBackbone, IncompatibleBankError
from detector.commands import COMMANDS
from detector.scoring import Calibration, make_result
from detector.serving.local_server import REPO, service_env

DOCUMENTS = ["README.md", "deploy/README.md", *(p.as_posix() for p in Path(REPO).glob("docs/*.md"))]


def run_python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=service_env(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_result_dict_csv_columns_and_answers_come_from_one_schema() -> None:
    result = make_result(0.3, Calibration(threshold=0.2, false_alarm_rate=0.01), (640, 480))
    fields = result.to_dict()
    assert tuple(fields) == schema.RESULT_FIELDS
    answer = schema.answer(fields, {"backbone": "b:1", "bank": "k:2"}, random_weights=True)
    assert schema.check_answer(answer) is None
    row = schema.row("a/b.png", answer)
    assert [key for key in schema.CSV_COLUMNS if key not in row] == []
    assert row["bank_model"] == "k:2" and row["image_height"] == 480 and row["error"] == ""
    broken = {**answer, "is_anomalous": False}
    assert "verdict" in schema.check_answer(broken)
    assert "finite" in schema.check_answer({**answer, "score": float("nan")})


def test_backbone_spec_round_trips_and_refuses_other_weights(tiny_backbone: DinoBackbone) -> None:
    spec = tiny_backbone.spec
    stored = spec.to_dict()
    assert stored["backbone"] == spec.source and stored["layers"] == [-1]
    assert BackboneSpec.from_dict(stored) == spec
    spec.check_compatible(BackboneSpec.from_dict({**stored, "backbone": "/elsewhere"}))
    old_bank = {key: value for key, value in stored.items() if key != "fingerprint"}
    BackboneSpec.from_dict(old_bank).check_compatible(spec)  # banks saved before fingerprints
    with pytest.raises(IncompatibleBankError, match="fingerprint"):
        spec.check_compatible(BackboneSpec.from_dict({**stored, "fingerprint": "0" * 16}))


def test_every_command_is_listed_importable_and_unknown_ones_exit_2() -> None:
    listing = run_python("-m", "detector", "--help")
    assert listing.returncode == 0
    for name, (entry, _) in COMMANDS.items():
        assert name in listing.stdout
        module, _, function = entry.partition(":")
        assert callable(getattr(importlib.import_module(module), function or "main"))
    unknown = run_python("-m", "detector", "no-such-command")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown command")


def test_export_of_a_folder_without_a_bank_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    result = run_python("-m", "detector", "export", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not a saved memory bank" in errors[0]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        found += [(document, m) for m in re.findall(r"python -m (detector [a-z][\w-]*)", text)]
        found += [(document, m) for m in re.findall(r"python -m (benchmarks\.\w+)", text)]
        found += [(document, m) for m in re.findall(r"python -m (detector\.[\w.]+)", text)]
    return found


def test_every_documented_command_exists() -> None:
    commands = documented_commands()
    assert len(commands) > 20
    for document, command in commands:
        if command.startswith("detector "):
            assert command.split()[1] in COMMANDS, f"{document}: {command}"
        else:  # a module run with -m must import (benchmarks.*); detector.X forms are gone
            assert not command.startswith("detector."), f"{document}: stale {command}"
            assert importlib.util.find_spec(command) is not None, f"{document}: {command}"


def modules_loaded_by(imports: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after `imports`."""
    code = f"import sys, {imports}\nprint([m for m in {watched!r} if m in sys.modules])"
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout)  # a printed list of module names


def test_the_batch_job_stands_apart_from_the_service_and_its_settings() -> None:
    watched = ("service", "detector.serving.settings")
    assert modules_loaded_by("batch.__main__, batch.job, batch.scorers", watched) == []


def test_the_schema_and_package_import_without_torch_or_faiss() -> None:
    assert modules_loaded_by("detector, detector.schema", ("torch", "faiss")) == []
    from detector import AnomalyDetector  # the lazy export resolves on first use

    assert AnomalyDetector.__module__ == "detector.anomaly_detector"


def requirement_names(file: Path) -> set[str]:
    """The distributions a requirements file names, following its `-r` includes."""
    names: set[str] = set()
    for line in file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(file.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            names.add(re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower())
    return names


def test_make_demo_installs_every_tool_the_readme_runs_later() -> None:
    """`make demo`'s environment is the one a reader keeps using: the Locust, pytest and ruff
    lines further down the README must not need another install."""
    recipe = (REPO / "Makefile").read_text()
    installed = set().union(
        *(requirement_names(REPO / f) for f in re.findall(r"pip install -q -r (\S+)", recipe))
    )
    text = (REPO / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
    tools = {"locust": "locust", "python -m pytest": "pytest", "ruff": "ruff"}
    used = {
        package for command, package in tools.items() if re.search(rf"^{command}\b", blocks, re.M)
    }
    assert used == set(tools.values()), "the README runs these tools as written"
    assert used <= installed, f"make demo does not install {sorted(used - installed)}"
