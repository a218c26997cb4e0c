"""One home per concept: the result schema, the backbone spec, the command dispatcher, and
the README's commands all resolve to the one definition they name."""

from __future__ import annotations

import ast
import functools
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from detector import schema
from detector.commands import COMMANDS
from detector.dino import DinoBackbone
from detector.extractor import BackboneSpec, IncompatibleBankError
from detector.scoring import Calibration, make_result
from devtools.local_server import REPO, service_env

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


# ----- layers: what may import what -------------------------------------------------------
SOURCES = [
    path
    for path in [*REPO.glob("detector/**/*.py"), *REPO.glob("batch/*.py"), REPO / "service.py"]
    if "migrations" not in path.parts
]
SERVING, COMMAND_LAYER, RECORDS = "detector.serving", "detector.commands", "detector.records"
# The library: what any extractor, bank or scoring user needs, and the bank store.
LIBRARY_PACKAGES = ("detector.banks", "detector.data")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (a lazy import is an
    import all the same), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in SOURCES}
    return {
        name: {other for other in imported_modules(path) if other in modules and other != name}
        for name, path in modules.items()
    }


def is_library(name: str) -> bool:
    top_level = name.count(".") == 1 and name.startswith("detector.")
    return (top_level and name != "detector.__main__") or name.startswith(LIBRARY_PACKAGES)


def under(name: str, *packages: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def test_each_layer_imports_only_the_layers_below_it() -> None:
    graph = import_graph()
    broken = []
    for name, imports in sorted(graph.items()):
        if under(name, COMMAND_LAYER, "batch"):
            forbidden: tuple[str, ...] = (SERVING, "service")
        elif under(name, RECORDS):
            forbidden = (SERVING, COMMAND_LAYER, "batch", "service")
        elif is_library(name):
            forbidden = (SERVING, COMMAND_LAYER, RECORDS, "batch", "service")
        else:
            continue
        broken += [
            f"{name} imports {other}" for other in sorted(imports) if under(other, *forbidden)
        ]
    assert broken == []
    assert any(is_library(name) for name in graph) and "detector.banks.versions" in graph
    shipped = [  # devtools/ is not in the wheel or the Bento: nothing that ships needs it
        module_name(path)
        for path in SOURCES
        if any(under(m, "devtools") for m in imported_modules(path))
    ]
    assert shipped == []


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        order[node] = low[node] = len(order)
        stack.append(node)
        for other in graph[node]:
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            component = []
            while (popped := stack.pop()) != node:
                component.append(popped)
            if component:
                cycles.append(sorted([node, *component]))

    for node in graph:
        if node not in order:
            visit(node)
    assert cycles == []


def test_functions_and_modules_stay_small() -> None:
    """No function over 60 lines, no module over 350: past that, a newcomer cannot hold one
    in their head, and it is doing more than one job."""
    too_long = []
    for path in SOURCES:
        text = path.read_text()
        if len(text.splitlines()) > 350:
            too_long.append(f"{module_name(path)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    too_long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert too_long == []


def test_the_batch_help_and_the_serve_process_start_without_torch() -> None:
    assert modules_loaded_by("batch.__main__, detector.extractor", ("torch",)) == []
    result = run_python("-m", "batch", "--help")
    assert result.returncode == 0 and "--product" in result.stdout


def test_the_readme_lists_every_metric_the_service_exports() -> None:
    text = (REPO / "detector/serving/telemetry.py").read_text()
    names = set(re.findall(r'"(inspection_\w+)"', text))
    counters = set(re.findall(r'Counter\(\s*"(inspection_\w+)"', text))
    readme = (REPO / "README.md").read_text()
    assert len(names) > 10
    missing = [
        name
        for name in sorted(names)
        if name + ("_total" if name in counters else "") not in readme
    ]
    assert missing == []


def test_every_exit_status_comes_from_the_one_table() -> None:
    """No entry point exits with a number of its own: `detector.errors.Exit` names them."""
    from detector.errors import Exit

    assert [int(code) for code in Exit] == list(range(6))
    literal = re.compile(r"(sys\.exit|SystemExit|return)\(?\s*[1-9]\b")
    offenders = [
        f"{module_name(path)}:{number}"
        for path in SOURCES
        if "commands" in path.parts or "batch" in path.parts or path.name == "__main__.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line) and "range(" not in line
    ]
    assert offenders == []
