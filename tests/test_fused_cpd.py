"""The "fused" CPDBlock form (norton.deploy.fused_cpd): its Triton kernel equals the reference forms.

The kernel runs here through Triton's interpreter (``TRITON_INTERPRET=1``, which Triton reads
when a kernel is decorated), in a subprocess so that no other test imports an interpreted
Triton. Shapes stay tiny: the interpreter runs the kernel in numpy, one program at a time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import norton
from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.forms import RECORDED_FORMS, build_form, form_of
from norton.deploy.fused_cpd import FusedCPDConv, fused_available, kernel_runs_on
from norton.deploy.optimize import optimize_for_inference
from norton.errors import UserError

_INTERPRETED = r'''
import json, os
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from torch import nn
from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.forms import build_form
from norton.deploy.fused_cpd import FusedCPDConv, depthwise_rank_sum, kernel_runs_on
from norton.deploy.optimize import optimize_for_inference

torch.manual_seed(0)
results = {"runs_kernel": kernel_runs_on(torch.zeros(1)), "cases": []}
cases = [
    dict(c_in=5, n=6, rank=3, kernel_size=3, padding=1),
    dict(c_in=4, n=3, rank=2, kernel_size=3, stride=2, padding=1, bias=True),
    dict(c_in=3, n=5, rank=1, kernel_size=(3, 1), padding=(1, 0), dilation=(2, 1)),
    dict(c_in=4, n=4, rank=2, kernel_size=(1, 5), padding=(0, 2), stride=(1, 2), bias=True),
    dict(c_in=3, n=4, rank=2, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(c_in=6, n=40, rank=2, kernel_size=3, padding=0),  # more filters than one tile of 32
]
for case in cases:
    case = dict(case)
    block = CPDBlock(case.pop("c_in"), case.pop("n"), case.pop("rank"), **case).eval()
    if block.bias is not None:
        nn.init.normal_(block.bias)
    x = torch.randn(2, block.in_channels, 7, 9)
    fused = build_form(block, "fused")
    row = {"case": repr(case), "is_fused": type(fused) is FusedCPDConv}
    with torch.no_grad():
        for layout in ("contiguous", "channels_last"):
            xl = x.contiguous(memory_format=getattr(torch, "channels_last" if layout == "channels_last" else "contiguous_format"))
            out = fused(xl)
            row[layout + "_keeps_layout"] = out.is_contiguous(
                memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            for form in ("cpd", "merged", "grouped", "dense"):
                ref = build_form(block, form)(x)
                row[f"{layout}:{form}"] = ((out - ref).abs().max() / ref.abs().max()).item()
    results["cases"].append(row)

# the kernel alone on bfloat16 storage: float32 accumulation, one rounding at the end
y = torch.randn(2, 6, 5, 5)
w = torch.randn(6, 1, 3, 3)
reference = torch.nn.functional.conv2d(y, w, padding=1, groups=6).unflatten(1, (2, 3)).sum(1)
low = depthwise_rank_sum(y.bfloat16(), w.bfloat16(), None, 2, (1, 1), (1, 1), (1, 1))
results["bf16_dtype"] = str(low.dtype)
results["bf16_error"] = ((low.float() - reference).abs().max() / reference.abs().max()).item()

# the whole path: optimize_for_inference with every block fused, checked against the original
model = nn.Sequential(CPDBlock(3, 8, 2, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), CPDBlock(8, 4, 3, 3, stride=2))
with torch.no_grad():
    model[1].running_mean.normal_(); model[1].running_var.uniform_(0.5, 2.0)
model.eval()
x = torch.randn(2, 3, 8, 8)
fast = optimize_for_inference(model, x, forms=("fused",), measure=False)
with torch.no_grad():
    results["optimize_error"] = ((fast(x) - model(x)).abs().max() / model(x).abs().max()).item()
results["optimize_forms"] = sorted(set(fast.norton_plan[-1]["forms"].values()))
results["optimize_folded"] = fast.norton_plan[-1]["fold_bn"]
print("RESULT" + json.dumps(results))
'''


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow  # one interpreter subprocess for the three, ~10-30 s
def test_the_interpreted_kernel_equals_every_reference_form(interpreted):
    assert interpreted["runs_kernel"]  # the kernel ran, not the merged fallback
    assert len(interpreted["cases"]) == 6
    for row in interpreted["cases"]:
        assert row["is_fused"], row
        assert row["contiguous_keeps_layout"] and row["channels_last_keeps_layout"], row
        for key, value in row.items():
            if ":" in key:
                assert value < 1e-5, (row["case"], key, value)


@pytest.mark.slow  # one interpreter subprocess for the three, ~10-30 s
def test_the_kernel_accumulates_bfloat16_in_float32(interpreted):
    assert interpreted["bf16_dtype"] == "torch.bfloat16"
    # inputs rounded to bfloat16 (u = 2**-8) then one output rounding; a bfloat16 accumulator would be worse
    assert interpreted["bf16_error"] < 2e-2


@pytest.mark.slow  # one interpreter subprocess for the three, ~10-30 s
def test_optimize_for_inference_with_the_fused_form_passes_its_check(interpreted):
    assert interpreted["optimize_forms"] == ["fused"]
    assert interpreted["optimize_folded"] == [["0", "1"]]  # a BatchNorm folds into the fused form too
    assert interpreted["optimize_error"] < 1e-5


# ------------------------------------------------------------------ without the interpreter (this process)
def test_on_cpu_the_fused_form_computes_the_merged_form_and_is_not_offered():
    assert not fused_available("cpu") and not kernel_runs_on(torch.zeros(1))
    torch.manual_seed(1)
    block = CPDBlock(4, 6, 2, 3, padding=1, bias=True).eval()
    fused = build_form(block, "fused")
    assert isinstance(fused, FusedCPDConv) and form_of(fused) == "fused" and "fused" in RECORDED_FORMS
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(fused(x), build_form(block, "merged")(x))
    model = torch.nn.Sequential(block)
    with pytest.raises(UserError, match="'fused' form needs Triton and a CUDA device"):
        optimize_for_inference(model, x, forms=("fused",))
    chosen = optimize_for_inference(model, x, repeats=2).norton_plan[-1]["forms"]
    assert chosen["0"] != "fused"  # the default candidates on CPU leave it out


def test_a_model_saved_with_fused_layers_loads_and_runs_on_cpu(monkeypatch):
    # as if optimized on a GPU: allow the form here, the chooser then keeps it (the only candidate)
    monkeypatch.setattr("norton.deploy.fused_cpd.fused_available", lambda device: True)
    model = norton.create_model("resnet_20", rank=1).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = optimize_for_inference(model, x, forms=("fused", "dense"), measure=False)
    assert "fused" in fast.norton_plan[-1]["forms"].values()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fused.pt")
        norton.save(fast, path)
        loaded = norton.load(path)
    assert any(isinstance(m, FusedCPDConv) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
