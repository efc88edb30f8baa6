"""Issue #25 parts 2 and 6, #26 part 4: one config loader for the workflow and the CLI, every
setting typed and ranged at parse time (the settings dataclasses' field metadata), the patch size
checked against the network's stride, and typed settings down to training and inference."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from metsflow import cli
from metsflow.cohort.preflight import RunError, prepare_run
from metsflow.core import config
from metsflow.core.settings import (
    ModelSettings,
    PreprocessSettings,
    RegisterSettings,
    Stage2Settings,
    TrainSettings,
)

BASE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _with(path: str, value) -> dict:
    cfg = copy.deepcopy(BASE)
    section = cfg
    *parents, last = path.split(".")
    for part in parents:
        section = section.setdefault(part, {})
    section[last] = value
    return cfg


# ------------------------------------------------------------------ #25.2: the CLI's --configfile


def test_cli_configfile_typo_is_refused_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"label_stroe: {tmp_path / 'store'}\n")
    code = cli.main(
        ["al", "import", "--round", "1", "--stage", "confirmed", "--reviewer", "r"]
        + ["--configfile", str(typo)]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert "unknown key 'label_stroe' in the top level; did you mean 'label_store'?" in err
    assert str(typo) in err and "Traceback" not in err
    # Neither the default label store nor the misspelt one was created.
    assert not (tmp_path / "labels").exists() and not (tmp_path / "store").exists()


def test_cli_configfile_bad_value_is_refused_with_its_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sharding: {cpu_shard_size: 0}\n")
    assert cli.main(["cost", "--configfile", str(bad)]) != 0
    assert "sharding.cpu_shard_size: 0 is less than the minimum of 1" in capsys.readouterr().err


def test_cli_configfile_overlays_load_as_written():
    # An overlay (no model section) is checked, not completed: the CLI keeps its own defaults.
    cohort = config.load(REPO / "config" / "cohort.yaml")
    assert cohort["train"]["folds"] == 5 and "results" not in cohort
    assert config.load(REPO / "config" / "config.yaml")["label_store"] == "labels"


# ------------------------------------------------------------------ #25.6: refused at parse time

REFUSED = [
    (
        "model.patch_size",
        [47, 48, 48],
        "model.patch_size: patch size [47, 48, 48] is not divisible",
    ),
    ("preprocess.brain_mask", "bogus", "preprocess.brain_mask: 'bogus' is not auto, atlas"),
    (
        "preprocess.coreg_iterations",
        [100],
        "preprocess.coreg_iterations, preprocess.coreg_shrink_factors, "
        "preprocess.coreg_smoothing_sigmas: one value per pyramid level each, got 1/2/2",
    ),
    ("preprocess.max_image_mb", "lots", "preprocess.max_image_mb: 'lots' is not of type 'number'"),
    ("preprocess.max_image_mb", -5, "preprocess.max_image_mb: -5 is less than or equal"),
    ("preprocess.zscore_clip", -1, "preprocess.zscore_clip: -1 is less than or equal"),
    ("register.aff_sampling_rate", 2, "register.aff_sampling_rate: 2 is greater than"),
    ("register.levels_mm", [8.0, 4.0], "register.reg_iterations, register.levels_mm"),
    ("train.aug_flip_prob", 1.5, "train.aug_flip_prob: 1.5 is greater than the maximum of 1"),
    ("train.num_workers", "many", "train.num_workers: 'many' is not of type"),
    ("train.aug_zoom_range", [1.4, 0.7], "train.aug_zoom_range: [min, max] with min <= max"),
    ("train.stage2.crop_size", [20, 24, 24], "train.stage2.crop_size: multiples of 8"),
    ("train.stage2.batch_size", 1, "train.stage2.batch_size: 1 is less than the minimum of 2"),
    ("train.stage2.keep_diameter_mm", 0, "train.stage2.keep_diameter_mm: 0 is less than or equal"),
    (
        "train.stage2.recovered_peak_fraction",
        0,
        "train.stage2.recovered_peak_fraction: 0 is less than or equal",
    ),
    (
        "train.stage2.recovered_peak_fraction",
        1.5,
        "train.stage2.recovered_peak_fraction: 1.5 is greater than the maximum of 1",
    ),
    (
        "train.reseg",
        {"enabled": True, "patch_size": [44, 48, 48]},
        "train.reseg.patch_size: patch size [44, 48, 48] is not divisible",
    ),
    ("train.reseg", {"iterations": 0}, "train.reseg.iterations: 0 is less than the minimum"),
]


@pytest.mark.parametrize(("key", "value", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_setting_is_refused_at_parse_time(key, value, message):
    found = config.problems(_with(key, value))
    assert len(found) == 1 and found[0].startswith(message), found


def test_the_dry_run_path_refuses_a_bad_setting_before_reading_the_sheet(tmp_path):
    cfg = _with("model.patch_size", [47, 48, 48])
    cfg["sheet"] = str(tmp_path / "absent.tsv")  # never read: the config is refused first
    with pytest.raises(RunError) as caught:
        prepare_run(cfg)
    assert any("model.patch_size" in p for p in caught.value.problems)
    assert not any("absent.tsv" in p for p in caught.value.problems)


def test_allowed_values_stay_allowed():
    for key, value in [
        ("preprocess.brain_mask", "/masks/{study_id}.nii.gz"),
        ("preprocess.zscore_clip", None),
        ("train.stage2.keep_diameter_mm", None),
        ("train.stage2.keep_diameter_mm", 10.0),
        ("train.stage2.recovered_peak_fraction", None),
        ("train.stage2.recovered_peak_fraction", 0.5),
        ("train.stage2.recovered_peak_fraction", 1.0),
        ("model.arch", "segresnet"),
        ("train.num_workers", 2),
        ("register.levels_mm", [16.0]),  # one level, as the demo's iterations and sigmas
    ]:
        assert config.problems(_with(key, value)) == [], key


def test_every_dataclass_key_is_typed_in_the_schema():
    properties = config.schema()["properties"]
    sections = {
        "preprocess": (properties["preprocess"], PreprocessSettings),
        "register": (properties["register"], RegisterSettings),
        "model": (properties["model"], ModelSettings),
        "train": (properties["train"], TrainSettings),
        "train.stage2": (properties["train"]["properties"]["stage2"], Stage2Settings),
    }
    for name, (section, cls) in sections.items():
        for f in dataclasses.fields(cls):
            schema = section["properties"][f.name]
            assert "type" in schema or "$ref" in schema or "enum" in schema, (name, f.name)
    # The re-seg overrides take the model's and training's schemas, not untyped keys.
    reseg = properties["train"]["properties"]["reseg"]["properties"]
    assert reseg["patch_size"]["maxItems"] == 3 and reseg["aug_flip_prob"]["maximum"] == 1


# The parse-time patch-size check and the network builder agree (one owner of the stride rule).
@settings(max_examples=60, deadline=None)
@given(
    patch=st.lists(st.integers(8, 160), min_size=3, max_size=3),
    spacing=st.lists(st.sampled_from([1.0, 1.5, 2.0, 3.0, 5.0]), min_size=3, max_size=3),
    arch=st.sampled_from(["dynunet", "segresnet"]),
    levels=st.integers(2, 6),
)
def test_parse_time_patch_check_agrees_with_the_network(patch, spacing, arch, levels):
    from metsflow.models.networks import network_spec

    cfg = copy.deepcopy(BASE)
    cfg["model"].update(arch=arch, patch_size=patch, filters=[8 * 2**i for i in range(levels)])
    cfg["preprocess"]["spacing"] = spacing
    refused = bool(config.problems(cfg))
    params = {**cfg["model"], "spacing": spacing}
    try:
        network_spec(params)
        builds = True
    except ValueError:
        builds = False
    assert refused != builds


# ------------------------------------------------------------------ #26.4: typed to the end


@settings(max_examples=40, deadline=None)
@given(
    iterations=st.integers(1, 10_000),
    optimizer=st.sampled_from(["sgd", "adam"]),
    lr=st.none() | st.floats(1e-6, 1.0),
    flip=st.floats(0, 1),
    channels=st.sampled_from([["t1c"], ["t1c", "flair"], ["t1c", "prior", "t2"]]),
)
def test_training_settings_round_trip_their_flat_form(iterations, optimizer, lr, flip, channels):
    from metsflow.core.settings import TrainingRun

    run = TrainingRun.from_params(
        {
            "channels": channels,
            "label_mode": "whole",
            "patch_size": [16, 16, 16],
            "iterations": iterations,
            "optimizer": optimizer,
            "learning_rate": lr,
            "aug_flip_prob": flip,
            "spacing": [2, 2, 2],
        }
    )
    assert TrainingRun.from_params(run.as_params()) == run
    # The optimizer's defaults live in one place and fill an unset learning rate.
    assert run.train.lr == (lr if lr is not None else {"sgd": 1e-2, "adam": 1e-4}[optimizer])


def test_unknown_training_and_inference_keys_are_refused():
    from metsflow.core.settings import InferRun, TrainingRun

    with pytest.raises(ValueError, match="learing_rate"):
        TrainingRun.from_params(
            {"channels": ["t1c"], "label_mode": "whole", "patch_size": [16] * 3, "learing_rate": 1}
        )
    with pytest.raises(ValueError, match="training params lack 'patch_size'"):
        TrainingRun.from_params({"channels": ["t1c"], "label_mode": "whole"})
    with pytest.raises(ValueError, match="ovelap"):
        InferRun.from_params({"ovelap": 0.5})


def test_round_settings_fine_tune_and_reseed():
    train = TrainSettings(iterations=300, finetune_iterations=100)
    assert train.for_round(seed=7, round_index=0).iterations == 300
    later = train.for_round(seed=7, round_index=2)
    assert later.iterations == 100 and later.seed == 9
    assert TrainSettings(iterations=300).for_round(0, 1).iterations == 300
