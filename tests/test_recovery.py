"""Tests for data-aware recovery: least-squares refits and BatchNorm re-estimation (norton.recovery, norton.layer_fit)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import norton
from norton import recovery
from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.layer_fit import Stats, cp_factor_system, dense_system, residual, ridge_solve
from norton.recovery import recalibrate_batchnorm, recover, refit_cp_blocks, refit_pruned_consumers

EXAMPLE = torch.zeros(1, 3, 16, 16)


def images(n: int, seed: int, size: int = 16) -> Tensor:
    """Natural-ish images: smooth (upsampled noise) with correlated colour channels ``(n, 3, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.randn(n, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear")
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.6, 0.5]])
    return torch.einsum("dc,nchw->ndhw", mix, low) + 0.05 * torch.randn(n, 3, size, size, generator=g)


def calibration(batches: int = 4, size: int = 16) -> list[Tensor]:
    return [images(32, seed, size) for seed in range(batches)]


HELD_OUT = images(64, 1234)  # never used for calibration


def tiny_net(seed: int = 0, decomposed: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    if decomposed:
        for index in (3, 6):
            model[index] = CPDBlock.from_conv(model[index], rank=3, seed=0)
    return recalibrate_batchnorm(model, calibration()).eval()  # realistic statistics


def outputs(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    found: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, y, n=n: found.setdefault(n, y)) for n in names]
    try:
        with torch.no_grad():
            found["logits"] = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def held_out_errors(original: nn.Module, compressed: nn.Module, names: list[str]) -> dict[str, float]:
    """Relative error of each layer's output (kept channels) and of the logits on held-out images."""
    removed = {}
    for record in getattr(compressed, "norton_plan", []):
        for name, idxs in record.get("removed", {}).items():
            removed[name] = idxs
    want, got = outputs(original, names, HELD_OUT), outputs(compressed, names, HELD_OUT)
    errors = {}
    for name in [*names, "logits"]:
        target = want[name]
        if name in removed:
            keep = torch.ones(target.shape[1], dtype=torch.bool)
            keep[removed[name]] = False
            target = target[:, keep]
        errors[name] = float((got[name] - target).norm() / target.norm())
    return errors


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------- pruned consumers
@pytest.mark.parametrize("decomposed", [False, True], ids=["conv", "cpd"])
def test_refit_lowers_held_out_error_of_every_pruned_consumer(decomposed):
    original = tiny_net(decomposed=decomposed)
    pruned = norton.prune(copy.deepcopy(original), EXAMPLE, ratio=0.5)
    refitted = copy.deepcopy(pruned)
    errors = refit_pruned_consumers(original, refitted, calibration())
    assert set(errors) == {"3", "6", "9"}  # the layers that lost input channels, the classifier included
    assert isinstance(refitted[3], CPDBlock) == decomposed and refitted[3].in_channels == 8  # structure kept
    before, after = held_out_errors(original, pruned, ["3", "6", "9"]), held_out_errors(original, refitted, ["3", "6", "9"])
    for name in ["3", "6", "9", "logits"]:
        assert after[name] < before[name], (name, before[name], after[name])
    assert after["logits"] < 0.6 * before["logits"]


def test_refit_on_a_zoo_resnet_lowers_held_out_error():
    torch.manual_seed(0)
    original = recalibrate_batchnorm(norton.create_model("resnet_20"), calibration(2)).eval()
    pruned = norton.prune(copy.deepcopy(original), EXAMPLE, ratio=0.5)
    refitted = copy.deepcopy(pruned)
    errors = refit_pruned_consumers(original, refitted, calibration(2), samples=4096)
    assert {"layer1.0.conv2", "layer3.2.conv2", "fc"} <= set(errors)
    names = ["layer2.1.conv2", "layer3.2.conv1"]
    before, after = held_out_errors(original, pruned, names), held_out_errors(original, refitted, names)
    for name in [*names, "logits"]:
        assert after[name] < before[name], (name, before[name], after[name])


def test_refit_with_explicit_layers_and_kept_outputs():
    original = tiny_net()
    pruned = copy.deepcopy(original)
    keep = [0, 2, 4, 6, 8, 10, 12, 14]
    with torch.no_grad():  # prune the outputs of conv 0 by hand, and the inputs of conv 3
        pruned[0] = nn.Conv2d(3, 8, 3, padding=1)
        pruned[0].weight.copy_(original[0].weight[keep])
        pruned[0].bias.copy_(original[0].bias[keep])
        pruned[1] = nn.BatchNorm2d(8).eval()
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(pruned[1], key).copy_(getattr(original[1], key)[keep])
        conv = nn.Conv2d(8, 16, 3, padding=1)
        conv.weight.copy_(original[3].weight[:, keep])
        conv.bias.copy_(original[3].bias)
        pruned[3] = conv
    baseline = copy.deepcopy(pruned)
    errors = refit_pruned_consumers(original, pruned, calibration(), layers=["3"])
    assert list(errors) == ["3"]
    assert held_out_errors(original, pruned, ["3"])["3"] < held_out_errors(original, baseline, ["3"])["3"]
    with pytest.raises(UserError, match="cannot tell which of the 16 output channels"):
        refit_pruned_consumers(original, copy.deepcopy(baseline), calibration(), layers=["0"])
    refit_pruned_consumers(original, baseline, calibration(), layers=["0"], kept_outputs={"0": keep})
    want, got = outputs(original, ["0"], HELD_OUT)["0"][:, keep], outputs(baseline, ["0"], HELD_OUT)["0"]
    assert (got - want).norm() < 1e-3 * want.norm()  # the kept filters reproduce themselves


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda o, p: refit_pruned_consumers(o, p, []), "non-empty list of input tensors"),
        (lambda o, p: refit_pruned_consumers(o, p, [torch.randn(2, 3, 16, 16)], ridge=0), "ridge must be positive"),
        (lambda o, p: refit_pruned_consumers(o, p, [torch.randn(2, 3, 16, 16)], layers=["nope"]), "not a layer of both"),
        (lambda o, p: refit_pruned_consumers(o, p, [torch.randn(2, 3, 16, 16)], layers=["1"]), "cannot be refitted"),
        (lambda o, p: refit_cp_blocks(o, p, [torch.randn(2, 3, 16, 16)], samples=0), "samples must be"),
        (lambda o, p: recover(o, p, None), "non-empty list of input tensors"),
    ],
)
def test_bad_arguments_are_one_line_and_change_nothing(call, message):
    original = tiny_net()
    pruned = norton.prune(copy.deepcopy(original), EXAMPLE, ratio=0.5)
    kept = state(pruned)
    with pytest.raises(UserError) as error:
        call(original, pruned)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert all(torch.equal(kept[k], v) for k, v in pruned.state_dict().items())


# ----------------------------------------------------------------- CP blocks
def _decomposed(original: nn.Module, rank: int) -> nn.Module:
    decomposed = copy.deepcopy(original)
    decomposed[3] = CPDBlock.from_conv(original[3], rank=rank, seed=0)  # the kernel-only fit
    return decomposed


def test_cp_refit_beats_the_kernel_only_fit_on_held_out_inputs():
    original = tiny_net()
    kernel_only = _decomposed(original, rank=2)
    refitted = copy.deepcopy(kernel_only)
    errors = refit_cp_blocks(original, refitted, calibration())
    assert list(errors) == ["3"]
    before, after = held_out_errors(original, kernel_only, ["3"]), held_out_errors(original, refitted, ["3"])
    assert after["3"] < 0.9 * before["3"] and after["logits"] < before["logits"]
    assert refitted[3].rank == 2 and refitted[3].out_channels == 16  # same structure


@pytest.mark.parametrize(("block", "rank"), [("Tucker2Conv", (4, 4)), ("LayerCPConv", 6), ("SpatialSVDConv", 4)])
def test_the_last_layer_of_other_blocks_is_refitted(block, rank):
    from norton.decomposition import layer_cp_conv, low_rank_layers, tucker2_conv

    cls = {"Tucker2Conv": tucker2_conv.Tucker2Conv, "LayerCPConv": layer_cp_conv.LayerCPConv,
           "SpatialSVDConv": low_rank_layers.SpatialSVDConv}[block]
    original = tiny_net()
    kernel_only = copy.deepcopy(original)
    kernel_only[3] = cls.from_conv(original[3], rank)
    refitted = copy.deepcopy(kernel_only)
    errors = refit_cp_blocks(original, refitted, calibration())
    assert list(errors) == ["3"]
    before, after = held_out_errors(original, kernel_only, ["3"]), held_out_errors(original, refitted, ["3"])
    assert after["3"] < before["3"] and after["logits"] < before["logits"]
    assert torch.equal(refitted[3].first.weight if block != "SpatialSVDConv" else refitted[3].vertical.weight,
                       kernel_only[3].first.weight if block != "SpatialSVDConv" else kernel_only[3].vertical.weight)


def test_more_alternating_rounds_never_raise_the_calibration_error():
    original = tiny_net()
    errors = [refit_cp_blocks(original, _decomposed(original, rank=2), calibration(2), rounds=r)["3"] for r in (1, 2, 3)]
    assert errors[0] >= errors[1] >= errors[2]


def test_cp_systems_match_explicit_design_matrices():
    g = torch.Generator().manual_seed(0)
    n, c, r, kh, kw, s = 5, 4, 3, 3, 2, 200
    x = torch.randn(s, c * kh * kw, dtype=torch.float64, generator=g)
    y = torch.randn(s, n, dtype=torch.float64, generator=g)
    stats = Stats.zeros(c * kh * kw, n, device=torch.device("cpu"), dtype=torch.float64)
    stats.add(x[:150], y[:150])
    stats.add(x[150:], y[150:])  # accumulation over batches
    head, body, tail = (torch.randn(n, d, r, dtype=torch.float64, generator=g) for d in (c, kh, kw))
    patches = x.view(s, c, kh, kw)
    designs = [  # (N, S, D): the output of filter n is designs[mode][n] @ factor[n].flatten()
        torch.einsum("scij,nir,njr->nscr", patches, body, tail),
        torch.einsum("scij,ncr,njr->nsir", patches, head, tail),
        torch.einsum("scij,ncr,nir->nsjr", patches, head, body),
    ]
    for mode, design in enumerate(designs):
        z = design.reshape(n, s, -1)
        gram, lin, rhs = cp_factor_system(stats, (head, body, tail), mode, (kh, kw))
        torch.testing.assert_close(gram, z.mT @ z)
        torch.testing.assert_close(lin, z.sum(1))
        torch.testing.assert_close(rhs, torch.einsum("nsd,sn->nd", z, y))
    # a tiny ridge solves ordinary least squares with a bias column
    theta, beta = ridge_solve(*dense_system(stats), stats, torch.zeros(n, c * kh * kw, dtype=torch.float64),
                              torch.zeros(n, dtype=torch.float64), 1e-12, select=False)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(s, 1, dtype=torch.float64)], 1), y).solution.T
    torch.testing.assert_close(theta, solution[:, :-1])
    torch.testing.assert_close(beta, solution[:, -1])
    expected = (x @ theta.T + beta - y).square().sum(0)
    torch.testing.assert_close(residual(*dense_system(stats), stats, theta, beta), expected)


# ----------------------------------------------------------------- BatchNorm and recover
def test_batchnorm_reestimation_matches_statistics_computed_directly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    model.train()
    batches = calibration(3)
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        features = [model[0](x) for x in batches]  # dropout off: the BatchNorm sees the conv's output
    means = torch.stack([f.mean((0, 2, 3)) for f in features])
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in features])  # unbiased, per batch
    norm = model[2]
    torch.testing.assert_close(norm.running_mean, means.mean(0))
    torch.testing.assert_close(norm.running_var, variances.mean(0))
    assert norm.momentum == 0.3 and int(norm.num_batches_tracked) == 3
    assert all(m.training for m in model.modules())  # modes restored


def test_recover_refits_consumers_and_blocks_in_one_pass_then_batchnorm():
    original = tiny_net()
    compressed = norton.prune(copy.deepcopy(original), EXAMPLE, ratio=0.5)
    compressed[6] = CPDBlock.from_conv(compressed[6], rank=2, seed=0)  # pruned, then decomposed
    untouched = copy.deepcopy(compressed)
    report = recover(original, compressed, calibration())
    assert report["images"] == 128 and report["batchnorms"] == 2
    assert set(report["layers"]) == {"3", "6", "9"}
    assert all(e["after"] < e["before"] for e in report["layers"].values())
    errors = held_out_errors(original, compressed, ["9"])
    assert errors["logits"] < held_out_errors(original, untouched, ["9"])["logits"]


# ----------------------------------------------------------------- one pass == per-layer reference
def reference_refit(
    original: nn.Module, compressed: nn.Module, inputs: list[Tensor], names: list[str], samples: int = 8192,
) -> dict[str, float]:
    """The refit done the slow, obvious way: per layer, full forwards of every batch, patches by ``F.unfold``.

    Same sampling rule as norton.recovery (seeded draws in the order the original's forward
    reaches the layers, ``ceil(samples / images)`` positions per image) and the same solver.
    """
    from norton.recovery import _solve_layer

    per_image = math.ceil(samples / sum(x.shape[0] for x in inputs))
    generator = torch.Generator().manual_seed(0)
    positions: dict[str, list[Tensor]] = {n: [] for n in names}
    wanted: dict[str, list[Tensor]] = {n: [] for n in names}
    order: list[str] = []

    def take(t: Tensor, p: Tensor) -> Tensor:  # t (B, L, D), p (B, P) -> (B * P, D)
        return t[torch.arange(t.shape[0]).unsqueeze(1), p].reshape(-1, t.shape[-1])

    def record(name: str):
        def hook(module, args, y):
            if name not in order:
                order.append(name)
            seq = y.flatten(2).transpose(1, 2) if y.ndim == 4 else y.unsqueeze(1)  # (B, L, N)
            p = torch.rand(seq.shape[0], seq.shape[1], generator=generator).argsort(1)[:, : min(per_image, seq.shape[1])]
            positions[name].append(p)
            wanted[name].append(take(seq, p))
        return hook

    old, new = dict(original.named_modules()), dict(compressed.named_modules())
    handles = [old[n].register_forward_hook(record(n)) for n in names]
    with torch.no_grad():
        for x in inputs:
            original.eval()(x)
    for handle in handles:
        handle.remove()
    removed: dict[str, list[int]] = {}
    for record_ in getattr(compressed, "norton_plan", [])[len(getattr(original, "norton_plan", [])):]:
        removed.update(record_.get("removed", {}))
    errors = {}
    captured: list[Tensor] = []
    for name in order:
        layer = new[name]
        handle = layer.register_forward_hook(lambda m, args, y: captured.append(args[0]))
        stats = None
        with torch.no_grad():
            for x, p, y in zip(inputs, positions[name], wanted[name], strict=True):
                captured.clear()
                compressed.eval()(x)
                if isinstance(layer, nn.Linear):
                    patches = captured[0].unsqueeze(1)  # (B, 1, in)
                else:
                    patches = F.unfold(captured[0], layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                       stride=layer.stride).transpose(1, 2)  # (B, L, C k_h k_w)
                features = take(patches, p)
                if stats is None:
                    stats = Stats.zeros(features.shape[1], y.shape[1], device=torch.device("cpu"), dtype=torch.float64)
                stats.add(features, y)
        handle.remove()
        if name in removed:
            keep = torch.ones(stats.cross.shape[0], dtype=torch.bool)
            keep[removed[name]] = False
            stats = stats.outputs(keep.nonzero().squeeze(1))
        errors[name] = _solve_layer(layer, stats, 1e-4, 1)[1]
    return errors


def assert_same_refit(ours: nn.Module, theirs: nn.Module, errors: dict[str, float], expected: dict[str, float]) -> None:
    assert list(errors) == list(expected)
    for name in errors:
        assert errors[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, theirs_state[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("kind", ["conv", "cpd", "resnet"])
def test_one_pass_refit_matches_a_per_layer_reference(kind):
    if kind == "resnet":
        torch.manual_seed(0)
        original = recalibrate_batchnorm(norton.create_model("resnet_20"), calibration(2)).eval()
    else:
        original = tiny_net(decomposed=kind == "cpd")
    pruned = norton.prune(copy.deepcopy(original), EXAMPLE, ratio=0.5)
    ours, theirs = copy.deepcopy(pruned), copy.deepcopy(pruned)
    errors = refit_pruned_consumers(original, ours, calibration(), samples=2048)
    expected = reference_refit(original, theirs, calibration(), list(errors), samples=2048)
    assert len(errors) >= (19 if kind == "resnet" else 3)
    assert_same_refit(ours, theirs, errors, expected)


def test_cp_refit_and_the_per_layer_fallback_give_the_one_pass_result(monkeypatch):
    original = tiny_net()
    compressed = norton.prune(copy.deepcopy(original), EXAMPLE, ratio=0.5)
    compressed[6] = CPDBlock.from_conv(compressed[6], rank=2, seed=0)
    ours, theirs, fallback = copy.deepcopy(compressed), copy.deepcopy(compressed), copy.deepcopy(compressed)
    report = recover(original, ours, calibration(), batchnorm=False)
    errors = {name: e["after"] for name, e in report["layers"].items()}
    assert_same_refit(ours, theirs, errors, reference_refit(original, theirs, calibration(), list(errors)))
    monkeypatch.setattr(recovery, "_ONE_PASS_BYTES", 0)  # activations "too big": one partial forward per layer
    report = recover(original, fallback, calibration(), batchnorm=False)
    assert_same_refit(ours, fallback, errors, {name: e["after"] for name, e in report["layers"].items()})


def test_eigh_runs_single_threaded_and_the_thread_count_is_restored():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 5, dtype=torch.float64, generator=g), torch.randn(64, 3, dtype=torch.float64, generator=g)
        stats = Stats.zeros(5, 3, device=torch.device("cpu"), dtype=torch.float64)
        stats.add(x, y)
        ridge_solve(*dense_system(stats), stats, torch.zeros(3, 5, dtype=torch.float64), None, 1e-4)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
