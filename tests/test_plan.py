"""The plan registry: every registered operation round-trips through save -> load in a fresh process."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import norton
from norton.errors import UserError
from norton.plan import (
    PlanOperation,
    append_record,
    check_plan,
    describe_plan,
    get_operation,
    list_operations,
    original_model,
    plan_of,
    record_original,
    register_operation,
    replay_plan,
)

LOAD_IN_FRESH_PROCESS = """
import sys, torch, norton
x = torch.load(sys.argv[1])
outputs = {}
for path in sys.argv[2:]:
    model = norton.load(path)
    with torch.no_grad():
        outputs[path] = model(x)
    outputs[path + ":plan"] = [step["op"] for step in model.norton_plan]
torch.save(outputs, sys.argv[1] + ".out")
"""


def test_builtin_operations_are_registered():
    assert {"decompose", "prune", "optimize"} <= set(list_operations())


def test_every_registered_operation_survives_save_and_load_in_a_fresh_process(tmp_path):
    # Model i carries operations 0..i of the registry, each applied by its own example:
    # a new operation is covered here as soon as it registers.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    expected, paths = {}, []
    model = norton.create_model("resnet_20")
    for i, name in enumerate(list_operations()):
        model = get_operation(name).example(model, x)
        assert [step["op"] for step in model.norton_plan][-1] == name
        path = str(tmp_path / f"{i}-{name}.pt")
        norton.save(model, path)
        model.eval()
        with torch.no_grad():
            expected[path] = model(x)
        expected[path + ":plan"] = [step["op"] for step in model.norton_plan]
        paths.append(path)
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path / "x.pt"), *paths], check=True)
    loaded = torch.load(str(tmp_path / "x.pt") + ".out")
    for path in paths:
        assert loaded[path + ":plan"] == expected[path + ":plan"]
        torch.testing.assert_close(loaded[path], expected[path], rtol=1e-4, atol=1e-5)


def test_unknown_operation_names_the_operation_and_the_writers_version(tmp_path):
    model = norton.create_model("resnet_20")
    path = norton.save(model, tmp_path / "m.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["plan"] = [{"op": "quantize", "bits": 4}]
    checkpoint["norton_version"] = "9.9.9"
    torch.save(checkpoint, tmp_path / "future.pt")
    with pytest.raises(UserError, match=r"plan step 0 has operation 'quantize'.*written by norton 9\.9\.9.*upgrade"):
        norton.load(tmp_path / "future.pt")


def test_records_are_checked_by_their_operation_before_anything_is_built():
    with pytest.raises(UserError, match=r"plan step 0 \(decompose\).*rank of layer 'conv1'"):
        check_plan([{"op": "decompose", "ranks": {"conv1": 10**9}}])
    with pytest.raises(UserError, match="must be a list"):
        check_plan("decompose")
    with pytest.raises(UserError, match="plan step 1 must be a dict"):
        check_plan([{"op": "decompose", "ranks": {"conv1": 2}}, "prune"])


def test_replay_plan_rebuilds_the_structure():
    model = norton.decompose(norton.create_model("resnet_20"), 2, progress=False)
    fresh = replay_plan(norton.create_model("resnet_20"), model.norton_plan)
    fresh.load_state_dict(model.state_dict())  # same structure: the strict load succeeds
    assert plan_of(fresh) == plan_of(model)


def test_describe_gives_one_line_per_record():
    model = norton.decompose(norton.create_model("resnet_20"), 2, progress=False)
    lines = describe_plan(model.norton_plan)
    assert len(lines) == 1 and lines[0].startswith("decompose 19 layers") and "\n" not in lines[0]


def test_duplicate_operation_names_are_an_error():
    existing = get_operation("decompose")
    clone = PlanOperation("decompose", existing.check, existing.replay, existing.describe, existing.example)
    with pytest.raises(ValueError, match="already registered"):
        register_operation(clone)


def test_append_record_stores_a_plain_copy():
    model = torch.nn.Linear(2, 2)
    record = {"op": "decompose", "ranks": {"a": 1}}
    append_record(model, record)
    record["ranks"]["a"] = 5
    assert model.norton_plan == [{"op": "decompose", "ranks": {"a": 1}}]
    with pytest.raises(UserError, match="plain JSON"):
        append_record(model, {"op": "decompose", "ranks": {"a": float("nan")}})


def test_original_model_of_a_zoo_model_and_of_any_module():
    zoo = norton.decompose(norton.create_model("resnet_20"), 2, progress=False)
    original = original_model(zoo)
    assert original.conv1.weight.device.type == "meta"  # rebuilt by name, shapes only
    assert isinstance(original.conv1, torch.nn.Conv2d)

    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    norton.decompose(plain, 2, progress=False)
    snapshot = original_model(plain)
    assert isinstance(snapshot[0], torch.nn.Conv2d) and snapshot[0].weight.device.type == "meta"
    assert "norton_original" not in dict(plain.named_modules())  # not a submodule: never runs or saves
    assert not any("norton_original" in key for key in plain.state_dict())
    record_original(plain)  # a second call keeps the first snapshot
    assert original_model(plain) is snapshot
