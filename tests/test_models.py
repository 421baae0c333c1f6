"""The model zoo: shapes from docs/METHOD.md §3, the Grad-CAM layer, specs and user errors."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from store.errors import InputError
from trainer.models import (
    ModelSpec,
    build_model,
    count_parameters,
    default_image_size,
    describe,
    gradcam_layer,
    model_names,
)

ZOO = model_names()

# Flatten sizes at the default input, 1 channel (METHOD.md §3; Model V's is our reconstruction).
FLATTEN_AT_DEFAULT = {
    "small": 128,
    "mnist": 9216,
    "model1": 5888,
    "model2": 11776,
    "model3": 2688,
    "model4": 5376,
    "model5": 5120,
    "model6": 4864,
}


def _spec(name: str, classes: int = 13, channels: int = 1) -> ModelSpec:
    return ModelSpec(name, channels, default_image_size(name), classes)


def _first_linear(model: nn.Module) -> nn.Linear:
    return next(layer for layer in model.modules() if isinstance(layer, nn.Linear))


def test_zoo_lists_the_small_net_mnist_and_the_six_thesis_models_in_order() -> None:
    assert ZOO == ["small", "mnist", "model1", "model2", "model3", "model4", "model5", "model6"]


def test_default_image_sizes_follow_the_data_each_model_was_made_for() -> None:
    assert default_image_size("small") == (8, 8)
    assert default_image_size("mnist") == (28, 28)
    assert {default_image_size(f"model{i}") for i in range(1, 7)} == {(50, 200)}


@pytest.mark.parametrize("name", ZOO)
def test_output_is_one_logit_per_class_for_every_image(name: str) -> None:
    model = build_model(_spec(name, classes=7, channels=3)).eval()
    images = torch.randn(2, 3, *default_image_size(name))
    with torch.no_grad():
        assert model(images).shape == (2, 7)


@pytest.mark.parametrize(("name", "flat"), FLATTEN_AT_DEFAULT.items())
def test_flatten_size_at_the_default_input_matches_the_spec_table(name: str, flat: int) -> None:
    model = build_model(_spec(name)).eval()
    with torch.no_grad():
        features = model.features(torch.zeros(1, 1, *default_image_size(name)))
    assert features.flatten(1).shape[1] == flat
    assert _first_linear(model).in_features == flat


def test_model6_flattens_to_256_by_1_by_19_not_the_thesis_typo_4894() -> None:
    model = build_model(_spec("model6")).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 1, 50, 200)).shape == (1, 256, 1, 19)


@pytest.mark.parametrize("name", ZOO)
def test_gradcam_layer_is_the_relu_after_the_last_conv_just_before_the_last_pool(
        name: str) -> None:
    model = build_model(_spec(name)).eval()
    target = gradcam_layer(name)
    assert isinstance(model.get_submodule(target), nn.ReLU)
    prefix, index = target.split(".")
    assert prefix == "features"
    layers = list(model.features)
    index = int(index)
    assert not any(isinstance(layer, nn.Conv2d) for layer in layers[index:])
    assert isinstance(layers[index + 1], nn.MaxPool2d)
    assert not any(isinstance(layer, nn.MaxPool2d) for layer in layers[index + 2:])

    captured: list[torch.Tensor] = []
    model.get_submodule(target).register_forward_hook(
        lambda _module, _inputs, output: captured.append(output))
    with torch.no_grad():
        model(torch.randn(2, 1, *default_image_size(name)))
    last_conv = [layer for layer in layers if isinstance(layer, nn.Conv2d)][-1]
    assert captured[0].dim() == 4
    assert captured[0].shape[:2] == (2, last_conv.out_channels)


def test_thesis_models_put_batch_norm_between_conv_and_relu_and_dropout_after_each_pool() -> None:
    layers = list(build_model(_spec("model1")).features)
    kinds = [type(layer) for layer in layers[:5]]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout]
    assert all(layer.kernel_size == (3, 3) and layer.stride == (1, 1) and layer.padding == (0, 0)
               for layer in layers if isinstance(layer, nn.Conv2d))
    dense = [layer for layer in build_model(_spec("model1")).classifier
             if isinstance(layer, nn.Linear)]
    assert [layer.out_features for layer in dense] == [512, 512, 13]


def test_mnist_net_has_no_batch_norm_and_dropout_on_the_dense_part() -> None:
    model = build_model(_spec("mnist", classes=10))
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in model.modules())
    kinds = [type(layer) for layer in model.classifier]
    assert kinds == [nn.Flatten, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


def test_parameter_count_of_the_small_net_is_the_hand_count() -> None:
    convs = (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32)
    batch_norms = 2 * 16 + 2 * 32
    dense = (128 * 64 + 64) + (64 * 10 + 10)
    assert count_parameters(build_model(_spec("small", classes=10))) == (
        convs + batch_norms + dense)


@pytest.mark.parametrize("name", ZOO)
def test_describe_gives_one_line_naming_the_conv_stages(name: str) -> None:
    text = describe(name)
    assert text and "\n" not in text
    assert "conv" in text and "|" in text


def test_describe_model5_says_it_is_a_reconstruction() -> None:
    assert "reconstruction" in describe("model5")


def test_spec_json_round_trips_exactly() -> None:
    spec = ModelSpec("model4", 3, (50, 200), 13)
    text = spec.to_json()
    assert text == '{"name":"model4","in_channels":3,"image_size":[50,200],"num_classes":13}'
    assert ModelSpec.from_json(text) == spec


@pytest.mark.parametrize("text", [
    "not json",
    "[1, 2]",
    '{"name": "model1", "in_channels": 1, "image_size": [50, 200]}',
    '{"name": "model1", "in_channels": 1, "image_size": 50, "num_classes": 13}',
    '{"name": "model1", "in_channels": 0, "image_size": [50, 200], "num_classes": 13}',
    '{"name": "model1", "in_channels": 1, "image_size": [50, 200, 3], "num_classes": 13}',
])
def test_malformed_spec_json_is_an_input_error(text: str) -> None:
    with pytest.raises(InputError):
        ModelSpec.from_json(text)


@pytest.mark.parametrize("name", ZOO)
def test_rebuilding_from_the_stored_spec_gives_the_same_state_dict_layout(name: str) -> None:
    spec = _spec(name, channels=2)
    original = build_model(spec).state_dict()
    rebuilt = build_model(ModelSpec.from_json(spec.to_json())).state_dict()
    assert {key: value.shape for key, value in original.items()} == {
        key: value.shape for key, value in rebuilt.items()}
    assert build_model(ModelSpec.from_json(spec.to_json())).load_state_dict(original)


@pytest.mark.parametrize("name", ZOO)
def test_too_small_image_is_refused_with_the_minimum_size_which_itself_works(name: str) -> None:
    with pytest.raises(InputError, match=rf"too small for {name}: needs at least") as error:
        build_model(ModelSpec(name, 1, (5, 5), 10))
    height, width = map(int, re.search(r"needs at least (\d+)x(\d+)", str(error.value)).groups())
    model = build_model(ModelSpec(name, 1, (height, width), 10)).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(1, 1, height, width)).shape[2:] == (1, 1)
    with pytest.raises(InputError):
        build_model(ModelSpec(name, 1, (height - 1, width), 10))
    with pytest.raises(InputError):
        build_model(ModelSpec(name, 1, (height, width - 1), 10))


def test_model4_at_20x20_names_the_size_and_the_minimum() -> None:
    with pytest.raises(InputError, match=r"image size 20x20 is too small for model4: "
                                         r"needs at least 36x36"):
        build_model(ModelSpec("model4", 1, (20, 20), 13))


@pytest.mark.parametrize("call", [
    lambda: build_model(ModelSpec("resnet50", 1, (50, 200), 13)),
    lambda: default_image_size("resnet50"),
    lambda: describe("resnet50"),
    lambda: gradcam_layer("resnet50"),
])
def test_unknown_model_name_is_an_input_error_listing_the_zoo(call: Callable[[], object]) -> None:
    with pytest.raises(InputError, match="resnet50") as error:
        call()
    assert all(name in str(error.value) for name in ZOO)


@pytest.mark.parametrize(("channels", "size", "classes"), [
    (0, (50, 200), 13), (1, (50,), 13), (1, (0, 200), 13), (1, (50, 200), 0)])
def test_nonsense_spec_fields_are_input_errors(
        channels: int, size: tuple[int, ...], classes: int) -> None:
    with pytest.raises(InputError):
        ModelSpec("model1", channels, size, classes)  # type: ignore[arg-type]
