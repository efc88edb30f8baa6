"""Everything a run will read, checked when the workflow is parsed, before the first job.

``prepare_run`` validates the configuration (closed sections, ``metsflow.core.config``), then the
study sheet, the data roots, the label store and results folders, the plan (seed, validation
and pool sets for the configured rounds) and, with the simulated annotator, the oracle sheet
and its label files. Every problem found is listed in one ``RunError``; ``rules/common.smk``
prints it and exits, so no Snakemake traceback (``KeyError``, ``IndexError`` from a rule
input function) reaches the user, and a bad oracle sheet is not found by round 1's
``collect_annotations`` after hours of preprocessing, registration and training.

What is *not* checked here, on purpose: each study's image files. A missing or broken image is
one study's fault and is quarantined by its shard job (docs/running.md "When a study fails").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from metsflow.cohort.plan import PlanSettings, build_plan, restrict
from metsflow.cohort.sheet import Cohort, SheetError, read_sheet
from metsflow.core import config as config_schema
from metsflow.core import io, labels

ORACLE_COLUMNS = ("study_id", "label")


class RunError(ValueError):
    """Every problem that stops a run before planning; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"the run cannot start: {len(self.problems)} problem(s), nothing was run:\n{listing}"
        )


@dataclass
class Run:
    """What the workflow plans from: the cohort, its plan and the rows a subset targets."""

    cohort: Cohort
    plan: pd.DataFrame
    plan_settings: PlanSettings
    target: pd.DataFrame
    warnings: list[str]


@dataclass(frozen=True)
class OracleLabel:
    """One ground-truth label of the simulated annotator (path absolute)."""

    path: Path
    convention: str


def read_oracle(oracle_sheet: str | os.PathLike) -> tuple[dict[str, OracleLabel], list[str]]:
    """The oracle sheet (TSV: study_id, label, optional label_convention; paths relative to
    its folder) and its problems (missing columns, unknown conventions, missing label files)."""
    path = Path(oracle_sheet)
    where = f"oracle_sheet {path}"
    if not path.is_file():
        return {}, [f"{where}: file not found"]
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return {}, [f"{where}: cannot be read as a TSV: {exc}"]
    missing = [c for c in ORACLE_COLUMNS if c not in table.columns]
    if missing:
        return {}, [f"{where}: missing column(s) {', '.join(missing)} (has {list(table.columns)})"]
    conventions = table.get("label_convention", pd.Series("", index=table.index, dtype=str))
    oracle, problems = {}, []
    header_problem: dict[Path, str | None] = {}  # one header read per file, however many rows
    for row, (study_id, label, convention) in enumerate(
        zip(table.study_id, table.label, conventions, strict=True), start=2
    ):
        if not label:
            continue
        convention = convention or "internal"
        if convention not in labels.CONVENTIONS:
            problems.append(
                f"{where} row {row} (study {study_id}): label_convention {convention!r} is not "
                f"one of {', '.join(labels.CONVENTIONS)}"
            )
            continue
        file = (path.parent / label).resolve()
        if not file.is_file():
            problems.append(f"{where} row {row} (study {study_id}): label file {file} not found")
            continue
        if not os.access(file, os.R_OK):
            problems.append(f"{where} row {row} (study {study_id}): label file {file} unreadable")
            continue
        # The first 348 bytes only: a text file or another format is found at parse time, not
        # by round 1. nibabel's full header check costs ~5 ms a label (60 s per parse of an
        # 11,892-study oracle, paid by every Snakemake invocation), so it and the voxel values
        # are the check_oracle job's (oracle_value_problems).
        if file not in header_problem:
            header_problem[file] = _nifti_signature_problem(file)
        if header_problem[file] is not None:
            problems.append(f"{where} row {row} (study {study_id}): {file}: {header_problem[file]}")
            continue
        oracle[study_id] = OracleLabel(file, convention)
    return oracle, problems


def _nifti_signature_problem(path: Path) -> str | None:
    """None when ``path`` starts like a NIfTI-1/2 file (gzipped or not), else why not."""
    import gzip

    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as handle:
            head = handle.read(544)
    except (OSError, EOFError) as exc:
        return f"cannot be read as a NIfTI file: {exc}"
    for order in ("<", ">"):
        size = int.from_bytes(head[:4], "little" if order == "<" else "big") if head else 0
        if size == 348 and head[344:348] in (b"n+1\0", b"ni1\0"):
            return None
        if size == 540 and head[4:8] in (b"n+2\0", b"ni2\0"):
            return None
    return "not a NIfTI file (no NIfTI-1/2 header at its start)"


def oracle_value_problems(oracle: dict[str, OracleLabel]) -> list[str]:
    """Every oracle label whose voxels are not values of its convention (value 4, 0.5, NaN):
    the check_oracle job reads them all before any round needs one."""
    problems = []
    for study_id, label in oracle.items():
        try:  # load_nifti: the full header check (io.header_problems), then the values
            data = np.asanyarray(io.load_nifti(label.path, study_id, "oracle label").dataobj)
            labels.to_internal(data, label.convention)
        except io.StudyError as exc:
            problems.append(f"oracle label {label.path} (study {study_id}): {exc.problem}")
        except ValueError as exc:
            problems.append(f"oracle label {label.path} (study {study_id}): {exc}")
    return problems


def _writable_folder(path: str, what: str, key: str) -> list[str]:
    """Problems with ``path`` as a folder the run creates or writes into."""
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            return [f"{key} {path}: the {what} is not a folder"]
        if not os.access(folder, os.W_OK | os.X_OK):
            return [f"{key} {path}: the {what} folder is not writable"]
        return []
    parent = next(p for p in Path(os.path.abspath(folder)).parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"{key} {path}: cannot create the {what} folder ({parent} is not writable)"]
    return []


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _folder_problems(config: dict) -> list[str]:
    found = []
    for root in config.get("data_roots") or []:
        if not os.path.isdir(root):
            found.append(f"data_roots: {root} is not an existing folder")
    store, results = config["label_store"], config["results"]
    found += _writable_folder(store, "label store", "label_store")
    marker = Path(store) / io.LABEL_STORE_MARKER
    if marker.exists() and not os.access(marker, os.R_OK):
        found.append(f"label_store {store}: {marker} is not readable")
    found += _writable_folder(results, "results", "results")
    real_store, real_results = os.path.realpath(store), os.path.realpath(results)
    if _within(real_results, real_store) or _within(real_store, real_results):
        found.append(
            f"results {real_results} and label_store {real_store} overlap: pipeline outputs "
            "and human labels must live in separate folders (neither inside the other)"
        )
    return found


def _plan_problems(config: dict, cohort: Cohort) -> tuple[pd.DataFrame | None, list[str]]:
    try:
        plan = build_plan(cohort, PlanSettings.from_config(config))
    except ValueError as exc:
        return None, [str(exc)]
    found = []
    roles = plan.role.value_counts().to_dict()
    labelled = int(plan.has_label.sum())
    if not roles.get("seed"):
        if labelled:
            found.append(
                f"no seed study to train round 0 on: all {labelled} labelled studies belong to "
                "validation patients; leave a labelled patient out of validation.patients (or "
                "lower validation.fraction)"
            )
        else:
            found.append(
                f"no labelled study in the sheet ({config['sheet']}): round 0 trains on studies "
                "with a `label` (the seed set); fill the label column for some patients"
            )
    rounds = int(config["active_learning"]["rounds"])
    if rounds > 0 and not roles.get("pool"):
        found.append(
            f"active_learning.rounds is {rounds} but the pool is empty (every study has a "
            "label): set active_learning.rounds: 0, or add unlabelled studies to the sheet"
        )
    return plan, found


def _oracle_problems(config: dict, plan: pd.DataFrame | None) -> list[str]:
    """The oracle sheet's own problems and, given the plan, pool studies it cannot answer."""
    al = config["active_learning"]
    if al["annotator"] != "simulated" or int(al["rounds"]) == 0:
        return []
    if not config.get("oracle_sheet"):
        return [
            "active_learning.annotator is 'simulated' but oracle_sheet is not set (the ground "
            "truth it answers from); set oracle_sheet or active_learning.annotator: human"
        ]
    oracle, found = read_oracle(config["oracle_sheet"])
    if plan is None or (found and not oracle):
        return found
    pool = plan.loc[plan.role == "pool", "study_id"]
    without = [s for s in pool if s not in oracle]
    if without:
        found.append(
            f"oracle_sheet {config['oracle_sheet']}: {len(without)} pool studies have no usable "
            f"ground-truth label, the simulated annotator could not answer them: "
            f"{', '.join(without[:10])}{' ...' if len(without) > 10 else ''}"
        )
    return found


def _pretrain_problems(config: dict, cohort: Cohort | None) -> list[str]:
    """The ``pretrain`` sheet: readable, with labelled studies, none of them a cohort study
    (pretraining studies must never enter the pool or the validation set); and not together
    with ``train.init_checkpoint`` (round 0 starts from one model)."""
    section = config.get("pretrain")
    if not section:
        return []
    found = []
    if (config.get("train") or {}).get("init_checkpoint"):
        found.append("pretrain and train.init_checkpoint are both set: round 0 starts from one")
    try:
        sheet = read_sheet(
            section["sheet"],
            data_roots=config.get("data_roots", []),
            allow_outside_roots=config.get("allow_paths_outside_roots", False),
        )
    except SheetError as exc:
        return [*found, f"pretrain: {exc}"]
    except OSError as exc:
        return [*found, f"pretrain sheet {section['sheet']}: {exc}"]
    labelled = [s.study_id for s in sheet.studies if s.label is not None]
    if not labelled:
        found.append(f"pretrain sheet {section['sheet']}: no study has a label to train on")
    if cohort is not None:
        shared = sorted(set(cohort.by_id) & {s.study_id for s in sheet.studies})
        if shared:
            found.append(
                f"pretrain sheet {section['sheet']}: {len(shared)} studies are also in the "
                f"cohort sheet (pretraining studies must not enter the pool or validation): "
                f"{', '.join(shared[:10])}{' ...' if len(shared) > 10 else ''}"
            )
    return found


def prepare_run(config: dict) -> Run:
    """Validate ``config`` (defaults filled in place) and everything the run reads; return the
    cohort and plan, or raise ``RunError`` listing every problem."""
    try:
        config_schema.validate(config)
    except config_schema.ConfigError as exc:
        raise RunError(exc.problems) from None  # the rest needs a valid config
    found = _folder_problems(config)
    cohort = plan = target = None
    try:
        cohort = read_sheet(
            config["sheet"],
            data_roots=config.get("data_roots", []),
            allow_outside_roots=config.get("allow_paths_outside_roots", False),
        )
    except SheetError as exc:
        found.append(str(exc))
    except OSError as exc:
        found.append(f"sheet {config['sheet']}: {exc}")
    if cohort is not None and not len(cohort):
        found.append(f"sheet {config['sheet']}: no studies (a header only)")
        cohort = None
    if cohort is not None:
        plan, more = _plan_problems(config, cohort)
        found += more
    # Without a plan (a broken sheet) the oracle sheet is still checked, not its pool coverage.
    found += _oracle_problems(config, plan)
    found += _pretrain_problems(config, cohort)
    if plan is not None:
        try:
            target = restrict(plan, config["subset_studies"], config["subset_patients"])
        except ValueError as exc:
            found.append(str(exc))
    if found:
        raise RunError(found)
    warnings = []
    if not (plan.role == "validation").any():
        # A warning, not an error: runs that stop before evaluation (a subset, the per-study
        # stages, tests/test_faults.py) are valid with one labelled patient.
        warnings.append(
            "no validation study: the rounds cannot be evaluated and the report's figures will "
            "fail; label at least two patients (one trains, one validates), or name them in "
            "validation.patients"
        )
    return Run(
        cohort=cohort,
        plan=plan,
        plan_settings=PlanSettings.from_config(config),
        target=target,
        warnings=warnings,
    )
