"""A torchrun script as a user writes one: `torchrun --nproc-per-node 3 tests/torchrun_job.py OUT
CLUSTER.json` trains tests.jobs:build, rank r on the plan's r-th device; rank 0 writes what the
run gave into OUT/result.json."""

import json
import sys

import asteroid_fx as asteroid

out, cluster = sys.argv[1], sys.argv[2]
trained = asteroid.train("tests.jobs:build", cluster, out=out, backend="torchrun", microbatches=2,
                         groups=[["a"], ["b", "c"]], rows=[[8], [3, 5]])
if trained.plan is not None:
    with open(f"{out}/result.json", "w") as f:
        json.dump({"losses": trained.losses, "devices": list(trained.program.devices)}, f)
