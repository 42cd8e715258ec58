"""transformers' Conv1D (GPT-2's projections, weight stored (in, out)) in the native API: the
adapter lives on the logical (d_out, d_in) weight; merging adds dW^T to the stored weight."""
import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels.model import lfma_layers
from conftest import FAST_BACKENDS, linear_against_oracle, rel_err

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

D_IN, D_OUT = 20, 60  # non-square, several outputs: a 1-output layer would hide transposition bugs


def make_conv(seed=0):
    torch.manual_seed(seed)
    conv = Conv1D(D_OUT, D_IN)  # nf = d_out, nx = d_in; weight (d_in, d_out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv


def random_coeffs(layer):
    with torch.no_grad():
        layer.coeffs.copy_(torch.randn(layer.coeffs.shape, generator=torch.Generator().manual_seed(2)))
    return layer


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_forward_and_gradients_match_the_oracle_on_the_logical_weight(backend, gen):
    conv = make_conv()
    layer = random_coeffs(lfma.LFMALinear(conv, k=11, alpha=40.0, backend=backend))
    assert (layer.out_features, layer.in_features) == (D_OUT, D_IN)
    x = torch.randn(3, 5, D_IN, generator=gen)
    grad = torch.randn(3, 5, D_OUT, generator=gen)
    for name, got, want in linear_against_oracle(backend, x, conv.weight.detach().t(), conv.bias.detach(),
                                                 layer.coeffs.detach(), layer.rows, layer.cols, grad, alpha=40.0):
        assert rel_err(got, want) <= 1e-5, name
    x = x.requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    xd = x.detach().double().requires_grad_(True)
    cd = layer.coeffs.detach().double().requires_grad_(True)
    ref = lfma.reference.lfma_linear(xd, conv.weight.detach().t().double(), conv.bias.double(), cd, layer.rows,
                                     layer.cols, 40.0)
    ref.backward(grad.double())
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(x.grad, xd.grad) <= 1e-5 and rel_err(layer.coeffs.grad, cd.grad) <= 1e-5
    layer.eval()
    with torch.no_grad():
        assert rel_err(layer(x), ref) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in FAST_BACKENDS if b != "triton"] + ["reference"])
def test_gradcheck_with_a_transposed_weight(backend):
    """float64 gradcheck of the fused op with the weight as a Conv1D passes it (a transposed
    view), the weight trainable too: dL/dW must come back in the stored layout."""
    gen = torch.Generator().manual_seed(4)
    rows, cols = torch.randint(0, 7, (4,), generator=gen), torch.randint(0, 5, (4,), generator=gen)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    stored = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    coeffs = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, c: lfma.lfma_linear(x, w.t(), None, c, rows, cols, 3.0, backend=backend),
        (x, stored, coeffs))


def test_weight_init_selects_from_the_logical_weight():
    conv = make_conv()
    layer = lfma.LFMALinear(conv, k=9, init="weight")
    spectrum = torch.fft.fft2(conv.weight.detach().t())
    assert torch.equal(torch.view_as_complex(layer.coeffs.detach().contiguous()), spectrum[layer.rows, layer.cols])
    assert int(layer.rows.max()) < D_OUT and int(layer.cols.max()) < D_IN


def test_merge_unmerge_adds_the_transposed_delta():
    conv = make_conv()
    layer = random_coeffs(lfma.LFMALinear(conv, k=11, alpha=40.0))
    original = conv.weight.detach().clone()
    x = torch.randn(4, D_IN)
    expected = layer(x).detach()
    layer.merge()
    assert rel_err(conv.weight - original, layer.delta_weight().detach().t()) <= 1e-5
    assert rel_err(conv(x), expected) <= 1e-6 and rel_err(layer(x), expected) <= 1e-6
    layer.unmerge()
    assert torch.allclose(conv.weight, original, atol=1e-5)


class TinyGPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * D_IN, D_IN), Conv1D(D_IN, D_IN)
        self.head = nn.Linear(D_IN, 4)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(D_IN, dim=-1)
        return self.head(self.c_proj(torch.tanh(q) * k + v))


def test_model_tooling_round_trip(tmp_path):
    torch.manual_seed(0)
    model = lfma.apply_lfma(TinyGPT2Block(), lfma.LFMAConfig(["c_attn", "c_proj"], k=6, alpha=30.0,
                                                             modules_to_save=["head"]))
    for layer in lfma_layers(model).values():
        random_coeffs(layer)
    x = torch.randn(2, 3, D_IN)
    expected = model(x).detach()
    lfma.save_lfma(model, tmp_path)
    torch.manual_seed(0)
    loaded = lfma.load_lfma(TinyGPT2Block(), tmp_path)
    assert torch.equal(loaded(x), expected)
    unloaded = lfma.unload_lfma(loaded)
    assert type(unloaded.c_attn) is Conv1D and type(unloaded.c_proj) is Conv1D
    assert rel_err(unloaded(x), expected) <= 1e-5


def test_other_modules_are_still_refused():
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D, got Conv1d"):
        lfma.LFMALinear(nn.Conv1d(4, 4, 1), k=2)
    with pytest.raises(TypeError, match="'norm' is a LayerNorm"):
        lfma.apply_lfma(nn.ModuleDict({"norm": nn.LayerNorm(4)}), lfma.LFMAConfig(["norm"], k=2))
