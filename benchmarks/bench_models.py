"""Models benchmark on the phantom cohort (CPU, small sizes): cascade, re-seg, fine-tuning.

Prints one table with
  1. the cascade's lesion sensitivity and FDR on held-out studies before / after stage 2 (the
     stage-2 threshold chosen on a validation patient for ``--target-sensitivity``);
  2. re-segmentation with the propagated prior vs segmentation only, on held-out follow-ups:
     whole-lesion DSC and lesion F1 (IoU > 0.1 matching), for the re-seg model alone and for
     the merged output (tracked lesions from re-seg, new ones from the cascade);
  3. fine-tuning from a checkpoint pretrained on other patients vs training from scratch, at
     an equal number of iterations: held-out whole-lesion DSC.

The cohort comes from ``metsflow.cohort.phantom.make_demo_cohort`` with every sequence on the T1c grid
(``separate_grids=False``), so "preprocessing" here is z-scoring inside the brain mask; the
prior of a follow-up is the previous study's label propagated with the phantom's *true*
follow-up -> previous correspondence (ideal registration), so re-seg is measured without
registration error at test time (its training priors are still fictitious).

    PYTHONPATH=. python benchmarks/bench_models.py --out /tmp/bench_models

Sizes are small on purpose (patch 32, filters 8-64, a few hundred iterations): the figures are
about the machinery on the phantom, not about accuracy on real MRI.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from metsflow.cohort import phantom
from metsflow.core import labels as lab
from metsflow.core.io import save_nifti
from metsflow.evaluation.metrics import dice, match_lesions
from metsflow.imaging.priors import merge_followup
from metsflow.models.cascade import filter_prediction, load_stage2, study_candidates, train_stage2
from metsflow.models.infer import foreground_probability, load_ensemble, stage1_probabilities
from metsflow.models.networks import load_study_input
from metsflow.models.train import train_model

IOU = 0.1  # lesion matching threshold (phantom lesions are small: a few dozen voxels)


def prepare(cohort_dir: Path, prep_root: Path) -> pd.DataFrame:
    """Write ``prep_root/<study>/{t1c,t1,t2,flair,brain_mask,label,prior}.nii.gz``."""
    read = lambda name: pd.read_csv(cohort_dir / name, sep="\t", dtype=str, keep_default_na=False)  # noqa: E731
    sheet = (
        read("studies.tsv")
        .drop(columns=["label"])
        .merge(read("oracle.tsv")[["study_id", "label"]], on="study_id")
    )
    manifest = json.loads((cohort_dir / "phantom.json").read_text())
    rows = []
    for row in sheet.itertuples():
        out = prep_root / row.study_id
        prior = out / "prior.nii.gz" if int(row.timepoint) > 0 else None
        if (out / "label.nii.gz").exists() and (prior is None or prior.exists()):
            rows.append(_item(row, out, prior))  # prepared by an earlier run
            continue
        study_dir = cohort_dir / row.patient_id / row.study_id
        t1c = nib.load(str(cohort_dir / row.t1c))
        brain = np.asarray(nib.load(str(study_dir / f"{row.study_id}_brainmask.nii.gz")).dataobj)
        brain = brain > 0
        for seq in ("t1c", "t1", "t2", "flair"):
            data = np.asarray(nib.load(str(cohort_dir / getattr(row, seq))).dataobj, np.float32)
            z = (data - data[brain].mean()) / (data[brain].std() + 1e-6)
            save_nifti(out / f"{seq}.nii.gz", np.where(brain, z, 0), t1c.affine, np.float32)
        save_nifti(out / "brain_mask.nii.gz", brain, t1c.affine, np.uint8)
        if prior is not None:
            previous = sheet[
                (sheet.patient_id == row.patient_id)
                & (sheet.timepoint == str(int(row.timepoint) - 1))
            ].iloc[0]
            save_nifti(
                prior,
                propagate(manifest, row.study_id, t1c, cohort_dir / previous.label),
                t1c.affine,
                np.uint8,
            )
        # The label last: its presence marks a completely prepared study.
        label = np.asarray(nib.load(str(cohort_dir / row.label)).dataobj).astype(np.uint8)
        save_nifti(out / "label.nii.gz", label, t1c.affine, np.uint8)
        rows.append(_item(row, out, prior))
    return pd.DataFrame(rows)


def _item(row, out: Path, prior: Path | None) -> dict:
    return {
        "study_id": row.study_id,
        "patient_id": row.patient_id,
        "timepoint": int(row.timepoint),
        "prep_dir": str(out),
        "label": str(out / "label.nii.gz"),
        "prior": str(prior) if prior else None,
    }


def propagate(manifest, study_id: str, target: nib.Nifti1Image, previous_label: Path):
    """Previous label on the follow-up grid through the phantom's true correspondence."""
    source = nib.load(str(previous_label))
    grid = np.indices(target.shape[:3]).reshape(3, -1).T.astype(float)
    world = nib.affines.apply_affine(target.affine, grid)
    previous_world = phantom.map_to_previous(manifest, study_id, world)
    voxels = nib.affines.apply_affine(np.linalg.inv(source.affine), previous_world).T
    data = np.asarray(source.dataobj).astype(np.uint8)
    sampled = ndimage.map_coordinates(data, voxels, order=0, mode="constant", cval=0)
    return sampled.reshape(target.shape[:3]).astype(np.uint8)


def whole(path_or_array) -> np.ndarray:
    if isinstance(path_or_array, str | Path):
        path_or_array = np.asarray(nib.load(str(path_or_array)).dataobj)
    return lab.whole_lesion(np.asarray(path_or_array)).astype(bool)


# --------------------------------------------------------------------------------------------
# Set-up shared with bench_small_lesions.py: options, cohort, patient split, model sizes,
# training, inference, stage-2 candidates.
# --------------------------------------------------------------------------------------------


def add_common_args(ap: argparse.ArgumentParser, patients: int, target_sensitivity: float):
    """The options this benchmark and bench_small_lesions.py share (``--out`` is each one's)."""
    ap.add_argument("--patients", type=int, default=patients)
    ap.add_argument("--iterations", type=int, default=200, help="stage-1 / re-seg iterations")
    ap.add_argument("--stage2-iterations", type=int, default=200)
    ap.add_argument("--target-sensitivity", type=float, default=target_sensitivity)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--reuse-models", action="store_true", help="use models an earlier run left in --out"
    )


def phantom_studies(args, spacing=(2.0, 2.0, 2.0), **cohort) -> pd.DataFrame:
    """The phantom cohort under ``<out>/cohort`` (made once: 3 time points, every patient
    labelled, every sequence on one ``spacing`` grid, no skull; ``cohort``: more
    ``make_demo_cohort`` arguments), prepared under ``<out>/prep`` (``prepare``)."""
    cohort_dir = args.out / "cohort"
    if not (cohort_dir / "oracle.tsv").exists():
        phantom.make_demo_cohort(
            cohort_dir,
            n_patients=args.patients,
            n_timepoints=3,
            native_spacing=spacing,
            model_spacing=spacing[0],
            labelled_patients=args.patients,
            separate_grids=False,
            skull=False,
            seed=args.seed,
            workers=args.threads,
            **cohort,
        )
    return prepare(cohort_dir, args.out / "prep")


def split_patients(studies: pd.DataFrame) -> dict[str, list[str]]:
    """Patients: train | stage-2 validation (one) | test (a third, at least 2); no patient in
    two groups."""
    patients = sorted(studies.patient_id.unique())
    n_test = max(2, len(patients) // 3)
    return {
        "train": patients[: -n_test - 1],
        "val": patients[-n_test - 1 : -n_test],
        "test": patients[-n_test:],
    }


def items_of(studies: pd.DataFrame, groups: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Training/inference items of each patient group."""
    return {k: studies[studies.patient_id.isin(g)].to_dict("records") for k, g in groups.items()}


def base_params(seed: int, spacing=(2.0, 2.0, 2.0)) -> dict:
    """Small-model training params (patch 32, filters 8-64, Adam), no validation, no resume."""
    return {
        "arch": "dynunet",
        "label_mode": "multiclass",
        "patch_size": [32, 32, 32],
        "filters": [8, 16, 32, 64],
        "spacing": list(spacing),
        "optimizer": "adam",
        "learning_rate": 3e-3,
        "batch_size": 2,
        "seed": seed,
        "log_interval": 50,
        "val_interval": 10**6,
        "checkpoint_interval": 10**6,
        "pos_neg_ratio": [2, 1],
    }


class Models:
    """Train (or, with ``reuse``, reuse) models as ``<out>/models/<name>.pt`` on the CPU,
    recording training seconds in ``timings``, and run them (stage 1) on items."""

    def __init__(self, out: Path, reuse: bool):
        self.dir, self.reuse, self.timings = out / "models", reuse, {}
        self.device = torch.device("cpu")
        self.infer = {"overlap": 0.25, "sw_batch_size": 4}

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def reusable(self, name: str) -> bool:
        return self.reuse and self.path(name).exists()

    def train(self, name: str, train_items: list[dict], params: dict, init=None) -> Path:
        if self.reusable(name):
            print(f"  reusing {self.path(name)}", flush=True)
            return self.path(name)
        t0 = time.perf_counter()
        result = train_model(
            train_items,
            [],
            params,
            self.path(name),
            init_checkpoint=init,
            device="cpu",
            resume=False,
        )
        self.timings[name] = time.perf_counter() - t0
        print(
            f"  trained {name}: {params['iterations']} it, loss {result['final_loss']:.3f}, "
            f"{self.timings[name]:.0f} s",
            flush=True,
        )
        return self.path(name)

    def stage2(self, train_candidates, val_candidates, channels: list[str], params: dict):
        """Train (or reuse) the stage-2 classifier ``stage2`` on the candidates the two callables
        return (only called when it is trained); ``load_stage2``'s (network, meta)."""
        if self.reusable("stage2"):
            print(f"  reusing {self.path('stage2')}", flush=True)
        else:
            t0 = time.perf_counter()
            train_stage2(
                train_candidates(), val_candidates(), channels, params, self.path("stage2"),
                device=self.device,
            )  # fmt: skip
            self.timings["stage2"] = time.perf_counter() - t0
        return load_stage2(self.path("stage2"))

    def segment(self, path: Path, study_items: list[dict]) -> list[tuple]:
        """``(input, probabilities, prediction)`` of each item (``stage1_probabilities``)."""
        networks, meta = load_ensemble([path], device=self.device)
        return [
            stage1_probabilities(networks, meta, i, self.infer, self.device) for i in study_items
        ]


def stage2_candidates(
    study_items: list[dict],
    stage1: list[tuple],
    refs: dict,
    params: dict,
    add_reference: bool,
    spacing=None,
) -> list:
    """``study_candidates`` of each item from its stage-1 output (``Models.segment``);
    ``spacing`` (mm) defaults to each input's voxel size."""
    out = []
    for item, (inp, probs, _) in zip(study_items, stage1, strict=True):
        out.append(
            study_candidates(
                item["study_id"],
                inp["image"],
                foreground_probability(probs, inp["brain"]),
                refs[item["study_id"]],
                params,
                add_reference,
                patient_id=item["patient_id"],
                spacing=spacing or nib.affines.voxel_sizes(inp["affine"]),
            )
        )
    return out


def detection(preds, refs) -> dict:
    tp = n_pred = n_ref = 0
    dscs = []
    for pred, ref in zip(preds, refs, strict=True):
        match = match_lesions(pred, ref, IOU)
        tp += len(match.pairs)
        n_pred += match.n_pred
        n_ref += match.n_ref
        dscs.append(dice(pred, ref))
    return {
        "dsc": float(np.mean(dscs)),
        "sensitivity": tp / n_ref if n_ref else float("nan"),
        "fdr": (n_pred - tp) / n_pred if n_pred else 0.0,
        "f1": 2 * tp / (2 * tp + (n_pred - tp) + (n_ref - tp)) if n_ref + n_pred else 1.0,
        "lesions": f"{tp}/{n_ref} found, {n_pred - tp} false",
    }


def detection_row(experiment: str, variant: str, preds, refs) -> dict:
    """One row of the printed table: ``detection`` of ``preds`` against ``refs``."""
    m = detection(preds, refs)
    return {
        "experiment": experiment,
        "variant": variant,
        "lesion sensitivity": m["sensitivity"],
        "lesion FDR": m["fdr"],
        "DSC": m["dsc"],
        "lesion F1": m["f1"],
        "lesions": m["lesions"],
    }


def profile_data_pipeline(train_items: list[dict], params: dict, samples: int = 20) -> dict:
    """Seconds per training sample (cached study -> augmented patch) vs per optimisation step
    (batch of ``batch_size`` patches, forward + backward), measured in this process."""
    from metsflow.models import train as tr
    from metsflow.models.networks import build_loss, build_network

    params = tr.resolve_params(params)  # metsflow.core.settings.TrainingRun
    patch = [int(p) for p in params.model.patch_size]
    t0 = time.perf_counter()
    cache = tr._cache(train_items, params, patch, 0)
    cache_s = time.perf_counter() - t0
    stream = tr.PatchStream(cache, tr._sample_transform(params), 0, 0, samples)
    t0 = time.perf_counter()
    batch = [stream[i] for i in range(samples)]
    sample_s = (time.perf_counter() - t0) / samples
    network, loss_fn = build_network(params), build_loss(params)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    size = int(params.train.batch_size)
    steps = samples // size
    t0 = time.perf_counter()
    for k in range(steps):
        image = torch.stack([b["image"] for b in batch[k * size : (k + 1) * size]])
        label = torch.stack([b["label"] for b in batch[k * size : (k + 1) * size]])
        optimizer.zero_grad()
        loss_fn(network(image), label).backward()
        optimizer.step()
    step_s = (time.perf_counter() - t0) / steps
    return {"cache_s": cache_s, "sample_s": sample_s, "step_s": step_s, "batch": size}


def show(rows: list[dict]) -> None:
    """Print the rows so far (a long run shows each section as it completes)."""
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_models"))
    add_common_args(ap, patients=8, target_sensitivity=0.9)
    ap.add_argument("--finetune-iterations", type=int, default=60)
    ap.add_argument(
        "--sections",
        default="cascade,transfer",
        help="cascade (stage 1/2 + re-seg follow-ups), transfer",
    )
    ap.add_argument("--profile-only", action="store_true", help="only the data-pipeline profile")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    studies = phantom_studies(args)
    groups = split_patients(studies)
    train_p, val_p, test_p = groups["train"], groups["val"], groups["test"]
    # Fine-tuning: pretrain on one half of the training patients, fine-tune on the other.
    half = max(1, len(train_p) // 2)
    items = items_of(studies, {**groups, "A": train_p[:half], "B": train_p[half:]})
    print(
        f"patients: train {train_p}, stage-2 validation {val_p}, test {test_p}; "
        f"fine-tune: pretrain on {train_p[:half]}, fine-tune on {train_p[half:]}"
    )

    base = base_params(args.seed)
    seg_params = {**base, "channels": ["t1c", "t2"], "iterations": args.iterations}
    if args.profile_only:
        for name, extra in (
            ("seg, patch 32, filters 8-64, 2 ch", {}),
            (
                "pipeline default: patch 48, filters 16-128, 4 ch",
                {
                    "patch_size": [48] * 3,
                    "filters": [16, 32, 64, 128],
                    "channels": ["t1c", "t1", "t2", "flair"],
                },
            ),
            (
                "re-seg with fictitious prior, patch 48",
                {
                    "patch_size": [48] * 3,
                    "filters": [16, 32, 64, 128],
                    "channels": ["t1c", "prior", "t2"],
                },
            ),
        ):
            p = profile_data_pipeline(items["train"], {**seg_params, **extra})
            print(
                f"data pipeline [{name}]: cache {p['cache_s']:.1f} s once; "
                f"{p['sample_s'] * p['batch']:.3f} s to make a batch of {p['batch']} vs "
                f"{p['step_s']:.3f} s per optimisation step "
                f"(loading = {p['sample_s'] * p['batch'] / p['step_s']:.2f}x the step)"
            )
        return
    reseg_params = {**base, "channels": ["t1c", "prior", "t2"], "iterations": args.iterations}
    models = Models(args.out, args.reuse_models)
    train, segment = models.train, models.segment

    rows: list[dict] = []
    s2_meta = None
    # Reference lesions, read once for every section (each section may run alone).
    refs = {i["study_id"]: whole(i["label"]) for i in studies.to_dict("records")}
    test_refs = [refs[i["study_id"]] for i in items["test"]]
    if "cascade" in args.sections:
        # ---- 1. cascade ---------------------------------------------------------------------------
        seg = train("seg", items["train"], seg_params)
        stage1 = {k: segment(seg, items[k]) for k in ("train", "val", "test")}
        s2_params = {
            "iterations": args.stage2_iterations,
            "crop_size": [24, 24, 24],
            "target_sensitivity": args.target_sensitivity,
            "seed": args.seed,
            "proposal_threshold": 0.3,
        }

        def cands(key, add_reference):
            return stage2_candidates(items[key], stage1[key], refs, s2_params, add_reference)

        s2_net, s2_meta = models.stage2(
            lambda: cands("train", True),
            lambda: cands("val", False),
            seg_params["channels"],
            s2_params,
        )
        before, after, cascade_pred = [], [], {}
        for item, (inp, probs, pred) in zip(items["test"], stage1["test"], strict=True):
            filtered, _ = filter_prediction(
                pred,
                inp["image"],
                foreground_probability(probs, inp["brain"]),
                s2_net,
                s2_meta,
                item["study_id"],
                spacing=nib.affines.voxel_sizes(inp["affine"]),
            )
            before.append(whole(pred))
            after.append(whole(filtered))
            cascade_pred[item["study_id"]] = filtered
        for name, preds in (("stage 1", before), ("stage 1 + stage 2", after)):
            rows.append(detection_row("cascade (test studies)", name, preds, test_refs))

        show(rows)
        # ---- 2. re-seg vs seg only on follow-ups -----------------------------------------------------
        reseg = train("reseg", items["train"], reseg_params)
        followups = [i for i in items["test"] if i["prior"]]
        reseg_out = segment(reseg, followups)
        fu_refs = [refs[i["study_id"]] for i in followups]
        seg_only = [whole(cascade_pred[i["study_id"]]) for i in followups]
        seg_raw = [
            whole(p)
            for i, (_, _, p) in zip(items["test"], stage1["test"], strict=True)
            if i["prior"]
        ]
        reseg_only, merged = [], []
        for item, (inp, _, pred) in zip(followups, reseg_out, strict=True):
            prior = inp["image"][1] > 0
            reseg_only.append(whole(pred))
            merged.append(whole(merge_followup(pred, cascade_pred[item["study_id"]], prior)[0]))
        prior_only = [whole(load_study_input(i, ["prior"])["image"][0]) for i in followups]
        for name, preds in (
            ("prior alone (previous label)", prior_only),
            ("seg only (stage 1)", seg_raw),
            ("seg only (cascade)", seg_only),
            ("re-seg alone", reseg_only),
            ("re-seg + cascade merged", merged),
        ):
            rows.append(detection_row("follow-ups (test)", name, preds, fu_refs))
        show(rows)

    if "transfer" in args.sections:
        # ---- 3. fine-tune vs scratch at equal iterations -------------------------------------------
        pre = train("pretrain_A", items["A"], seg_params)
        ft_params = {**seg_params, "iterations": args.finetune_iterations}
        for name, init in (("from scratch on B", None), ("fine-tuned A -> B", pre)):
            path = train(name.replace(" ", "_").replace(">", ""), items["B"], ft_params, init)
            preds = [whole(p) for _, _, p in segment(path, items["test"])]
            experiment = f"transfer, {args.finetune_iterations} it (test)"
            rows.append(detection_row(experiment, name, preds, test_refs))

    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if s2_meta is not None:
        print(
            f"\nstage-2 operating point (validation patient {val_p}): threshold "
            f"{s2_meta['threshold']:.3f} for target sensitivity {args.target_sensitivity}; "
            f"validation sensitivity {s2_meta['sensitivity_before']:.3f} -> "
            f"{s2_meta['sensitivity_after']:.3f}, FDR {s2_meta['fdr_before']:.3f} -> "
            f"{s2_meta['fdr_after']:.3f} ({s2_meta['n_candidates']} candidates)"
        )
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in models.timings.items()))
    print(f"total {time.perf_counter() - start:.0f} s")
    table.to_csv(args.out / "bench_models.tsv", sep="\t", index=False)


if __name__ == "__main__":
    main()
