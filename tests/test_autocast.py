"""Mixed precision: torch.autocast (what the transformers Trainer's bf16=True runs) forward and
backward through LFMA layers, nn.Linear and Conv1D, every backend, against the float64 oracle;
the tolerance is bf16's own (1e-2, as for every bf16 output)."""
import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from conftest import FAST_BACKENDS, rel_err

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TOL = 1e-2


def make(kind, backend):
    torch.manual_seed(0)
    base = nn.Linear(24, 40) if kind == "linear" else Conv1D(40, 24)
    layer = lfma.LFMALinear(base, k=9, alpha=60.0, backend=backend)
    with torch.no_grad():
        layer.coeffs.normal_()
    return layer


def logical_weight(layer):
    w = layer.base.weight.detach()
    return w.t() if isinstance(layer.base, Conv1D) else w


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_forward_and_backward_match_the_oracle(kind, backend, input_dtype, mode):
    """A float32 input (the first layer, or after a LayerNorm) and a bf16 input that needs a
    gradient (a trainable layer below); train mode, and eval with grad enabled (dropout off)."""
    layer = make(kind, backend).train(mode == "train")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=gen).to(input_dtype).requires_grad_(True)
    g = torch.randn(2, 5, 40, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().backward(g)

    xd = x.detach().double().requires_grad_(True)
    cd = layer.coeffs.detach().double().requires_grad_(True)
    want = lfma.reference.lfma_linear(xd, logical_weight(layer).double(), layer.base.bias.double(), cd, layer.rows,
                                      layer.cols, layer.alpha)
    want.backward(g.double())
    assert rel_err(out, want) <= TOL
    assert x.grad.dtype == input_dtype and rel_err(x.grad, xd.grad) <= TOL
    assert layer.coeffs.grad.dtype == torch.float32 and rel_err(layer.coeffs.grad, cd.grad) <= TOL


def test_autocast_eval_cache_and_trainable_weight():
    layer = make("linear", "auto")
    layer.base.weight.requires_grad_(True)
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    assert layer.base.weight.grad.dtype == torch.float32 and layer.base.weight.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cached = layer(x)
    with torch.no_grad():
        want = layer.train()(x)
    assert cached.dtype == torch.bfloat16 and rel_err(cached, want) <= TOL


def test_mismatched_dtypes_outside_autocast_are_a_clear_error():
    layer = make("linear", "auto")
    with pytest.raises(RuntimeError, match="x is torch.float64 but the weight is torch.float32"):
        layer(torch.randn(2, 24, dtype=torch.float64))


def test_gpt2_through_peft_trains_under_autocast():
    pytest.importorskip("peft")
    import warnings

    import lfma_kernels.peft  # noqa: F401
    from lfma_kernels.peft import LfmaConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(transformers.GPT2LMHeadModel(config), LfmaConfig(target_modules=["c_attn"], k=16))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lfma_coeffs" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
