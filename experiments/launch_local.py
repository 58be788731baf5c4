"""Run one training job as several local CPU processes (a pod layout on one machine).

  python -m experiments.launch_local --num_processes=2 --devices_per_process=4 -- \
      --config=experiments/configs/tiny_test.py --workdir=/tmp/mp \
      --config.train.mesh.fsdp=-1 --config.data.batch_size=8

Everything after `--` goes to `experiments.train` in every process. Output is forwarded with a
`[p<i>]` prefix; if any process fails, the others are killed and the exit status is the
failure's (engram_jax/distributed.py). The mesh must span all N x K devices (tiny_test pins one
device, hence the override); each process reads its own data shard, and a relaunch with the same
flags resumes from the workdir's last checkpoint (tests/test_launch_local.py).
"""

import sys

from absl import app
from absl import flags

from engram_jax import distributed

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes in the job.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")


def main(argv):
  sys.exit(distributed.launch_local(_NUM_PROCESSES.value, _DEVICES.value, argv[1:]))


if __name__ == "__main__":
  app.run(main)
