import pytest
import torch
from flwr.app import ArrayRecord

from fedapps.config import RunConfig
from fedapps.models import MODELS, build_model, count_parameters
from fedapps.protocol.messages import BadModelError, from_arrays, new_model, to_arrays


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("lstm")])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_image_models_build_and_give_class_scores(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_lstm_predicts_next_character(depth):
    model = build_model(f"lstm{depth}", (80,), 80)
    assert model(torch.zeros(3, 80, dtype=torch.long)).shape == (3, 80)
    assert model.lstm.num_layers == depth


@pytest.mark.parametrize(
    ("family", "shape"),
    [("cnn", (1, 28, 28)), ("vgg", (3, 32, 32)), ("lstm", (80,))],
)
def test_parameter_count_grows_with_depth(family, shape):
    names = {"cnn": ["cnn1", "cnn2", "cnn3", "cnn4"], "vgg": ["vgg11", "vgg13", "vgg16", "vgg19"],
             "lstm": ["lstm1", "lstm2", "lstm3", "lstm4"]}[family]
    classes = 80 if family == "lstm" else 10
    counts = [count_parameters(build_model(n, shape, classes)) for n in names]
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_cnns_have_a_nonlinearity_between_convolutions():
    model = build_model("cnn3", (1, 28, 28), 10)
    kinds = [type(layer).__name__ for layer in model.features]
    for i, kind in enumerate(kinds[:-1]):
        if kind == "Conv2d":
            assert kinds[i + 1] == "ReLU"


def test_vgg_has_no_batchnorm():
    model = build_model("vgg11", (3, 32, 32), 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_global_model_larger_than_distilled_model():
    small = count_parameters(build_model("cnn-small", (1, 8, 8), 10))
    large = count_parameters(build_model("cnn-large", (1, 8, 8), 10))
    assert large > 5 * small


def test_model_family_must_fit_inputs():
    with pytest.raises(ValueError, match="does not fit this data set's inputs"):
        build_model("lstm1", (1, 8, 8), 10)


def test_arrayrecord_round_trip_is_exact():
    config = RunConfig()
    model = new_model("cnn3", config)
    restored = from_arrays("cnn3", to_arrays(model), config)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name


def test_arrays_of_another_architecture_are_rejected():
    config = RunConfig()
    with pytest.raises(BadModelError, match="do not match architecture 'cnn2'"):
        from_arrays("cnn2", to_arrays(new_model("cnn1", config)), config)
    state = new_model("cnn1", config).state_dict()
    state["classifier.1.weight"][0, 0] = float("nan")
    with pytest.raises(BadModelError, match="NaN or infinite"):
        from_arrays("cnn1", ArrayRecord(state), config)


@pytest.mark.parametrize(("name", "layers"), [("cnn-distill6", 6), ("cnn-global12", 12)])
def test_distillation_models_have_the_papers_depth(name, layers):
    model = build_model(name, (3, 32, 32), 10)
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weighted) == layers
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_global_model_is_larger_than_the_distilled_one():
    small, large = (count_parameters(build_model(n, (3, 32, 32), 10))
                    for n in ("cnn-distill6", "cnn-global12"))
    assert large > 5 * small
