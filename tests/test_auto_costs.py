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


def _choice_macs(model, x):
    work, _, groups = traced(model, x, (), False)
    widths = MacModel(work, x, groups)
    leaves = widths.leaf_names
    convs = {n: c for n, c in eligible_convs(work).items() if n in leaves}
    shapes = module_input_shapes(work, convs, x, eval_mode=True)
    options = {
        name: [LayerOption("dense", None, (float(widths.weight[leaves.index(name)]), 0, 0, 0))]
        + [LayerOption("cp-filter", r, cp_filter_coefficients(conv, shapes[name][-2:], r)) for r in (3, 1)]
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
