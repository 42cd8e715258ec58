"""LFMALinear: the public contract, the eval cache, merge/unmerge, bad input."""
import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels.ops import dispatch
from conftest import FAST_BACKENDS, compiled_matches_eager, make_layer, rel_err


def test_contract_attributes():
    base = nn.Linear(80, 48)
    layer = lfma.LFMALinear(base, top_k_ratio=0.01, alpha=3.0)
    assert layer.base is base and layer.alpha == 3.0 and isinstance(layer.alpha, float)
    assert isinstance(layer.coeffs, nn.Parameter) and layer.coeffs.dtype == torch.float32
    assert layer.coeffs.shape == (38, 2) and layer.coeffs.requires_grad
    assert layer.rows.dtype == layer.cols.dtype == torch.int64
    assert not any(p.requires_grad for p in base.parameters())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["coeffs"]
    assert {"coeffs", "rows", "cols", "base.weight", "base.bias"} == set(layer.state_dict())
    assert "k=38" in repr(layer) and "real_params=76" in repr(layer) and "ratio=0.009896" in repr(layer)


def test_initial_coefficients_are_the_init_spectrum():
    init = torch.randn(48, 80)
    layer = make_layer(init=init, k=10)
    spectrum = torch.fft.fft2(init)
    assert torch.equal(torch.view_as_complex(layer.coeffs.detach().contiguous()), spectrum[layer.rows, layer.cols])
    a = make_layer(seed=1)
    b = make_layer(seed=1)
    c = make_layer(seed=2)
    assert torch.equal(a.rows, b.rows) and not torch.equal(a.rows, c.rows)
    w = make_layer(init="weight")
    spectrum = torch.fft.fft2(w.base.weight.detach())
    assert torch.equal(torch.view_as_complex(w.coeffs.detach().contiguous()), spectrum[w.rows, w.cols])


def top_k_projection(weight, rows, cols):
    """``P_K(W) = Re(ifft2(mask * fft2(W)))`` in float64, ``mask`` the selected positions."""
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    mask[rows, cols] = True
    return torch.fft.ifft2(torch.fft.fft2(weight.double()) * mask).real


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_scaled_weight_start_is_alpha_scale_times_the_weights_top_k_part(scale):
    """The official code's start: support from the weight's energy, dW = alpha * scale * P_K(W)."""
    layer = make_layer(init="weight", init_scale=scale, alpha=12.0, k=40)
    want = 12.0 * scale * top_k_projection(layer.base.weight.detach(), layer.rows, layer.cols)
    assert rel_err(layer.delta_weight(), want) <= 1e-5
    unscaled = make_layer(init="weight", alpha=12.0, k=40)
    assert torch.equal(layer.rows, unscaled.rows) and torch.equal(layer.cols, unscaled.cols)


def test_zero_start_keeps_the_weights_support_and_starts_at_the_base_layer():
    layer = make_layer(init="weight", init_scale=0.0, k=40)
    reference = make_layer(init="weight", k=40)
    assert torch.equal(layer.rows, reference.rows) and torch.equal(layer.cols, reference.cols)
    assert not layer.coeffs.any()
    x = torch.randn(3, 80)
    assert torch.equal(layer(x), layer.base(x))
    layer(x).backward(torch.randn(3, 48))
    assert layer.coeffs.grad.abs().sum() > 0, "a zero start must still train"
    config = lfma.LFMAConfig(["0"], k=4, init="weight", init_scale=0.0)
    assert lfma.LFMAConfig.from_dict(config.to_dict()).init_scale == 0.0
    for bad in (float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="init_scale"):
            make_layer(init_scale=bad)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["auto", "reference"])
def test_forward_backward_matches_oracle(backend):
    layer = make_layer(backend=backend, hermitian=True)
    x = torch.randn(2, 3, 80, requires_grad=True)
    out = layer(x)
    out.pow(2).sum().backward()
    c = layer.coeffs.detach().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    ref = lfma.reference.lfma_linear(xd, layer.base.weight.double(), layer.base.bias.double(), c, layer.rows,
                                     layer.cols, layer.alpha)
    ref.pow(2).sum().backward()
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(layer.coeffs.grad, c.grad) <= 1e-5 and rel_err(x.grad, xd.grad) <= 1e-5
    assert layer.base.weight.grad is None
    assert rel_err(layer.delta_weight(), lfma.reference.delta_weight(c, layer.rows, layer.cols, (48, 80), layer.alpha)) <= 1e-5


def test_eval_cache_hits_and_invalidation(count_folds):
    layer = make_layer()
    x = torch.randn(4, 80)
    layer.eval()
    with torch.no_grad():
        first = layer(x)
        layer(x)
        layer(x)
    assert len(count_folds) == 1, "the eval forward rebuilt W + dW although nothing changed"
    with torch.inference_mode():
        layer(x)
    assert len(count_folds) == 1

    # in-place coefficient update, as an optimizer step does
    opt = torch.optim.SGD([layer.coeffs], lr=1e-3)
    layer.coeffs.grad = torch.randn_like(layer.coeffs)
    opt.step()
    with torch.no_grad():
        after_step = layer(x)
    assert len(count_folds) == 2 and not torch.equal(first, after_step)
    layer.train()
    expected = layer(x)
    assert rel_err(after_step, expected) <= 1e-6

    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.coeffs.mul_(2.0)
        doubled = layer(x)
    assert len(count_folds) == 4
    layer.train()
    assert rel_err(doubled, layer(x)) <= 1e-6

    layer.eval()
    with torch.no_grad():
        layer(x)
        n = len(count_folds)
        layer.double()
        layer(x.double())
    assert len(count_folds) == n + 1


def test_eval_with_grad_enabled_still_trains_coeffs():
    """model.eval() during training (to turn dropout off) must not silently stop coefficient grads:
    in eval with grad enabled the layer gives the training-mode gradient. (A plain ``.sum()`` loss
    would not do: its dL/dout is constant along the output, so every frequency with u != 0 has an
    exactly zero gradient.)"""
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(3, 80, generator=gen), torch.randn(3, 48, generator=gen)
    grads = {}
    for mode in ("train", "eval"):
        layer = make_layer().train(mode == "train")
        layer(x).backward(g)
        grads[mode] = layer.coeffs.grad
    assert grads["eval"] is not None and grads["eval"].abs().sum() > 0
    assert rel_err(grads["eval"], grads["train"]) <= 1e-6


@pytest.mark.parametrize("adam_foreach", [False, True])
def test_cache_follows_optimizer_steps(adam_foreach):
    layer = make_layer()
    opt = torch.optim.Adam([layer.coeffs], lr=1e-2, foreach=adam_foreach)
    x = torch.randn(5, 80)
    for _ in range(3):
        layer.train()
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        layer.eval()
        with torch.no_grad():
            cached = layer(x)
        assert rel_err(cached, lfma.reference.lfma_linear(
            x.double(), layer.base.weight.double(), layer.base.bias.double(), layer.coeffs.detach().double(),
            layer.rows, layer.cols, layer.alpha)) <= 1e-5


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(6, 80)
    original = layer.base.weight.detach().clone()
    expected = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), expected) <= 1e-6
    assert rel_err(layer.base(x), expected) <= 1e-6
    layer.merge()  # merging twice is a no-op
    assert rel_err(layer(x), expected) <= 1e-6
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base.weight, original, atol=1e-6)
    assert rel_err(layer(x), expected) <= 1e-6


def test_safe_merge_refuses_non_finite():
    layer = make_layer()
    original = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.coeffs[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.base.weight, original) and not layer.merged


def test_bad_construction():
    with pytest.raises(TypeError, match="nn.Linear"):
        lfma.LFMALinear(nn.Conv1d(4, 4, 1), k=2)
    base = nn.Linear(8, 6)
    for kwargs, match in [
        ({}, "exactly one"), ({"k": 2, "top_k_ratio": 0.1}, "exactly one"), ({"k": 0}, "k must be"),
        ({"k": 49}, "k must be"), ({"top_k_ratio": 1.5}, "top_k_ratio"), ({"top_k_ratio": 0.001}, "selects no"),
        ({"k": 2, "init": "zeros"}, "init must be"), ({"k": 2, "backend": "jax"}, "unknown backend"),
    ]:
        with pytest.raises(ValueError, match=match):
            lfma.LFMALinear(base, **kwargs)
        assert all(p.requires_grad for p in base.parameters()), "a failed construction froze the base layer"


UNAVAILABLE = [b for b in dispatch.BACKENDS if b not in lfma.available_backends()]


@pytest.mark.skipif(not UNAVAILABLE, reason="every backend is available here")
def test_backend_that_cannot_run_here_is_refused_at_construction():
    """Availability cannot change within a process, so a backend that cannot run fails at
    construction (saying why), not at the first forward; the base layer is left as it was."""
    base = nn.Linear(8, 6)
    with pytest.raises(RuntimeError, match=f"backend '{UNAVAILABLE[0]}' is not available: .+"):
        lfma.LFMALinear(base, k=2, backend=UNAVAILABLE[0])
    assert all(p.requires_grad for p in base.parameters())


def test_frequencies_argument():
    rows, cols = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 7])
    values = torch.randn(3, dtype=torch.complex64)
    layer = lfma.LFMALinear(nn.Linear(8, 6), frequencies=lfma.Frequencies(rows, cols, values))
    assert layer.k == 3 and torch.equal(layer.rows, rows)
    with pytest.raises(ValueError, match="rows must lie in"):
        lfma.LFMALinear(nn.Linear(8, 6), frequencies=lfma.Frequencies(rows + 4, cols, values))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_torch_compile_without_graph_breaks(backend):
    """fullgraph=True: the adapter must trace as custom ops, in training (fwd + bwd) and eval."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.GELU(), nn.Linear(24, 12))
    lfma.apply_lfma(model, lfma.LFMAConfig(["0", "2"], k=7, backend=backend))
    compiled_matches_eager(model, torch.randn(3, 5, 20), out_tol=1e-6, grad_tol=1e-5, backend="aot_eager")


def test_numpy_and_tensor_k_and_a_bad_init_std():
    np = pytest.importorskip("numpy")
    assert make_layer(k=np.int64(5)).k == 5 and make_layer(k=torch.tensor(6)).k == 6
    for std in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="init_std"):
            make_layer(init_std=std)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "3", None])
def test_alpha_must_be_a_finite_number(alpha):
    with pytest.raises(ValueError, match="alpha must be a"):
        make_layer(alpha=alpha)
    assert make_layer(alpha=torch.tensor(3.0)).alpha == 3.0 and type(make_layer(alpha=torch.tensor(3.0)).alpha) is float


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_init_weight_with_nan_or_inf_is_refused(bad):
    base = nn.Linear(80, 48)
    with torch.no_grad():
        base.weight[3, 5] = bad
    with pytest.raises(ValueError, match=r'init="weight": the weight has NaN or inf'):
        lfma.LFMALinear(base, k=9, init="weight")
    with pytest.raises(ValueError, match="the init tensor has NaN or inf"):
        lfma.LFMALinear(nn.Linear(80, 48), k=9, init=base.weight.detach())
    assert base.weight.requires_grad, "a refused layer leaves its base as it was"


def test_seed_none_draws_from_the_global_rng():
    torch.manual_seed(3)
    a, b = make_layer(seed=None), make_layer(seed=None)  # make_layer reseeds the global RNG with 0 first
    assert torch.equal(a.rows, b.rows)
    base = nn.Linear(80, 48)
    torch.manual_seed(1)
    first = lfma.LFMALinear(base, k=17, seed=None)
    second = lfma.LFMALinear(base, k=17, seed=None)
    assert not torch.equal(first.coeffs, second.coeffs)


def test_loading_adapter_state_into_a_merged_layer_is_refused():
    layer = make_layer()
    with torch.no_grad():
        layer.coeffs.normal_()
    x = torch.randn(4, 80)
    expected = layer(x).detach()
    layer.merge()
    weight = layer.base.weight.detach().clone()
    other = make_layer(seed=9).state_dict()
    with pytest.raises(ValueError, match="the layer is merged; unmerge it"):
        layer.load_state_dict(other)
    assert torch.equal(layer.base.weight, weight)
    layer.unmerge()
    assert rel_err(layer(x), expected) <= 1e-5
    layer.load_state_dict(other)  # unmerged: loads


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_eager_calls_skip_the_op_and_compiled_ones_trace_it(backend):
    """Eager: the layer runs linear_op.LinearFunction (the op's forward and backward without its
    dispatch), with the op's outputs and gradients. Compiled: the graph holds the op itself.
    torch.func transforms get a Function of their own: vmap matches a loop. A second derivative through
    the op equals the one through the layer."""
    torch.manual_seed(0)
    layer = make_layer(20, 24, k=7, backend=backend)
    x = torch.randn(3, 5, 20, requires_grad=True)
    g = torch.randn(3, 5, 24)
    decision = layer.plan(x)
    choices = (decision.backend, decision.dw, decision.grad, decision.backward)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "LinearFunctionBackward"
    grads = torch.autograd.grad(out, (x, layer.coeffs), g)
    op = torch.ops.lfma.linear
    want = op(x, layer.base.weight, layer.base.bias, layer.coeffs, layer.rows, layer.cols, layer.alpha, *choices)[0]
    assert torch.equal(out, want)
    for got, ref in zip(grads, torch.autograd.grad(want, (x, layer.coeffs), g)):
        assert torch.equal(got, ref)

    targets = []

    def record(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    torch.compile(layer, backend=record, fullgraph=True)(x)
    assert op.default in targets or op in targets, targets

    batched = torch.func.vmap(layer)(x.detach())
    assert rel_err(batched, torch.stack([layer(xi) for xi in x.detach()])) <= 1e-6

    # A second derivative through the direct op call equals the one through the layer (both are
    # checked against the oracle in test_transforms.py).
    seconds = []
    for run in (layer, lambda x: op(x, layer.base.weight, layer.base.bias, layer.coeffs, layer.rows, layer.cols,
                                    layer.alpha, *choices)[0]):
        first = torch.autograd.grad((run(x) * g).sum(), x, create_graph=True)[0]
        seconds.append(torch.autograd.grad(first.pow(2).sum(), layer.coeffs)[0])
    assert rel_err(seconds[1], seconds[0]) <= 1e-6
