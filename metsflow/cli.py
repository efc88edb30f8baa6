"""The ``metsflow`` command line: cohort tools, the demo cohort, evaluation, active learning, review.

The pipeline itself runs through Snakemake (see docs/running.md); these commands are what a user
runs around it: build and check a sheet before any job runs, evaluate a single case, move a
review batch in and out of the label store, and run the review web server (``metsflow review``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sqlite3
import sys
from pathlib import Path

from metsflow.core.layout import Layout


def _bounded(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type`` for a number in a range: every numeric argument uses one, so an
    out-of-range, NaN or infinite value is refused while parsing (``evaluate --iou-threshold
    5`` gave lesion F1 0 and ``-1`` F1 1; ``--max-image-mb nan`` turned the memory guard off)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value

    parse.__name__ = kind.__name__
    return parse


_COUNT = _bounded(int, 1)  # studies, patients, GPUs, cores, shard sizes, workers
_INDEX = _bounded(int, 0)  # seeds, rounds
_POSITIVE = _bounded(float, 0, low_open=True)  # mm, MiB, scales
_FRACTION = _bounded(float, 0, 1, low_open=True)  # shares of a cohort: (0, 1]


def _candidates(text: str) -> str:
    """``--candidates``: ``all`` or a whole number of at least 1."""
    return text if text == "all" else str(_COUNT(text))


def _cmd_demo_cohort(args) -> int:
    from metsflow.cohort.phantom import make_demo_cohort

    result = make_demo_cohort(
        args.out,
        n_patients=args.patients,
        n_timepoints=args.timepoints,
        model_spacing=args.phantom_spacing,
        labelled_patients=args.labelled_patients,
        seed=args.seed,
        workers=args.workers,
    )
    print(f"demo cohort: {len(result['study_ids'])} studies, sheet {result['sheet']}")
    return 0


def _cmd_cohort_scan(args) -> int:
    from metsflow.cohort.scan import scan, write_sheet

    table, problems = scan(args.root, layout=args.layout, labels=args.labels)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    write_sheet(table, args.out)
    print(f"{len(table)} studies of {table.patient_id.nunique()} patients -> {args.out}")
    return 0


def _cmd_cohort_import_dicom(args) -> int:
    """Classify and convert a DICOM export; the sheet and the report go into --out."""
    from metsflow.cohort.dicom import REPORT_NAME, SHEET_NAME, import_dicom

    frame, report, problems = import_dicom(args.dicom_root, args.out, rules_path=args.rules)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    counts = report.status.value_counts().to_dict()
    print(
        f"{len(report)} series: "
        + ", ".join(f"{counts[k]} {k}" for k in sorted(counts))
        + f" (report {Path(args.out) / REPORT_NAME})"
    )
    print(
        f"{len(frame)} studies of {frame.patient_id.nunique()} patients -> "
        f"{Path(args.out) / SHEET_NAME}"
    )
    return 0


def _cmd_cohort_check(args) -> int:
    """Report every problem of a sheet at once, before any job runs; exit 1 if any."""
    from metsflow.cohort.sheet import SheetError, check_cohort, read_sheet

    try:
        cohort = read_sheet(
            args.sheet,
            data_roots=args.data_root,  # none given: the sheet's own folder
            allow_outside_roots=args.allow_outside_roots,
        )
    except SheetError as exc:
        print(exc, file=sys.stderr)
        return 1
    from metsflow.core.io import MAX_IMAGE_MB

    limit = MAX_IMAGE_MB if args.max_image_mb is None else args.max_image_mb
    problems = check_cohort(cohort, deep=args.deep, max_image_mb=limit)
    if args.out:
        from metsflow.core.io import write_table

        write_table(args.out, problems)
    if len(problems):
        print(problems.to_string(index=False), file=sys.stderr)
        print(
            f"{problems.study_id.nunique()} of {len(cohort)} studies have problems "
            f"({len(problems)} in all)",
            file=sys.stderr,
        )
        return 1
    print(f"{len(cohort)} studies of {len(cohort.patients)} patients: no problems found")
    return 0


def _cmd_cohort_synthetic(args) -> int:
    from metsflow.cohort.sheet import synthetic_sheet

    synthetic_sheet(args.studies, args.out, seed=args.seed)
    print(f"{args.studies} synthetic rows -> {args.out}")
    return 0


def _json_number(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cmd_evaluate(args) -> int:
    from metsflow.evaluation.metrics import DEFAULT_IOU_THRESHOLD, evaluate_files

    result = evaluate_files(
        args.pred,
        args.ref,
        convention=args.convention,
        iou_threshold=DEFAULT_IOU_THRESHOLD if args.iou_threshold is None else args.iou_threshold,
        nsd_rate=args.ndsc_rate,
    )
    # Strict JSON: a metric that is undefined here (nDSC without a cohort rate) is null, not NaN.
    result = {
        group: {k: _json_number(v) for k, v in values.items()} for group, values in result.items()
    }
    text = json.dumps(result, indent=2, sort_keys=True, allow_nan=False)
    if args.json:
        from metsflow.core.io import write_text

        write_text(args.json, text + "\n")
    print(text)
    return 0


def _alternative(value: str) -> str:
    """``--alternative``: one of ``metsflow.evaluation.stats.ALTERNATIVES`` (checked while parsing)."""
    from metsflow.evaluation.stats import ALTERNATIVES

    if value not in ALTERNATIVES:
        raise argparse.ArgumentTypeError(f"{value!r}: use one of {', '.join(ALTERNATIVES)}")
    return value


def _cmd_stats_compare(args) -> int:
    """Paired statistics of two per-study tables (a = first, b = second) on shared studies."""
    import pandas as pd

    from metsflow.evaluation.stats import COMPARE_GROUPS, COMPARE_METRICS, compare_per_study

    tables = [pd.read_csv(p, sep="\t", dtype={"study_id": str}) for p in (args.a, args.b)]
    table = compare_per_study(
        *tables,
        metrics=args.metric or COMPARE_METRICS,
        groups=args.group or COMPARE_GROUPS,
        alternative=args.alternative,
    )
    if table.empty:
        print("no studies, groups or metrics in common: nothing to compare", file=sys.stderr)
        return 1
    if args.out:
        from metsflow.core.io import write_table

        write_table(args.out, table)
    columns = ["group", "metric", "n", "mean_a", "mean_b", "mean_diff", "ci95_low", "ci95_high"]
    columns += ["ttest_p", "wilcoxon_p", "mannwhitney_p", "shapiro_p"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


# --sheet/--results/--labels: the workflow config key of each; their defaults are the config
# schema's (the sheet has none there: the demo's, as config/config.yaml).
_WORKFLOW_KEYS = {"sheet": "sheet", "results": "results", "labels": "label_store"}
_DEMO_SHEET = "demo/studies.tsv"


def _workflow_defaults() -> dict[str, tuple[str, str]]:
    """option -> (default, config key), the defaults from the workflow config schema."""
    from metsflow.core import config as workflow_config

    properties = workflow_config.schema()["properties"]
    return {
        option: (properties[key].get("default", _DEMO_SHEET), key)
        for option, key in _WORKFLOW_KEYS.items()
    }


def _workflow_path_args(parser, *names: str, note: dict[str, str] | None = None) -> None:
    """``--configfile`` and the ``--sheet``/``--results``/``--labels`` options ``names`` of a
    command (``note``: text after an option's default), filled by ``_workflow_paths``."""
    paths = _workflow_defaults()
    keys = ", ".join(paths[n][1] for n in names)
    parser.add_argument("--configfile", help=f"workflow config: its {keys}")
    for name in names:
        extra = f" ({note[name]})" if note and name in note else ""
        parser.add_argument(f"--{name}", help=f"default: {paths[name][0]}{extra}")


def _workflow_paths(args) -> None:
    """Fill --sheet/--results/--labels left unset from the workflow config (--configfile), so the
    commands read the same folders the pipeline wrote; then the demo defaults."""
    paths = _workflow_defaults()
    defaults = {key: default for key, (default, _) in paths.items()}
    if getattr(args, "configfile", None):
        from metsflow.core import config as workflow_config

        config = workflow_config.load(args.configfile)
        defaults.update({key: config[name] for key, (_, name) in paths.items() if config.get(name)})
    for key, value in defaults.items():
        if getattr(args, key, "unset") is None:
            setattr(args, key, value)


def _cmd_al_status(args) -> int:
    from metsflow.active_learning.labelstore import LabelStore
    from metsflow.active_learning.status import (
        cascade_status,
        detection_status,
        final_status,
        format_burden,
        format_status,
        round_status,
        suggestion_status,
    )

    _workflow_paths(args)
    store = LabelStore(args.labels, create=False)
    table = round_status(args.results, store)
    detection = detection_status(args.results) + cascade_status(args.results)
    print(
        format_status(table) + format_burden(table) + detection + final_status(args.results, store),
        end="",
    )
    print(suggestion_status(args.results, store), end="")
    from metsflow.review_server.db import progress_line

    print(progress_line(args.labels), end="")
    return 0


def _cmd_al_import(args) -> int:
    """Import a reviewed batch into the label store; print what was imported or rejected."""
    from metsflow.active_learning.labelstore import LabelStore
    from metsflow.active_learning.review import import_batch
    from metsflow.cohort.sheet import read_sheet

    _workflow_paths(args)
    cohort = read_sheet(args.sheet)
    store = LabelStore(args.labels, known_studies=set(cohort.by_id))
    if args.review_dir:
        review_dir = Path(args.review_dir)
    elif args.round is not None:
        review_dir = Path(Layout(args.results).review_dir(args.round))
    elif args.final:
        review_dir = Path(Layout(args.results).final_review_dir)
    else:
        raise ValueError("say which review package: --round R, --final or --review-dir")
    results = import_batch(
        review_dir,
        store,
        stage=args.stage,
        reviewer=args.reviewer,
        # A study the sheet does not know gets no reference; the store then rejects it.
        reference_for=lambda s: cohort.by_id[s].t1c if s in cohort.by_id else None,
    )
    print(results.to_string(index=False))
    return 1 if (results.get("result") == "rejected").any() else 0


def _cmd_al_override(args) -> int:
    """Replace one study's confirmed label with a new, versioned confirmed label (with reason)."""
    from metsflow.active_learning.labelstore import LabelStore
    from metsflow.cohort.sheet import read_sheet

    _workflow_paths(args)
    cohort = read_sheet(args.sheet)
    if args.study not in cohort.by_id:
        raise ValueError(f"study {args.study}: unknown study (not in {args.sheet})")
    store = LabelStore(args.labels, known_studies=set(cohort.by_id))
    # LabelImportError is a ValueError: main() prints it (study, file, problem) and exits 2.
    version = store.import_label(
        args.study,
        args.label,
        stage="confirmed",
        reviewer=args.reviewer,
        reference_image=cohort.by_id[args.study].t1c,
        source="override",
        override=True,
        reason=args.reason,
    )
    print(f"{args.study}: confirmed label version {version} (override: {args.reason})")
    return 0


def _bounded_int(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; anything else is a usage error (exit 2)
    naming the option and the range, never a traceback from deeper down."""
    span = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _review_config(args):
    """Review server settings from --configfile/--results/--labels/--sheet (as ``al import``);
    the sheet is used when it exists (labels then checked against its native T1c). A --round
    without an exported review batch is refused, naming the rounds that have one."""
    from metsflow.review_server.catalog import review_rounds
    from metsflow.review_server.config import ReviewConfig

    _workflow_paths(args)
    round_index = getattr(args, "round", None)
    if round_index is not None:
        rounds = review_rounds(args.results)
        if round_index not in rounds:
            have = ", ".join(map(str, rounds)) or "none yet"
            raise ValueError(
                f"round {round_index} has no review batch in {args.results} (rounds with one: "
                f"{have})"
            )
    sheet = Path(args.sheet) if args.sheet and Path(args.sheet).is_file() else None
    return ReviewConfig(
        results=Path(args.results),
        label_store=Path(args.labels),
        sheet=sheet,
        round=round_index,
        secure_cookies=getattr(args, "secure_cookies", False),
    )


def _read_password(username: str) -> str:
    """From a prompt (twice) on a terminal, else the first line of stdin."""
    import getpass

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ")
        return password
    return sys.stdin.readline().rstrip("\r\n")


def _cmd_review_user_add(args) -> int:
    from metsflow.review_server import db

    config = _review_config(args)
    db.add_user(config.db_path, args.name, _read_password(args.name), args.role)
    print(f"user {args.name} ({args.role}) added to {config.db_path}")
    return 0


def _cmd_review_user_list(args) -> int:
    from metsflow.review_server import db

    config = _review_config(args)
    db.init_db(config.db_path)
    with db.connect(config.db_path) as con:
        users = db.list_users(con)
    for user in users:
        print(f"{user['username']}\t{user['role']}\t{user['created_at']}")
    if not users:
        print(f"no users yet in {config.db_path}", file=sys.stderr)
    return 0


def _cmd_review_assign(args) -> int:
    from metsflow.review_server.assign import assign_studies, auto_assign
    from metsflow.review_server.service import HTTPError, ReviewApp

    app = ReviewApp(_review_config(args))
    who = f"cli:{os.environ.get('USER', 'admin')}"
    try:
        if args.to:
            if bool(args.patient) == bool(args.study):
                raise ValueError("with --to, give one of --patient / --study")
            moved = assign_studies(app, args.to, args.study, args.patient, who)
            print(f"{len(moved)} studies assigned to {args.to}: {', '.join(moved)}")
        else:
            counts = auto_assign(app, who)
            total = sum(counts.values())
            print(
                f"{total} unassigned studies assigned: "
                + ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
            )
    except HTTPError as exc:
        raise ValueError(exc.detail) from exc
    return 0


def _cmd_review_export_times(args) -> int:
    from metsflow.core.io import write_text
    from metsflow.review_server.dashboard import review_times_tsv
    from metsflow.review_server.service import ReviewApp

    text = review_times_tsv(ReviewApp(_review_config(args)))
    write_text(args.out, text)
    print(f"{text.count(chr(10)) - 1} saves -> {args.out}")
    return 0


# uvicorn's supervisor kills (SIGKILL) and replaces a worker that does not answer its ping
# within this many seconds; its default, 5 s, killed a worker in the middle of the load test's
# saves on the 2-core machine under a 2-core training job (nice 19). Minutes of silence mean
# a hung worker; seconds only a busy machine.
WORKER_HEALTHCHECK_S = 120


def _cmd_review_serve(args) -> int:
    import uvicorn

    from metsflow.review_server.app import CONFIG_ENV, create_app

    config = _review_config(args)
    # Built here even for N workers: it creates the review database and the label store once,
    # before the workers open them (N processes creating the store's marker at once race).
    app = create_app(config)
    batches = app.state.review.catalog.batch_names()
    print(
        f"review server on http://{args.host}:{args.port} (batches: {', '.join(batches) or 'none'}"
        f"; state {config.db_path}; {args.workers} worker process(es))"
    )
    options = {"host": args.host, "port": args.port, "log_level": "info", "proxy_headers": False}
    if args.workers == 1:
        uvicorn.run(app, **options)
    else:
        # uvicorn starts each worker by importing the app by name: the settings go by environment.
        os.environ[CONFIG_ENV] = config.to_json()
        target = "metsflow.review_server.app:app_from_env"
        uvicorn.run(
            target,
            factory=True,
            workers=args.workers,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            **options,
        )
    return 0


def _cmd_cost(args) -> int:
    """Estimate the full cohort's core-hours, GPU-hours and makespan from a run's benchmarks."""
    import dataclasses

    from metsflow.cohort.costmodel import BenchmarkError, CohortShape, ModelSet, estimate, read_run

    shape = CohortShape(
        studies=args.studies,
        gpus=args.gpus,
        cores=args.cores,
        cpu_shard_size=args.cpu_shard_size,
        gpu_shard_size=args.gpu_shard_size,
        rounds=args.rounds,
        infer_fraction=args.infer_fraction,
        train_scale=args.train_scale,
        validation_fraction=args.validation_fraction,
        followup_fraction=args.followup_fraction,
    )
    pilot = None
    if args.pilot_configfile:
        from metsflow.core import config as workflow_config

        try:
            pilot = ModelSet.from_config(workflow_config.load(args.pilot_configfile))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"--pilot-configfile {args.pilot_configfile}: {exc}", file=sys.stderr)
            return 1
    if args.configfile:
        try:
            shape = _shape_from_config(shape, args.configfile)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A ConfigError names the file itself.
            named = args.configfile in str(exc)
            print(exc if named else f"--configfile {args.configfile}: {exc}", file=sys.stderr)
            return 1
    if args.candidates is not None:
        shape = dataclasses.replace(
            shape, candidates=None if args.candidates == "all" else int(args.candidates)
        )
    try:
        bench = read_run(args.benchmarks, plan=args.plan)
    except BenchmarkError as exc:
        print(exc, file=sys.stderr)
        return 1
    result = estimate(bench, shape, pilot)
    print(result.render())
    if shape.candidates is not None:
        from metsflow.cohort.costmodel import render_comparison

        before = estimate(bench, dataclasses.replace(shape, candidates=None), pilot)
        print()
        print(render_comparison(before, result))
    if args.out:
        from metsflow.core.io import write_table

        write_table(args.out, result.table())
    return 0


def _shape_from_config(shape, path: str):
    """Shard sizes, rounds, candidates and the models trained and ensembled (``train``,
    ``infer``) of a workflow config file (e.g. config/cohort.yaml)."""
    import dataclasses

    from metsflow.cohort.costmodel import ModelSet
    from metsflow.core import config as workflow_config

    config = workflow_config.load(path)
    sharding = config.get("sharding", {})
    al = config.get("active_learning", {})
    candidates = al.get("candidates", "all")
    return dataclasses.replace(
        shape,
        cpu_shard_size=int(sharding.get("cpu_shard_size", shape.cpu_shard_size)),
        gpu_shard_size=int(sharding.get("gpu_shard_size", shape.gpu_shard_size)),
        rounds=int(al.get("rounds", shape.rounds)),
        candidates=None if candidates == "all" else int(candidates),
        models=ModelSet.from_config(config),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metsflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-cohort", help="write the longitudinal phantom demo cohort")
    demo.add_argument("--out", default="demo")
    demo.add_argument("--patients", type=_COUNT, default=8)
    demo.add_argument("--timepoints", type=_COUNT, default=3)
    demo.add_argument("--labelled-patients", type=_INDEX, default=4)
    demo.add_argument("--phantom-spacing", type=_POSITIVE, default=2.0, help="mm")
    demo.add_argument("--seed", type=_INDEX, default=0)
    demo.add_argument(
        "--workers",
        type=_COUNT,
        default=min(4, os.cpu_count() or 1),
        help="processes (same output)",
    )
    demo.set_defaults(func=_cmd_demo_cohort)

    cohort = sub.add_parser("cohort", help="build and check study sheets")
    cohort_sub = cohort.add_subparsers(dest="cohort_command", required=True)
    scan = cohort_sub.add_parser(
        "scan", help="build a sheet from a BraTS-METS, dated or BIDS layout"
    )
    scan.add_argument("root")
    scan.add_argument("--out", default="studies.tsv")
    scan.add_argument("--layout", choices=["auto", "brats", "longitudinal", "bids"], default="auto")
    scan.add_argument("--labels", help="bids layout: a derivatives folder with _dseg label maps")
    scan.set_defaults(func=_cmd_cohort_scan)
    dicom = cohort_sub.add_parser(
        "import-dicom", help="convert a DICOM export (dcm2niix) to the dated layout and a sheet"
    )
    dicom.add_argument("dicom_root")
    dicom.add_argument("--out", required=True, help="NIfTI folder (gets studies.tsv and a report)")
    dicom.add_argument(
        "--rules",
        help="series classification rules (YAML; default metsflow/schemas/dicom_series.yaml)",
    )
    dicom.set_defaults(func=_cmd_cohort_import_dicom)
    check = cohort_sub.add_parser("check", help="report all problems of a sheet at once")
    check.add_argument("sheet")
    check.add_argument("--deep", action="store_true", help="also open every NIfTI header")
    check.add_argument(
        "--data-root",
        action="append",
        default=[],
        help="folder sheet paths must stay inside (repeatable; default: the sheet's folder)",
    )
    check.add_argument(
        "--allow-outside-roots", action="store_true", help="turn the containment check off"
    )
    check.add_argument(
        "--max-image-mb",
        type=_POSITIVE,
        help="with --deep: refuse headers claiming more voxel data (MiB; default as the "
        "pipeline's preprocess.max_image_mb, metsflow.core.io.MAX_IMAGE_MB)",
    )
    check.add_argument("--out", help="write the problems table (TSV)")
    check.set_defaults(func=_cmd_cohort_check)
    synth = cohort_sub.add_parser("synthetic", help="a paths-only sheet for planning benchmarks")
    synth.add_argument("studies", type=_INDEX)
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=_INDEX, default=0)
    synth.set_defaults(func=_cmd_cohort_synthetic)

    evaluate = sub.add_parser("evaluate", help="metrics of one prediction against a reference")
    evaluate.add_argument("--pred", required=True)
    evaluate.add_argument("--ref", required=True)
    evaluate.add_argument("--convention", choices=["internal", "brats"], default="internal")
    # The defaults are the library's (metsflow.core.settings.EvaluateSettings, metsflow.evaluation.stats), read
    # when the command runs: importing them here would add ~0.8 s to every command (numpy,
    # nibabel, scipy).
    evaluate.add_argument(
        "--iou-threshold",
        # IoU > t matches: t = 1 could never match, t < 0 would match disjoint lesions
        type=_bounded(float, 0, 1, high_open=True),
        help="lesions match when their IoU is greater than this (default: the workflow's "
        "evaluate.iou_threshold default)",
    )
    evaluate.add_argument(
        "--ndsc-rate",
        type=_bounded(float, 0, 1, low_open=True, high_open=True),
        help="positive-class rate r of the normalised Dice (Raina et al. 2023), e.g. the cohort "
        "mean; without it ndsc is null",
    )
    evaluate.add_argument("--json", help="also write the JSON here")
    evaluate.set_defaults(func=_cmd_evaluate)

    stats = sub.add_parser("stats", help="statistics over per-study metric tables")
    stats_sub = stats.add_subparsers(dest="stats_command", required=True)
    compare = stats_sub.add_parser(
        "compare", help="paired tests of two per_study.tsv tables (a vs b, same studies)"
    )
    compare.add_argument("a", help="per_study.tsv of the model/round under test")
    compare.add_argument("b", help="per_study.tsv of the baseline")
    compare.add_argument("--metric", action="append", help="repeatable; default dice, ndsc, ...")
    compare.add_argument("--group", action="append", help="repeatable; default whole_lesion, ...")
    compare.add_argument(
        "--alternative",
        type=_alternative,
        help="greater | less | two-sided (a vs b); default per metric: less where lower is "
        "better (metsflow.evaluation.metrics.LOWER_IS_BETTER: hd95, FP/FN counts), else greater",
    )
    compare.add_argument("--out", help="also write the full table (TSV)")
    compare.set_defaults(func=_cmd_stats_compare)

    cost = sub.add_parser(
        "cost", help="core-hours, GPU-hours and makespan of a cohort from a run's benchmarks"
    )
    cost.add_argument("--benchmarks", default=Layout("results").benchmarks_dir)
    cost.add_argument(
        "--plan", help="the run's plan table (default: <benchmarks>/../plan/cohort.tsv)"
    )
    cost.add_argument("--studies", type=_COUNT, default=11_892)
    cost.add_argument("--gpus", type=_COUNT, default=8)
    cost.add_argument("--cores", type=_COUNT, default=512, help="CPU cores for the CPU stages")
    cost.add_argument("--cpu-shard-size", type=_COUNT, default=16)
    cost.add_argument("--gpu-shard-size", type=_COUNT, default=64)
    cost.add_argument(
        "--rounds", type=_INDEX, default=5, help="active-learning rounds after round 0"
    )
    cost.add_argument(
        "--infer-fraction", type=_FRACTION, default=1.0, help="share of studies segmented per round"
    )
    cost.add_argument(
        "--train-scale", type=_POSITIVE, default=1.0, help="cohort / run training iterations"
    )
    cost.add_argument(
        "--configfile",
        help="take shard sizes, rounds, active_learning.candidates and the models trained per "
        "round (train.folds, stage2, reseg, iterations) and ensembled (infer.tta) from this "
        "workflow config",
    )
    cost.add_argument(
        "--pilot-configfile",
        help="the benchmarked run's config: its iterations and infer.tta, against which "
        "--configfile's are scaled (without it: --train-scale, and no TTA in the run)",
    )
    cost.add_argument(
        "--followup-fraction",
        type=float,
        help="share of segmented studies that are follow-ups (re-seg passes; default: the run's)",
    )
    cost.add_argument(
        "--candidates",
        type=_candidates,
        help="active_learning.candidates (N or all); with N, also the table against all",
    )
    cost.add_argument(
        "--validation-fraction",
        type=_bounded(float, 0, 1, high_open=True),
        default=0.1,
        help="share of studies in validation (segmented every round)",
    )
    cost.add_argument("--out", help="also write the per-stage table (TSV)")
    cost.set_defaults(func=_cmd_cost)

    al = sub.add_parser("al", help="active-learning rounds and the human label store")
    al_sub = al.add_subparsers(dest="al_command", required=True)
    status = al_sub.add_parser(
        "status", help="rounds, batches, review progress, Dice, correction burden"
    )
    _workflow_path_args(status, "results", "labels")
    status.set_defaults(func=_cmd_al_status)
    imp = al_sub.add_parser("import", help="import reviewed labels of a round's batch")
    package = imp.add_mutually_exclusive_group(required=True)
    package.add_argument("--round", type=_INDEX, help="the batch of this round")
    package.add_argument("--final", action="store_true", help="the final model's QA sample")
    package.add_argument("--review-dir", help="any review package folder")
    imp.add_argument("--stage", choices=["refined", "confirmed"], required=True)
    imp.add_argument("--reviewer", required=True)
    _workflow_path_args(imp, "sheet", "results", "labels")
    imp.set_defaults(func=_cmd_al_import)
    override = al_sub.add_parser(
        "override", help="replace a confirmed label by a new confirmed version (with a reason)"
    )
    override.add_argument("--study", required=True)
    override.add_argument("--label", required=True, help="NIfTI on the study's native T1c grid")
    override.add_argument("--reviewer", required=True)
    override.add_argument("--reason", required=True)
    _workflow_path_args(override, "sheet", "labels")
    override.set_defaults(func=_cmd_al_override)

    from metsflow.review_server.policy import ACCOUNT_RULES, Role

    review = sub.add_parser("review", help="the review web server and its accounts")
    review_sub = review.add_subparsers(dest="review_command", required=True)

    def paths(p):
        _workflow_path_args(p, "sheet", "results", "labels", note={"sheet": "used when it exists"})
        p.add_argument(
            "--round", type=_bounded_int(0), help="serve this round's batch (default: newest)"
        )

    serve = review_sub.add_parser("serve", help="serve the current round's batch and QA sample")
    paths(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_bounded_int(1, 65535), default=8765)
    serve.add_argument(
        "--secure-cookies", action="store_true", help="mark the session cookie Secure (HTTPS)"
    )
    serve.add_argument(
        "--workers",
        type=_bounded_int(1, 64),
        default=1,
        help="server processes (default %(default)s; docs/reviewing.md#server-processes)",
    )
    serve.set_defaults(func=_cmd_review_serve)
    user = review_sub.add_parser("user", help="reviewer accounts")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    user_add = user_sub.add_parser(
        "add",
        help="add an account (password: prompt or stdin)",
        description=f"Add a reviewer account. {ACCOUNT_RULES}.",
    )
    user_add.add_argument("name", help=ACCOUNT_RULES.split("; ")[0])
    user_add.add_argument("--role", required=True, choices=[str(role) for role in Role])
    paths(user_add)
    user_add.set_defaults(func=_cmd_review_user_add)
    user_list = user_sub.add_parser("list", help="list accounts")
    paths(user_list)
    user_list.set_defaults(func=_cmd_review_user_list)
    assign = review_sub.add_parser(
        "assign", help="assign unassigned studies to trainees (balanced), or reassign with --to"
    )
    paths(assign)
    assign.add_argument("--to", help="trainee to (re)assign to")
    assign.add_argument("--patient", help="with --to: all studies of this patient")
    assign.add_argument("--study", help="with --to: this study")
    assign.set_defaults(func=_cmd_review_assign)
    times = review_sub.add_parser("export-times", help="review time per save (TSV)")
    paths(times)
    times.add_argument("--out", required=True)
    times.set_defaults(func=_cmd_review_export_times)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its errors are printed as one line (exit 2), never as a traceback
    (``-v`` shows the traceback of an unexpected error)."""
    from metsflow.core.io import StudyError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    # OSError: refused writes (a path inside the label store, permissions), missing files.
    except (ValueError, OSError, StudyError, sqlite3.Error) as exc:
        print(f"metsflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # e.g. a table without a column the command needs
        print(
            f"metsflow: error: missing {exc} (a column or key the command needs)", file=sys.stderr
        )
        return 2
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"metsflow: internal error: {type(exc).__name__}: {exc} (rerun with -v for the "
            "traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
