"""GPT-2's Conv1D seen as a linear map: the same numbers, no copy, and the original module back."""

import pytest
import torch
from torch import nn

from tinylab.adapter.attach import apply_tinylora
from tinylab.model.conv1d import LinearView, as_linear, is_conv1d, original
from tinylab.model.tiny import tiny_model


def _conv(n_in=6, n_out=5, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(n_out, n_in)
    nn.init.normal_(conv.bias)
    return conv


def test_a_view_computes_what_the_conv1d_computes_and_shares_its_weight():
    conv = _conv()
    view = as_linear(conv)
    assert isinstance(view, LinearView) and original(view) is conv
    assert (view.in_features, view.out_features) == (6, 5) and view.weight.shape == (5, 6)
    assert view.weight.data_ptr() == conv.weight.data_ptr()  # a view, not a copy
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(view(x), nn.functional.linear(x, view.weight, view.bias))
    torch.testing.assert_close(view(x), x @ conv.weight + conv.bias)
    with torch.no_grad():
        view.weight.add_(1.0)  # an in-place write reaches the Conv1D
    torch.testing.assert_close(conv(x), x @ (view.weight.T) + conv.bias)
    assert not any(True for _ in view.parameters(recurse=False))  # the Conv1D holds the one weight


def test_only_linear_maps_and_conv1d_count():
    linear = nn.Linear(3, 2)
    assert as_linear(linear) is linear and original(linear) is linear
    assert as_linear(nn.Conv1d(3, 2, 1)) is None and not is_conv1d(nn.Conv1d(3, 2, 1))  # torch's own Conv1d is not
    assert as_linear(nn.Embedding(4, 3)) is None
    with pytest.raises(TypeError, match="LinearView wraps a transformers Conv1D, got Linear"):
        LinearView(linear)


def test_an_adapted_gpt2_adds_the_update_to_its_transposed_weights_and_removing_gives_the_conv1d_back():
    model, _ = tiny_model("gpt2")
    convs = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    adapter = apply_tinylora(model, u=3)
    assert [m.name for m in adapter.modules] == [n for n in convs if ".h." in n]
    adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        adapted = model(ids).logits
        for name, module in adapter.named_modules():  # y = x (W + dW^T) + b, the Conv1D's own layout
            conv = convs[name]
            x = torch.randn(2, 5, conv.weight.shape[0])  # (in, out) weight
            expected = x @ (conv.weight + module.delta_weight().T) + conv.bias
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3
    stored = {n: c.weight.detach().clone() for n, c in convs.items()}
    adapter.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    adapter.unmerge()
    assert all(torch.equal(convs[n].weight, w) for n, w in stored.items())  # bit-exact after unmerge
    adapter.remove()
    assert {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"} == convs  # the same objects
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
