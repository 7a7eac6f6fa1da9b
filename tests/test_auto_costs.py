"""The MAC model of auto_compress predicts what count_complexity counts on the compressed model."""
from __future__ import annotations

import copy

import pytest
import torch

import norton
from norton.auto.costs import ChoiceMacs, LayerOption, cp_filter_coefficients
from norton.complexity import count_complexity
from norton.decomposition.decompose import eligible_convs
from norton.example_inputs import module_input_shapes
from norton.pruning.budget import MacModel
from norton.pruning.groups import traced


def _choice_macs(model, x, decompositions=None):
    """The MAC model of ``model`` with ``decompositions(conv, input_hw)`` as each conv's options (CP ranks 3, 1)."""
    work, _, groups = traced(model, x, (), False)
    widths = MacModel(work, x, groups)
    leaves = widths.leaf_names
    convs = {n: c for n, c in eligible_convs(work).items() if n in leaves}
    shapes = module_input_shapes(work, convs, x, eval_mode=True)
    if decompositions is None:
        def decompositions(conv, hw):
            return [LayerOption("cp-filter", r, cp_filter_coefficients(conv, hw, r)) for r in (3, 1)]
    options = {
        name: [LayerOption("dense", None, (float(widths.weight[leaves.index(name)]), 0, 0, 0))]
        + decompositions(conv, shapes[name][-2:])
        for name, conv in convs.items()
    }
    return ChoiceMacs(widths, options, leaves), groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predicted_macs_equal_the_count_of_the_compressed_model(seed):
    torch.manual_seed(seed)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    macs, groups = _choice_macs(model, x)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.tensor([
        g.channels if g.protected else int(torch.randint(1, g.channels + 1, (1,), generator=generator))
        for g in groups
    ])
    choice = torch.randint(0, 3, (len(macs.layers),), generator=generator)

    compressed = copy.deepcopy(model)
    ratio = {g.layers[0]: (g.channels - k - 0.5) / g.channels for g, k in zip(groups, keep.tolist(), strict=True) if k < g.channels}
    norton.prune(compressed, x, ratio=ratio, criterion="l1")
    ranks = {name: macs.options[name][int(c)].rank for name, c in zip(macs.layers, choice, strict=True) if int(c) > 0}
    norton.decompose(compressed, ranks, progress=False)

    predicted = float(macs(keep[None], choice[None])[0])
    assert predicted == pytest.approx(count_complexity(compressed, example_inputs=x).macs, rel=1e-9)


def test_dense_choice_predicts_the_uncompressed_count():
    model = norton.create_model("vgg_16_bn", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    macs, groups = _choice_macs(model, x)
    keep = torch.tensor([g.channels for g in groups])
    choice = torch.zeros(len(macs.layers), dtype=torch.long)
    assert float(macs(keep[None], choice[None])[0]) == count_complexity(model, example_inputs=x).macs


@pytest.mark.parametrize("method", ["cp-filter", "tucker2", "cp-layer", "svd"])
@pytest.mark.parametrize(("geometry", "input_hw"), [
    ({"kernel_size": 3, "padding": 1}, (13, 11)),
    ({"kernel_size": 3, "stride": 2, "padding": 1}, (16, 15)),
    ({"kernel_size": (3, 5), "stride": (2, 1), "padding": (0, 2), "dilation": (1, 2)}, (12, 14)),
])
def test_each_methods_coefficients_count_its_block_at_full_and_kept_widths(method, geometry, input_hw):
    from norton.auto.costs import decomposition_options, option_macs
    from norton.decomposition.methods import get_method

    conv = torch.nn.Conv2d(24, 32, bias=False, **geometry)
    options = decomposition_options(conv, input_hw, [method], (4, 2, 1))
    assert options and all(o.method == method for o in options)
    for option in options:
        for inner, out in ((24, 32), (max(option.min_widths[0], 13), max(option.min_widths[1], 17))):
            kept = torch.nn.Conv2d(inner, out, bias=False, **geometry)  # the layer after pruning
            block = get_method(method).empty(kept, option.rank)
            counted = count_complexity(block, example_inputs=torch.randn(1, inner, *input_hw)).macs
            a, b, c, d = option.coefficients
            assert a * out * inner + b * out + c * inner + d == counted
        assert option_macs(option, conv) < 0.8 * count_complexity(conv, example_inputs=torch.randn(1, 24, *input_hw)).macs


def test_a_rank_above_the_kept_widths_costs_infinity():
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    work, _, groups = traced(model, x, (), False)
    widths = MacModel(work, x, groups)
    dense = LayerOption("dense", None, (float(widths.weight[widths.leaf_names.index("layer1.0.conv1")]), 0, 0, 0))
    tucker = LayerOption("tucker2", (8, 8), (0, 1, 1, 0), min_widths=(8, 8))
    macs = ChoiceMacs(widths, {"layer1.0.conv1": [dense, tucker]}, widths.leaf_names)
    full = torch.tensor([float(g.channels) for g in groups])
    group = next(i for i, g in enumerate(groups) if "layer1.0.conv1" in g.layers)  # its output channels
    narrow = full.clone()
    narrow[group] = 7  # fewer than R2 = 8 outputs kept
    values = macs(torch.stack([full, narrow, narrow]), torch.tensor([[1], [1], [0]]))
    assert torch.isfinite(values[0]) and torch.isinf(values[1]) and torch.isfinite(values[2])


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_methods_predicted_macs_equal_the_count(seed):
    from norton.auto.costs import decomposition_options

    torch.manual_seed(seed)
    model = norton.create_model("resnet_20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    macs, groups = _choice_macs(model, x, lambda conv, hw: decomposition_options(
        conv, hw, ("cp-filter", "tucker2", "cp-layer", "svd"), (4, 2, 1)))
    generator = torch.Generator().manual_seed(seed)
    keep = torch.tensor([
        g.channels if g.protected else int(torch.randint(g.channels // 2, g.channels + 1, (1,), generator=generator))
        for g in groups
    ])
    choice = torch.stack([torch.randint(0, len(macs.options[n]), (), generator=generator) for n in macs.layers])
    for d in range(len(choice)):  # drop the ranks the kept widths cannot hold (the allocator never picks them)
        alone = torch.zeros_like(choice)
        alone[d] = choice[d]
        if not torch.isfinite(macs(keep[None], alone[None])[0]):
            choice[d] = 0
    assert {macs.options[n][int(c)].method for n, c in zip(macs.layers, choice, strict=True)} >= {"tucker2", "svd"}

    compressed = copy.deepcopy(model)
    ratio = {g.layers[0]: (g.channels - k - 0.5) / g.channels for g, k in zip(groups, keep.tolist(), strict=True)
             if k < g.channels}
    norton.prune(compressed, x, ratio=ratio, criterion="l1")
    for method in ("cp-filter", "tucker2", "cp-layer", "svd"):
        ranks = {n: macs.options[n][int(c)].rank for n, c in zip(macs.layers, choice, strict=True)
                 if macs.options[n][int(c)].method == method}
        if ranks:
            norton.decompose(compressed, ranks, method=method, progress=False)
    predicted = float(macs(keep[None], choice[None])[0])
    assert predicted == pytest.approx(count_complexity(compressed, example_inputs=x).macs, rel=1e-9)
