"""Small pieces of the benchmark scripts that decide what they measure."""

import pytest

from experiments import bench_train_step
from experiments.configs import quickstart


def test_set_overrides_parse_literals_and_strings():
  config = quickstart.get_config()
  bench_train_step._apply_overrides(
      config, ["model.moe.top_k=1", "data.batch_size=3", "table_optim.kind=adagrad"])
  assert config.model.moe.top_k == 1
  assert config.data.batch_size == 3
  assert config.table_optim.kind == "adagrad"


@pytest.mark.parametrize("item", ["model.moe.no_such_field=1", "model.moe.top_k"])
def test_set_overrides_reject_unknown_fields_and_missing_values(item):
  with pytest.raises(SystemExit):
    bench_train_step._apply_overrides(quickstart.get_config(), [item])
