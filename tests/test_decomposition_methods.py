"""Contract tests every decomposition method passes, as CPDBlock does: equivalence, complexity, pruning,
export, save/load and bad input, on the zoo's CIFAR ResNet-20 and a torchvision ResNet-18 (tiny inputs)."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import norton
from norton.complexity import count_complexity, cpd_block_macs
from norton.decomposition.cpd_block import CPDBlock
from norton.decomposition.decompose import decompose, eligible_convs, replay_decompose
from norton.decomposition.factorized import FactorizedConv, chain_macs
from norton.decomposition.low_rank_layers import LowRankLinear
from norton.decomposition.methods import METHODS, get_method, is_block
from norton.deploy.export import export_onnx, export_torchscript
from norton.errors import UserError
from norton.example_inputs import module_input_shapes

METHOD_NAMES = list(METHODS)
X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return norton.create_model("resnet_20").eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def small_rank(method: str):
    """A rule giving every layer a small valid rank of ``method`` (at most 4 per mode)."""
    spec = get_method(method)

    def rule(name, layer):
        full = spec.full_rank(layer)
        return (min(4, full[0]), min(4, full[1])) if isinstance(full, tuple) else min(4, full)
    return rule


def decomposed(build, method: str) -> nn.Module:
    model = build()
    decompose(model, small_rank(method), method=method, n_iter_max=5, progress=False)
    return model


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every block replaced by its reconstructed dense layer."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, (CPDBlock, FactorizedConv)):
            dense.set_submodule(name, module.to_conv())
        elif isinstance(module, LowRankLinear):
            dense.set_submodule(name, module.to_linear())
    return dense


def blocks_of(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_block(m)}


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("method, build", [
    *((method, resnet20) for method in METHOD_NAMES),
    *((method, resnet18) for method in METHOD_NAMES if method != "svd"),
    pytest.param("svd", resnet18, marks=pytest.mark.slow),  # ~13 s: full SVDs of 512-channel kernels
])
def test_every_block_computes_the_conv_by_its_reconstructed_kernel(build, method):
    model = decomposed(build, method)
    eligible = eligible_convs(build(), method=method)
    assert set(blocks_of(model)) == set(eligible) and eligible
    expected = dense_equivalent(model)(X)
    torch.testing.assert_close(model(X), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for b in blocks_of(model).values() for m in b.children()
               if not isinstance(b, CPDBlock))


@pytest.mark.parametrize("method", ["tucker2", "svd"])
def test_full_rank_is_exact(method):
    model = resnet20()
    expected = model(X)
    spec = get_method(method)
    decompose(model, lambda name, layer: spec.full_rank(layer), method=method, n_iter_max=3, progress=False)
    torch.testing.assert_close(model(X), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_layer_cp_recovers_a_planted_rank():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        factors = [torch.randn(d, 2, generator=g) for d in (5, 6, 3, 3)]
        conv.weight.copy_(torch.einsum("nr,cr,ir,jr->ncij", *factors))
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 6, 8, 8, generator=g)
    expected = model(x)
    _, report = decompose(model, 2, method="cp-layer", n_iter_max=500, tol=1e-12, progress=False, return_report=True)
    assert report[0].max_error < 1e-3
    torch.testing.assert_close(model(x), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


# ------------------------------------------------------------------ complexity
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_count_complexity_equals_the_closed_form_in_both_conventions(method):
    model = decomposed(resnet20, method)
    blocks = blocks_of(model)
    shapes = module_input_shapes(model, blocks, X, eval_mode=True)
    for name, block in blocks.items():
        shape = shapes[name]
        if isinstance(block, CPDBlock):
            closed = cpd_block_macs(block, shape[-2:])
        elif isinstance(block, LowRankLinear):
            closed = block.rank * (block.in_features + block.out_features)
        else:
            closed = chain_macs(block, shape[-2:])
        params = sum(p.numel() for p in block.parameters())
        for convention in ("conv+linear", "reference"):
            counted = count_complexity(block, tuple(shape), convention=convention)
            assert counted.macs == closed, (name, convention)
            if not isinstance(block, CPDBlock):  # thop skips a CPDBlock's own bias (see complexity.py)
                assert counted.params == params, (name, convention)
    whole = count_complexity(model, example_inputs=X, per_layer=True)
    assert whole.macs < count_complexity(resnet20(), example_inputs=X).macs


# ------------------------------------------------------------------ pruning
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("criterion", ["l1", "pabs"])
def test_pruning_removes_block_outputs_and_inputs_and_round_trips(method, criterion, tmp_path):
    model = decomposed(resnet20, method)
    before = {name: (b.in_channels if not isinstance(b, LowRankLinear) else b.in_features)
              for name, b in blocks_of(model).items()}
    pruned = norton.prune(copy.deepcopy(model), X, ratio=0.5, criterion=criterion)
    block = pruned.get_submodule("layer1.0.conv1")
    assert block.out_channels == 8  # its own filters: 16 -> 8
    assert block.rank == model.get_submodule("layer1.0.conv1").rank  # rank channels are the decomposition's
    assert pruned.get_submodule("layer1.0.conv2").in_channels == 8  # its predecessor was pruned
    assert any(b.in_channels < before[name] for name, b in blocks_of(pruned).items()
               if not isinstance(b, LowRankLinear))
    y = pruned(X)
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    torch.testing.assert_close(dense_equivalent(pruned)(X), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    norton.save(pruned, tmp_path / "m.pt")
    loaded = norton.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded.eval()(X), y, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tucker2", "cp-layer", "svd"])
def test_rank_channels_are_protected_groups(method):
    model = decomposed(resnet20, method)
    groups = norton.coupled_groups(model, X)
    inner = [g for g in groups if g.protected and g.protected.startswith("rank channels")]
    assert inner and all(g.layers[0].rpartition(".")[0] in blocks_of(model) for g in inner)


@pytest.mark.parametrize("method", ["tucker2", "cp-layer", "svd"])
def test_prune_ranks_shrinks_every_rank_with_the_widths_and_round_trips(method, tmp_path):
    model = decomposed(resnet20, method)
    pruned = norton.prune(copy.deepcopy(model), X, ratio=0.5, criterion="l1", prune_ranks=True)
    for name, block in blocks_of(pruned).items():
        if isinstance(block, LowRankLinear):
            continue
        before, after = model.get_submodule(name).rank, block.rank
        pairs = zip(before, after, strict=True) if isinstance(before, tuple) else [(before, after)]
        assert all(a == max(1, int(b * 0.5)) for b, a in pairs), (name, before, after)
    y = pruned(X)
    torch.testing.assert_close(dense_equivalent(pruned)(X), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    assert pruned.norton_plan[-1]["prune_ranks"] is True
    norton.save(pruned, tmp_path / "m.pt")
    torch.testing.assert_close(norton.load(tmp_path / "m.pt").eval()(X), y, rtol=0, atol=0)


def test_a_target_only_pruned_ranks_reach_is_met_with_prune_ranks_and_explained_without():
    model = resnet20()
    full = get_method("tucker2").full_rank
    decompose(model, lambda name, layer: full(layer), method="tucker2", n_iter_max=2, progress=False)
    original = count_complexity(resnet20(), example_inputs=X).macs
    untouched = copy.deepcopy(model)
    with pytest.raises(UserError, match=r"prune_ranks=True \(--prune-ranks\) prunes the decomposed blocks' ranks"):
        norton.prune(model, X, target_macs=0.3, criterion="l1")
    assert str(model) == str(untouched)  # a refused prune leaves the model as it was
    pruned = norton.prune(model, X, target_macs=0.3, criterion="l1", prune_ranks=True)
    assert count_complexity(pruned, example_inputs=X).macs == pytest.approx(0.3 * original, rel=0.02)


@pytest.mark.parametrize("amount", [{"ratio": {"layer1.*": 0.5}}, {"compress_rate": "[0.5]*9"}])
def test_prune_ranks_with_per_layer_amounts_is_refused(amount):
    with pytest.raises(UserError, match="prune_ranks applies to a single ratio and to target_macs"):
        norton.prune(decomposed(resnet20, "svd"), X, prune_ranks=True, **amount)


def test_ratio_and_compress_rate_name_a_decomposed_block_by_its_own_name():
    model = decomposed(resnet20, "tucker2")
    pruned = norton.prune(copy.deepcopy(model), X, ratio={"layer1.0.conv1": 0.5}, criterion="l1")
    assert pruned.get_submodule("layer1.0.conv1").out_channels == 8
    rates = "[0.]*3+[0.5]*9"  # ResNet-20: stem and two stage widths kept, every block's inner width halved
    target = norton.create_model("resnet_20", compress_rate=rates)
    pruned = norton.prune(copy.deepcopy(model), X, compress_rate=rates, criterion="l1")
    for name, module in target.named_modules():
        if isinstance(module, nn.Conv2d) and isinstance(pruned.get_submodule(name), FactorizedConv):
            assert pruned.get_submodule(name).out_channels == module.out_channels


# ------------------------------------------------------------------ deploy and export
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_optimize_folds_batchnorms_into_blocks_and_replays(method, tmp_path):
    model = decomposed(resnet20, method)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics, so folding matters
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    optimized = norton.optimize_for_inference(model, X, measure=False)
    record = optimized.norton_plan[-1]
    assert len(record["fold_bn"]) == 19
    assert set(record["forms"]) == set(blocks_of(model))
    torch.testing.assert_close(optimized(X), model(X), rtol=1e-4, atol=1e-4 * model(X).abs().max().item())
    norton.save(optimized, tmp_path / "o.pt")
    torch.testing.assert_close(norton.load(tmp_path / "o.pt")(X), optimized(X), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tucker2", "cp-layer", "svd"])
def test_measured_forms_of_layer_blocks_are_factored_or_dense(method):
    optimized = norton.optimize_for_inference(decomposed(resnet20, method), X, repeats=2, memory_format="contiguous")
    forms = optimized.norton_plan[-1]["forms"]
    assert forms and set(forms.values()) <= {"factored", "dense"}
    dense_only = norton.optimize_for_inference(decomposed(resnet20, method), X, forms=("dense",), measure=False)
    assert set(dense_only.norton_plan[-1]["forms"].values()) == {"dense"}
    assert not blocks_of(dense_only)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_onnx_and_torchscript_exports_match_eager(method, tmp_path):
    pytest.importorskip("onnx")
    model = decomposed(resnet20, method)
    assert export_onnx(model, tmp_path / "m.onnx", X).max_relative_difference is not None
    export_torchscript(model, tmp_path / "m.pt", X)  # traced: the zoo's ResNet itself is not scriptable
    if method != "cp-filter":  # the blocks themselves compile with torch.jit.script too
        block = model.get_submodule("layer1.0.conv1")
        export_torchscript(block, tmp_path / "block.pt", torch.randn(1, 16, 8, 8), method="script")


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method, rank, message", [
    ("tucker2", 0, "rank must be a positive integer"),
    ("tucker2", {"layer1.0.conv1": (17, 2)}, "above the full Tucker-2 rank"),
    ("cp-layer", {"layer1.0.conv1": 10**4}, "above the full rank"),
    ("svd", {"fc": 11}, "above the full rank 10"),
    ("svd", (2, 2), "pair of ranks"),
    ("qr", 2, "unknown decomposition method 'qr'"),
    ("cp-layer", "8", "pass the int 8"),
    ("cp-filter", 10, r"use <= 9, or leave the layer dense with exclude=\['conv1'\]"),  # the RGB stem: 3 x 3
])
def test_bad_input_is_one_line_and_leaves_the_model_untouched(method, rank, message):
    model = resnet20()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=message) as info:
        decompose(model, rank, method=method, progress=False)
    assert "\n" not in str(info.value)
    assert not blocks_of(model) and not hasattr(model, "norton_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method, rank", [("tucker2", (0, 2)), ("cp-layer", -1), ("tucker2", (17, 2, 3))])
def test_a_rank_no_layer_can_hold_gets_no_exclude_hint(method, rank):
    # the hint fits a rank too high for one small layer only; a bad value is bad for every layer
    with pytest.raises(UserError) as info:
        decompose(resnet20(), rank, method=method, progress=False)
    assert "exclude=" not in str(info.value)


def test_a_record_naming_an_unknown_method_or_a_wrong_layer_is_refused():
    with pytest.raises(UserError, match="unknown decomposition method"):
        replay_decompose(resnet20(), {"op": "decompose", "method": "qr", "ranks": {"layer1.0.conv1": 2}})
    with pytest.raises(UserError, match="does not take"):
        replay_decompose(resnet20(), {"op": "decompose", "method": "tucker2", "ranks": {"fc": [2, 2]}})


# ------------------------------------------------------------------ rank selection through the registry
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_macs_spec_picks_the_highest_rank_within_the_fraction(method):
    conv, hw = nn.Conv2d(64, 64, 3, padding=1), (8, 8)
    spec = get_method(method)
    rank = spec.select_rank(conv, "macs", 0.5, hw)
    dense = 64 * 64 * 9 * 64
    assert spec.block_macs(conv, rank, hw) <= 0.5 * dense
    higher = spec.candidates(conv)[spec.candidates(conv).index(rank) + 1]
    assert spec.block_macs(conv, higher, hw) > 0.5 * dense


def test_macs_spec_needs_example_inputs_and_max_error_is_cp_filter_only():
    from norton.decomposition.decompose import MaxError

    with pytest.raises(UserError, match="needs example_inputs"):
        decompose(resnet20(), "macs:0.5", method="tucker2", progress=False)
    with pytest.raises(UserError, match="cp-filter only"):
        decompose(resnet20(), MaxError(0.1), method="svd", progress=False)


def test_energy_and_vbmf_find_a_planted_rank():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 30)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(30, 3, generator=g) @ torch.randn(3, 40, generator=g))
    svd = get_method("svd")
    assert svd.select_rank(linear, "energy", 0.999999, None) == 3
    noisy = nn.Linear(40, 30)
    with torch.no_grad():
        noisy.weight.copy_(linear.weight + 0.01 * torch.randn(30, 40, generator=g))
    assert svd.select_rank(noisy, "vbmf", None, None) == 3
    # Tucker-2: a kernel of multilinear rank (R1, R2) = (3, 5) in its (input, output) channel modes
    core = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    first, last = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(16, 12, 3).double()
    with torch.no_grad():
        weight = torch.einsum("nq,qpij,cp->ncij", last, core, first)
        conv.weight.copy_(weight + 1e-3 * weight.std() * torch.randn(weight.shape, generator=g, dtype=torch.float64))
    assert get_method("tucker2").select_rank(conv, "vbmf", None, None) == (3, 5)
    assert get_method("tucker2").select_rank(conv, "energy", 0.9999, None) == (3, 5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tucker2", "cp-layer", "svd"])
def test_torch_compile_sees_plain_layers(method):
    model = decomposed(resnet20, method)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(X), model(X), rtol=1e-4, atol=1e-5)
