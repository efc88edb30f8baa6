"""Progress of the active-learning loop, for ``metsflow al status``.

Reads, for every ``<results_dir>/rounds/round_<r>/`` folder:

- ``selection.tsv``: the batch chosen with model r-1 for labelling in round r (columns as
  ``acquisition.select_batch`` returns: study_id, patient_id, score, rank, strategy). Round 0
  (the seed model) normally has none.
- ``evaluation/summary.json``: at least ``{"round": r, "mean_dice": x, "n_train": n}`` for
  model r on the validation set.

- ``correction_burden.tsv``: per study, how much people changed the pre-segmentation
  (``metsflow.active_learning.burden``), summarised per round as the median and interquartile
  range next to the median review time.

and the label store, for how far review of each batch has got (pending / refined /
confirmed) and, from the saved versions' provenance, how many of the review assists' possible
lesions (stage-2-dropped candidates) reviewers accepted per size bin (``suggestion_status``):
the cascade's operating point audited against the reviewers. A missing file means that step has not run yet; an unreadable one is reported in
the ``note`` column rather than stopping the report.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from metsflow.active_learning.assists import round_suggestion_decisions
from metsflow.active_learning.burden import (
    BURDEN_NAME,
    SUMMARY_COLUMNS,
    read_burden_tables,
    summarise_rounds,
)
from metsflow.active_learning.labelstore import LabelStore
from metsflow.core import io
from metsflow.core.layout import Layout
from metsflow.evaluation.report import suggestions_table

STATUS_COLUMNS = [
    "round",
    "strategy",
    "batch_size",
    "pending",
    "refined",
    "confirmed",
    "n_train",
    "mean_dice",
    "note",
    # correction burden of the round's confirmed batch (burden.SUMMARY_COLUMNS)
    *SUMMARY_COLUMNS[1:],
]


def _selection_summary(path: Path, store: LabelStore | None) -> tuple[dict, list[str]]:
    summary = {
        "strategy": None,
        "batch_size": None,
        "pending": None,
        "refined": None,
        "confirmed": None,
    }
    if not path.exists():
        return summary, []
    try:
        selection = pd.read_csv(path, sep="\t", dtype={"study_id": str})
    except (OSError, ValueError) as exc:
        return summary, [f"selection.tsv unreadable: {exc}"]
    if "study_id" not in selection.columns:
        return summary, ["selection.tsv has no study_id column"]
    summary["batch_size"] = len(selection)
    if "strategy" in selection.columns:
        strategies = sorted({str(s) for s in selection["strategy"].dropna()})
        summary["strategy"] = ",".join(strategies) or None
    if store is not None:
        counts = {"none": 0, "refined": 0, "confirmed": 0}
        for study_id in selection["study_id"]:
            counts[store.status(str(study_id))] += 1
        summary.update(
            pending=counts["none"], refined=counts["refined"], confirmed=counts["confirmed"]
        )
    return summary, []


def _evaluation_summary(path: Path, round_index: int) -> tuple[dict, list[str]]:
    summary = {"n_train": None, "mean_dice": None}
    if not path.exists():
        return summary, []
    try:
        data = io.read_json(path)
    except (OSError, json.JSONDecodeError) as exc:
        return summary, [f"summary.json unreadable: {exc}"]
    notes = []
    if data.get("round") is not None and int(data["round"]) != round_index:
        notes.append(f"summary.json says round {data['round']}")
    summary["mean_dice"] = data.get("mean_dice")
    summary["n_train"] = data.get("n_train")
    return summary, notes


def round_status(
    results_dir: str | os.PathLike, store: LabelStore | str | os.PathLike | None
) -> pd.DataFrame:
    """One row per round folder (``STATUS_COLUMNS``); None where a step has not run yet."""
    results_dir = Path(results_dir)
    if store is not None and not isinstance(store, LabelStore):
        store = LabelStore(store, create=False)
    rows = []
    layout = Layout(results_dir)
    rounds = layout.existing_rounds()
    burden, burden_notes = _burden_summary({r: Path(layout.burden(r)) for r, _ in rounds})
    for round_index, _ in rounds:
        selection, notes = _selection_summary(Path(layout.selection(round_index)), store)
        evaluation, eval_notes = _evaluation_summary(
            Path(layout.evaluation_summary(round_index)), round_index
        )
        notes += eval_notes + burden_notes.get(round_index, [])
        rows.append(
            {
                "round": round_index,
                **selection,
                **evaluation,
                "note": "; ".join(notes),
                **burden.get(round_index, {}),
            }
        )
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def _burden_summary(paths: dict[int, Path]) -> tuple[dict[int, dict], dict[int, list[str]]]:
    """Per round with a ``correction_burden.tsv`` (``paths``: round -> table): its
    ``burden.summarise_rounds`` row (an empty batch: 0 studies); and per round the notes on
    unreadable tables."""
    summaries, notes = {}, {}
    for round_index, path in paths.items():
        if not path.exists():
            continue
        try:
            table = read_burden_tables([path])
        except (OSError, ValueError) as exc:
            notes[round_index] = [f"{BURDEN_NAME} unreadable: {exc}"]
            continue
        summary = summarise_rounds(table, rounds=[round_index]).set_index("round")
        summaries[round_index] = summary.loc[round_index].to_dict()
    return summaries, notes


def _cell(value, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "dice":
        return f"{float(value):.3f}"
    if kind == "int":
        return str(int(value))
    return str(value)


def _aligned(header: list[str], table: list[list[str]]) -> list[str]:
    """The header and rows as left-aligned columns two spaces apart (every status table)."""
    widths = [max(len(header[i]), *(len(r[i]) for r in table)) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *table]
    ]


def format_status(frame: pd.DataFrame) -> str:
    """Plain-text table of ``round_status`` for the terminal, with a one-line total."""
    if frame.empty:
        return "active learning: no rounds yet (no results/rounds/round_<r> folders)\n"
    header = [
        "round",
        "strategy",
        "batch",
        "pending",
        "refined",
        "confirmed",
        "n_train",
        "dice",
        "note",
    ]
    table = []
    for row in frame.to_dict("records"):
        if row["batch_size"] is None or _cell(row["batch_size"]) == "-":
            note = "no selection" if row["round"] == 0 else "selection not run yet"
        else:
            note = ""
        if _cell(row["mean_dice"]) == "-":
            note = "; ".join(filter(None, [note, "not evaluated yet"]))
        note = "; ".join(filter(None, [note, row.get("note") or ""]))
        table.append(
            [
                _cell(row["round"], "int"),
                _cell(row["strategy"]),
                _cell(row["batch_size"], "int"),
                _cell(row["pending"], "int"),
                _cell(row["refined"], "int"),
                _cell(row["confirmed"], "int"),
                _cell(row["n_train"], "int"),
                _cell(row["mean_dice"], "dice"),
                note,
            ]
        )
    lines = _aligned(header, table)
    selected = pd.to_numeric(frame["batch_size"], errors="coerce").sum()
    confirmed = pd.to_numeric(frame["confirmed"], errors="coerce").sum()
    pending = pd.to_numeric(frame["pending"], errors="coerce").sum()
    lines.append(
        f"total: {int(selected)} studies selected, {int(confirmed)} confirmed, "
        f"{int(pending)} awaiting review"
    )
    return "\n".join(lines) + "\n"


def _spread(row: dict, metric: str, digits: int) -> str:
    """``median [q1-q3]`` of a burden figure, or "n/a" without values."""
    median = row.get(f"{metric}_median")
    if median is None or (isinstance(median, float) and math.isnan(median)):
        return "n/a"
    q1, q3 = row[f"{metric}_q1"], row[f"{metric}_q3"]
    return f"{median:.{digits}f} [{q1:.{digits}f}-{q3:.{digits}f}]"


BURDEN_HEADER = [
    "round",
    "studies",
    "voxels_changed",
    "changed_ml",
    "lesions_added",
    "lesions_removed",
    "lesions_resized",
    "review_s",
    "timed",
]


def format_burden(frame: pd.DataFrame) -> str:
    """Per round with a measured batch: correction burden and review time, median [IQR]."""
    rows = [
        r
        for r in frame.to_dict("records")
        if r.get("n_studies") is not None and not pd.isna(r.get("n_studies"))
    ]
    if not rows:
        if (frame["round"] > 0).any():
            return "correction burden: not measured yet (once a round's batch is confirmed)\n"
        return ""
    table = [
        [
            _cell(r["round"], "int"),
            _cell(r["n_studies"], "int"),
            _spread(r, "voxels_changed", 0),
            _spread(r, "changed_ml", 2),
            _spread(r, "lesions_added", 1),
            _spread(r, "lesions_removed", 1),
            _spread(r, "lesions_resized", 1),
            _spread(r, "review_seconds", 0),
            _cell(r["n_timed"], "int"),
        ]
        for r in rows
    ]
    lines = [
        "correction burden per round (confirmed label vs the round's pre-segmentation; "
        "median [IQR] over the batch; review_s: open -> save seconds, n/a without web saves):",
        *_aligned(BURDEN_HEADER, table),
    ]
    return "\n".join(lines) + "\n"


def final_status(results_dir: str | os.PathLike, store: LabelStore | None) -> str:
    """One line on the loop's end product (``results/final``): where every pool study's label
    comes from and how far human QA of the seeded model-labelled sample has got; empty if the
    last round has not finished."""
    layout = Layout(results_dir)
    labels_path = Path(layout.final_labels)
    if not labels_path.exists():
        return ""
    try:
        labels = pd.read_csv(labels_path, sep="\t", dtype=str, keep_default_na=False)
        sources = labels["source"].value_counts().to_dict()
        model_round = next(iter(labels["model"]), "?")
    except (OSError, ValueError, KeyError) as exc:
        return f"final: labels.tsv unreadable: {exc}\n"
    parts = ", ".join(f"{n} {source}" for source, n in sorted(sources.items()))
    line = f"final ({model_round}): {parts}"
    sample_path = Path(layout.qa_sample)
    if sample_path.exists():
        sample = pd.read_csv(sample_path, sep="\t", dtype={"study_id": str})
        line += f"; QA sample {len(sample)} studies"
        if store is not None and len(sample):
            states = [store.status(str(s)) for s in sample["study_id"]]
            line += (
                f" ({states.count('confirmed')} confirmed, {states.count('refined')} refined, "
                f"{states.count('none')} awaiting review)"
            )
    return line + "\n"


def detection_status(results_dir: str | os.PathLike) -> str:
    """Small-lesion detection per evaluated round, from ``evaluation/summary.json``: lesion
    sensitivity per size bin (detected/reference, sensitivity, Wilson 95% CI) and false
    positives per patient and per study; empty when no round has these figures yet."""
    rows, bins = [], []
    layout = Layout(results_dir)
    for round_index, _ in layout.existing_rounds():
        path = Path(layout.evaluation_summary(round_index))
        if not path.exists():
            continue
        try:
            data = io.read_json(path)
        except (OSError, json.JSONDecodeError):
            continue  # round_status's note already says so
        by_size = {e["size_bin"]: e for e in data.get("sensitivity_by_size") or []}
        if not by_size:
            continue
        bins += [b for b in by_size if b not in bins]
        rows.append((round_index, by_size, data.get("fp_per_patient"), data.get("fp_per_study")))
    if not rows:
        return ""

    def cell(entry: dict | None) -> str:
        if not entry or not entry.get("n_ref_lesions"):
            return "-"
        low, high = entry.get("ci95") or (None, None)
        ci = f" [{low:.2f}-{high:.2f}]" if low is not None and high is not None else ""
        return f"{entry['n_detected']}/{entry['n_ref_lesions']} {entry['sensitivity']:.2f}{ci}"

    header = ["round", *bins, "FP/patient", "FP/study"]
    table = [
        [
            str(r),
            *(cell(by_size.get(b)) for b in bins),
            _cell(None if fpp is None else f"{fpp:.2f}"),
            _cell(None if fps is None else f"{fps:.2f}"),
        ]
        for r, by_size, fpp, fps in rows
    ]
    lines = [
        "lesion detection on validation (whole lesion; detected/reference sensitivity "
        "[Wilson 95% CI] by equivalent diameter):",
        *_aligned(header, table),
    ]
    return "\n".join(lines) + "\n"


def cascade_status(results_dir: str | os.PathLike) -> str:
    """Per round with a stage-2 model: stage 1's proposal sensitivity on validation (the
    ceiling stage 2 works under), the operating point's sensitivity and FP/patient, and the
    validation lesions the operating point gives up per size bin
    (``metsflow.evaluation.report.cascade_ceiling``); empty without stage 2."""
    from metsflow.evaluation.report import cascade_ceiling

    layout = Layout(results_dir)
    summaries = []
    for round_index, _ in layout.existing_rounds():
        path = Path(layout.stage2_summary(round_index))
        try:
            summaries.append({"round": round_index, **io.read_json(path)})
        except (OSError, json.JSONDecodeError):
            continue  # no stage 2 in this round (or not trained yet)
    table = cascade_ceiling(summaries)
    if table.empty:
        return ""
    lost = [c for c in table.columns if c.startswith("lost ")]
    header = ["round", "proposal sens", "operating sens", "FP/patient", *lost]
    rows = [
        [
            str(row["round"]),
            _cell(row["proposal_sensitivity"], "dice"),
            _cell(row["operating_sensitivity"], "dice"),
            _cell(
                None
                if row["operating_fp_per_patient"] is None
                else f"{row['operating_fp_per_patient']:.2f}"
            ),
            *(str(int(row[c])) for c in lost),
        ]
        for row in table.to_dict("records")
    ]
    lines = [
        "cascade on validation: stage-1 proposal sensitivity (stage 2's ceiling), the "
        "operating point, and the lesions it gives up by size:",
        *_aligned(header, rows),
    ]
    return "\n".join(lines) + "\n"


def suggestion_status(
    results_dir: str | os.PathLike, store: LabelStore | str | os.PathLike | None
) -> str:
    """Per round and size bin: possible lesions offered in the review editor, accepted,
    dismissed (from the saved versions' provenance); empty when no save carried decisions."""
    if store is None:
        return ""
    if not isinstance(store, LabelStore):
        store = LabelStore(store, create=False)
    layout = Layout(results_dir)
    selections = {r: layout.selection(r) for r, _ in layout.existing_rounds()}
    found = suggestions_table(round_suggestion_decisions(store, selections))
    table = [
        [
            str(row.round),
            row.size_bin,
            str(row.offered),
            str(row.accepted),
            str(row.dismissed),
            "-" if math.isnan(row.accept_rate) else f"{row.accept_rate:.0%}",
        ]
        for row in found.itertuples()
    ]
    if not table:
        return ""
    header = ["round", "size", "possible", "accepted", "dismissed", "accept rate"]
    title = "possible lesions (candidates stage 2 dropped) decided in the review editor:"
    return "\n".join([title, *_aligned(header, table)]) + "\n"
