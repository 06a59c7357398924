"""The data set records: one per data set, consistent with the models and the paper's protocol."""

import dataclasses

import pytest

from densenet.data.registry import DATASETS, dataset_record
from densenet.errors import ConfigError
from densenet.models.registry import model_config


@pytest.mark.parametrize("name", list(DATASETS))
def test_record_is_consistent(name):
    record = dataset_record(name)
    assert record.name == name
    model_config(record.model)  # the default model exists
    assert record.epochs > 0 and record.batch_size > 0
    assert record.milestones is None or list(record.milestones) == sorted(record.milestones)
    assert record.milestones is None or record.milestones[-1] < record.epochs
    assert (record.mean is None) == (record.std is None)
    assert record.mean is None or len(record.mean) == record.in_chans
    assert record.in_memory == (record.preprocess == "resize")  # small sets are resized, large ones cropped


def test_records_are_frozen_and_unknown_names_get_a_hint():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["cifar10"].epochs = 1
    with pytest.raises(ConfigError, match="did you mean cifar10"):
        dataset_record("cifar-10")
