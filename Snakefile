# metsflow: cohort-scale brain-metastasis segmentation in longitudinal MRI with active learning.
#
#   snakemake --profile profiles/local        # the embedded demo (default config, phantom cohort)
#   snakemake --profile profiles/slurm --configfile config/cohort.yaml --config sheet=studies.tsv
#
# Stages (one rule file each): cohort plan -> preprocess (per CPU shard) -> register follow-ups to
# the previous time point (per CPU shard) -> train round 0 on the seed set -> infer the pool and
# validation studies (per GPU shard) -> evaluate -> active-learning rounds (select, annotate,
# fine-tune, infer, evaluate) -> report.

from snakemake.utils import min_version

# 9.17: earlier 9.x local schedulers could run more threads than --cores (snakemake#3913);
# pyproject.toml pins the tested release.
min_version("9.17")


report: "report/workflow.rst"


# Validated against config/schemas/config.schema.yaml (closed sections, defaults filled in)
# with the sheet and the run's other inputs at the top of rules/common.smk.
configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/cohort.smk"
include: "rules/preprocess.smk"
include: "rules/register.smk"
include: "rules/train.smk"
include: "rules/infer.smk"
include: "rules/evaluate.smk"
include: "rules/export.smk"
include: "rules/active_learning.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        # A function, evaluated while the DAG is built: with people the default target stops at
        # the first unconfirmed batch (rules/common.smk, final_targets).
        lambda wildcards: final_targets(),
