import tomllib
from pathlib import Path

import pytest

from fedapps.config import ConfigError, RunConfig

PROJECT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_match_runconfig():
    with (PROJECT / "pyproject.toml").open("rb") as stream:
        app_config = tomllib.load(stream)["tool"]["flwr"]["app"]["config"]
    assert app_config == RunConfig().to_dict()


def test_every_conf_file_is_a_valid_override():
    for path in sorted((PROJECT / "conf").glob("*.toml")):
        with path.open("rb") as stream:
            RunConfig.from_mapping(tomllib.load(stream))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dataset": "mnist"}, "dataset='mnist' is not known; allowed: digits"),
        ({"model": "resnet"}, "model='resnet' is not known"),
        ({"method": "fedprox"}, "method='fedprox' is not known; allowed: fedme"),
        ({"partitioner": "shards"}, "partitioner='shards' is not known"),
        ({"alpha-label": 0.0}, "alpha-label=0.0: must be > 0"),
        ({"alpha-size": -1}, "alpha-size=-1.0: must be > 0"),
        ({"data-path": "/no/such/file.npz"}, "data-path='/no/such/file.npz': no such file"),
        ({"num-rouds": 3}, "unknown config key 'num-rouds'"),
        ({"num-clients": "many"}, "num-clients='many': expected int"),
        ({"init-arch": "cnn1,cnn9"}, "'cnn9' is not a model"),
        ({"cluster-schedule": "1:1,x"}, "bad item 'x'"),
        ({"val-fraction": 0.5, "test-fraction": 0.5}, "must be < 1"),
    ],
)
def test_bad_values_name_key_value_and_allowed(values, message):
    with pytest.raises(ConfigError, match=None) as error:
        RunConfig.from_mapping(values)
    assert message in str(error.value)


def test_paper_cluster_schedule():
    config = RunConfig(num_rounds=100)
    assert config.cluster_schedule_pairs() == [(1, 1), (51, 2), (76, 3), (91, 4)]
    assert [config.clusters_at(r) for r in (1, 50, 51, 75, 76, 90, 91, 100)] == [
        1, 1, 2, 2, 3, 3, 4, 4,
    ]


def test_custom_cluster_schedule():
    config = RunConfig.from_mapping({"cluster-schedule": "1:1,3:2"})
    assert [config.clusters_at(r) for r in (1, 2, 3, 9)] == [1, 1, 2, 2]
