"""norton.pipeline.compress: argument checks that must fail before any training or decomposition."""
import pytest

from norton.errors import UserError
from norton.models import create_model
from norton.pipeline import compress


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 2, "compress_rate": "[0.2]*9", "round_to": 8}, "round_to applies"),
        ({"rank": 2, "ratio": 0.2, "target_macs": 0.5}, "one way"),
        ({"rank": None}, "nothing to do"),
        ({"rank": 2, "order": "sideways"}, "order must be"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, message):
    # loaders=None: a check that came after the first evaluation would crash instead of raising
    with pytest.raises(UserError, match=message):
        compress(create_model("resnet_20"), None, input_size=(3, 32, 32), **kwargs)
