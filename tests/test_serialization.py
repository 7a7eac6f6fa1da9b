"""Tests for norton.serialization: self-describing files, fresh-process loading, reference checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import norton
from norton.errors import UserError
from norton.models import create_model
from norton.pruning.engine import prune
from norton.serialization import (
    FORMAT_VERSION,
    load,
    load_checkpoint,
    load_reference_checkpoint,
    model_from_state,
    model_state,
    save,
)


def decompose_by_hand(model: nn.Module, rank: int = 2) -> None:
    """Structure-only decomposition of the 3x3 convs (no ALS), recorded in the plan like norton.decompose."""
    from norton.decomposition.decompose import replay_decompose

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    replay_decompose(model, {"op": "decompose", "ranks": {name: rank for name in names}})


@pytest.fixture(scope="module")
def compressed_resnet() -> nn.Module:
    """ResNet-56 pruned, decomposed, pruned again: every kind of plan step."""
    torch.manual_seed(0)
    model = create_model("resnet_56")
    x = torch.randn(1, 3, 32, 32)
    prune(model, x, ratio=0.25, criterion="l1")
    decompose_by_hand(model)
    prune(model, x, ratio={"layer3.*.conv1": 0.5}, criterion="l1")
    return model.eval()


def test_file_is_self_describing_and_weights_only_loadable(tmp_path, compressed_resnet):
    path = save(compressed_resnet, tmp_path / "model.pt", epoch=7)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "norton" and raw["format_version"] == FORMAT_VERSION
    assert raw["architecture"] == compressed_resnet.norton_architecture
    assert [step["op"] for step in raw["plan"]] == ["prune", "decompose", "prune"]
    assert json.loads(json.dumps(raw["plan"])) == raw["plan"]  # plain JSON
    assert raw["metadata"] == {"epoch": 7}
    assert raw["state_dict"].keys() == compressed_resnet.state_dict().keys()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_round_trip_in_a_fresh_process_gives_identical_outputs(tmp_path, compressed_resnet):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    save(compressed_resnet, tmp_path / "model.pt")
    torch.save({"x": x, "y": compressed_resnet(x)}, tmp_path / "io.pt")
    script = (
        "import sys, torch, norton.serialization as s\n"
        f"m = s.load({str(tmp_path / 'model.pt')!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    y = m(io['x'])\n"
        "print(torch.equal(y, io['y']), (y - io['y']).abs().max().item(), len(m.norton_plan))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    equal, max_diff, steps = result.stdout.split()
    assert float(max_diff) <= 1e-6 and int(steps) == 3, result.stdout


def test_load_rebuilds_structure_plan_and_eval_mode(tmp_path, compressed_resnet):
    loaded = load(save(compressed_resnet, tmp_path / "model.pt"))
    assert not loaded.training
    assert loaded.norton_plan == json.loads(json.dumps(compressed_resnet.norton_plan))
    assert loaded.norton_architecture == compressed_resnet.norton_architecture
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), compressed_resnet(x))


def test_metadata_with_optimizer_state_round_trips(tmp_path):
    model = create_model("resnet_56", rank=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    save(model, tmp_path / "ckpt.pt", epoch=3, optimizer=optimizer.state_dict(), best_top1=93.5)
    checkpoint = load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint["metadata"]["epoch"] == 3 and checkpoint["metadata"]["best_top1"] == 93.5
    restored = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(checkpoint["metadata"]["optimizer"])
    first = next(iter(optimizer.state.values()))["momentum_buffer"]
    assert torch.equal(next(iter(restored.state.values()))["momentum_buffer"], first)


def test_metadata_may_use_the_argument_names_model_and_path(tmp_path):
    save(create_model("resnet_20"), tmp_path / "m.pt", model="resnet_20", path="runs/x")
    assert load_checkpoint(tmp_path / "m.pt")["metadata"] == {"model": "resnet_20", "path": "runs/x"}


def test_model_state_embeds_in_a_trainer_checkpoint(tmp_path, compressed_resnet):
    torch.save({"model": model_state(compressed_resnet), "epoch": 1}, tmp_path / "trainer.pt")
    record = torch.load(tmp_path / "trainer.pt", weights_only=True)["model"]
    rebuilt = model_from_state(record).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt(x), compressed_resnet(x))


def test_models_without_architecture_need_one(tmp_path):
    from norton.models.resnet_cifar import resnet_56

    bare = resnet_56()  # the builder itself: no norton_architecture
    with pytest.raises(UserError, match="create_model") as error:
        save(bare, tmp_path / "bare.pt")
    assert "\n" not in str(error.value)
    save(bare, tmp_path / "bare.pt", architecture={"name": "resnet_56", "kwargs": {}})
    assert torch.equal(load(tmp_path / "bare.pt").fc.weight, bare.fc.weight)


def test_bad_files_and_metadata_raise_one_line_errors(tmp_path):
    model = create_model("resnet_56")
    with pytest.raises(UserError, match="weights-only"):
        save(model, tmp_path / "m.pt", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UserError, match="no such file"):
        load(tmp_path / "missing.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a norton model file"):
        load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load(tmp_path / "junk.pt")
    path = save(model, tmp_path / "m.pt")
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(UserError, match="upgrade norton"):
        load(tmp_path / "future.pt")
    del checkpoint["state_dict"]["fc.bias"]
    torch.save(checkpoint, tmp_path / "damaged.pt")
    with pytest.raises(UserError, match="lacks 'fc.bias'"):
        load(tmp_path / "damaged.pt")
    torch.save({**checkpoint, "plan": [{"op": "quantize"}]}, tmp_path / "op.pt")
    with pytest.raises(UserError, match="operation 'quantize', which norton .* does not know"):
        load(tmp_path / "op.pt")


# ------------------------------------------------------------------ reference checkpoints
CPR = "[0.]+[0.18]*29"


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    """A file laid out like the authors' releases: DataParallel prefixes, -r/-cpr stored beside the weights."""
    torch.manual_seed(0)
    model = create_model("resnet_56", rank=1, compress_rate=CPR)
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    path = tmp_path_factory.mktemp("reference") / "resnet_56_[0.]+[0.18]*29_1_93.81.pt"
    torch.save({"state_dict": state, "rank": 1, "compress_rate": CPR, "best_top1_acc": 93.81}, path)
    return path, model.eval()


def test_reference_checkpoint_loads_strictly(reference_file):
    path, original = reference_file
    model = load_reference_checkpoint(path, "resnet_56", 1, CPR)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), original(x))
    assert model.norton_architecture["name"] == "resnet_56"  # so it can be saved in norton's format


@pytest.mark.parametrize(
    "rank,compress_rate,message",
    [
        (8, CPR, "checkpoint has 55 conv layers of rank 1 but rank=8 was given"),
        (0, CPR, "CPDBlocks\\) of rank 1 but rank=0"),
        (1, "[0.]+[0.12]*2+[0.4]*27", "layer1.0.conv1.feature.pointwise.weight has shape"),
    ],
)
def test_reference_checkpoint_mismatch_names_the_problem(reference_file, rank, compress_rate, message):
    path, _ = reference_file
    with pytest.raises(UserError, match=message) as error:
        load_reference_checkpoint(path, "resnet_56", rank, compress_rate)
    assert "\n" not in str(error.value)


def test_reference_checkpoint_with_pickled_objects_needs_trust(reference_file, tmp_path):
    import numpy as np

    path, original = reference_file
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["best_top1_acc"] = np.float64(93.81)  # what a training script often stores
    torch.save(checkpoint, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="trusted=True"):
        load_reference_checkpoint(tmp_path / "pickled.pt", "resnet_56", 1, CPR)
    model = load_reference_checkpoint(tmp_path / "pickled.pt", "resnet_56", 1, CPR, trusted=True)
    assert torch.equal(model.fc.weight, original.fc.weight)


def _tampered(tmp_path, **changes):
    """A norton file of resnet_20 whose architecture or plan a hostile or broken writer changed."""
    path = norton.save(create_model("resnet_20"), tmp_path / "m.pt")
    checkpoint = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "plan":
            checkpoint["plan"] = value
        else:
            checkpoint["architecture"]["kwargs"][key] = value
    torch.save(checkpoint, tmp_path / "tampered.pt")
    return tmp_path / "tampered.pt"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_classes": 10**9}, "num_classes must be in"),
        ({"rank": 10**9}, "rank must be in"),
        ({"compress_rate": [0.0] * 50_000}, "compress_rate has 50,000 entries"),
        ({"plan": [{"op": "decompose", "ranks": {"conv1": 10**9}}]}, "rank of layer 'conv1'"),
        ({"plan": [{"op": "decompose", "ranks": {"conv1": 60_000}}]}, r"above 9 = C_in x k"),
    ],
)
def test_files_asking_for_huge_models_are_refused_before_allocating(tmp_path, changes, message):
    import time

    path = _tampered(tmp_path, **changes)
    before = path.read_bytes()
    started = time.perf_counter()
    with pytest.raises(UserError, match=message):
        load(path)
    assert time.perf_counter() - started < 5  # refused, not allocated
    assert path.read_bytes() == before


def test_unknown_architecture_argument_is_one_line(tmp_path):
    path = _tampered(tmp_path, width_multiplier=2)
    with pytest.raises(UserError, match="argument 'width_multiplier', which create_model does not take"):
        load(path)


def test_read_model_file_detects_each_kind(tmp_path):
    from norton.serialization import read_model_file

    model = create_model("resnet_20")
    norton.save(model, tmp_path / "n.pt", dataset="cifar10")
    loaded = read_model_file(tmp_path / "n.pt")
    assert loaded.kind == "norton model file" and loaded.trained_with == {"dataset": "cifar10"}
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ref.pt")
    with pytest.raises(UserError, match="bare state_dict.*--arch"):
        read_model_file(tmp_path / "ref.pt")
    assert read_model_file(tmp_path / "ref.pt", arch="resnet_20").kind == "reference checkpoint"
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a model file norton knows"):
        read_model_file(tmp_path / "other.pt")
