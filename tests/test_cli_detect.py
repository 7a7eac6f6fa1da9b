"""``norton detect``: the subcommands end to end on tiny data, the demo's quick run, one-line errors."""
from __future__ import annotations

import json
import time

import pytest
import torch

import norton
from norton.cli.main import main
from norton.serialization import load_model_file


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["detect", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """4 training and 2 validation 64-px images of the Fashion-MNIST detection set."""
    root = tmp_path_factory.mktemp("detect") / "data"
    assert main(["detect", "make-demo-data", str(root), "--train-images", "4", "--val-images", "2",
                 "--canvas", "64"]) == 0
    return root


def test_make_demo_data_writes_the_coco_layout(demo_data):
    for name in ("instances_train2017.json", "instances_val2017.json", "person_keypoints_val2017.json"):
        assert (demo_data / "annotations" / name).is_file()
    images = json.loads((demo_data / "annotations" / "instances_train2017.json").read_text())["images"]
    assert len(images) == 4 and all((demo_data / "train2017" / image["file_name"]).is_file() for image in images)


@pytest.mark.slow
def test_train_evaluate_visualize(capsys, demo_data, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--model", "fasterrcnn_resnet18_fpn", "--data", demo_data, "--epochs", 1,
                          "--batch-size", 2, "--workers", 0, "--min-size", 64, "--max-size", 64, "--out", out,
                          "--device", "cpu", "--no-progress")
    assert code == 0, stdout
    assert "best epoch 1" in stdout
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    assert checkpoint["args"]["category_names"][1] == "T-shirt/top"

    code, stdout, _ = run(capsys, "evaluate", "--checkpoint", out / "best.pt", "--data", demo_data, "--workers", 0,
                          "--size", 64, "--json", tmp_path / "metrics.json", "--device", "cpu")
    assert code == 0
    assert "AR100" in stdout and "MACs" in stdout and "Params" in stdout
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report["metrics"]["bbox"]) >= {"AP", "AP50", "AP75", "AR100"}
    total = sum(p.numel() for p in load_model_file(out / "best.pt")[0].parameters())
    assert 0.9 * total < report["params"] <= total and report["macs"] > 0

    code, stdout, _ = run(capsys, "visualize", "--baseline", out / "best.pt", "--compressed", out / "best.pt",
                          "--input", demo_data / "val2017", "--out", tmp_path / "frames", "--limit", 1,
                          "--device", "cpu")
    assert code == 0, stdout
    assert (tmp_path / "frames" / "side_by_side.gif").is_file()


@pytest.mark.slow
def test_demo_quick_end_to_end_and_rerun_reuses_the_stages(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, _ = run(capsys, "demo", "--quick", "--out", out, "--device", "cpu", "--no-progress")
    assert code == 0
    assert "| baseline " in stdout and "| compressed " in stdout and "FPS" in stdout
    for name in ("baseline.pt", "compressed.pt", "results.json", "summary.json", "side_by_side/side_by_side.gif"):
        assert (out / name).is_file(), name
    baseline, compressed = norton.load(out / "baseline.pt"), norton.load(out / "compressed.pt")
    assert [record["op"] for record in compressed.norton_plan] == ["decompose", "prune"]
    assert sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in baseline.parameters())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["compressed"]["macs"] < summary["results"]["baseline"]["macs"]
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        assert set(compressed(images)[0]) == {"boxes", "labels", "scores"}

    stamp = (out / "compressed.pt").stat().st_mtime_ns
    started = time.perf_counter()
    code, second, _ = run(capsys, "demo", "--quick", "--out", out, "--device", "cpu", "--no-progress")
    assert code == 0 and (out / "compressed.pt").stat().st_mtime_ns == stamp  # nothing retrained
    assert time.perf_counter() - started < summary["seconds"]
    assert second.splitlines()[2:4] == stdout.splitlines()[2:4]  # the same table rows (cached results)

    code, _, err = run(capsys, "demo", "--out", out)  # the full demo in the quick demo's folder
    assert code == 2 and "other settings" in err


@pytest.mark.slow
def test_compress_a_detector_in_stages_then_resume(capsys, demo_data, tmp_path):
    torch.manual_seed(0)
    model = norton.create_model("fasterrcnn_resnet18_fpn", num_classes=11, min_size=64, max_size=64)
    norton.save(model, tmp_path / "baseline.pt")
    out = tmp_path / "compressed"
    argv = ["compress", "--model", tmp_path / "baseline.pt", "--data", demo_data, "-r", 1, "--ratio", 0.3,
            "--decompose-epochs", 1, "--prune-epochs", 0, "--size", 64, "--workers", 0, "--out", out,
            "--device", "cpu", "--no-progress"]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0, stdout
    assert "| decomposed " in stdout and "| pruned " in stdout
    summary = json.loads((out / "summary.json").read_text())
    names = [stage["name"] for stage in summary["stages"]]
    assert names == ["baseline", "decomposed", "pruned"]
    assert all("AP" in stage and "bbox" in stage["coco"] for stage in summary["stages"])
    assert summary["stages"][2]["params"] < summary["stages"][1]["params"] < summary["stages"][0]["params"]
    assert "validation_AP_before_finetune" in summary["stages"][1]
    compressed = norton.load(out / "compressed.pt")
    assert [record["op"] for record in compressed.norton_plan] == ["decompose", "prune"]
    assert (out / "decomposed" / "best.pt").is_file()  # the fine-tuning run's checkpoints

    stamp = (out / "pruned" / "final.pt").stat().st_mtime_ns
    code, again, _ = run(capsys, *argv, "--resume")
    assert code == 0 and "finished in an earlier run" in again
    assert (out / "pruned" / "final.pt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(("argv", "message"), [
    (["compress", "--model", "{tmp}/classifier.pt", "--data", "{data}", "-r", "1"], "not a detector"),
    (["compress", "--model", "{tmp}/detector.pt", "--data", "{data}", "--target-macs", "0.5", "--parts", "rpn",
      "--out", "{tmp}/none"], "not its rpn"),
    (["compress", "--model", "{tmp}/detector.pt", "--data", "{data}", "-r", "1", "--parts", "wheel",
      "--out", "{tmp}/none"], "unknown detector part 'wheel'"),
    (["compress", "--model", "{tmp}/detector.pt", "--data", "{data}", "--target-macs", "1.5",
      "--out", "{tmp}/none"], "target_macs"),
    (["train", "--model", "nope_fpn", "--data", "{data}"], "unknown detector 'nope_fpn'"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{tmp}/missing"], "is not a folder"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{data}", "--epochs", "0"], "epochs"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{data}", "--epochs", "4", "--lr-steps", "5"],
     "lr step"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{data}", "--lr", "nan"], "learning rate"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{data}", "--batch-size", "0"], "batch_size"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{data}", "--amp", "--device", "cpu"], "needs a CUDA"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{data}", "--resume", "--out", "{tmp}/none"],
     "nothing to resume"),
    (["train", "--model", "fasterrcnn_resnet18_fpn", "--data", "{tmp}"], "annotations"),
    (["evaluate", "--checkpoint", "{tmp}/missing.pt", "--data", "{data}"], "not found"),
    (["evaluate", "--checkpoint", "{tmp}/classifier.pt", "--data", "{data}"], "not a detector"),
    (["visualize", "--baseline", "{tmp}/classifier.pt", "--compressed", "{tmp}/classifier.pt",
      "--input", "{tmp}/missing", "--out", "{tmp}/frames"], "--input"),
    (["make-demo-data", "{tmp}/d", "--canvas", "0"], "--canvas"),
    (["demo", "--out", "{tmp}/classifier.pt"], "is a file"),
])
def test_mistakes_are_one_line_and_exit_code_2(capsys, demo_data, tmp_path, argv, message):
    from norton.models import create_model

    norton.save(create_model("resnet_20"), tmp_path / "classifier.pt")
    if "{tmp}/detector.pt" in argv:
        norton.save(create_model("fasterrcnn_resnet18_fpn", num_classes=11, min_size=64, max_size=64),
                    tmp_path / "detector.pt")
    argv = [word.format(data=demo_data, tmp=tmp_path) for word in argv]
    code, stdout, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("norton detect: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "none").exists() and not (tmp_path / "d").exists()


def test_detect_without_a_subcommand_prints_help(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "make-demo-data" in err
