"""The eval cache of W + dW never serves a stale weight, and never serves a forward that needs a
gradient through it. Every test compares with the float64 oracle, or with the
same layer in training mode, after the change under test."""
import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from conftest import FAST_BACKENDS, make_layer, rel_err, swap_in_checkpoints

X = torch.randn(5, 80, generator=torch.Generator().manual_seed(7))


def oracle(layer, x=X):
    return lfma.reference.lfma_linear(x.double(), layer.base.weight.double(), layer.base.bias.double(),
                                      layer.coeffs.detach().double(), layer.rows, layer.cols, layer.alpha)


def cached_output(layer, x=X):
    """The eval forward; the layer must already be in eval mode (``eval()`` drops the cache)."""
    assert not layer.training
    with torch.no_grad():
        return layer(x)


def step(layer, opt):
    """One training step with a random dL/dout (a plain sum would leave u != 0 frequencies alone)."""
    out = layer(X)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(11)))
    opt.step()
    opt.zero_grad()


class DataWritingSGD(torch.optim.Optimizer):
    """An old-style optimizer: it updates ``p.data``, which bumps no version counter."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS = {
    "adamw fused": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    "adam fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    "sgd fused": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
    "adamw foreach": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    "adamw for-loop": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "p.data writer": lambda p: DataWritingSGD(p, lr=0.1),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cache_follows_every_optimizer_in_eval_mode(optimizer):
    """Training while the model stays in eval() (dropout off), with cached eval forwards between
    steps: fused optimizers bump no version counter, yet the cache must see their update."""
    layer = make_layer(alpha=50.0).eval()
    opt = OPTIMIZERS[optimizer]([layer.coeffs])
    for _ in range(3):
        before = cached_output(layer)
        step(layer, opt)
        after = cached_output(layer)
        assert rel_err(after, oracle(layer)) <= 1e-5
        assert not torch.equal(after, before)


def test_cache_follows_a_trained_base_weight():
    """Coefficients and weight trained together (full fine-tuning on top of LFMA)."""
    layer = make_layer(alpha=50.0).eval()
    layer.base.weight.requires_grad_(True)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    cached_output(layer)
    step(layer, opt)
    assert rel_err(cached_output(layer), oracle(layer)) <= 1e-5


@pytest.mark.parametrize("edit", ["rows in place", "cols in place", "new rows buffer", "new coeffs parameter",
                                  "load_state_dict", "load_state_dict assign"])
def test_cache_sees_edited_sources(edit):
    layer = make_layer().eval()
    other = make_layer(seed=5)
    cached_output(layer)
    with torch.no_grad():
        if edit == "rows in place":
            layer.rows[:3] = (layer.rows[:3] + 1) % layer.out_features
        elif edit == "cols in place":
            layer.cols[:3] = (layer.cols[:3] + 1) % layer.in_features
        elif edit == "new rows buffer":
            layer.rows = other.rows.clone()
        elif edit == "new coeffs parameter":
            layer.coeffs = nn.Parameter(other.coeffs.detach().clone())
        else:
            layer.load_state_dict(other.state_dict(), assign=edit.endswith("assign"))
    assert rel_err(cached_output(layer), oracle(layer)) <= 1e-5


def test_cache_is_never_fooled_by_a_reused_address():
    layer = make_layer().eval()
    for out in swap_in_checkpoints(layer, "base.", lambda: (layer(X), oracle(layer)), 48, 80):
        assert rel_err(*out) <= 1e-5


def test_data_writes_are_seen_after_clear_cache():
    """Writes through ``.data`` outside an optimizer step are hidden from version counters by
    design; ``clear_cache()`` is the documented way to make the cache see them."""
    layer = make_layer().eval()
    cached_output(layer)
    layer.coeffs.data.mul_(3.0)
    layer.clear_cache()
    assert rel_err(cached_output(layer), oracle(layer)) <= 1e-5


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["auto", "reference"])
def test_eval_with_frozen_coeffs_and_trainable_weight_gives_train_gradients(backend):
    """The cache may serve a forward only when nothing that feeds it needs a gradient: here the
    weight does, so eval must give exactly the training-mode gradients."""
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(3, 80, generator=gen), torch.randn(3, 48, generator=gen)
    grads = {}
    for mode in ("train", "eval"):
        layer = make_layer(backend=backend).train(mode == "train")
        layer.coeffs.requires_grad_(False)
        layer.base.weight.requires_grad_(True)
        layer.base.bias.requires_grad_(True)
        layer(x).backward(g)
        grads[mode] = (layer.base.weight.grad, layer.base.bias.grad)
    for got, want in zip(grads["eval"], grads["train"]):
        assert got is not None and rel_err(got, want) <= 1e-6


def test_trainable_bias_alone_still_uses_the_cache(count_folds):
    """The bias is added after the cached weight, so its gradient does not keep the cache out."""
    layer = make_layer().eval()
    layer.coeffs.requires_grad_(False)
    layer.base.bias.requires_grad_(True)
    x = torch.randn(4, 80, requires_grad=True)
    g = torch.randn(4, 48)
    for _ in range(3):
        layer(x).backward(g)
    assert len(count_folds) == 1
    assert torch.allclose(layer.base.bias.grad, 3 * g.sum(0))
    assert rel_err(x.grad, 3 * g @ (layer.base.weight + layer.delta_weight()).detach()) <= 1e-6


def test_cache_built_under_inference_mode_serves_autograd_later(count_folds):
    layer = make_layer().eval()
    layer.coeffs.requires_grad_(False)
    with torch.inference_mode():
        under_inference = layer(X)
    x = X.clone().requires_grad_(True)
    out = layer(x)
    g = torch.randn(out.shape)
    out.backward(g)
    assert len(count_folds) == 1, "the cache built under inference_mode was not reused"
    assert torch.equal(out.detach(), under_inference)
    assert rel_err(x.grad, g @ (layer.base.weight + layer.delta_weight()).detach()) <= 1e-6


def test_layer_built_under_inference_mode_runs_in_eval():
    with torch.inference_mode():
        layer = make_layer().eval()
        out = layer(X)
    assert rel_err(out, oracle(layer)) <= 1e-5


def test_no_cache_while_parameters_are_sharded(monkeypatch, count_folds):
    """Under FSDP2 the parameters are DTensors between forwards and the unsharded copies are
    refilled without version bumps: the layer keeps no cache (nor its memory), every eval forward
    runs the uncached fused path."""
    from lfma_kernels import adapter

    layer = make_layer()
    monkeypatch.setattr(adapter, "is_dtensor", lambda t: t is layer.coeffs)
    layer.eval()
    for _ in range(3):
        assert rel_err(cached_output(layer), oracle(layer)) <= 1e-5
    assert not count_folds and layer._cache._entry is None
    monkeypatch.setattr(adapter, "is_dtensor", lambda t: False)  # unsharded again
    layer.train().eval()
    cached_output(layer)
    cached_output(layer)
    assert len(count_folds) == 1 and layer._cache._entry is not None


def test_copies_and_pickles_carry_no_cache(tmp_path):
    import copy
    import pickle

    layer = make_layer().eval()
    cached_output(layer)
    assert layer._cache._entry is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._cache._entry is None
        assert rel_err(cached_output(clone), oracle(layer)) <= 1e-5
    torch.save(layer, tmp_path / "layer.pt")
    assert torch.load(tmp_path / "layer.pt", weights_only=False)._cache._entry is None


def test_load_state_dict_refuses_positions_out_of_range():
    layer = make_layer()
    state = layer.state_dict()
    state["rows"] = state["rows"] + 48
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 48\)"):
        layer.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
