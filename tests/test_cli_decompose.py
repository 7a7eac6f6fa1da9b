"""``norton decompose --method M -r SPEC``: what reaches the library, user errors, and ``norton info`` naming the method."""
from __future__ import annotations

import pytest
import torch

import norton
import norton.cli.decompose
from norton.cli._options import DECOMPOSITION_METHODS
from norton.cli.main import main
from norton.decomposition.methods import METHODS


@pytest.fixture
def calls(monkeypatch):
    received: list[dict] = []
    monkeypatch.setattr(norton.cli.decompose, "run_compression", lambda **kwargs: received.append(kwargs) or {})
    return received


def test_the_cli_names_every_registered_method():
    assert DECOMPOSITION_METHODS == tuple(METHODS)


@pytest.mark.parametrize("method", ["tucker2", "cp-layer", "svd"])
@pytest.mark.parametrize("rank, expected", [("vbmf", "vbmf"), ("energy:0.9", "energy:0.9"), ("macs:0.5", "macs:0.5"),
                                            ("3", 3)])
def test_method_and_rank_spec_reach_the_library(calls, capsys, method, rank, expected):
    assert main(["decompose", "--ckpt", "m.pt", "--method", method, "-r", rank, "--json"]) == 0
    capsys.readouterr()
    assert calls[0]["decompose_method"] == method and calls[0]["rank"] == expected


def test_the_default_method_calls_the_library_as_before(calls, capsys):
    assert main(["decompose", "--ckpt", "m.pt", "-r", "4", "--json"]) == 0
    capsys.readouterr()
    assert calls[0]["rank"] == 4 and "decompose_method" not in calls[0]


@pytest.mark.parametrize("rank, message", [("energy:1.5", "energy"), ("macs:0", "macs"), ("banana", "banana")])
def test_bad_rank_specs_are_one_line_before_any_work(calls, capsys, rank, message):
    assert main(["decompose", "--ckpt", "m.pt", "--method", "tucker2", "-r", rank]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("norton decompose: error:") and message in err
    assert not calls


def test_an_unknown_method_is_refused_by_the_parser(calls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["decompose", "--ckpt", "m.pt", "--method", "qr", "-r", "2"])
    assert exit_info.value.code == 2 and "invalid choice: 'qr'" in capsys.readouterr().err
    assert not calls


@pytest.mark.parametrize("method", ["tucker2", "svd"])
def test_info_prints_the_method(tmp_path, capsys, method):
    model = norton.create_model("resnet_20")
    norton.decompose(model, "energy:0.5", method=method, progress=False)
    norton.save(model, tmp_path / "m.pt")
    assert main(["info", "--ckpt", str(tmp_path / "m.pt")]) == 0
    assert f"with {method} (rank" in capsys.readouterr().out
    assert torch.equal(norton.load(tmp_path / "m.pt")(torch.ones(1, 3, 8, 8)), model.eval()(torch.ones(1, 3, 8, 8)))
