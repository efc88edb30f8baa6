"""Logging for a Snakemake job: everything goes to the rule's ``log:`` file."""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from pathlib import Path


@contextlib.contextmanager
def job_logging(log_path: str | None, level: int = logging.INFO):
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)
    try:
        yield logging.getLogger("metsflow.job")
    except BaseException:
        logging.getLogger("metsflow.job").error("job failed:\n%s", traceback.format_exc())
        raise
    finally:
        for handler in handlers:
            handler.flush()
