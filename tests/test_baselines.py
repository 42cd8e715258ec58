"""The FourierFT peer (lfma_kernels.baselines): the oracle, its zero start, no per-step host sync."""
import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels import _checks
from lfma_kernels.baselines import FourierFTLinear
from conftest import rel_err


def make_fourierft(n=23, **kwargs):
    torch.manual_seed(0)
    return FourierFTLinear(nn.Linear(80, 48), n, **kwargs)


def test_starts_as_the_frozen_layer():
    layer = make_fourierft()
    x = torch.randn(4, 80)
    assert torch.equal(layer(x), layer.base(x))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["spectrum"]


def test_matches_the_oracle_with_real_coefficients():
    layer = make_fourierft(alpha=30.0)
    with torch.no_grad():
        layer.spectrum.normal_()
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(3, 7, 80, generator=gen), torch.randn(3, 7, 48, generator=gen)
    layer(x).backward(g)
    spectrum = layer.spectrum.detach().double().requires_grad_(True)
    coeffs = torch.stack([spectrum, torch.zeros_like(spectrum)], dim=1)
    ref = lfma.reference.lfma_linear(x.double(), layer.base.weight.double(), layer.base.bias.double(), coeffs,
                                     layer.rows, layer.cols, layer.alpha)
    ref.backward(g.double())
    assert rel_err(layer(x), ref) <= 1e-5
    assert rel_err(layer.spectrum.grad, spectrum.grad) <= 1e-5


def test_training_step_does_not_revalidate_positions(monkeypatch):
    """The index range check reads the positions on the host (a GPU sync): once, never per step."""
    layer = make_fourierft()

    def refuse(*args, **kwargs):
        raise AssertionError("positions validated inside a training step")

    monkeypatch.setattr(_checks, "check_frequencies", refuse)
    monkeypatch.setattr(lfma.functional, "check_frequencies", refuse)
    layer(torch.randn(2, 80)).backward(torch.randn(2, 48))
    assert layer.spectrum.grad is not None


def test_bad_arguments():
    for n in (0, 48 * 80 + 1):
        with pytest.raises(ValueError, match="k must be"):
            make_fourierft(n)
    with pytest.raises(ValueError, match="unknown backend"):
        make_fourierft(backend="jax")
    with pytest.raises(TypeError, match="nn.Linear"):
        FourierFTLinear(nn.Conv1d(4, 4, 1), 2)
