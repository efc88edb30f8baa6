"""Frozen settings, one dataclass per config section, built once from the validated config.

Each dataclass holds its section's defaults (the one owner of each default); the config schema's
closed key lists of these sections come from the dataclass fields (``x-keys-from:
metsflow.core.settings:InferSettings`` in ``metsflow/schemas/config.schema.yaml``, read by
``metsflow.core.config`` with ``ast``). This module imports nothing heavy: the Snakefile builds
``SETTINGS`` while it parses, and importing ``metsflow.models.train`` (torch, MONAI) would add 5.6 s to
every dry run on the 2-core test machine.

Rules pass a section to a job as a plain dict (``dataclasses.asdict``): Snakemake compares
params by ``repr`` to decide reruns and cannot represent a dataclass, so a changed setting
would go unnoticed; the job rebuilds the dataclass (``InferSettings.from_dict``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from metsflow.core.io import MAX_IMAGE_MB
from metsflow.core.netplan import patch_size_problem


def setting(default: Any = dataclasses.MISSING, *, factory=None, **schema: Any):
    """A settings field with its JSON-schema constraints (``minimum``, ``enum``, ``items``, ...):
    ``metsflow.core.config`` adds them, with the type of the annotation, to the section's schema,
    so a key's type and range have one owner and are checked while the workflow parses."""
    if factory is not None:
        return field(default_factory=factory, metadata={"schema": schema})
    return field(default=default, metadata={"schema": schema})


# Schema fragments shared by several knobs.
_PROB = {"minimum": 0, "maximum": 1}
_POSITIVE = {"exclusiveMinimum": 0}
_NONNEG = {"minimum": 0}
_LEVELS = {"items": {"type": "integer", "minimum": 1}, "minItems": 1}  # iterations per level
_SIGMAS = {"items": {"type": "number", "minimum": 0}, "minItems": 1}
_SHRINK = {"items": {"type": "integer", "minimum": 1}, "minItems": 1}


class _Section:
    """``from_dict`` (unknown keys refused) and ``as_dict`` for a settings dataclass.

    ``SAME_LENGTH``: groups of per-level keys that must have one value per pyramid level (what
    a JSON schema cannot say); ``problems`` reports a mismatch at parse time, where ANTs would
    otherwise fail on every study."""

    SAME_LENGTH: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | _Section | None, what: str | None = None):
        """``values`` (overrides of the defaults; an instance is returned as it is). An unknown
        key raises ``ValueError`` listing the known ones; ``what`` names them in the message
        ("registration parameters"; default "<class>: ... keys")."""
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            prefix = f"unknown {what}" if what else f"{cls.__name__}: unknown keys"
            raise ValueError(f"{prefix} {unknown}; known: {sorted(names)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self, where: str) -> list[str]:
        """What the schema cannot check: one line per problem, keys named ``where.key``."""
        found = []
        for group in self.SAME_LENGTH:
            lengths = [len(getattr(self, key)) for key in group]
            if len(set(lengths)) > 1:
                keys = ", ".join(f"{where}.{key}" for key in group)
                found.append(
                    f"{keys}: one value per pyramid level each, got {'/'.join(map(str, lengths))}"
                )
        return found

    @classmethod
    def nullable(cls) -> frozenset[str]:
        """The keys whose ``None`` is a value of its own (``proposal_sensitivity: null`` =
        argmax proposals, ``zscore_clip: null`` = no clip), not "the default"."""
        return frozenset(f.name for f in dataclasses.fields(cls) if "None" in str(f.type))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The fields that have a default, with it (not the required ones, whose ``None`` only
        lets a part of the section be built, e.g. a loss from the model settings)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("required"):
                continue
            if f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                values[f.name] = f.default
        return values


@dataclass(frozen=True)
class BrainMaskSettings(_Section):
    """The brain-mask knobs of the ``preprocess`` section (``metsflow.imaging.brainmask``)."""

    # Skull-stripped if at least this fraction of voxels is the exact background value ...
    stripped_min_background_fraction: float = setting(0.25, **_PROB)
    # ... and the remaining support is no bigger than a brain. A head scanned with a
    # zero-filled background (some scanners/converters do this) has >= 3 L of support.
    stripped_max_volume_ml: float = setting(2600.0, **_POSITIVE)
    # Atlas registration: isotropic working resolution (mm) and ANTs affine schedule (levels
    # at 6 and 3 mm). On skull phantoms the brain-masked affine reaches Dice 0.985 against the
    # true mask at 3 mm, the same as a 2 mm pyramid ending at 2 mm (0.987) at half the time.
    atlas_resolution_mm: float = setting(3.0, **_POSITIVE)
    # ants.registration's type_of_transform (linear ones: the mask is an affine prior)
    atlas_transform: str = setting(
        "Affine", enum=["Translation", "Rigid", "Similarity", "Affine", "AffineFast", "TRSAA"]
    )
    atlas_iterations: tuple = setting((100, 50), **_LEVELS)
    atlas_shrink_factors: tuple = setting((2, 1), **_SHRINK)
    atlas_smoothing_sigmas: tuple = setting((1, 0), **_SIGMAS)
    atlas_mask_dilate_mm: float = setting(1.0, **_NONNEG)
    # Rough skull strip that initialises the atlas affine and masks its metric (mm): the
    # erosion must exceed half the thickness of the bright layers bridging brain and scalp
    # (dura, diploe) so the brain becomes its own component; the metric sees the rough brain
    # dilated by ``atlas_metric_margin_mm`` (template and image both dark there: CSF, bone).
    rough_erosion_mm: float = setting(6.0, **_NONNEG)
    atlas_metric_margin_mm: float = setting(6.0, **_NONNEG)
    random_seed: int = 1

    SAME_LENGTH = (("atlas_iterations", "atlas_shrink_factors", "atlas_smoothing_sigmas"),)


@dataclass(frozen=True)
class PreprocessSettings(BrainMaskSettings):
    """The ``preprocess`` section (``metsflow.imaging.preprocess.DEFAULTS`` is its dict form)."""

    spacing: list = setting(
        factory=lambda: [1.0, 1.0, 1.0],
        items={"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        minItems=3,
        maxItems=3,
    )
    crop_margin_mm: float = setting(10.0, **_NONNEG)
    # "auto" (skull-stripped input -> its support, else atlas), "atlas", "nonzero", or a path
    # template containing "{study_id}" for user-supplied masks on the native T1c grid.
    brain_mask: str = setting(
        "auto",
        anyOf=[{"enum": ["auto", "atlas", "nonzero"]}, {"pattern": r"\{study_id\}"}],
        description='auto, atlas, nonzero, or a path template containing "{study_id}"',
    )
    coregister: str = setting("rigid", enum=["rigid", "none"])
    # Rigid co-registration schedule (Mattes MI). Same-session motion is small: a short
    # pyramid on images resampled to an isotropic working resolution is enough. Measured on a
    # phantom FLAIR (1x1x4.7 mm) to T1c (1x1x3 mm), 2 cores: full native resolution ~90 s,
    # 2 mm 10 s, 3 mm 1.9 s, with translations within 0.1 mm of the 2 mm estimate.
    coreg_resolution_mm: float = setting(3.0, **_POSITIVE)
    coreg_iterations: tuple = setting((100, 50), **_LEVELS)
    coreg_shrink_factors: tuple = setting((2, 1), **_SHRINK)
    coreg_smoothing_sigmas: tuple = setting((1, 0), **_SIGMAS)
    # |z| clipped to this after normalisation; None disables. 0 or below would squash every
    # T1c to {-clip, 0}, hence the strict minimum.
    zscore_clip: float | None = setting(5.0, **_POSITIVE)
    # Memory guard: an input whose header claims more voxel data (MiB) is refused before it is
    # decompressed (metsflow.core.io.MAX_IMAGE_MB explains the default).
    max_image_mb: float = setting(MAX_IMAGE_MB, **_POSITIVE)  # metsflow.core.io owns the default

    SAME_LENGTH = (
        *BrainMaskSettings.SAME_LENGTH,
        ("coreg_iterations", "coreg_shrink_factors", "coreg_smoothing_sigmas"),
    )


@dataclass(frozen=True)
class RegisterSettings(_Section):
    """The ``register`` section (``metsflow.imaging.register.DEFAULTS`` is its dict form)."""

    # Affine stage: reduced resolution only (SyN refines the rest).
    aff_transform: str = setting(
        "Affine", enum=["Translation", "Rigid", "Similarity", "Affine", "CompositeAffine"]
    )
    aff_metric: str = setting("Mattes", enum=["Mattes", "CC", "MeanSquares"])  # register._metric
    aff_bins: int = setting(32, minimum=2)
    aff_sampling_rate: float = setting(0.25, exclusiveMinimum=0, maximum=1)
    aff_gradient_step: float = setting(0.1, **_POSITIVE)
    aff_iterations: tuple = setting((200, 100), **_LEVELS)
    aff_levels_mm: tuple = setting((8.0, 4.0), items={"type": "number", **_POSITIVE}, minItems=1)
    aff_smoothing_mm: tuple = setting((3.0, 2.0), **_SIGMAS)  # Gaussian sigma per level
    # SyN stage.
    syn_metric: str = setting("CC", enum=["CC", "Mattes", "MeanSquares"])
    cc_radius: int = setting(2, minimum=1)  # voxels; ANTs' default of 32 is far too slow for CC
    syn_bins: int = setting(32, minimum=2)  # for syn_metric Mattes
    syn_gradient_step: float = setting(0.2, **_POSITIVE)
    syn_flow_sigma: float = setting(3.0, **_NONNEG)
    syn_total_sigma: float = setting(0.0, **_NONNEG)
    # Levels at 8, 4 and 2 mm whatever the grid spacing (see ``pyramid``). A full-resolution
    # CC level at 1 mm costs ~8x the 2 mm level for little gain in a label prior.
    reg_iterations: tuple = setting((40, 20, 5), **_LEVELS)
    levels_mm: tuple = setting((8.0, 4.0, 2.0), items={"type": "number", **_POSITIVE}, minItems=1)
    smoothing_mm: tuple = setting((3.0, 2.0, 1.0), **_SIGMAS)
    convergence_threshold: float = setting(1e-6, **_POSITIVE)
    convergence_window: int = setting(10, minimum=1)
    # Brain masks are dilated so the brain/CSF boundary (the strongest edge) is in the metric.
    mask_dilate_mm: float = setting(5.0, **_NONNEG)
    random_seed: int = 1
    # QC: below these the pair is flagged in qc.json (not silently accepted).
    qc_min_ncc: float = setting(0.6, minimum=-1, maximum=1)
    qc_min_mask_dice: float = setting(0.9, **_PROB)

    SAME_LENGTH = (
        ("aff_iterations", "aff_levels_mm", "aff_smoothing_mm"),
        ("reg_iterations", "levels_mm", "smoothing_mm"),
    )


@dataclass(frozen=True)
class ModelSettings(_Section):
    """The ``model`` section: the stage-1 network (``metsflow.models.networks.MODEL_DEFAULTS`` is
    ``defaults()``); ``channels`` and ``patch_size`` have no default (the schema requires them;
    a network is refused without them, a loss needs neither)."""

    # of metsflow.models.networks.CHANNELS, in channel-axis order
    channels: list | None = field(default=None, metadata={"required": True})
    patch_size: list | None = field(default=None, metadata={"required": True})  # voxels, 3 values
    arch: str = "dynunet"  # dynunet | segresnet
    label_mode: str = "multiclass"  # multiclass | whole
    # DynUNet filters per resolution level (nnU-Net's 3D full-resolution widths); the patch
    # size may support fewer levels (metsflow.models.networks.dynunet_plan).
    filters: list = field(default_factory=lambda: [32, 64, 128, 256, 320, 320])
    loss: str = "dice_ce"  # dice_ce | tversky_bce
    # multiclass only: weight of the nested-region Dice (metsflow.models.networks.NestedRegionDiceLoss)
    region_loss_weight: float = 1.0
    init_filters: int = 32  # segresnet width
    dropout: float | None = None
    res_block: bool = False  # residual DynUNet blocks


# nnU-Net's SGD (Nesterov, momentum 0.99) and the usual Adam settings for 3D segmentation: the
# defaults of train.learning_rate and train.weight_decay.
OPTIMIZERS = {
    "sgd": {"learning_rate": 1e-2, "weight_decay": 3e-5},
    "adam": {"learning_rate": 1e-4, "weight_decay": 1e-5},
}


@dataclass(frozen=True)
class TrainSettings(_Section):
    """The stage-1 training knobs of the ``train`` section (``metsflow.models.train.DEFAULTS``);
    the section's other keys (folds, stage2, reseg, ...) are typed in the config schema."""

    iterations: int = setting(1000, minimum=1)
    # Rounds r > 0 fine-tune for this many iterations; None: ``iterations``.
    finetune_iterations: int | None = setting(None, minimum=1)
    batch_size: int = setting(2, minimum=1)
    optimizer: str = setting("sgd", enum=list(OPTIMIZERS))
    # None: the optimizer's default (OPTIMIZERS).
    learning_rate: float | None = setting(None, **_POSITIVE)
    weight_decay: float | None = setting(None, **_NONNEG)
    grad_clip: float = setting(12.0, **_POSITIVE)
    seed: int = 0
    val_interval: int = setting(250, minimum=0)  # 0: no validation while training
    checkpoint_interval: int = setting(100, minimum=1)
    log_interval: int = setting(10, minimum=1)
    val_overlap: float = setting(0.25, minimum=0, exclusiveMaximum=1)
    sw_batch_size: int = setting(4, minimum=1)
    # lesion-centred : brain-centred patch draws
    pos_neg_ratio: list = setting(
        factory=lambda: [1.0, 1.0], items={"type": "number", **_NONNEG}, minItems=2, maxItems=2
    )
    num_workers: int | None = setting(None, minimum=0)  # None: 0 on CPU, min(4, cores) on CUDA
    aug_rotate_prob: float = setting(0.2, **_PROB)
    aug_rotate_degrees: float = setting(30.0, minimum=0, maximum=180)
    aug_zoom_prob: float = setting(0.2, **_PROB)
    aug_zoom_range: list = setting(
        factory=lambda: [0.7, 1.4], items={"type": "number", **_POSITIVE}, minItems=2, maxItems=2
    )
    aug_scale_intensity_prob: float = setting(0.15, **_PROB)
    aug_shift_intensity_prob: float = setting(0.15, **_PROB)
    aug_noise_prob: float = setting(0.15, **_PROB)
    aug_flip_prob: float = setting(0.5, **_PROB)  # per axis
    # With the prior channel: each sample's prior is a fictitious one made from its label
    # (metsflow.imaging.priors); false: the study's real propagated prior.
    fictitious_prior: bool = True
    # Detection levers (issue #23). Defaults from benchmarks/bench_detection.py at 1 mm (20 test
    # patients, 195 lesions, 124 under 3 mm; benchmarks/results/bench_detection.txt), cascade
    # at the validation operating point: baseline (pos_neg, Dice+CE, argmax proposals) found
    # 65/195 (0.33; 13/124 under 3 mm) at 0.45 FP/patient; lesion sampling alone 141/195
    # (0.72; 76/124), the instance term alone 134/195 (0.69), all levers 171/195 (0.88; 105/124
    # under 3 mm) at 1.15 FP/patient. Training time unchanged (800 it: 205 s baseline, 183 s
    # all levers).
    # Patch centres: "pos_neg" = MONAI RandCropByPosNegLabeld, uniform over lesion *voxels* (a
    # 20 mm lesion is centred ~500x more often than a 2.5 mm one at 1 mm); "lesion" = choose a
    # lesion, then a voxel inside it (metsflow.models.sampling.RandLesionCropd).
    sampling: str = setting("lesion", enum=["pos_neg", "lesion"])
    # "lesion" sampling: weight of a lesion ~ volume ** -lesion_size_power (0: every lesion
    # alike; 1: the chance of a lesion is inversely proportional to its volume). 0.5 measured.
    lesion_size_power: float = setting(0.5, minimum=0, maximum=1)
    # Hard negatives: the fraction of the negative (brain-centred) patches that are centred on a
    # voxel the previous model called lesion and the reviewer deleted (the presegmentation's
    # components the confirmed label does not touch), in the studies that have such voxels; the
    # rest, and every patch of other studies, stay brain-centred. 0 = off (no presegmentation is
    # read). Works with either sampling (metsflow.models.sampling.RandLesionCropd).
    hard_negative_fraction: float = setting(0.0, **_PROB)
    # Weight of the instance-aware term (per reference component Dice, blob-loss style;
    # metsflow.models.networks.InstanceDiceLoss) beside Dice+CE; 0 = off. 1.0 measured: on top
    # of lesion sampling, stage 1's test FROC at 1 FP/patient 0.651 -> 0.738.
    instance_loss_weight: float = setting(1.0, **_NONNEG)
    # Round 0 fine-tunes from these weights (e.g. a model trained on BraTS-METS) instead of
    # starting from scratch; channels, label mode and patch size must match the model section
    # (checked when the workflow is parsed: metsflow.models.networks.init_checkpoint_problems).
    init_checkpoint: str | None = setting(None, minLength=1)
    device: str = "auto"
    folds: int = setting(1, minimum=1)  # patient-level k-fold stage-1 models (1: no CV)

    def problems(self, where: str) -> list[str]:
        found = super().problems(where)
        low, high = self.aug_zoom_range
        if low > high:
            found.append(f"{where}.aug_zoom_range: [min, max] with min <= max, got {[low, high]}")
        return found

    @property
    def lr(self) -> float:
        """The learning rate, the optimizer's default when unset."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return OPTIMIZERS[self.optimizer]["learning_rate"]

    @property
    def wd(self) -> float:
        """The weight decay, the optimizer's default when unset."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return OPTIMIZERS[self.optimizer]["weight_decay"]

    def for_round(self, seed: int, round_index: int) -> TrainSettings:
        """Round ``round_index``'s settings: round r > 0 fine-tunes for ``finetune_iterations``
        and every round is seeded ``seed + r``."""
        iterations = self.iterations
        if round_index > 0 and self.finetune_iterations is not None:
            iterations = self.finetune_iterations
        return dataclasses.replace(self, iterations=iterations, seed=seed + round_index)


@dataclass(frozen=True)
class Stage2Settings(_Section):
    """The ``train.stage2`` section (``metsflow.models.cascade.DEFAULTS`` is its dict form)."""

    enabled: bool = False
    crop_size: list = setting(
        factory=lambda: [24, 24, 24],
        items={"type": "integer", "minimum": 4},
        minItems=3,
        maxItems=3,
    )
    filters: list = setting(
        factory=lambda: [16, 32, 64], items={"type": "integer", "minimum": 1}, minItems=1
    )
    iterations: int = setting(300, minimum=1)
    # Half lesion, half non-lesion candidates per batch: at least one of each.
    batch_size: int = setting(16, minimum=2)
    learning_rate: float = setting(1e-3, **_POSITIVE)
    weight_decay: float = setting(1e-5, **_NONNEG)
    proposal_threshold: float = setting(0.3, exclusiveMinimum=0, exclusiveMaximum=1)
    # per study (training): the most confident stage-1 components
    max_candidates: int = setting(200, minimum=1)
    operating_rule: str = setting(
        "max_fp_per_patient", enum=["max_fp_per_patient", "target_sensitivity"]
    )  # module docstring of metsflow.models.cascade
    max_fp_per_patient: float = setting(1.0, **_NONNEG)  # metrics.DEFAULT_MAX_FP_PER_PATIENT
    target_sensitivity: float = setting(0.95, exclusiveMinimum=0, maximum=1)
    seed: int = 0
    # High-sensitivity stage 1 (issue #23): None = stage 2 filters the components of stage 1's
    # argmax, so it can only remove lesions; a value (0.98) = the proposals are the components
    # of stage 1's foreground probability at the highest threshold that reaches this lesion
    # sensitivity on the validation studies (metsflow.models.cascade.proposal_threshold), and
    # stage 2's operating point decides which of them stay. 0.98 measured: the validation
    # ceiling 0.591 -> 0.712 and test sensitivity 0.33 -> 0.56 on the baseline stage 1, 0.924
    # ceiling and 0.88 with the other levers (benchmarks/results/bench_detection.txt).
    proposal_sensitivity: float | None = setting(0.98, exclusiveMinimum=0, maximum=1)
    # Size-aware stage 2 (issue #23): a candidate at least this wide (equivalent-sphere diameter
    # in mm, from its voxel count and the grid spacing) is kept whatever its stage-2 score, and
    # the validation operating point counts it as always kept, false positives included
    # (metsflow.models.cascade.size_aware_scores). Why: the crop classifier sees few large
    # positives in a heavy-tailed training set and dropped every lesion >= 10 mm stage 1 found
    # in 6 of 7 benchmark arms. None = off (and what a checkpoint without the key means), the
    # default, measured: 10 mm kept 1 more of the 2 test lesions >= 10 mm (171 -> 172/195 with
    # "all levers", 176 -> 176 with flips) at +0.05 FP/patient, one training seed
    # (benchmarks/results/bench_detection.txt); and where a weak stage 1 needs the 0.05 proposal
    # floor its proposals merge into brain-sized regions that the rule always keeps (53.7
    # FP/patient on the benchmark's 30-iteration smoke run).
    keep_diameter_mm: float | None = setting(None, exclusiveMinimum=0)
    # Lesion-aware shape of a recovered lesion (issue #23): with proposal_sensitivity set, a
    # kept candidate without any argmax lesion voxel (a lesion stage 1 scored below 0.5) is
    # added as enhancing. None = its whole proposal component (fg_prob >= proposal_threshold),
    # bloated around a small lesion: it can miss the evaluation's IoU match and then counts as a
    # false positive too. A fraction f = only the voxels of the component with fg_prob >= f x
    # the component's peak, the connected piece that holds the peak
    # (metsflow.models.cascade.peak_connected_region). Inference only (filter_prediction): stage
    # 2's training and operating point do not read it. None is also what a checkpoint without
    # the key means. Default None, measured: 0.5 changed nothing with "all levers" (171/195 at
    # 1.15 FP/patient either way) and 1 lesion / -0.05 FP/patient with flips and keep-large
    # (176 -> 177/195, 1.40 -> 1.35), one training seed (benchmarks/results/bench_detection.txt).
    recovered_peak_fraction: float | None = setting(None, exclusiveMinimum=0, maximum=1)
    # One candidate per lesion (issue #23): with proposal_sensitivity set, a proposal component
    # that holds stage-1 argmax lesions is split at them: each argmax lesion is a candidate of
    # its own (scored, kept or dropped alone), a proposal without any argmax voxel stays one
    # (metsflow.models.cascade.split_at_lesions). Why: at the 0.05 proposal floor a lesion's
    # proposal merges with vessel and plexus specks around it; stage 2 kept the whole and every
    # argmax speck in it stayed, 15 of the 27 test false positives of the best arm (IoU match,
    # benchmarks/results/bench_detection.txt). False = whole proposals, and what a checkpoint
    # without the key means. Changes training (the candidates and their labels) and inference.
    # Measured (one training seed, 16 validation patients): split, the validation-chosen point
    # holds on test (0.55-0.80 FP/patient for <= 1.0 chosen; whole proposals 1.15-1.40), and
    # the best threshold on the final masks finds 0.872-0.877 of the test lesions at <= 1
    # FP/patient (whole: 0.856-0.872). But split needs a stage 2 trained longer: at the
    # benchmark's 300 iterations the chosen point found 151-161/195 (whole: 171/195), at 900
    # 163-170/195 (whole: 174/195 at 1.40) (benchmarks/results/bench_detection_val16.txt,
    # bench_detection_s2long.txt). Default False (the default 300 iterations); config/cohort.yaml
    # (2000 iterations) turns it on.
    split_proposals: bool = False
    # Stage 1's voice in the operating point (issue #23): a candidate's score is (1 - w) x stage
    # 2's probability + w x stage 1's peak foreground probability in it, on the validation
    # candidates the threshold is chosen on and at inference alike
    # (metsflow.models.cascade.candidate_scores). Why: stage 2 scored real lesions that stage 1
    # was sure of (peak >= 0.97) near 0, the 12.6 mm test lesion included, at 0.0000. 0 = stage 2
    # alone, and what a checkpoint without the key means; the default, as the benchmark's
    # default 300-iteration stage 2 was not measured with it. Measured with split proposals and
    # stage 2 at 2000 iterations, two stage-2 seeds paired (0 -> 0.5): the validation-chosen
    # point 174 -> 173/195 at 1.0 FP/patient and 171 -> 172/195 at 0.65; the best threshold on
    # the test masks at <= 1 FP/patient 0.887 -> 0.887 and 0.892 -> 0.903, at <= 0.5 0.785 ->
    # 0.821 and 0.826 -> 0.851 (benchmarks/results/bench_detection_weight.txt).
    stage1_weight: float = setting(0.0, minimum=0, maximum=1)
    # Checkpoint selection (issue #23): every this many iterations (and at the last) stage 2
    # scores the validation candidates and keeps the weights with the best validation FROC, the
    # mean lesion sensitivity at 1/4, 1/2 and 1 x max_fp_per_patient
    # (metsflow.models.cascade.SELECTION_FP_FRACTIONS), instead of the last iteration's. Why:
    # at 2000 iterations three stage-2 seeds found 157, 171 and 174 of 195 test lesions
    # (benchmarks/results/bench_detection_weight.txt). Scoring does not draw from the training's
    # random streams: a seed trains the same network with or without it. None = the last
    # iteration, and what a checkpoint without the key means; the default, as the default
    # 300-iteration stage 2 was not measured with it. Measured at 2000 iterations with
    # stage1_weight 0.5, every 100, three stage-2 seeds paired: the validation-chosen point
    # 173/195 at 1.0 FP/patient -> 172 at 0.45, 172 at 0.65 -> 177 at 0.75, 164 at 0.80 -> 170
    # at 0.95 (mean 0.870 -> 0.887); the best threshold on the test masks at <= 1 FP/patient
    # 0.887 -> 0.903, 0.903 -> 0.918, 0.887 -> 0.887; the weights chosen were iteration 900,
    # 500 and 1000's (benchmarks/results/bench_detection_select.txt).
    select_every: int | None = setting(None, minimum=1)
    # Seed ensemble (issue #23): this many classifiers, trained alike from seeds seed, seed + 1,
    # ..., score a candidate by their mean probability (metsflow.models.cascade.SeedEnsemble);
    # each is trained (and, with select_every, selected) on its own. Why: stage 2's ranking of
    # the same candidates moved from seed to seed. Offline, the mean of two or three seeds'
    # scores (select_every off) ranked the test candidates better than any one of them: test
    # FROC (touch rule, stage1_weight 0.5) at 1 FP/patient 0.908-0.918 for one seed, 0.928-0.933
    # for two or three. Measured with stage1_weight 0.5 and select_every 100 of 2000
    # iterations: the validation-chosen point of 3 members 177/195 (0.908) at 0.85 FP/patient
    # (seeds 1-3), 175/195 (0.897) at 0.80 (seeds 4-6) and 178/195 (0.913) at 0.70 (seeds 7-9),
    # single classifiers 172, 177 and 170/195 (seeds 1-3); the best threshold on the test masks
    # at <= 1 FP/patient 0.918, 0.897 and 0.913, single 0.887-0.918 (benchmarks/results/bench_detection_ensemble.txt,
    # bench_detection_select.txt). Default 1: it costs one stage-2 training per member;
    # config/cohort.yaml sets 3.
    ensemble: int = setting(1, minimum=1)

    def problems(self, where: str) -> list[str]:
        found = super().problems(where)
        # The classifier halves each crop axis once per filter level (MONAI Classifier).
        if any(int(c) % 8 for c in self.crop_size):
            found.append(f"{where}.crop_size: multiples of 8 voxels, got {list(self.crop_size)}")
        return found


@dataclass(frozen=True)
class InferSettings(_Section):
    """The ``infer`` section (metsflow.models.infer reads it as a dict: ``as_params``)."""

    overlap: float = 0.5  # sliding-window overlap (config/config.yaml sets 0.25)
    sw_batch_size: int = 4
    tta: bool = False  # flip test-time augmentation
    device: str = "auto"
    # Speed levers (metsflow.models.infer.lever_settings; why and the measured figures: the comment
    # above metsflow.models.infer.LEVERS). "auto" resolves per device and job: amp on CUDA only (bf16
    # labels on CPU differ beyond Dice 0.999), channels_last on CUDA and CPU inference jobs,
    # compile for CPU jobs of >= metsflow.models.infer.COMPILE_MIN_STUDIES studies (a cold compile has
    # to pay back). All equal-output levers: 1.66x a naive MONAI loop on 2 CPU cores.
    amp: str | bool = "auto"
    channels_last: str | bool = "auto"
    compile: str | bool = "auto"
    skip_outside_brain: bool = True
    prefetch: bool = True
    inference_mode: bool = True
    # Instance norm as a channels-last reduction (metsflow.models.infer._ChannelsLastInstanceNorm3d):
    # demo net's forward 1.07-1.2x CPU with compile + channels-last, 1.10x eager with
    # channels-last, equal labels; acts on channels-last inputs only: "auto" = CPU with
    # channels_last (whose "auto" is on for CUDA and for CPU inference jobs).
    fast_norm: str | bool = "auto"
    # glibc malloc keeps freed blocks (metsflow.core.runtime.reuse_freed_memory): no page faults
    # on every forward pass's activations; "auto" = on for inference jobs, any device.
    heap_reuse: str | bool = "auto"

    def as_params(self) -> dict[str, Any]:
        return self.as_dict()


def tta_flips(tta: bool) -> list[tuple[int, ...]]:
    """The flips of a (N, C, X, Y, Z) batch that inference averages over: none, or with ``tta``
    every subset of the spatial axes (8 forward passes per member; the cost model counts them)."""
    if not tta:
        return [()]
    return [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)]


@dataclass(frozen=True)
class InferRun(InferSettings):
    """An inference run's settings (``metsflow.models.infer`` takes them): the ``infer`` section
    and what the networks take: the sliding-window size (a checkpoint's patch size) and the
    channels and label mode to check checkpoints against (None: unchecked)."""

    patch_size: list | None = None
    channels: list | None = None
    label_mode: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | InferSettings | None) -> InferRun:
        """From ``InferSettings`` or a flat dict of these keys (unknown keys refused)."""
        if isinstance(params, cls):
            return params
        if isinstance(params, InferSettings):
            return cls(**params.as_dict())
        return cls.from_dict(params, "inference settings")


@dataclass(frozen=True)
class EvaluateSettings(_Section):
    """The ``evaluate`` section. ``metsflow.evaluation.metrics`` takes its defaults from here."""

    # A predicted and a reference lesion match when their IoU is strictly greater than this.
    iou_threshold: float = 0.25
    # Reference-lesion size bins (equivalent-sphere diameter, mm): the clinical reporting split
    # of small-metastasis detection studies (< 3 mm is where published detectors lose most,
    # 93% vs 98% overall for a data-centric nnU-Net; BraTS-METS names missed small lesions the
    # commonest error).
    size_bins_mm: tuple[float, ...] = (3.0, 10.0)
    # Paired statistics against round 0; None = metsflow.evaluation.stats.COMPARE_METRICS / _GROUPS.
    compare_metrics: tuple[str, ...] | None = None
    compare_groups: tuple[str, ...] | None = None
    # Volumetric response thresholds (metsflow.evaluation.longitudinal.ResponseThresholds owns them).
    response: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("size_bins_mm", "compare_metrics", "compare_groups"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))

    def metrics(self) -> dict[str, Any]:
        """What rule evaluate_round reads: response or statistics settings must not re-run the
        evaluation (and with it every later active-learning round)."""
        return {"iou_threshold": self.iou_threshold, "size_bins_mm": list(self.size_bins_mm)}

    def comparison(self) -> dict[str, Any]:
        """What rule compare_rounds reads."""
        return {
            key: list(value)
            for key in ("compare_metrics", "compare_groups")
            if (value := getattr(self, key)) is not None
        }


@dataclass(frozen=True)
class ActiveLearningSettings(_Section):
    """The ``active_learning`` section (defaults as config/config.yaml)."""

    rounds: int = 1  # rounds after round 0
    batch_size: int = 4
    strategy: str = "entropy"  # random | entropy | lesion_aware | disagreement
    per_patient_max: int | None = 1  # time points of one patient per batch
    annotator: str = "simulated"  # human | simulated (answers from oracle_sheet)
    dice_threshold: float = 0.95  # no further batch once validation Dice reaches it
    final_validation_sample: int = 4
    candidates: int | str = "all"  # pool studies a round's models segment: all | N

    def selection(self) -> dict[str, Any]:
        """What rule select_batch reads (``rounds`` or the QA sample must not re-select)."""
        keys = ("batch_size", "strategy", "per_patient_max", "dice_threshold")
        return {key: getattr(self, key) for key in keys}

    def annotation(self) -> dict[str, Any]:
        """What rule collect_annotations reads."""
        return {"annotator": self.annotator}


@dataclass(frozen=True)
class ExportSettings(_Section):
    """The ``export`` section: exports of the final labels (rules/export.smk)."""

    bids: bool = True  # BIDS derivative dataset
    bids_dir: str = ""  # empty: <results>/bids (metsflow.core.layout.Layout.bids_root)
    dicom_seg: bool = True  # DICOM SEG for studies imported from DICOM


@dataclass(frozen=True)
class ThreadsSettings(_Section):
    """The ``threads`` section: threads per job of each stage (defaults as config/config.yaml)."""

    preprocess: int = 1
    register: int = 1
    train: int = 2
    infer: int = 2


@dataclass(frozen=True)
class Settings:
    """Every section, built once from the validated config (``Settings.from_config``)."""

    model: ModelSettings
    preprocess: PreprocessSettings
    register: RegisterSettings
    infer: InferSettings
    evaluate: EvaluateSettings
    active_learning: ActiveLearningSettings
    export: ExportSettings
    threads: ThreadsSettings

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(
            model=ModelSettings.from_dict(config.get("model")),
            preprocess=PreprocessSettings.from_dict(config.get("preprocess")),
            register=RegisterSettings.from_dict(config.get("register")),
            infer=InferSettings.from_dict(config.get("infer")),
            evaluate=EvaluateSettings.from_dict(config.get("evaluate")),
            active_learning=ActiveLearningSettings.from_dict(config.get("active_learning")),
            export=ExportSettings.from_dict(config.get("export")),
            threads=ThreadsSettings.from_dict(config.get("threads")),
        )


# Sub-sections of ``train:`` that configure other models, not stage-1 training.
TRAIN_SUBSECTIONS = ("stage2", "reseg")
# The re-segmentation model's channels unless train.reseg.channels says otherwise.
RESEG_CHANNELS = ("t1c", "prior", "t2")


def split_overrides(values: Mapping[str, Any]) -> tuple[dict, dict]:
    """``values`` (model and training keys, e.g. ``train.reseg``) split into the model's and the
    training's keys."""
    model_keys = {f.name for f in dataclasses.fields(ModelSettings)}
    model = {k: v for k, v in values.items() if k in model_keys}
    train = {k: v for k, v in values.items() if k not in model_keys and k != "enabled"}
    return model, train


def reseg_settings(
    model: ModelSettings, train: TrainSettings, reseg: Mapping[str, Any] | None
) -> tuple[ModelSettings, TrainSettings]:
    """The re-segmentation model's settings: ``model``/``train`` with the ``train.reseg``
    overrides (``channels`` default ``RESEG_CHANNELS``); always trained on fictitious priors."""
    model_over, train_over = split_overrides(dict(reseg or {}))
    model_over.setdefault("channels", list(RESEG_CHANNELS))
    return (
        dataclasses.replace(model, **model_over),
        dataclasses.replace(train, **{**train_over, "fictitious_prior": True}),
    )


@dataclass(frozen=True)
class TrainingRun:
    """One segmentation network's training (stage 1 or re-seg): its model, its training knobs
    and the grid spacing it trains at (``metsflow.models.train.train_model`` takes it).

    ``as_params`` is its flat dict form: the checkpoint's ``meta["params"]``, the resume
    fingerprint, and what ``from_params`` reads back (``None`` = the default, as in the config)."""

    model: ModelSettings
    train: TrainSettings
    spacing: tuple[float, ...] = tuple(PreprocessSettings().spacing)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | TrainingRun) -> TrainingRun:
        if isinstance(params, cls):
            return params
        values = {k: v for k, v in dict(params).items() if v is not None}
        spacing = values.pop("spacing", cls.spacing)
        missing = [key for key in ("channels", "label_mode", "patch_size") if key not in values]
        if missing:
            raise ValueError(f"training params lack {', '.join(map(repr, missing))}")
        model, train = split_overrides(values)
        return cls(
            ModelSettings.from_dict(model),
            TrainSettings.from_dict(train, "training keys"),
            tuple(float(v) for v in spacing),
        )

    def as_params(self) -> dict[str, Any]:
        return {**self.model.as_dict(), **self.train.as_dict(), "spacing": list(self.spacing)}


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """What the schema cannot check of a schema-valid ``config``, one line per problem: per-level
    lists of one length, and each network's patch size against its stride at the grid spacing."""
    found: list[str] = []
    preprocess = PreprocessSettings.from_dict(config.get("preprocess"))
    found += preprocess.problems("preprocess")
    found += RegisterSettings.from_dict(config.get("register")).problems("register")
    train_section = dict(config.get("train") or {})
    train = TrainSettings.from_dict(
        {k: v for k, v in train_section.items() if k not in TRAIN_SUBSECTIONS}
    )
    found += train.problems("train")
    stage2 = train_section.get("stage2") or {}
    found += Stage2Settings.from_dict(stage2).problems("train.stage2")
    if not {"channels", "patch_size"} <= set(config.get("model") or {}):
        return found  # an overlay of the default config (metsflow.core.config.load)
    model = ModelSettings.from_dict(config["model"])
    networks = {"model": model}
    reseg = train_section.get("reseg") or {}
    if reseg.get("enabled"):
        reseg_model, reseg_train = reseg_settings(model, train, reseg)
        networks["train.reseg"] = reseg_model
        found += reseg_train.problems("train.reseg")
    for where, net in networks.items():
        problem = patch_size_problem(net.arch, net.patch_size, preprocess.spacing, net.filters)
        if problem:
            found.append(
                f"{where}.patch_size: {problem} (at preprocess.spacing {list(preprocess.spacing)})"
            )
    return found
