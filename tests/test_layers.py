"""norton.layers: the per-layer table of a compressed model, and `norton info --layers`."""
from __future__ import annotations

import json

import torch

import norton
from norton.cli.main import main
from norton.layers import format_layer_table, layer_summaries


def _compressed():
    torch.manual_seed(0)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    norton.prune(model, x, ratio={"layer1.0.conv1": 0.5}, criterion="l1")
    norton.decompose(model, {"layer2.0.conv1": 2}, progress=False)
    norton.decompose(model, {"layer3.0.conv1": (4, 6)}, method="tucker2", progress=False)
    return model


def test_rows_say_method_rank_and_width_against_the_original():
    rows = {row.name: row for row in layer_summaries(_compressed())}
    assert rows["layer1.0.conv1"].method == "dense"
    assert (rows["layer1.0.conv1"].out_channels, rows["layer1.0.conv1"].original_out_channels) == (8, 16)
    assert rows["layer1.0.conv2"].in_channels == 8
    assert (rows["layer2.0.conv1"].method, rows["layer2.0.conv1"].rank) == ("cp-filter", 2)
    assert (rows["layer3.0.conv1"].method, rows["layer3.0.conv1"].rank) == ("tucker2", [4, 6])
    assert not any(name.startswith("layer2.0.conv1.") for name in rows)  # a block's children are not rows
    table = format_layer_table(list(rows.values()))
    assert "4x6" in table and table.count("\n") == len(rows)


def test_info_prints_the_layers_as_text_and_json(tmp_path, capsys):
    norton.save(_compressed(), tmp_path / "m.pt")
    assert main(["info", "--ckpt", str(tmp_path / "m.pt"), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "layer2.0.conv1" in out and "cp-filter" in out and "tucker2" in out
    assert main(["info", "--ckpt", str(tmp_path / "m.pt"), "--layers", "--json"]) == 0
    layers = {row["name"]: row for row in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["layer1.0.conv1"]["out_channels"] == 8 and layers["layer3.0.conv1"]["rank"] == [4, 6]
