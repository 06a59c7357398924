"""The task record: outputs, loss, probabilities, decisions and the kind inferred from label arrays."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densenet.data.task import Task, infer_task, positive_weight, targets_array
from densenet.errors import ConfigError


def test_outputs_per_kind_and_names_checked():
    assert Task("binary", ("normal", "pneumonia")).num_outputs == 1
    assert Task("binary", ("normal", "pneumonia")).label_names == ("pneumonia",)
    assert Task("multiclass", ("a", "b", "c")).num_outputs == 3
    assert Task("multilabel", ("sea", "sunset")).num_outputs == 2
    with pytest.raises(ConfigError, match="two names"):
        Task("binary", ("a", "b", "c"))
    with pytest.raises(ConfigError, match="unknown task kind"):
        Task("regression", ("a",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sea more than once"):
        Task("multilabel", ("sea", "sea"))


def test_round_trip_through_plain_types():
    task = Task("multilabel", ("desert", "sea"))
    assert task.to_dict() == {"kind": "multilabel", "names": ["desert", "sea"]}
    assert Task.from_dict(task.to_dict()) == task
    with pytest.raises(ConfigError, match="kind"):
        Task.from_dict({"names": ["a"]})


def test_multiclass_loss_is_cross_entropy_with_label_smoothing():
    logits, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    loss = Task.multiclass(["a", "b", "c"]).loss(label_smoothing=0.1)
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))


def test_binary_loss_takes_int64_targets_against_one_logit_and_weighs_positives():
    task = Task("binary", ("neg", "pos"))
    logits, y = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 0, 0])
    plain = F.binary_cross_entropy_with_logits(logits.view(-1), y.float())
    assert torch.allclose(task.loss()(logits, y), plain)
    weighted = F.binary_cross_entropy_with_logits(logits.view(-1), y.float(), pos_weight=torch.tensor([2.0]))
    assert torch.allclose(task.loss(pos_weight=[2.0])(logits, y), weighted)
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ConfigError, match="label-smoothing"):
        task.loss(label_smoothing=0.1)
    with pytest.raises(ConfigError, match="2 values"):
        task.loss(pos_weight=[1.0, 2.0])


def test_multilabel_loss_and_pos_weight_from_training_targets():
    task = Task("multilabel", ("a", "b", "c"))
    y = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    # per label negatives / positives: a 2/2, b 3/1, c none positive -> 1
    assert positive_weight(task, y).tolist() == [1.0, 3.0, 1.0]
    logits = torch.randn(4, 3)
    expected = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor([1.0, 3.0, 1.0]))
    assert torch.allclose(task.loss(pos_weight=positive_weight(task, y))(logits, y), expected)
    assert positive_weight(Task("binary", ("n", "p")), torch.tensor([0, 0, 0, 1])).tolist() == [3.0]
    with pytest.raises(ConfigError, match="multiclass"):
        positive_weight(Task.multiclass(["a", "b"]), torch.tensor([0, 1]))


def test_probabilities_and_decisions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [-1.0, 0.5, 0.0]])
    multiclass = Task.multiclass(["a", "b", "c"])
    probs = multiclass.probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(2)) and multiclass.predict(probs).tolist() == [0, 1]
    multilabel = Task("multilabel", ("a", "b", "c"))
    probs = multilabel.probabilities(logits)
    assert torch.allclose(probs, torch.sigmoid(logits))
    assert multilabel.predict(probs).tolist() == [[1, 0, 0], [0, 1, 0]]  # sigmoid(0) = 0.5 is not above 0.5
    assert multilabel.predict(probs.numpy(), threshold=np.array([0.9, 0.9, 0.1])).tolist() == [[0, 0, 1], [0, 0, 1]]
    binary = Task("binary", ("n", "p"))
    assert binary.predict(binary.probabilities(torch.tensor([[1.0], [-1.0]]))).tolist() == [1, 0]
    assert binary.predict(np.array([[0.2], [0.7]]), threshold=0.6).tolist() == [0, 1]


@pytest.mark.parametrize(("labels", "kind", "names"), [
    (np.array([[0], [1], [1]]), "binary", ("0", "1")),
    (np.array([0, 0, 0]), "binary", ("0", "1")),  # one class seen: still a two-class problem
    (np.array([[0], [3], [1]]), "multiclass", ("0", "1", "2", "3")),  # ordinal grades as classes
    (np.array([[0, 1, 1], [0, 0, 0]]), "multilabel", ("0", "1", "2")),
])
def test_infer_task_from_label_arrays(labels, kind, names):
    assert infer_task(labels) == Task(kind, names)


def test_infer_task_with_names_and_bad_arrays():
    assert infer_task(np.array([0, 1]), names=("normal", "pneumonia")) == Task("binary", ("normal", "pneumonia"))
    assert infer_task(np.array([0, 1]), names=("a", "b", "c")).kind == "multiclass"
    with pytest.raises(ConfigError, match="f.npz: .*0/1, found 2"):
        infer_task(np.array([[0, 2], [1, 0]]), source="f.npz")
    with pytest.raises(ConfigError, match=">= 0"):
        infer_task(np.array([0, -1]))
    with pytest.raises(ConfigError, match="whole numbers"):
        infer_task(np.array([0.0, 0.5]))
    with pytest.raises(ConfigError, match="only 2 names"):
        infer_task(np.array([0, 1, 2]), names=("a", "b"))


def test_targets_are_stored_as_the_task_says():
    assert targets_array(Task("binary", ("n", "p")), np.array([[0], [1]])).dtype == np.int64
    assert targets_array(Task("binary", ("n", "p")), np.array([[0], [1]])).shape == (2,)
    stored = targets_array(Task("multilabel", ("a", "b")), np.array([[0, 1], [1, 1]], dtype=np.uint8))
    assert stored.dtype == np.float32 and stored.shape == (2, 2)
    assert Task("multilabel", ("a", "b")).target_dtype == torch.float32
