"""Per-job runtime settings (metsflow.core.runtime): threads and seeding hold without importing
more of torch than a job needs."""

import os
import subprocess
import sys

from conftest import REPO

_JOB = """
import sys
from metsflow.core.runtime import seed_everything, set_threads

set_threads(1)
assert "torch" not in sys.modules, "an ANTs-only job paid for a torch import"
import torch

assert torch.get_num_threads() == 1, torch.get_num_threads()  # imported later: the job's threads
seed_everything(0)
assert torch.are_deterministic_algorithms_enabled()
assert torch.is_deterministic_algorithms_warn_only_enabled()
assert "torch._inductor" not in sys.modules, "seeding imported torch.compile's inductor"
a = torch.rand(3)
seed_everything(0)
assert torch.equal(a, torch.rand(3))
# A compile later in the process gets the flag, as torch.use_deterministic_algorithms gave it.
from metsflow.core.runtime import compiler_follows_determinism
import torch._inductor.config as inductor_config

compiler_follows_determinism()
assert inductor_config.deterministic
print("ok")
"""


def test_threads_and_seeding_import_no_more_of_torch_than_the_job_needs():
    # A fresh interpreter, as a Snakemake job is (this test process has torch and more loaded).
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    proc = subprocess.run(
        [sys.executable, "-c", _JOB], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
