"""The model zoo: registry, reference module names and widths, compress-rate semantics, torchvision names."""
import json

import pytest
import torch
from torch import nn

from norton.decomposition.cpd_block import CPDBlock
from norton.errors import UserError
from norton.models import create_model, get_model_entry, list_models, register_model

ZOO = ["densenet_40", "resnet_110", "resnet_20", "resnet_50", "resnet_56", "vgg_16_bn", "vgg_19_bn"]


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {
        name: module.out_channels
        for name, module in model.named_modules()
        if isinstance(module, CPDBlock) or (isinstance(module, nn.Conv2d) and ".feature." not in name)
    }


# ------------------------------------------------------------------ registry
def test_registry_lists_the_paper_models():
    assert [name for name in list_models() if get_model_entry(name).dataset != "coco"] == ZOO
    detectors = {name for name in list_models() if get_model_entry(name).dataset == "coco"}
    assert {"fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
            "fasterrcnn_CPresnet50_fpn"} <= detectors
    assert {name: (get_model_entry(name).input_size, get_model_entry(name).dataset) for name in ZOO} == {
        "densenet_40": (32, "cifar10"),
        "resnet_110": (32, "cifar10"),
        "resnet_20": (32, "cifar10"),
        "resnet_50": (224, "imagenet"),
        "resnet_56": (32, "cifar10"),
        "vgg_16_bn": (32, "cifar10"),
        "vgg_19_bn": (32, "cifar10"),
    }


def test_compress_rate_lengths_match_the_reference_scripts():
    # Lengths of the specs in the reference's scripts and README.
    lengths = {name: get_model_entry(name).compress_rate_length for name in ZOO}
    assert lengths == {
        "densenet_40": 39, "resnet_110": 57, "resnet_20": 12, "resnet_50": 20, "resnet_56": 30, "vgg_16_bn": 13, "vgg_19_bn": 16,
    }


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_model(input_size=32, dataset="cifar10", num_classes=10, compress_rate_slots=())
        def resnet_56(**kwargs):  # noqa: ARG001
            raise AssertionError("never built")


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(UserError) as info:
        create_model("resnet_57")
    assert "resnet_57" in str(info.value)
    assert all(name in str(info.value) for name in ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_every_model_builds_runs_and_records_its_arguments(name):
    entry = get_model_entry(name)
    model = create_model(name, compress_rate=[0.0] * entry.compress_rate_length, rank=1, num_classes=7).eval()
    side = min(entry.input_size, 32)  # ResNet-50 runs on any side >= 32; a small input keeps the test fast
    with torch.no_grad():
        out = model(torch.randn(1, 3, side, side))
    assert out.shape == (1, 7)
    record = model.norton_architecture
    assert json.loads(json.dumps(record)) == record
    assert record["name"] == name
    rebuilt = create_model(record["name"], **record["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ZOO)
def test_default_classes_come_from_the_registry(name):
    model = create_model(name)
    assert model.norton_architecture["kwargs"]["num_classes"] == get_model_entry(name).num_classes
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == get_model_entry(name).num_classes


# -------------------------------------------------- reference names and widths
def test_vgg_reference_layout():
    model = create_model("vgg_16_bn", compress_rate="[0.6]*6+[0.8]*7", rank=1)
    keys = set(model.state_dict())
    # The reference's VGG keeps CPDBlock's default bias; pools are numbered by config position.
    assert {"features.conv0.feature.pointwise.weight", "features.conv0.bias", "features.norm0.running_mean",
            "features.conv16.feature.horizontal.weight", "classifier.linear1.weight", "classifier.norm1.weight",
            "classifier.linear2.bias"} <= keys
    assert isinstance(model.features.pool2, nn.MaxPool2d)
    widths = list(conv_widths(model).values())
    # int(64*0.4)=25, int(128*0.4)=51, int(256*0.4)=102, int(256*0.2)=51, int(512*0.2)=102
    assert widths == [25, 25, 51, 51, 102, 102, 51, 102, 102, 102, 102, 102, 102]
    assert model.classifier.linear1.in_features == 102 and model.classifier.linear1.out_features == 512
    assert model.features.conv0.feature.pointwise.weight.shape == (25, 3, 1, 1)


def test_vgg_with_one_rate_short_keeps_the_last_conv_whole():
    model = create_model("vgg_16_bn", compress_rate="[0.5]*12")
    assert list(conv_widths(model).values())[-2:] == [256, 512]


def test_resnet56_reference_layout():
    model = create_model("resnet_56", compress_rate="[0.]+[0.18]*29", rank=1)
    keys = set(model.state_dict())
    assert "conv1.feature.pointwise.weight" in keys  # the stem is decomposed too
    assert "conv1.bias" not in keys and "layer1.0.conv1.bias" not in keys  # CPDBlocks without bias
    assert "fc.weight" in keys
    widths = conv_widths(model)
    # int(16*0.82)=13 for stage 1 outputs and inner widths, int(32*0.82)=26, stage 3 outputs stay 64
    assert (widths["conv1"], widths["layer1.0.conv1"], widths["layer1.0.conv2"]) == (16, 13, 13)
    assert (widths["layer2.3.conv1"], widths["layer2.3.conv2"], widths["layer3.8.conv2"]) == (26, 26, 64)
    assert model.layer1[0].conv1.feature.pointwise.weight.shape == (13, 16, 1, 1)


def test_resnet110_head_is_named_linear():
    keys = set(create_model("resnet_110").state_dict())
    assert "linear.weight" in keys and "fc.weight" not in keys


def test_resnet_cifar_shortcut_pads_and_crops_channels():
    # Stage-2 outputs (8) narrower than stage-1 outputs (16): the shortcut crops, as the reference's F.pad does.
    model = create_model("resnet_56", compress_rate=[0.0, 0.0, 0.75] + [0.0] * 27).eval()
    assert conv_widths(model)["layer2.0.conv2"] == 8
    x = torch.randn(1, 16, 8, 8)
    shortcut = model.layer2[0].shortcut(x)
    assert shortcut.shape == (1, 8, 4, 4)
    torch.testing.assert_close(shortcut, x[:, 4:12, ::2, ::2])
    padded = create_model("resnet_56").layer2[0].shortcut(x)
    assert padded.shape == (1, 32, 4, 4)
    torch.testing.assert_close(padded[:, 8:24], x[:, :, ::2, ::2])
    assert padded[:, :8].abs().sum() == 0 and padded[:, 24:].abs().sum() == 0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_densenet_reference_layout():
    model = create_model("densenet_40", compress_rate="[0.]+[0.08]*6+[0.09]*6+[0.08]*26", rank=8)
    keys = set(model.state_dict())
    assert {"conv1.feature.pointwise.weight", "dense1.0.conv1.feature.vertical.weight", "trans1.conv1.weight",
            "trans1.bn1.weight", "bn.weight", "fc.weight"} <= keys
    assert model.trans1.conv1.weight.dim() == 4  # 1x1 transitions stay dense
    widths = conv_widths(model)
    # dense1.0-5: int(12*0.92)=11, dense1.6-11: int(12*0.91)=10, then 0.08 everywhere:
    # trans1 int((24+66+60)*0.92)=138, trans2 int((138+132)*0.92)=248
    assert (widths["dense1.5.conv1"], widths["dense1.6.conv1"], widths["dense3.11.conv1"]) == (11, 10, 11)
    assert (widths["trans1.conv1"], widths["trans2.conv1"]) == (138, 248)
    assert model.fc.in_features == 248 + 12 * 11


def test_densenet_stem_rate_must_be_zero():
    with pytest.raises(UserError, match="stem"):
        create_model("densenet_40", compress_rate=[0.1] * 39)


def test_resnet50_reference_layout():
    model = create_model("resnet_50", compress_rate="[0.]+[0.1]*2+[0.4]*5+[0.75]*12", rank=1)
    keys = set(model.state_dict())
    assert {"layer1.0.conv2.feature.pointwise.weight", "layer1.0.conv1.weight", "layer1.0.conv3.weight",
            "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "fc.weight"} <= keys
    assert "layer1.1.downsample.0.weight" not in keys and "layer1.0.conv2.bias" not in keys
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7)
    widths = conv_widths(model)
    # outputs: int(256*0.9)=230, int(512*0.9)=460, int(1024*0.6)=614, 2048 (never truncated)
    assert (widths["conv1"], widths["layer1.0.conv3"], widths["layer2.0.downsample.0"]) == (64, 230, 460)
    assert (widths["layer3.0.conv3"], widths["layer4.2.conv3"]) == (614, 2048)
    # inner widths, entries 4-7 at 0.4 (blocks 0-3), 8-19 at 0.75: int(64*0.6)=38, int(128*0.6)=76, int(128*0.25)=32
    assert (widths["layer1.0.conv1"], widths["layer1.0.conv2"]) == (38, 38)
    assert (widths["layer2.0.conv1"], widths["layer2.3.conv2"]) == (76, 32)
    assert (widths["layer3.0.conv1"], widths["layer4.2.conv2"]) == (64, 128)  # int(256*0.25), int(512*0.25)


# ------------------------------------------------------------ argument checks
def test_short_compress_rate_is_an_error():
    with pytest.raises(UserError, match="needs 30 compress rates"):
        create_model("resnet_56", compress_rate="[0.1]*29")


def test_long_compress_rate_needs_zero_extras():
    assert create_model("resnet_56", compress_rate="[0.]*100").norton_architecture["kwargs"]["compress_rate"] == [0.0] * 30
    with pytest.raises(UserError, match="nonzero extra"):
        create_model("resnet_56", compress_rate="[0.]*30+[0.5]")


def test_rate_that_removes_every_channel_is_an_error():
    with pytest.raises(UserError, match="no channel"):
        create_model("densenet_40", compress_rate=[0.0] + [0.95] * 38)


@pytest.mark.parametrize("rank", [-1, 1.5, True, "2"])
def test_bad_rank_is_an_error(rank):
    with pytest.raises(UserError, match="rank"):
        create_model("resnet_56", rank=rank)


@pytest.mark.parametrize(("kwargs", "what"), [({"num_classes": 0}, "num_classes"), ({"in_channels": -3}, "in_channels")])
def test_bad_sizes_are_errors(kwargs, what):
    with pytest.raises(UserError, match=what):
        create_model("vgg_16_bn", **kwargs)


def test_builders_are_keyword_only():
    with pytest.raises(TypeError):
        get_model_entry("resnet_56").builder(None, 0)


def test_in_channels_changes_the_first_conv_only():
    model = create_model("resnet_56", in_channels=1, rank=2).eval()
    assert model.conv1.feature.pointwise.weight.shape[1] == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)


# ---------------------------------------------------------------- torchvision
def test_torchvision_models_carry_a_record():
    model = create_model("torchvision.resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert model.norton_architecture == {"name": "torchvision.resnet18", "kwargs": {"num_classes": 7}}
    assert create_model("torchvision.mobilenet_v3_small").norton_architecture["kwargs"]["num_classes"] == 1000


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [({"rank": 2}, "rank"), ({"compress_rate": [0.5]}, "compress_rate"), ({"in_channels": 1}, "in_channels")],
)
def test_torchvision_models_take_no_compression_arguments(kwargs, what):
    with pytest.raises(UserError, match=what):
        create_model("torchvision.resnet18", **kwargs)


def test_unknown_torchvision_name():
    with pytest.raises(UserError, match="resnet19"):
        create_model("torchvision.resnet19")
