"""The warm runtime's one rank gets what torchrun would give it (warm.py): the same variables, the same values."""

from __future__ import annotations

import subprocess
import sys

from services.training import warm

# Where a warm rank differs on purpose: its own port and run id, and no agent's store to join.
DIFFERENT = {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"}
# torchrun's own bookkeeping, which nothing in the runtime reads.
AGENT_ONLY = {"TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE",
              "TORCHELASTIC_ENABLE_FILE_TIMER", "TORCHELASTIC_TIMER_FILE", "TORCHELASTIC_HEALTH_CHECK_PORT",
              "TORCHELASTIC_TORCHRUN_VERSION"}


def test_a_warm_rank_gets_the_environment_torchrun_gives_a_single_process_job():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                             "--nproc-per-node", "1", "--no-python", "env"], capture_output=True, text=True,
                            timeout=300, check=True, env={"PATH": "/usr/bin:/bin"})
    given = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    torchrun = {name: value for name, value in given.items()
                if name.startswith(("TORCHELASTIC_", "MASTER_", "TORCH_"))
                or name in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                            "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME"}}
    ours = warm.rank_environment("job-1", 29_500)
    assert set(torchrun) - AGENT_ONLY == set(ours), (torchrun, ours)
    assert {k: v for k, v in torchrun.items() if k not in DIFFERENT | AGENT_ONLY} == \
           {k: v for k, v in ours.items() if k not in DIFFERENT}
