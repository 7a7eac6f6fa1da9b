"""``norton info``: what a file holds, through the plan registry; bad sizes refused before reading."""
from __future__ import annotations

import json

import pytest
import torch

import norton
from norton.cli.main import main


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_info_lists_every_plan_step_through_the_registry(tmp_path, capsys):
    model = norton.create_model("resnet_20")
    norton.decompose(model, 2, progress=False)
    norton.prune(model, torch.zeros(1, 3, 32, 32), ratio=0.5)
    optimized = norton.optimize_for_inference(model, torch.zeros(1, 3, 32, 32), measure=False)
    norton.save(optimized, tmp_path / "m.pt", dataset="cifar10")
    assert main(["info", "--ckpt", str(tmp_path / "m.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [line.split()[0].rstrip(":") for line in info["plan"]] == ["decompose", "prune", "optimize"]
    assert info["kind"] == "norton model file" and info["metadata"] == {"dataset": "cifar10"}
    assert info["macs"] == norton.count_complexity(norton.load(tmp_path / "m.pt"), (3, 32, 32)).macs


@pytest.mark.parametrize("side", ["0", "100000", "-3"])
def test_bad_input_sizes_are_one_line_before_anything_is_read(tmp_path, capsys, side):
    path = norton.save(norton.create_model("resnet_20"), tmp_path / "m.pt")
    err = one_line_error(capsys, ["info", "--ckpt", str(path), "--input-size", side])
    assert "--input-size must be in [1, 8,192]" in err


def test_a_refused_info_command_does_not_import_torch(tmp_path):
    # Only the command being run is imported; info checks --input-size before its library code.
    import subprocess
    import sys

    code = ("import sys; from norton.cli.main import main; code = main(['info', '--ckpt', 'x', '--input-size', '0']); "
            "sys.exit(10 + code if 'torch' in sys.modules else code)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 2
