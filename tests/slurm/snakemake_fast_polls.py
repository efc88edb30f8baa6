"""`python -m snakemake` for the test cluster only: the SLURM plugin polls at a fixed interval.

snakemake-executor-plugin-slurm (2.6) ignores Snakemake's `--seconds-between-status-checks`: it
starts at `slurm-init-seconds-before-status-checks` and adds 10 s after every poll that sees no
job finish (up to 180 s), and it sleeps 5 s before every single-job `sbatch`. On a real cluster
that spares the controller; on the one-node test cluster, whose jobs take 10-80 s, it let
Snakemake notice a finished job up to 36 s late, wave after wave (measured in the slurmctld log
against Snakemake's log). Here the poll interval is `--seconds-between-status-checks` again and
the pause before `sbatch` is dropped; submission, status queries (`squeue`) and everything else
are the plugin's own. If a plugin release changes either internal, this wrapper leaves it alone
(the run is then only slower). The jobs inside SLURM run plain `python -m snakemake`.
"""

from __future__ import annotations

import sys
import time
import types


def patch_plugin() -> None:
    import snakemake_executor_plugin_slurm as slurm

    def interval(self):
        return self.workflow.remote_execution_settings.seconds_between_status_checks

    if isinstance(getattr(slurm.Executor, "next_seconds_between_status_checks", None), property):
        slurm.Executor.next_seconds_between_status_checks = property(interval, lambda self, v: None)
    if getattr(slurm, "time", None) is time:
        no_pause = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time)})
        no_pause.sleep = lambda seconds: None
        slurm.time = no_pause


if __name__ == "__main__":
    patch_plugin()
    from snakemake.cli import main

    sys.argv[0] = "snakemake"
    sys.exit(main())
