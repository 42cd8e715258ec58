"""The oracle itself: it must be the paper's Algorithm 1, and agree with the closed form (docs/math.md)."""
import math

import torch
import torch.nn.functional as F

import lfma_kernels as lfma
from conftest import random_frequencies, rel_err


def paper_algorithm_1(x, weight, bias, delta_w_init, top_k_ratio, alpha):
    """Algorithm 1 as printed (square layers only: the paper writes ``x @ Delta_W``)."""
    d1, d2 = delta_w_init.shape
    w_freq = torch.fft.fft2(delta_w_init)
    k = int(d1 * d2 * top_k_ratio)
    indices = torch.topk(torch.abs(w_freq).view(-1), k).indices
    mask = torch.zeros((d1, d2), dtype=torch.bool)
    mask.view(-1)[indices] = True
    c = w_freq[mask].clone()
    spectrum = torch.zeros(weight.shape, dtype=torch.complex128)
    spectrum[mask] = c
    delta_w = torch.fft.ifft2(spectrum).real * alpha
    return F.linear(x, weight, bias) + x @ delta_w, delta_w, mask


def closed_form(coeffs, rows, cols, shape, alpha):
    """The closed form (docs/math.md): ``s * sum_k a_k cos(theta) - b_k sin(theta)`` with exact phase reduction."""
    d_out, d_in = shape
    m = torch.arange(d_out, dtype=torch.int64)[:, None, None]
    n = torch.arange(d_in, dtype=torch.int64)[None, :, None]
    theta = 2 * math.pi * (((m * rows) % d_out).double() / d_out + ((n * cols) % d_in).double() / d_in)
    a, b = coeffs[:, 0].double(), coeffs[:, 1].double()
    return alpha / (d_out * d_in) * (a * torch.cos(theta) - b * torch.sin(theta)).sum(-1)


def test_reference_is_algorithm_1(gen):
    d = 24
    init = torch.randn(d, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(d, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(5, d, generator=gen, dtype=torch.float64)
    expected, delta_w, mask = paper_algorithm_1(x, weight, bias, init, 0.05, alpha=12.0)
    rows, cols = mask.nonzero(as_tuple=True)
    values = torch.fft.fft2(init)[rows, cols]
    coeffs = torch.view_as_real(values)
    assert rel_err(lfma.reference.delta_weight(coeffs, rows, cols, (d, d), 12.0), delta_w) < 1e-14
    # The paper's x @ dW is F.linear(x, dW^T); our orientation is F.linear(x, dW) with dW shaped like W.
    ours = lfma.reference.lfma_linear(x, weight, bias, coeffs, rows, cols, 12.0)
    assert rel_err(ours, F.linear(x, weight, bias) + F.linear(x, delta_w)) < 1e-14
    assert rel_err(expected, F.linear(x, weight, bias) + F.linear(x, delta_w.T)) < 1e-14


def test_reference_matches_closed_form_non_square(gen):
    for shape, k in [((48, 80), 13), ((97, 64), 1), ((33, 33), 40)]:
        coeffs, rows, cols = random_frequencies(shape, k, generator=gen, dtype=torch.float64)
        ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 3.0)
        assert ref.dtype == torch.float64
        assert rel_err(ref, closed_form(coeffs, rows, cols, shape, 3.0)) < 1e-12


def test_reference_repeated_positions_add_up(gen):
    coeffs, rows, cols = random_frequencies((16, 12), 4, generator=gen, dtype=torch.float64)
    rows2, cols2 = torch.cat([rows, rows]), torch.cat([cols, cols])
    doubled = lfma.reference.delta_weight(torch.cat([coeffs, coeffs]), rows2, cols2, (16, 12), 1.0)
    assert rel_err(doubled, 2 * lfma.reference.delta_weight(coeffs, rows, cols, (16, 12), 1.0)) < 1e-14


def closed_form_grad(g, rows, cols, alpha):
    """The gradient (docs/math.md): ``dL/da_k = s sum G cos(theta)``, ``dL/db_k = -s sum G sin(theta)``, in float64."""
    d_out, d_in = g.shape
    m = torch.arange(d_out, dtype=torch.int64)[:, None, None]
    n = torch.arange(d_in, dtype=torch.int64)[None, :, None]
    theta = 2 * math.pi * (((m * rows) % d_out).double() / d_out + ((n * cols) % d_in).double() / d_in)
    s = alpha / (d_out * d_in)
    g = g.double()[:, :, None]
    return torch.stack([s * (g * torch.cos(theta)).sum((0, 1)), -s * (g * torch.sin(theta)).sum((0, 1))], dim=1)


def test_coeff_grad_is_autograd_through_ifft2_and_the_closed_form(gen):
    """The gradient oracle: autograd through the paper's delta_weight, equal to the closed form
    (and to the adjoint of delta_weight) on non-square and odd shapes, repeated positions included."""
    for shape, k in [((48, 80), 13), ((97, 64), 1), ((33, 33), 40), ((7, 5), 35)]:
        coeffs, rows, cols = random_frequencies(shape, k, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = lfma.reference.coeff_grad(g, rows, cols, 2.5)
        assert grad.dtype == torch.float64 and grad.shape == (k, 2)
        assert rel_err(grad, closed_form_grad(g, rows, cols, 2.5)) < 1e-12
        # <dW(c), G> = <c, grad(G)>
        lhs = (lfma.reference.delta_weight(coeffs, rows, cols, shape, 2.5) * g).sum()
        assert abs(lhs - (coeffs * grad).sum()) <= 1e-12 * max(1.0, abs(lhs))
    assert lfma.reference.coeff_grad(g.float(), rows, cols, 1.0).dtype == torch.float32


def test_reference_imports_nothing_it_checks():
    """The oracle stands alone: no import from the package's kernels or dispatch."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(lfma.reference))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert all(not name.startswith(("lfma_kernels", ".")) and name not in ("ops",) for name in imported), imported
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
