"""Run a command's `main` inside the test process, as `python -m ...` would run it.

A `python -m batch` or `python -m detector` subprocess spends 4-7 s importing torch and
transformers before it does anything; the tests that check what a command writes, prints
and returns pay that once per run. Here the command runs in the test's own process (torch
already imported), with the environment, the BentoML home and the model store it would have
as a subprocess, its output captured and its exit status returned. Tests where the process
boundary is the point (signals, a kill, the command line itself) keep a real subprocess.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from devtools.local_server import service_env


@dataclass
class Finished:
    """What a finished command left: the fields of `subprocess.CompletedProcess` tests read."""

    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def bentoml_home(home: Path, **environment: str) -> Iterator[None]:
    """The process's environment, BentoML home and model store as `service_env(home)` gives a
    subprocess, for the block; everything is restored after it."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    from detector.banks import location

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(service_env(home, **environment))
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    location._selected = None  # chosen again, from this environment
    try:
        with (
            BentoMLContainer.bentoml_home.patch(str(home)),
            BentoMLContainer.model_store_dir.patch(str(models)),
            BentoMLContainer.model_store.patch(ModelStore(str(models))),
        ):
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        location._selected = None


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """Every logger's handlers, level and switches as they were before the block: a Hydra
    command configures logging for its whole process (`dictConfig`), which here would take
    pytest's capture off the root logger and leave handlers writing into a finished run."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    kept = {
        logger: (logger.handlers[:], logger.level, logger.propagate, logger.disabled)
        for logger in loggers
        if isinstance(logger, logging.Logger)
    }
    try:
        yield
    finally:
        now = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in (item for item in now if isinstance(item, logging.Logger)):
            handlers, level, propagate, disabled = kept.get(
                logger, ([], logging.NOTSET, True, False)
            )
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled


def run_main(
    main: Callable[[list[str]], int | None], home: Path, *args: str, **environment: str
) -> Finished:
    """`main(args)` in the BentoML home `home`, with stdout and stderr captured; a
    `SystemExit` becomes the exit status, as it would for the process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    handler, argv = signal.getsignal(signal.SIGTERM), sys.argv
    try:
        with (
            bentoml_home(home, **environment),
            logging_kept(),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            try:
                status = main(list(args))
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
                if exit_.code is not None and not isinstance(exit_.code, int):
                    print(exit_.code, file=stderr)
    finally:
        signal.signal(signal.SIGTERM, handler)  # a command may install its own
        sys.argv = argv  # `python -m detector` hands its command's arguments over in it
    return Finished(int(status or 0), stdout.getvalue(), stderr.getvalue())


def run_detector(home: Path, *args: str, **environment: str) -> Finished:
    """`python -m detector ARGS` in this process: the argparse commands and the Hydra ones
    (fit, evaluate, simulate-drift) alike."""
    from detector.__main__ import main

    return run_main(main, home, *args, **environment)
