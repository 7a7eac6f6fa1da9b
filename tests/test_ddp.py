"""Distributed data parallel on CPU: two gloo processes launched by torchrun."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

from norton.training.checkpoint import load_checkpoint
from norton.training.datasets import build_datasets
from norton.training.loaders import build_loaders
from norton.training.loop import evaluate

VAL_SIZE = 51  # odd: two shards of 26 and 25, where a padding sampler would count one image twice

SCRIPT = textwrap.dedent(
    f"""
    import json, sys
    import torch
    from torch import nn
    from norton.training.datasets import build_datasets
    from norton.training.distributed import cleanup_distributed, init_distributed
    from norton.training.loaders import build_loaders
    from norton.training.loop import fit


    def tiny_cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10))


    def main(output_dir):
        context = init_distributed("cpu")
        splits = build_datasets("synthetic", limit=64, val_size={VAL_SIZE})
        loaders = build_loaders(splits, batch_size=8)
        result = fit(tiny_cnn(), loaders, epochs=2, lr=0.05, device=context.device, output_dir=output_dir,
                     verbose=False, progress=False)
        with open(f"{{output_dir}}/rank{{context.rank}}.json", "w") as handle:
            json.dump({{"world_size": context.world_size, "backend": torch.distributed.get_backend(),
                       "result": result.to_dict()}}, handle)
        cleanup_distributed()


    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


@pytest.mark.slow
def test_two_process_gloo_run_counts_every_validation_image_once(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    assert ranks[0]["result"]["test"] == ranks[1]["result"]["test"]  # all-reduced: every rank sees the same
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs, test = lines[:-1], lines[-1]
    assert [line["val_samples"] for line in epochs] == [VAL_SIZE, VAL_SIZE]
    assert [line["train_samples"] for line in epochs] == [64, 64]
    assert test["test_samples"] == 64
    assert load_checkpoint(out / "last.pt")["recipe"]["world_size"] == 2

    # Rank 0 saved the model it evaluated: one process over the whole validation split agrees.
    best = load_checkpoint(out / "best.pt")
    model = runpy.run_path(str(script))["tiny_cnn"]()
    model.load_state_dict(best["model"]["state_dict"])
    splits = build_datasets("synthetic", limit=64, val_size=VAL_SIZE)
    single = evaluate(model, build_loaders(splits, batch_size=8).val, device="cpu")
    assert single["samples"] == VAL_SIZE
    assert single["top1"] == pytest.approx(best["metrics"]["val_top1"], abs=1e-9)
    assert single["loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)
    assert torch.is_tensor(best["model"]["state_dict"]["0.weight"])
