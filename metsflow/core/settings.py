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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metsflow.core.io import MAX_IMAGE_MB


class _Section:
    """``from_dict`` (unknown keys refused) and ``as_dict`` for a settings dataclass."""

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

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The fields that have a default, with it (a section with required keys cannot be
        built empty)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                values[f.name] = f.default
        return values


@dataclass(frozen=True)
class BrainMaskSettings(_Section):
    """The brain-mask knobs of the ``preprocess`` section (``metsflow.imaging.brainmask``)."""

    # Skull-stripped if at least this fraction of voxels is the exact background value ...
    stripped_min_background_fraction: float = 0.25
    # ... and the remaining support is no bigger than a brain. A head scanned with a
    # zero-filled background (some scanners/converters do this) has >= 3 L of support.
    stripped_max_volume_ml: float = 2600.0
    # Atlas registration: isotropic working resolution (mm) and ANTs affine schedule (levels
    # at 6 and 3 mm). On skull phantoms the brain-masked affine reaches Dice 0.985 against the
    # true mask at 3 mm, the same as a 2 mm pyramid ending at 2 mm (0.987) at half the time.
    atlas_resolution_mm: float = 3.0
    atlas_transform: str = "Affine"
    atlas_iterations: tuple = (100, 50)
    atlas_shrink_factors: tuple = (2, 1)
    atlas_smoothing_sigmas: tuple = (1, 0)
    atlas_mask_dilate_mm: float = 1.0
    # Rough skull strip that initialises the atlas affine and masks its metric (mm): the
    # erosion must exceed half the thickness of the bright layers bridging brain and scalp
    # (dura, diploe) so the brain becomes its own component; the metric sees the rough brain
    # dilated by ``atlas_metric_margin_mm`` (template and image both dark there: CSF, bone).
    rough_erosion_mm: float = 6.0
    atlas_metric_margin_mm: float = 6.0
    random_seed: int = 1


@dataclass(frozen=True)
class PreprocessSettings(BrainMaskSettings):
    """The ``preprocess`` section (``metsflow.imaging.preprocess.DEFAULTS`` is its dict form)."""

    spacing: list = field(default_factory=lambda: [1.0, 1.0, 1.0])
    crop_margin_mm: float = 10.0
    # "auto" (skull-stripped input -> its support, else atlas), "atlas", "nonzero", or a path
    # template containing "{study_id}" for user-supplied masks on the native T1c grid.
    brain_mask: str = "auto"
    coregister: str = "rigid"  # "rigid" | "none"
    # Rigid co-registration schedule (Mattes MI). Same-session motion is small: a short
    # pyramid on images resampled to an isotropic working resolution is enough. Measured on a
    # phantom FLAIR (1x1x4.7 mm) to T1c (1x1x3 mm), 2 cores: full native resolution ~90 s,
    # 2 mm 10 s, 3 mm 1.9 s, with translations within 0.1 mm of the 2 mm estimate.
    coreg_resolution_mm: float = 3.0
    coreg_iterations: tuple = (100, 50)
    coreg_shrink_factors: tuple = (2, 1)
    coreg_smoothing_sigmas: tuple = (1, 0)
    zscore_clip: float = 5.0  # |z| clipped to this after normalisation; None disables
    # Memory guard: an input whose header claims more voxel data (MiB) is refused before it is
    # decompressed (metsflow.core.io.MAX_IMAGE_MB explains the default).
    max_image_mb: float = MAX_IMAGE_MB  # metsflow.core.io owns the guard's default


@dataclass(frozen=True)
class RegisterSettings(_Section):
    """The ``register`` section (``metsflow.imaging.register.DEFAULTS`` is its dict form)."""

    # Affine stage: reduced resolution only (SyN refines the rest).
    aff_transform: str = "Affine"
    aff_metric: str = "Mattes"
    aff_bins: int = 32
    aff_sampling_rate: float = 0.25
    aff_gradient_step: float = 0.1
    aff_iterations: tuple = (200, 100)
    aff_levels_mm: tuple = (8.0, 4.0)  # voxel size of each pyramid level
    aff_smoothing_mm: tuple = (3.0, 2.0)  # Gaussian sigma per level
    # SyN stage.
    syn_metric: str = "CC"  # "CC" | "Mattes" | "MeanSquares"
    cc_radius: int = 2  # voxels; ANTs' default of 32 bins/voxels is far too slow for CC
    syn_bins: int = 32  # for syn_metric Mattes
    syn_gradient_step: float = 0.2
    syn_flow_sigma: float = 3.0
    syn_total_sigma: float = 0.0
    # Levels at 8, 4 and 2 mm whatever the grid spacing (see ``pyramid``). A full-resolution
    # CC level at 1 mm costs ~8x the 2 mm level for little gain in a label prior.
    reg_iterations: tuple = (40, 20, 5)
    levels_mm: tuple = (8.0, 4.0, 2.0)
    smoothing_mm: tuple = (3.0, 2.0, 1.0)
    convergence_threshold: float = 1e-6
    convergence_window: int = 10
    # Brain masks are dilated so the brain/CSF boundary (the strongest edge) is in the metric.
    mask_dilate_mm: float = 5.0
    random_seed: int = 1
    # QC: below these the pair is flagged in qc.json (not silently accepted).
    qc_min_ncc: float = 0.6
    qc_min_mask_dice: float = 0.9


@dataclass(frozen=True)
class ModelSettings(_Section):
    """The ``model`` section: the stage-1 network (``metsflow.models.networks.MODEL_DEFAULTS`` is
    ``defaults()``); ``channels`` and ``patch_size`` have no default."""

    channels: list  # of metsflow.models.networks.CHANNELS, in channel-axis order
    patch_size: list  # voxels, 3 values
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


@dataclass(frozen=True)
class TrainSettings(_Section):
    """The stage-1 training knobs of the ``train`` section (``metsflow.models.train.DEFAULTS``);
    the section's other keys (folds, stage2, reseg, ...) are typed in the config schema."""

    iterations: int = 1000
    batch_size: int = 2
    optimizer: str = "sgd"
    grad_clip: float = 12.0
    seed: int = 0
    val_interval: int = 250
    checkpoint_interval: int = 100
    log_interval: int = 10
    val_overlap: float = 0.25
    sw_batch_size: int = 4
    pos_neg_ratio: list = field(default_factory=lambda: [1.0, 1.0])
    num_workers: Any = None
    aug_rotate_prob: float = 0.2
    aug_rotate_degrees: float = 30.0
    aug_zoom_prob: float = 0.2
    aug_zoom_range: list = field(default_factory=lambda: [0.7, 1.4])
    aug_scale_intensity_prob: float = 0.15
    aug_shift_intensity_prob: float = 0.15
    aug_noise_prob: float = 0.15
    aug_flip_prob: float = 0.5
    fictitious_prior: bool = True
    # Detection levers (issue #23; benchmarks/bench_detection.py measures them). Defaults keep
    # the behaviour the demo was timed with until a lever's measured gain decides otherwise.
    # Patch centres: "pos_neg" = MONAI RandCropByPosNegLabeld, uniform over lesion *voxels* (a
    # 20 mm lesion is centred ~500x more often than a 2.5 mm one at 1 mm); "lesion" = choose a
    # lesion, then a voxel inside it (metsflow.models.sampling.RandLesionCropd).
    sampling: str = "pos_neg"  # pos_neg | lesion
    # "lesion" sampling: weight of a lesion ~ volume ** -lesion_size_power (0: every lesion
    # alike; 1: the chance of a lesion is inversely proportional to its volume).
    lesion_size_power: float = 0.0
    # Weight of the instance-aware term (per reference component Dice, blob-loss style;
    # metsflow.models.networks.InstanceDiceLoss) beside Dice+CE; 0 = off.
    instance_loss_weight: float = 0.0
    # Round 0 fine-tunes from these weights (e.g. a model trained on BraTS-METS) instead of
    # starting from scratch; channels, label mode and patch size must match the model section
    # (checked when the workflow is parsed: metsflow.models.networks.init_checkpoint_problems).
    init_checkpoint: str | None = None


@dataclass(frozen=True)
class Stage2Settings(_Section):
    """The ``train.stage2`` section (``metsflow.models.cascade.DEFAULTS`` is its dict form)."""

    crop_size: list = field(default_factory=lambda: [24, 24, 24])
    filters: list = field(default_factory=lambda: [16, 32, 64])
    iterations: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    proposal_threshold: float = 0.3
    max_candidates: int = 200  # per study (training): the most confident stage-1 components
    operating_rule: str = "max_fp_per_patient"  # or "target_sensitivity" (module docstring)
    max_fp_per_patient: float = 1.0  # metrics.DEFAULT_MAX_FP_PER_PATIENT derives from it
    target_sensitivity: float = 0.95
    seed: int = 0
    # High-sensitivity stage 1 (issue #23): None = stage 2 filters the components of stage 1's
    # argmax, so it can only remove lesions; a value (0.98) = the proposals are the components
    # of stage 1's foreground probability at the highest threshold that reaches this lesion
    # sensitivity on the validation studies (metsflow.models.cascade.proposal_threshold), and
    # stage 2's operating point decides which of them stay.
    proposal_sensitivity: float | None = None


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
