"""norton.pipeline.compress: a real (tiny) compression end to end, and argument checks before any work."""
import math

import pytest
import torch

import norton
import norton.pipeline as pipeline
from norton.compress_arguments import FineTune, check_compress_arguments
from norton.decomposition.cpd_block import CPDBlock
from norton.deploy.forms import form_of_block, set_training_form
from norton.errors import UserError
from norton.models import create_model
from norton.pipeline import compress
from norton.training.datasets import build_datasets
from norton.training.loaders import build_loaders

ONE_EPOCH = FineTune(epochs=1, lr=0.01)


@pytest.fixture(scope="module")
def tiny_loaders():
    splits = build_datasets("synthetic", limit=32, val_size=16, seed=0)  # 32 train, 16 val, 32 test images
    return build_loaders(splits, batch_size=16, workers=0, seed=0)


@pytest.mark.slow
def test_a_real_compression_records_its_stages_saves_them_and_resumes(tiny_loaders, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("resnet_20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forms_seen = []  # compress times its training forms; here they are fixed, so the check cannot depend on load
    monkeypatch.setattr(pipeline, "_use_training_forms", lambda net, task: [
        set_training_form(m, "merged") for m in net.modules() if type(m) is CPDBlock])
    real_fit = pipeline.fit

    def spying_fit(net, *args, **kwargs):
        forms_seen.extend(form_of_block(m) for m in net.modules() if isinstance(m, CPDBlock))
        return real_fit(net, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit", spying_fit)
    result = compress(
        model, tiny_loaders, input_size=(3, 32, 32), rank=2, ratio=0.5, criterion="l1",
        decompose_finetune=ONE_EPOCH, prune_finetune=ONE_EPOCH, output_dir=tmp_path, device="cpu",
        progress=False, log=lambda message: None,
    )
    stages = result.stages
    assert [s["name"] for s in stages] == ["baseline", "decomposed", "pruned"]
    macs = [s["macs"] for s in stages]
    params = [s["params"] for s in stages]
    assert macs[0] > macs[1] > macs[2] > 0 and params[0] > params[1] > params[2] > 0
    for stage in stages:
        assert 0 <= stage["top1"] <= 100 and stage["top1"] <= stage["top5"] <= 100
        assert math.isfinite(stage["test_loss"])
    assert [s.get("finetune_epochs") for s in stages] == [None, 1, 1]
    assert all(0 <= s["validation_top1_before_finetune"] <= 100 for s in stages[1:])
    # the input model is untouched, the returned one matches the last record
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert norton.count_complexity(result.model, (3, 32, 32)).macs == macs[2]
    # fine-tuning ran in training forms; the returned model computes as written again
    blocks = [m for m in result.model.modules() if isinstance(m, CPDBlock)]
    assert blocks and all(type(b) is CPDBlock for b in blocks)
    assert forms_seen and set(forms_seen) == {"merged"}

    # every stage's final.pt loads with norton.load and carries the plan so far
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    for name, ops in (("decomposed", ["decompose"]), ("pruned", ["decompose", "prune"])):
        loaded = norton.load(tmp_path / name / "final.pt")
        assert [step["op"] for step in loaded.norton_plan] == ops
        assert norton.count_complexity(loaded, (3, 32, 32)).macs == stages[[s["name"] for s in stages].index(name)]["macs"]
    loaded = norton.load(tmp_path / "pruned" / "final.pt").eval()
    torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-4, atol=1e-5)
    assert loaded.norton_plan[1]["criterion"] == "l1"

    # resuming the finished run recomputes nothing and returns the same records
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage was recomputed")

    monkeypatch.setattr(pipeline, "decompose", must_not_run)
    monkeypatch.setattr(pipeline, "_prune", must_not_run)
    monkeypatch.setattr(pipeline, "fit", must_not_run)
    again = compress(
        model, tiny_loaders, input_size=(3, 32, 32), rank=2, ratio=0.5, criterion="l1",
        decompose_finetune=ONE_EPOCH, prune_finetune=ONE_EPOCH, output_dir=tmp_path, resume=True, device="cpu",
        progress=False, log=lambda message: None,
    )
    assert again.stages[1:] == stages[1:]
    assert again.stages[0]["macs"] == stages[0]["macs"]


NO_EPOCHS = FineTune(epochs=0)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["decompose-prune", "prune-decompose"])
def test_target_macs_is_a_fraction_of_the_original_in_either_order(tiny_loaders, order):
    result = compress(
        create_model("resnet_20"), tiny_loaders, input_size=(3, 32, 32), rank=3, target_macs=0.33, order=order,
        decompose_finetune=NO_EPOCHS, prune_finetune=NO_EPOCHS, device="cpu", progress=False, log=lambda m: None,
    )
    baseline, final = result.stages[0], result.stages[-1]
    assert final["macs"] / baseline["macs"] == pytest.approx(0.33, abs=0.02)


@pytest.mark.slow
def test_a_budget_alone_runs_auto_compress_in_one_fine_tuned_stage(tiny_loaders, tmp_path):
    model = create_model("resnet_20")
    result = compress(
        model, tiny_loaders, input_size=(3, 32, 32), rank=None, target_macs=0.4, prune_finetune=ONE_EPOCH,
        output_dir=tmp_path, device="cpu", progress=False, log=lambda m: None,
    )
    baseline, auto = result.stages
    assert auto["name"] == "auto" and auto["finetune_epochs"] == 1
    assert auto["macs"] / baseline["macs"] == pytest.approx(0.4, rel=0.02)
    assert 0 <= auto["validation_top1_before_finetune"] <= 100
    assert {step["op"] for step in result.model.norton_plan} <= {"prune", "decompose"}
    loaded = norton.load(tmp_path / "auto" / "final.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), result.model.eval()(x), rtol=1e-4, atol=1e-5)


def _spy_on_auto_compress(monkeypatch) -> dict:
    """Replace auto_compress by a plain prune; the returned dict receives the keyword arguments it was given."""
    import norton.auto

    seen: dict = {}

    def fake_auto_compress(model, example, **kwargs):
        seen.update(kwargs)
        return norton.prune(model, example, ratio=0.5, criterion="l1")

    monkeypatch.setattr(norton.auto, "auto_compress", fake_auto_compress)
    return seen


def test_a_latency_budget_reaches_auto_compress(tiny_loaders, monkeypatch):
    seen = _spy_on_auto_compress(monkeypatch)
    result = compress(
        create_model("resnet_20"), tiny_loaders, input_size=(3, 32, 32), rank=None, target_latency="5ms",
        prune_finetune=FineTune(epochs=0), device="cpu", progress=False, log=lambda m: None,
    )
    assert seen["target_latency"] == "5ms" and "target_macs" not in seen
    assert seen["distill_steps"] == 0  # calibration distillation is off unless asked for
    assert [stage["name"] for stage in result.stages] == ["baseline", "auto"]


def test_calibration_distillation_reaches_auto_compress_and_is_refused_elsewhere(tiny_loaders, monkeypatch):
    seen = _spy_on_auto_compress(monkeypatch)
    common = {"input_size": (3, 32, 32), "device": "cpu", "progress": False, "log": lambda m: None,
              "prune_finetune": FineTune(epochs=0)}
    compress(create_model("resnet_20"), tiny_loaders, rank=None, target_macs=0.4, calibration_distill_steps=7,
             **common)
    assert seen["distill_steps"] == 7 and seen["target_macs"] == 0.4
    with pytest.raises(UserError, match="part of auto_compress"):
        compress(create_model("resnet_20"), tiny_loaders, rank=2, target_macs=0.4, calibration_distill_steps=7,
                 **common)
    with pytest.raises(UserError, match="calibration distillation steps must be"):
        compress(create_model("resnet_20"), tiny_loaders, rank=None, target_macs=0.4, calibration_distill_steps=-1,
                 **common)


@pytest.mark.parametrize("method", ["tucker2", "cp-layer", "svd"])
def test_other_decompositions_run_through_the_pipeline(tiny_loaders, method):
    result = compress(
        create_model("resnet_20"), tiny_loaders, input_size=(3, 32, 32), rank="macs:0.5", decompose_method=method,
        decompose_finetune=NO_EPOCHS, device="cpu", progress=False, log=lambda m: None,
    )
    baseline, decomposed = result.stages
    assert decomposed["macs"] < 0.75 * baseline["macs"]
    (record,) = result.model.norton_plan
    assert record["op"] == "decompose" and record["method"] == method


def test_the_order_and_criterion_follow_what_is_given():
    from norton.compress_arguments import resolve_criterion, resolve_order

    assert resolve_order(None, rank=None, compress_rate=None, ratio=None, target_macs=0.3) == "auto"
    assert resolve_order(None, rank=3, compress_rate=None, ratio=None, target_macs=0.3) == "decompose-prune"
    assert resolve_order(None, rank=None, compress_rate=None, ratio=0.5, target_macs=None) == "decompose-prune"
    assert resolve_order("prune-decompose", rank=3, compress_rate=None, ratio=0.5, target_macs=None) == "prune-decompose"
    assert resolve_criterion(None, "auto") == "l1" and resolve_criterion(None, "decompose-prune") == "pabs"
    assert resolve_criterion("csa", "auto") == "csa"


@pytest.mark.slow
def test_a_target_the_decomposition_already_meets_prunes_nothing(tiny_loaders):
    lines = []
    result = compress(
        create_model("resnet_20"), tiny_loaders, input_size=(3, 32, 32), rank=2, target_macs=0.9,
        decompose_finetune=NO_EPOCHS, prune_finetune=NO_EPOCHS, device="cpu", progress=False, log=lines.append,
    )
    decomposed, pruned = result.stages[1], result.stages[2]
    assert pruned["macs"] == decomposed["macs"] and "nothing to prune" in "\n".join(lines)
    assert [step["op"] for step in result.model.norton_plan] == ["decompose"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 2, "compress_rate": "[0.2]*9", "round_to": 8}, "round_to applies"),
        ({"rank": 2, "ratio": 0.2, "target_macs": 0.5}, "one way"),
        ({"rank": None}, "nothing to do"),
        ({"rank": 2, "order": "sideways"}, "order must be"),
        ({"rank": 10**7}, "rank must be in"),
        ({"rank": 10}, "rank for layer 'conv1' 10 is above 9"),  # C_in x k = 3 x 3 for the stem
        ({"rank": None, "target_macs": 0.0}, r"\(0, 1\]"),
        ({"rank": None, "target_macs": 1.5}, r"\(0, 1\]"),
        ({"rank": None, "ratio": math.nan}, r"\[0, 1\)"),
        ({"rank": None, "compress_rate": "[0.1]*99999999999"}, "more than 10,000 rates"),
        ({"rank": 2, "decompose_finetune": FineTune(lr=math.nan)}, "decompose fine-tuning learning rate"),
        ({"rank": None, "ratio": 0.2, "prune_finetune": FineTune(lr=math.inf)}, "prune fine-tuning learning rate"),
        ({"rank": None, "ratio": 0.2, "prune_finetune": FineTune(epochs=-1)}, "prune fine-tuning epochs"),
        ({"rank": None, "ratio": 0.2, "prune_finetune": FineTune(momentum=math.nan)}, "prune fine-tuning: momentum"),
        ({"rank": 2, "decompose_finetune": FineTune(distill=True, distill_alpha=1.5)},
         r"decompose fine-tuning: distillation alpha .* must lie in \[0, 1\], got 1.5"),
        ({"rank": 2, "decompose_finetune": FineTune(epochs=0, distill_temperature=0.0)},
         "decompose fine-tuning: distillation temperature must be positive"),
        ({"rank": 2, "decompose_finetune": FineTune(distill="yes")}, "distill must be True or False"),
        ({"rank": None, "ratio": 0.2, "criterion": "nope"}, "nope"),
        ({"rank": None, "ratio": 0.2, "round_to": 0}, "round_to"),
        ({"rank": 2, "input_size": (3, 100_000, 100_000)}, "too large"),
        ({"rank": 2, "resume": True}, "resume needs the output folder"),
        ({"rank": 2, "target_macs": 0.5, "order": "auto"}, "order 'auto' chooses every layer"),
        ({"rank": None, "target_macs": 0.5, "round_to": 8}, "order 'auto' does not take round_to"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, message):
    # loaders=None: a check that came after the first evaluation would crash instead of raising
    kwargs = {"input_size": (3, 32, 32), **kwargs}
    with pytest.raises(UserError, match=message):
        compress(create_model("resnet_20"), None, **kwargs)


def test_a_folder_holding_a_run_is_refused_unless_resumed(tmp_path):
    (tmp_path / "decomposed").mkdir()
    with pytest.raises(UserError, match="pass --resume"):
        compress(create_model("resnet_20"), None, input_size=(3, 32, 32), rank=2, output_dir=tmp_path)


def test_amounts_are_checked_and_returned_in_their_canonical_form():
    common = {"rank": None, "criterion": "pabs", "round_to": None, "order": "decompose-prune",
              "decompose_finetune": None, "prune_finetune": None}
    assert check_compress_arguments(compress_rate="[0.]+[0.1]*2", ratio=None, target_macs=None, **common) == {
        "compress_rate": [0.0, 0.1, 0.1]}
    # target_macs is a fraction of the original MACs in (0, 1], as everywhere else
    assert check_compress_arguments(compress_rate=None, ratio=None, target_macs=1, **common) == {"target_macs": 1.0}
    assert check_compress_arguments(compress_rate=None, ratio={"layer1.*": 0.5}, target_macs=None, **common) == {
        "ratio": {"layer1.*": 0.5}}


def test_distilling_stages_learn_from_the_uncompressed_input_model(tiny_loaders, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(  # small: the test runs two fine-tunings
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        uncompressed = model(x)
    calls = []
    real_fit = pipeline.fit

    def spy(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        calls.append((kwargs, result))
        return result

    monkeypatch.setattr(pipeline, "fit", spy)
    kd = FineTune(epochs=1, lr=0.01, distill=True, distill_alpha=0.8, distill_temperature=2.0)
    result = compress(
        model, tiny_loaders, input_size=(3, 32, 32), rank=2, ratio=0.5, criterion="l1", decompose_finetune=kd,
        prune_finetune=ONE_EPOCH, device="cpu", progress=False, log=lambda m: None,
    )
    (decomposed, decomposed_fit), (pruned, pruned_fit) = calls  # the decomposition's fine-tuning distils
    teacher = decomposed["teacher"]
    assert pruned["teacher"] is None and teacher is not model and teacher is not result.model
    assert (decomposed["distill_alpha"], decomposed["distill_temperature"]) == (0.8, 2.0)
    assert not any(isinstance(m, norton.CPDBlock) for m in teacher.modules())  # taken before the first stage
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(teacher.to("cpu")(x), uncompressed)
    assert decomposed_fit.history[0]["train_loss_kind"] == "distillation"
    assert pruned_fit.history[0]["train_loss_kind"] == "cross_entropy"


class _FakeTask:
    """A task whose fine-tuning adds 1 to every weight and reports ``best`` as its best validation score."""

    metric, label = "top1", "top-1"

    def __init__(self, best, split="validation"):
        self.best, self.split = best, split

    def before_split(self):
        return self.split

    def score(self, model, *, before):
        return {"top1": 50.0}

    def fine_tune(self, model, recipe, folder, *, resume, seed, stage, teacher):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return self.best

    def complexity(self, model):
        return {"macs": 1, "params": 1}


@pytest.mark.parametrize("best, split, kept", [(40.0, "validation", True), (60.0, "validation", False),
                                               (40.0, "test", False), (None, "validation", False)])
def test_a_fine_tuning_worse_on_validation_than_its_start_is_undone(best, split, kept):
    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    logs = []
    out, record = pipeline._run_stage("pruned", model, lambda m: m, ONE_EPOCH, _FakeTask(best, split), out=None,
                                      resume=False, seed=0, log=logs.append)
    assert record["kept_model_before_finetune"] is kept
    assert all(torch.equal(start[k], v) is kept for k, v in out.state_dict().items())
    assert any("keeping the model before fine-tuning" in line for line in logs) is kept
