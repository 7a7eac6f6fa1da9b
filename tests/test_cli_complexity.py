"""``norton complexity``: the README's commands, JSON output, and one-line errors."""
import json

import pytest

from norton.cli.main import main
from norton.complexity import count_complexity
from norton.models import create_model


def run(capsys, *argv):
    code = main(["complexity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_vgg_command(capsys):
    code, out, err = run(capsys, "--arch", "vgg_16_bn", "-r", "1", "-cpr", "[0.6]*6+[0.8]*7")
    assert code == 0 and err == ""
    macs_line = next(line for line in out.splitlines() if line.startswith("MACs"))
    params_line = next(line for line in out.splitlines() if line.startswith("params"))
    assert "4,582,498" in macs_line and macs_line.endswith("98.54%")
    assert "149,648" in params_line and params_line.endswith("99.00%")
    assert "[0.6]*6+[0.8]*7" in out


def test_readme_densenet_command_as_json(capsys):
    code, out, _ = run(
        capsys, "--arch", "densenet_40", "-r", "8", "-cpr", "[0.]+[0.08]*6+[0.09]*6+[0.08]*26", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert (report["macs"], report["params"]) == (213_587_810, 745_468)
    assert report["input_size"] == [1, 3, 32, 32]
    assert report["convention"] == "reference"
    assert round(report["macs_reduction_percent"], 2) == 26.38  # the README's FLOPs_reduced
    assert round(report["params_reduction_percent"], 2) == 29.63
    baseline = count_complexity(create_model("densenet_40"), (3, 32, 32), convention="reference")
    assert (report["baseline_macs"], report["baseline_params"]) == (baseline.macs, baseline.params)


def test_convention_input_size_and_per_layer(capsys):
    code, out, _ = run(
        capsys, "--arch", "resnet_56", "--convention", "conv+linear", "--input-size", "16", "--per-layer", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["input_size"] == [1, 3, 16, 16]
    assert report["convention"] == "conv+linear"
    assert report["compress_rate"] is None and report["macs_reduction_percent"] == 0
    assert sum(row["macs"] for row in report["layers"]) == report["macs"]
    assert report["layers"][0] == {"name": "conv1", "type": "Conv2d", "macs": 16 * 16 * 16 * 27, "params": 432}


def test_per_layer_table(capsys):
    code, out, _ = run(capsys, "--arch", "resnet_56", "-r", "1", "--per-layer", "--input-size", "8")
    assert code == 0
    assert any(line.startswith("layer3.8.conv2.feature.pointwise") for line in out.splitlines())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "resnet_57"], "unknown model 'resnet_57'"),
        (["--arch", "resnet_56", "-cpr", "[0.1]*x"], "position 6"),
        (["--arch", "resnet_56", "-cpr", "[0.1]*3"], "needs 30 compress rates"),
        (["--arch", "resnet_56", "-r", "-1"], "-r/--rank must be in [0, 65,536], got -1"),
        # bounded before anything is built: this rank once allocated terabytes
        (["--arch", "resnet_56", "-r", "10000000"], "-r/--rank must be in [0, 65,536], got 10,000,000"),
        (["--arch", "resnet_56", "-cpr", "[0.1]*99999999999"], "more than 10,000 rates"),
        (["--arch", "resnet_56", "--input-size", "100000"], "--input-size must be in [1, 8,192]"),
        (["--arch", "resnet_56", "--input-size", "0"], "--input-size must be in [1, 8,192]"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("norton complexity: error: ") and message in err
    assert err.count("\n") == 1


def test_non_integer_rank_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as info:
        main(["complexity", "--arch", "resnet_56", "-r", "two"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err
