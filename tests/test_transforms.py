"""Higher-order autograd and torch.func transforms through the layer and the functional API, on every
backend, against the float64 oracle (the paper's formulation, differentiated by autograd itself).

Second derivatives: an input-gradient penalty (WGAN-GP: ``dL/dx = g (W + dW)`` depends on the
coefficients), a Hessian-vector product over the coefficients (MAML's inner step). torch.func:
``grad``, per-sample gradients with ``vmap(grad)`` (Opacus-style), ``jacrev``, ``jacfwd``, ``hessian``,
``vmap`` over stacked coefficients (ensembles)."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import lfma_kernels as lfma
from conftest import FAST_BACKENDS, rel_err

# torch.func.jacfwd scripts its jvp decompositions with the deprecated torch.jit.script: its noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

D_OUT, D_IN, K, ALPHA = 12, 20, 7, 9.0


def float64_layer(backend, gen):
    """A float64 layer (coefficients included) with random coefficients, repeated positions allowed."""
    torch.manual_seed(0)
    layer = lfma.LFMALinear(nn.Linear(D_IN, D_OUT), k=K, alpha=ALPHA, backend=backend).double()
    with torch.no_grad():
        layer.coeffs.copy_(torch.randn(K, 2, generator=gen, dtype=torch.float64))
        layer.rows[:2] = 5  # a repeated position: its two coefficients add up
        layer.cols[:2] = 3
    return layer


def oracle(layer, x, coeffs):
    return lfma.reference.lfma_linear(x, layer.base.weight, layer.base.bias, coeffs, layer.rows, layer.cols,
                                      layer.alpha)


def with_coeffs(layer, coeffs, x):
    return functional_call(layer, {"coeffs": coeffs}, (x,))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("api", ["layer", "functional"])
def test_input_gradient_penalty_and_hessian_vector_product(backend, api, gen):
    layer = float64_layer(backend, gen)
    x = torch.randn(3, 4, D_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, D_OUT, generator=gen, dtype=torch.float64)  # constant: WGAN-GP's interpolation weight
    target = torch.randn(3, 4, D_OUT, generator=gen, dtype=torch.float64)
    probe = torch.randn(K, 2, generator=gen, dtype=torch.float64)

    def forward(coeffs):
        if api == "layer":
            return with_coeffs(layer, coeffs, x)
        return lfma.lfma_linear(x, layer.base.weight, layer.base.bias, coeffs, layer.rows, layer.cols, layer.alpha,
                                backend=backend)

    def second_derivatives(run):
        coeffs = layer.coeffs.detach().clone().requires_grad_(True)
        out = run(coeffs)
        (gx,) = torch.autograd.grad(out, x, v, create_graph=True)
        penalty = ((out * target).sum() + gx.pow(2).sum())
        (gc,) = torch.autograd.grad(penalty, coeffs, create_graph=True)
        (hvp,) = torch.autograd.grad((gc * probe).sum(), coeffs)
        return gc, hvp

    for got, want in zip(second_derivatives(forward), second_derivatives(lambda c: oracle(layer, x, c))):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_per_sample_gradients_equal_a_loop_and_the_oracle(backend, gen):
    layer = float64_layer(backend, gen)
    x = torch.randn(5, 3, D_IN, generator=gen, dtype=torch.float64)
    target = torch.randn(5, 3, D_OUT, generator=gen, dtype=torch.float64)
    coeffs = layer.coeffs.detach()

    def loss(c, xi, ti, run):
        return (run(c, xi) * ti).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop" fallback: every op has a vmap rule
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0, None))(coeffs, x, target,
                                                                   lambda c, xi: with_coeffs(layer, c, xi))
    loop = torch.stack([torch.autograd.grad((layer(xi) * ti).sum(), layer.coeffs)[0] for xi, ti in zip(x, target)])
    want = vmap(grad(loss), in_dims=(None, 0, 0, None))(coeffs, x, target, lambda c, xi: oracle(layer, xi, c))
    assert per_sample.shape == (5, K, 2)
    assert rel_err(per_sample, loop) <= 1e-10
    assert rel_err(per_sample, want) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_jacobians_and_hessian(backend, gen):
    layer = float64_layer(backend, gen)
    x = torch.randn(2, D_IN, generator=gen, dtype=torch.float64)
    coeffs = layer.coeffs.detach()
    for transform in (jacrev, jacfwd):
        got = transform(lambda c: with_coeffs(layer, c, x))(coeffs)
        assert rel_err(got, transform(lambda c: oracle(layer, x, c))(coeffs)) <= 1e-10
        got = transform(lambda xx: with_coeffs(layer, coeffs, xx))(x)
        assert rel_err(got, transform(lambda xx: oracle(layer, xx, coeffs))(x)) <= 1e-10
    got = hessian(lambda c: with_coeffs(layer, c, x).pow(2).sum())(coeffs)
    assert rel_err(got, hessian(lambda c: oracle(layer, x, c).pow(2).sum())(coeffs)) <= 1e-10
    got = jacrev(lambda c: lfma.delta_weight(c, layer.rows, layer.cols, (D_OUT, D_IN), ALPHA, backend=backend))(coeffs)
    want = jacrev(lambda c: lfma.reference.delta_weight(c, layer.rows, layer.cols, (D_OUT, D_IN), ALPHA))(coeffs)
    assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_vmap_over_stacked_coefficients(backend, gen):
    """Model ensembling: one forward per set of coefficients, through vmap."""
    layer = float64_layer(backend, gen)
    x = torch.randn(3, D_IN, generator=gen, dtype=torch.float64)
    stacked = torch.randn(4, K, 2, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(lambda c: with_coeffs(layer, c, x))(stacked)
    assert rel_err(got, torch.stack([oracle(layer, x, c) for c in stacked])) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_reverse_over_forward(backend, gen):
    """A gradient of a jvp (jacrev of jacfwd; grad of a directional derivative): the jvp uses the saved
    W + dW, so the outer reverse pass must reach the coefficients through it."""
    layer = float64_layer(backend, gen)
    x = torch.randn(3, D_IN, generator=gen, dtype=torch.float64)
    t = torch.randn(3, D_IN, generator=gen, dtype=torch.float64)
    coeffs = layer.coeffs.detach()

    def directional(run):
        return lambda c: torch.func.jvp(lambda xx: run(c, xx).tanh().pow(2).sum(), (x,), (t,))[1]

    got = grad(directional(lambda c, xx: with_coeffs(layer, c, xx)))(coeffs)
    want = grad(directional(lambda c, xx: oracle(layer, xx, c)))(coeffs)
    assert rel_err(got, want) <= 1e-10
    got = jacrev(jacfwd(lambda c, xx: with_coeffs(layer, c, xx).tanh().sum(), argnums=1))(coeffs, x)
    want = jacrev(jacfwd(lambda c, xx: oracle(layer, xx, c).tanh().sum(), argnums=1))(coeffs, x)
    assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_eager_forward_mode_ad(backend, gen):
    import torch.autograd.forward_ad as fwad

    layer = float64_layer(backend, gen)
    x = torch.randn(4, D_IN, generator=gen, dtype=torch.float64)
    t = torch.randn(4, D_IN, generator=gen, dtype=torch.float64)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(layer(fwad.make_dual(x, t))).tangent
    assert rel_err(tangent, t @ (layer.base.weight + lfma.reference.delta_weight(
        layer.coeffs.detach(), layer.rows, layer.cols, (D_OUT, D_IN), ALPHA)).T) <= 1e-10


def test_the_first_order_backward_saves_no_weight():
    """Only x, W + dW and the coefficients are kept for the backward: the frozen weight may change in
    place between forward and backward (a merge), and saved-tensor hooks (offloading) never see it."""
    layer = lfma.LFMALinear(nn.Linear(D_IN, D_OUT), k=K)
    x = torch.randn(5, D_IN)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not any(t is layer.base.weight for t in saved) and len(saved) == 5
    expected = torch.autograd.grad(out.sum(), layer.coeffs, retain_graph=True)[0]
    layer.merge()
    assert torch.equal(torch.autograd.grad(out.sum(), layer.coeffs)[0], expected)


def test_compiled_grad():
    layer = lfma.LFMALinear(nn.Linear(D_IN, D_OUT), k=K)
    x = torch.randn(3, D_IN)
    loss = lambda c: with_coeffs(layer, c, x).pow(2).sum()  # noqa: E731
    coeffs = layer.coeffs.detach()
    assert rel_err(torch.compile(grad(loss), backend="aot_eager")(coeffs), grad(loss)(coeffs)) <= 1e-6
