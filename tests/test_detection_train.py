"""train_detector: the loss falls, the schedule is the reference's, a stopped run resumes, errors are one line."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from norton.detection.train import (
    DetectionSchedule,
    build_detection_scheduler,
    reference_lr,
    scaled_lr_steps,
    train_detector,
)
from norton.errors import UserError


def tiny_detector(num_classes: int = 3, size: int = 32) -> nn.Module:
    """A Faster R-CNN on a 2-conv backbone (8 channels, stride 4), 32-px images: trains in milliseconds."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
    backbone.out_channels = 8
    return FasterRCNN(
        backbone, min_size=size, max_size=size,
        rpn_anchor_generator=AnchorGenerator(((8, 16),), ((1.0,),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=3, sampling_ratio=1),
        box_head=TwoMLPHead(8 * 3 * 3, 16), box_predictor=FastRCNNPredictor(16, num_classes),
        rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_batch_size_per_image=16,
        rpn_batch_size_per_image=32,
    )


def tiny_set(n: int = 8) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``n`` 32x32 images, each with one bright square (class 1) or bar (class 2) on black."""
    generator = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        image = torch.zeros(3, 32, 32)
        x, y = (int(v) for v in torch.randint(2, 16, (2,), generator=generator))
        w, h = (12, 12) if i % 2 == 0 else (14, 6)
        image[:, y:y + h, x:x + w] = 1.0
        target = {"boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32),
                  "labels": torch.tensor([1 + i % 2]), "image_id": i}
        items.append((image, target))
    return items


def collate(batch):
    return tuple(zip(*batch, strict=True))


def loader(items, batch_size: int = 4, shuffle: bool = True) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


# --------------------------------------------------------------------------- the recipe


def test_schedule_matches_hand_computed_values():
    # 5 iterations per epoch, warm-up 3 iterations from 1e-3, steps after epochs 2 and 3 (of 4)
    schedule = DetectionSchedule(steps_per_epoch=5, milestones=(2, 3), warmup_iters=3, warmup_factor=1e-3)
    expected = [1e-3, 1e-3 + 0.999 / 3, 1e-3 + 2 * 0.999 / 3, 1, 1,  # epoch 1: warm-up, then 1
                1, 1, 1, 1, 1,  # epoch 2
                0.1, 0.1, 0.1, 0.1, 0.1,  # epoch 3: after the first step
                0.01, 0.01, 0.01, 0.01, 0.01]  # epoch 4: after the second
    assert [schedule(t) for t in range(20)] == pytest.approx(expected)

    # Through the optimiser: the lr of each of the run's iterations, warm-up capped at one epoch.
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    scheduler = build_detection_scheduler(optimizer, steps_per_epoch=4, milestones=(1,), warmup_iters=1000)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = [0.5 * (1e-3 + 0.999 * t / 3) for t in range(3)]  # min(1000, 4 - 1) = 3 warm-up iterations
    assert lrs == pytest.approx([*warm, 0.5, 0.05, 0.05, 0.05, 0.05])


def test_reference_lr_and_scaled_steps():
    assert reference_lr(16) == pytest.approx(0.02)
    assert reference_lr(4) == pytest.approx(0.005)
    assert scaled_lr_steps(26) == (16, 22)
    assert scaled_lr_steps(12) == (7, 10)  # round(16 * 12 / 26) = 7, round(22 * 12 / 26) = 10
    assert scaled_lr_steps(1) == (1, 1)


# --------------------------------------------------------------------------- training


def test_loss_falls_and_history_is_returned(tmp_path):
    model = tiny_detector()
    history = train_detector(model, loader(tiny_set()), epochs=6, lr=0.02, warmup_iters=0, lr_steps=(5,),
                             device="cpu", progress=False, verbose=False, checkpoint_dir=tmp_path / "run")
    losses = [record["train_loss"] for record in history]
    assert [record["epoch"] for record in history] == list(range(1, 7))
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses  # e.g. 1.82 -> 0.99, 1.32
    assert {"train_loss_classifier", "train_loss_box_reg", "train_loss_objectness"} <= set(history[0])
    assert history[-1]["best_epoch"] == 6  # no validation loader: the last epoch is the best
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def stop_at(model: nn.Module, call: int) -> None:
    """Make ``model`` raise KeyboardInterrupt at its ``call``-th training forward (a killed run)."""
    calls = [0]

    def hook(module, inputs):
        calls[0] += module.training
        if calls[0] == call:
            raise KeyboardInterrupt

    model.register_forward_pre_hook(hook)


def test_resume_after_a_stop_continues_from_the_saved_epoch(tmp_path):
    items = tiny_set()
    kwargs = {"epochs": 3, "lr": 0.01, "warmup_iters": 2, "device": "cpu", "progress": False, "verbose": False}
    whole = tiny_detector()
    expected = train_detector(whole, loader(items), checkpoint_dir=tmp_path / "whole", **kwargs)

    stopped = tiny_detector()
    stop_at(stopped, 4)  # killed in the middle of epoch 2 (2 batches per epoch)
    with pytest.raises(KeyboardInterrupt):
        train_detector(stopped, loader(items), checkpoint_dir=tmp_path / "run", **kwargs)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1

    resumed = tiny_detector()
    history = train_detector(resumed, loader(items), checkpoint_dir=tmp_path / "run", resume=True, **kwargs)
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert [r["train_loss"] for r in history] == pytest.approx([r["train_loss"] for r in expected], rel=1e-5)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_refuses_other_settings_and_other_models(tmp_path):
    kwargs = {"lr": 0.01, "device": "cpu", "progress": False, "verbose": False, "checkpoint_dir": tmp_path}
    train_detector(tiny_detector(), loader(tiny_set(4)), epochs=1, **kwargs)
    with pytest.raises(UserError, match="already holds a training run"):
        train_detector(tiny_detector(), loader(tiny_set(4)), epochs=1, **kwargs)
    with pytest.raises(UserError, match="epochs=1.*now epochs=2"):
        train_detector(tiny_detector(), loader(tiny_set(4)), epochs=2, resume=True, **kwargs)
    other = tiny_detector()
    other.roi_heads.box_predictor.cls_score = nn.Linear(16, 5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(UserError, match=r"different model .*cls_score.weight: \(3, 16\) in the checkpoint") as error:
        train_detector(other, loader(tiny_set(4)), epochs=1, resume=True, **kwargs)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing loaded
    with pytest.raises(UserError, match="nothing to resume"):
        train_detector(tiny_detector(), loader(tiny_set(4)), epochs=1, resume=True, lr=0.01, device="cpu",
                       checkpoint_dir=tmp_path / "empty")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"amp": True}, "needs a CUDA device"),
    ({"epochs": 0}, "epochs"),
    ({"lr": float("nan")}, "learning rate"),
    ({"epochs": 4, "lr_steps": (5,)}, "lr step"),
    ({"epochs": 4, "lr_steps": (3, 2)}, "increasing"),
    ({"momentum": 1.0}, "momentum"),
])
def test_bad_arguments_are_one_line_errors_before_any_work(kwargs, message):
    model = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message) as error:
        train_detector(model, loader(tiny_set(4)), **{"device": "cpu", "progress": False, **kwargs})
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NanLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, images, targets):
        return {"loss_classifier": self.weight.sum() * 0.5, "loss_box_reg": self.weight.sum() * float("nan")}


def test_non_finite_loss_stops_with_a_clear_error():
    with pytest.raises(UserError, match=r"diverged at iteration 1 .*loss_box_reg nan.*lower --lr") as error:
        train_detector(NanLoss(), loader(tiny_set(4)), epochs=1, lr=0.01, device="cpu", progress=False, verbose=False)
    assert "\n" not in str(error.value)


def test_default_lr_follows_the_batch_size():
    history = train_detector(tiny_detector(), loader(tiny_set(4), batch_size=2), epochs=1, warmup_iters=0,
                             device="cpu", progress=False, verbose=False)
    assert history[0]["lr"] == pytest.approx(0.02 * 2 / 16)


def test_best_epoch_is_chosen_on_validation_ap(tmp_path, monkeypatch):
    import norton.detection.evaluate as evaluate

    aps = iter([10.0, 30.0, 20.0])
    states = []

    def fake_evaluate(model, loader, *, progress=True):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"bbox": {"AP": next(aps)}}

    monkeypatch.setattr(evaluate, "evaluate_detector", fake_evaluate)
    model = tiny_detector()
    history = train_detector(model, loader(tiny_set()), loader(tiny_set(4), shuffle=False), epochs=3, lr=0.01,
                             device="cpu", progress=False, verbose=False, checkpoint_dir=tmp_path)
    assert [r["val_ap"] for r in history] == [10.0, 30.0, 20.0]
    assert [r["best_epoch"] for r in history] == [1, 2, 2]
    for key, value in model.state_dict().items():  # the model is left with epoch 2's weights
        assert torch.equal(value, states[1][key]), key
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["best"] == {"epoch": 2, "val_ap": 30.0}


def test_validation_with_coco_evaluation(tmp_path):
    from norton.detection.coco import coco_datasets, detection_loader
    from norton.detection.demo_data import make_demo_data

    make_demo_data(tmp_path, train_images=4, val_images=2, canvas=64)
    train_set, val_set = coco_datasets(tmp_path, kind="boxes")
    history = train_detector(tiny_detector(train_set.num_classes, 64),
                             detection_loader(train_set, batch_size=2, train=True),
                             detection_loader(val_set, batch_size=2, train=False), epochs=1, lr=0.01,
                             device="cpu", progress=False, verbose=False)
    assert set(history[0]["val"]["bbox"]) >= {"AP", "AP50", "AP75", "AR100"}
    assert history[0]["val_ap"] == history[0]["val"]["bbox"]["AP"]


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    from norton.detection.coco import detection_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_detector()
        history = train_detector(model, detection_loader(tiny_set(), batch_size=2, train=True), epochs=2, lr=0.01,
                                 device="cpu", progress=False, verbose=False,
                                 checkpoint_dir=f"{folder}/run")  # rank 0 writes, the others only read it
        torch.save({"state": model.state_dict(), "lr": history[0]["lr"]}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in zero["state"].items():  # DDP averages the gradients: the replicas stay equal
        torch.testing.assert_close(value, one["state"][key], msg=key)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["recipe"]["world_size"] == 2
    assert saved["recipe"]["steps_per_epoch"] == 2  # 8 images, 2 ranks, 2 per batch


def tiny_rcnn(kind: str, num_classes: int, num_keypoints: int = 0) -> nn.Module:
    """A tiny Faster / Mask / Keypoint R-CNN on the 8-channel backbone, for 64-px images."""
    from torchvision.models.detection import KeypointRCNN, MaskRCNN
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    base = tiny_detector(num_classes, 64)
    if kind == "boxes":
        return base
    common = {"min_size": 64, "max_size": 64, "rpn_anchor_generator": base.rpn.anchor_generator,
              "box_roi_pool": base.roi_heads.box_roi_pool, "box_head": base.roi_heads.box_head,
              "box_predictor": base.roi_heads.box_predictor, "box_batch_size_per_image": 16}
    pool = MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=1)
    if kind == "masks":
        return MaskRCNN(base.backbone, mask_roi_pool=pool, mask_head=MaskRCNNHeads(8, [8], 1),
                        mask_predictor=MaskRCNNPredictor(8, 8, num_classes), **common)
    return KeypointRCNN(base.backbone, keypoint_roi_pool=pool, keypoint_head=KeypointRCNNHeads(8, [8]),
                        keypoint_predictor=KeypointRCNNPredictor(8, num_keypoints), **common)


@pytest.mark.parametrize(("kind", "metrics", "epochs", "fall"), [
    ("boxes", {"bbox"}, 6, 0.8), ("masks", {"bbox", "segm"}, 6, 0.8),
    # the keypoint loss, a cross-entropy over 56x56 heatmap positions (log 3136 = 8), falls slowest
    ("keypoints", {"bbox", "keypoints"}, 10, 0.9),
])
def test_each_detector_kind_trains_and_evaluates(tmp_path, kind, metrics, epochs, fall):
    from norton.detection.coco import coco_datasets, detection_loader
    from norton.detection.demo_data import make_demo_data

    make_demo_data(tmp_path, train_images=8, val_images=2, canvas=64)
    train_set, val_set = coco_datasets(tmp_path, kind=kind)
    model = tiny_rcnn(kind, train_set.num_classes, train_set.num_keypoints)
    history = train_detector(model, detection_loader(train_set, batch_size=4, train=True),
                             detection_loader(val_set, batch_size=2, train=False), epochs=epochs, lr=0.02,
                             lr_steps=(epochs - 1,), warmup_iters=0, device="cpu", progress=False, verbose=False)
    losses = [record["train_loss"] for record in history]
    assert sum(losses[-2:]) / 2 < fall * losses[0], losses
    assert set(history[-1]["val"]) == metrics
    if kind != "boxes":
        assert f"train_loss_{'mask' if kind == 'masks' else 'keypoint'}" in history[0]
