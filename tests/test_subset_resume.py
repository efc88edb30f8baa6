"""Rerunning a subset (docs/running.md "Rerun a subset") leaves every other study alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_cohort, run_snakemake


def output_mtimes(results: Path, stages=("preprocessed", "registered")) -> dict[str, int]:
    """mtime of every per-study output file (shard manifests and logs excluded)."""
    mtimes = {}
    for stage in stages:
        for path in (results / stage).rglob("*"):
            if path.is_file() and "shards" not in path.parts:
                mtimes[str(path.relative_to(results))] = path.stat().st_mtime_ns
    return mtimes


def study_of(relative: str) -> str:
    return Path(relative).parts[1]


@pytest.mark.slow
def test_subset_rerun_touches_only_the_chosen_studies(tmp_path, tiny_config):

    demo = tmp_path / "demo"
    # CPU shards of 4 studies: s0000 = P001 + P002, s0001 = P003.
    # Skull-stripped phantoms on one grid: a nonzero brain mask and no co-registration keep each
    # study to seconds (the subset logic does not depend on the preprocessing method). With the
    # skull, "nonzero" kept the whole head: one follow-up's registration took 36 CPU-s.
    make_tiny_cohort(demo, n_patients=3, labelled_patients=2, skull=False, separate_grids=False)
    config = tiny_config(
        demo,
        sharding={"cpu_shard_size": 4, "gpu_shard_size": 8},
        preprocess={"coregister": "none", "brain_mask": "nonzero"},
    )
    results = tmp_path / "results"
    everyone = '["P001","P002","P003"]'
    # The documented commands: the local profile (its SQLite metadata store), 2 cores.
    local = ["--profile", "profiles/local", "--cores", "2"]
    run_snakemake([*local, "--configfile", str(config), "--config", f"subset_patients={everyone}"])
    before = output_mtimes(results)
    assert {study_of(p) for p in before} == {f"P00{p}_T{t}" for p in (1, 2, 3) for t in (0, 1)}

    # A corrected scan of one follow-up arrives: rerun that study only, from the command line.
    # New content, not only a new mtime: Snakemake 9 skips an input whose recorded checksum
    # (kept for small files, as these phantoms are) still matches.
    t1c = demo / "P001/P001_T1/P001_T1_t1c.nii.gz"
    image = nib.load(t1c)
    data = np.asanyarray(image.dataobj).copy()
    data.flat[data.size // 2] += 1
    nib.save(nib.Nifti1Image(data, image.affine, image.header), t1c.parent / "corrected.nii.gz")
    os.replace(t1c.parent / "corrected.nii.gz", t1c)
    subset = ["--configfile", str(config), "--config", 'subset_studies=["P001_T1"]']

    # Only the shard holding P001_T1 is planned (both per-study stages); P003's shard is not.
    # One dry run shows both the rules and the shard wildcards (a second one cost 3 s).
    dry = run_snakemake(["-n", *local, *subset]).stdout
    planned = set(re.findall(r"^rule (\w+):", dry, re.MULTILINE))
    assert {"preprocess_shard", "register_shard"} <= planned, dry[-3000:]
    assert "s0000" in dry and "s0001" not in dry

    run_snakemake([*local, *subset])
    after = output_mtimes(results)
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed, "the chosen study was not recomputed"
    assert {study_of(p) for p in changed} == {"P001_T1"}, sorted(changed)
    # Other shards' manifests were not rewritten either.
    for stage in ("preprocessed", "registered"):
        manifest = results / stage / "shards" / "s0001.tsv"
        assert manifest.stat().st_mtime_ns < min(after[p] for p in changed)

    # An unknown id is an error naming it, not a silent empty run.
    typo = run_snakemake(
        ["-n", "--configfile", str(config), "--config", 'subset_patients=["P009"]'], check=False
    )
    assert typo.returncode != 0 and "P009" in typo.stdout + typo.stderr
