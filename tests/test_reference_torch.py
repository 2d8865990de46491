"""Users of the reference PyTorch script: its state_dict loads into `Synapse`,
and PyTorch-style constructor arguments are refused with their mapping.

The module below is written here in the reference script's style: a `weight`
of shape (out_features, in_features) read as beta_ij = weight[i, j], an unused
`bias`, and a forward pass that sums the log factors over the whole batch (the
reference's batch coupling), so it agrees with the paper's formula at batch 1.
"""

import keras
import numpy as np
import pytest

import keras_synann


def _torch_modules():
    torch = pytest.importorskip("torch")

    class ReferenceStyleSynapse(torch.nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
            self.bias = torch.nn.Parameter(torch.zeros(out_features))
            torch.nn.init.uniform_(self.weight, 0.0, 0.8)

        def forward(self, x):
            # factors[b, i, j] = log(1 - weight[i, j] * x[b, j]), summed over
            # every sample b and input j, as the reference's ones matrix does.
            factors = torch.log1p(-x[:, None, :] * self.weight[None, :, :])
            return x * torch.exp(factors.sum(dim=(0, 2)))

    class ReferenceStyleNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(12, 6)
            self.fcn = ReferenceStyleSynapse(6, 6)
            self.fcb = torch.nn.BatchNorm1d(6)
            self.fc2 = torch.nn.Linear(6, 3)

    return torch, ReferenceStyleNet


def test_a_reference_pth_loads_with_beta_transposed(tmp_path):
    torch, net_class = _torch_modules()
    torch.manual_seed(0)
    net = net_class()
    torch.save(net.state_dict(), tmp_path / "model.pth")

    layer = keras_synann.Synapse()
    keras_synann.load_reference_state_dict(layer, tmp_path / "model.pth")
    weight = net.fcn.weight.detach().numpy()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.beta), weight)

    rng = np.random.default_rng(0)
    for _ in range(4):  # batch size 1: the reference's formula is the paper's
        x = rng.uniform(0.01, 0.99, (1, 6)).astype("float32")
        with torch.no_grad():
            expected = net.fcn(torch.from_numpy(x)).numpy()
        got = keras.ops.convert_to_numpy(layer(x))
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)

    # At larger batches the reference mixes samples; the layer does not.
    x = rng.uniform(0.01, 0.99, (4, 6)).astype("float32")
    with torch.no_grad():
        mixed = net.fcn(torch.from_numpy(x)).numpy()
    alone = np.concatenate([keras.ops.convert_to_numpy(layer(row[None])) for row in x])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), alone, rtol=1e-5)
    assert np.all(mixed < alone)


def test_a_state_dict_mapping_and_an_explicit_key(tmp_path):
    torch, net_class = _torch_modules()
    state = {k: v.numpy() for k, v in net_class().state_dict().items()}
    state["other.weight"] = np.zeros((6, 6), "float32")  # a second square weight
    layer = keras_synann.Synapse()
    with pytest.raises(ValueError, match="Pass `key`.*fcn.weight, other.weight"):
        keras_synann.load_reference_state_dict(layer, state)
    keras_synann.load_reference_state_dict(layer, state, key="fcn.weight")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.kernel), state["fcn.weight"].T
    )
    wrong_size = keras_synann.Synapse()
    wrong_size.build((None, 5))
    with pytest.raises(ValueError, match=r"fcn.weight is \(6, 6\)"):
        keras_synann.load_reference_state_dict(wrong_size, state, key="fcn.weight")
    with pytest.raises(KeyError, match="'nope.weight' is not in"):
        keras_synann.load_reference_state_dict(layer, state, key="nope.weight")


@pytest.mark.parametrize(
    "args, kwargs, hint, received",
    [
        ((64, 64), {}, "Synapse(64)", "in_features=64, out_features=64"),
        ((), {"in_features": 8, "out_features": 8}, "Synapse(8)", "in_features=8"),
        ((64, 32), {}, "a Dense layer to resize", "out_features=32"),
        ((16,), {"bias": True}, "Synapse(16)", "bias=True"),
    ],
)
def test_pytorch_style_arguments_are_refused_with_their_mapping(
    args, kwargs, hint, received
):
    with pytest.raises(ValueError) as error:
        keras_synann.Synapse(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    assert f"use {hint}." in message and received in message


def test_synapse_uniform_is_exported():
    init = keras_synann.SynapseUniform(seed=1)
    values = keras.ops.convert_to_numpy(init((50, 50)))
    assert values.min() >= 0.0 and values.max() < 0.01
    assert keras_synann.Synapse().kernel_initializer.__class__ is (
        keras_synann.SynapseUniform
    )
