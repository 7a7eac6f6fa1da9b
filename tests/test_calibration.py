"""Tests for calibration data as users pass it (norton.calibration)."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from norton.calibration import calibration_inputs, count_images, evaluating, run_calibration
from norton.errors import UserError

EXAMPLE = torch.zeros(1, 3, 8, 8)


def test_tensors_pairs_and_loaders_give_the_inputs_without_reading_labels():
    images = torch.randn(10, 3, 8, 8)
    as_tensors = calibration_inputs([images[:4], images[4:]], EXAMPLE)
    labels = torch.arange(10)
    as_pairs = calibration_inputs(DataLoader(TensorDataset(images, labels), batch_size=3), EXAMPLE)
    unlabeled = calibration_inputs(DataLoader(TensorDataset(images), batch_size=4), EXAMPLE)  # items are [x]
    for inputs in (as_tensors, as_pairs, unlabeled):
        assert torch.equal(torch.cat(inputs), images)
    assert [x.shape[0] for x in as_pairs] == [3, 3, 3, 1]


def test_labels_that_are_not_tensors_are_fine():
    images = torch.randn(4, 3, 8, 8)
    inputs = calibration_inputs([(images, ["a", "b", "c", "d"])], EXAMPLE)
    assert torch.equal(inputs[0], images)


def test_max_images_cuts_the_last_batch_and_stops_reading():
    read = []

    def batches():
        for i in range(100):
            read.append(i)
            yield torch.randn(4, 3, 8, 8)

    inputs = calibration_inputs(batches(), EXAMPLE, max_images=10)
    assert [x.shape[0] for x in inputs] == [4, 4, 2] and count_images(inputs) == 10
    assert read == [0, 1, 2]  # the generator was not drained


def test_dtype_follows_the_example_and_device_is_honoured():
    inputs = calibration_inputs([torch.randn(2, 3, 8, 8, dtype=torch.float64)], EXAMPLE, device="cpu")
    assert inputs[0].dtype == torch.float32 and inputs[0].device.type == "cpu"


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([], "calibration gave no batches"),
        (iter(()), "calibration gave no batches"),
        ([torch.zeros(0, 3, 8, 8)], "calibration gave no batches"),
        (torch.randn(4, 3, 8, 8), "must be an iterable of batches"),
        (3, "must be an iterable of batches"),
        ([{"image": torch.randn(2, 3, 8, 8)}], "batch 0 is a dict"),
        ([("x", torch.randn(2, 3, 8, 8))], "whose first item is a str"),
        ([torch.randn(2, 3, 8, 8), torch.randn(2, 1, 8, 8)], "batch 1 has shape (2, 1, 8, 8)"),
        ([torch.randn(3, 8, 8)], "images of shape (3, 8, 8)"),
        ([torch.full((2, 3, 8, 8), float("nan"))], "NaN or infinite"),
    ],
)
def test_bad_calibration_is_one_line(calibration, message):
    with pytest.raises(UserError) as error:
        calibration_inputs(calibration, EXAMPLE)
    text = str(error.value)
    assert message in text and "\n" not in text


def test_wrong_shape_names_both_shapes():
    with pytest.raises(UserError, match=r"images of shape \(1, 28, 28\).*images of shape \(3, 8, 8\)"):
        calibration_inputs([torch.randn(2, 1, 28, 28)], EXAMPLE)


def test_models_with_several_inputs_are_refused():
    with pytest.raises(UserError, match="one input tensor"):
        calibration_inputs([torch.randn(2, 3)], (torch.zeros(1, 3), torch.zeros(1, 3)))
    with pytest.raises(UserError, match="max_images"):
        calibration_inputs([torch.randn(2, 3, 8, 8)], EXAMPLE, max_images=0)


def test_run_calibration_is_eval_mode_without_gradients_and_restores_modes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9), nn.BatchNorm1d(4))
    model.train()
    model[2].eval()
    before = model[2].running_mean.clone()
    x = torch.randn(8, 4)
    outputs = run_calibration(model, [x, x], lambda inp, out: (out.requires_grad, out.clone()))
    assert [grad for grad, _ in outputs] == [False, False]
    assert torch.equal(outputs[0][1], outputs[1][1])  # no dropout noise
    assert torch.equal(model[2].running_mean, before)  # no statistics updated
    assert model.training and model[1].training and not model[2].training
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("boom")
    assert model.training and not model[2].training
