"""Mixed-adapter batches through PEFT (``model(..., adapter_names=[...])``): every sample through its own
adapter, against the same samples run one adapter at a time; every path the planner can choose; GPT-2
forward, ``generate`` and beam search; quantized bases; ``modules_to_save``; the errors PEFT's LoRA raises."""
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lfma_kernels as lfma  # noqa: E402
from conftest import FAST_BACKENDS, TRITON_INTERPRETED, rel_err  # noqa: E402
from lfma_kernels.ops import planner  # noqa: E402
from lfma_kernels.peft import LfmaConfig, LfmaLayer  # noqa: E402
from peft import get_peft_model  # noqa: E402
from test_peft import add_second, inputs, peft_model, randomize, tiny_gpt2  # noqa: E402

NAMES = ["default", "other", "__base__", "other", "default", "__base__"]
PATHS = ["fold", "rows", "separable", "dense"]


def one_at_a_time(model, x, names, **kwargs):
    """Each sample through the model with only its adapter active (``"__base__"``: adapters disabled)."""
    outs = []
    active = model.active_adapter
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                outs.append(model(x[i:i + 1], **kwargs))
        else:
            model.set_adapter(name)
            outs.append(model(x[i:i + 1], **kwargs))
    model.set_adapter(active)
    return torch.cat(outs)


def two_adapters(kind="mlp", **kwargs):
    return add_second(randomize(peft_model(kind, **kwargs)), kind, **kwargs).eval()


@pytest.mark.parametrize("kind", ["mlp", "conv1d"])
@pytest.mark.parametrize("path", [None] + PATHS)
def test_mixed_batch_equals_one_adapter_at_a_time(kind, path):
    model = two_adapters(kind)
    x = inputs(kind, n=len(NAMES))
    with torch.no_grad():
        want = one_at_a_time(model, x, NAMES)
        if path is None:
            got = model(x, adapter_names=NAMES)
        else:
            with planner.force(delta=path):
                got = model(x, adapter_names=NAMES)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(want, model(x)) > 1e-2  # the names matter: not the active adapter's output


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_adapters_of_different_k_and_backends_in_one_batch(backend):
    if backend == "triton" and TRITON_INTERPRETED:
        pytest.skip("the interpreter is slow; covered with the other backends")
    model = add_second(randomize(peft_model("mlp", k=9)), k=3, backend=backend).eval()
    x = inputs("mlp", n=len(NAMES))
    with torch.no_grad():
        assert rel_err(model(x, adapter_names=NAMES), one_at_a_time(model, x, NAMES)) <= 1e-5


def test_gradients_through_a_mixed_batch_in_eval_mode():
    """Grad mode on (eval mode): a kept W + dW cannot serve, the fold is rebuilt differentiably; the
    coefficient gradients for a random dL/dout equal those of each sample's own backward."""
    model = two_adapters()
    x = inputs("mlp", n=len(NAMES))
    g = torch.randn(len(NAMES), 5, 3, generator=torch.Generator().manual_seed(5))
    params = {n: p for n, p in model.named_parameters() if "lfma_coeffs" in n}
    model.zero_grad()
    for i, name in enumerate(NAMES):  # set_adapter makes the active adapter alone trainable
        if name != "__base__":
            model.set_adapter(name)
            model(x[i:i + 1]).backward(g[i:i + 1])
    want = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for path in [None] + PATHS:
        model.zero_grad()
        with planner.force(delta=path) if path else warnings.catch_warnings():
            model(x, adapter_names=NAMES).backward(g)
        for n, p in params.items():
            assert rel_err(p.grad, want[n]) <= 1e-5, (path, n)


def test_kept_folds_are_bounded_fresh_and_dropped():
    model = two_adapters()
    x = inputs("mlp", n=64)  # 320 rows per adapter: the planner folds
    names = ["default", "other"] * 32
    layers = [m for m in model.modules() if isinstance(m, LfmaLayer)]
    with torch.no_grad():
        model(x, adapter_names=names)
        assert all(set(layer._folds._caches) == {"default", "other"} for layer in layers)
        # an in-place update of the coefficients is seen (no stale W + dW)
        layers[0].lfma_coeffs["other"].mul_(-2.0)
        assert rel_err(model(x, adapter_names=names), one_at_a_time(model, x, names)) <= 1e-5
        model.set_mixed_batch_folds(1)
        model(x, adapter_names=names)
        assert all(len(layer._folds._caches) == 1 for layer in layers)
        assert rel_err(model(x, adapter_names=names), one_at_a_time(model, x, names)) <= 1e-5
        model.set_mixed_batch_folds(0)
        model(x, adapter_names=names)
        assert all(not layer._folds._caches for layer in layers)
        model.set_mixed_batch_folds(2)
        model(x, adapter_names=names)
        model.train().eval()  # a mode switch empties them, as the eval cache
        assert all(not layer._folds._caches for layer in layers)
        model(x, adapter_names=names)
        model.delete_adapter("other")
        assert all(set(layer._folds._caches) <= {"default"} for layer in layers)
    with pytest.raises(ValueError, match="max_adapters"):
        model.set_mixed_batch_folds(-1)


def test_layers_without_the_named_adapter_run_the_base():
    model = randomize(peft_model("mlp"))
    model.add_adapter("lin0_only", LfmaConfig(target_modules=["lin0"], k=4, alpha=30.0, seed=2))
    randomize(model, "lin0_only", seed=6)
    model.eval()
    names = ["lin0_only", "default", "__base__", "lin0_only"]
    x = inputs("mlp", n=len(names))
    with torch.no_grad():
        assert rel_err(model(x, adapter_names=names), one_at_a_time(model, x, names)) <= 1e-5


def test_modules_to_save_follow_each_sample():
    model = randomize(peft_model("mlp", modules_to_save=["head"]))
    model.add_adapter("other", LfmaConfig(target_modules=["lin0", "lin1"], k=5, alpha=20.0, seed=7,
                                          modules_to_save=["head"]))
    randomize(model, "other", seed=4)
    with torch.no_grad():
        head = model.base_model.model.head.modules_to_save["other"]
        head.weight.add_(torch.randn_like(head.weight))
    model.eval()
    x = inputs("mlp", n=len(NAMES))
    with torch.no_grad():
        assert rel_err(model(x, adapter_names=NAMES), one_at_a_time(model, x, NAMES)) <= 1e-5


def test_errors_as_peft_lora_raises_them():
    model = two_adapters()
    x = inputs("mlp", n=len(NAMES))
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(x, adapter_names=["default", "typo"] * 3)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(x, adapter_names=NAMES[:-1])
    with pytest.raises(TypeError, match="expected a list of str"):
        model(x, adapter_names="default")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=NAMES)
    model.eval()
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(x, adapter_names=NAMES)
    model.unmerge_adapter()
    # disabled adapters: the names are checked, then the base model runs
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(x, adapter_names=NAMES), model(x))


def gpt2_two_adapters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out forced for Conv1D
        model = get_peft_model(tiny_gpt2(), LfmaConfig(target_modules=["c_attn", "c_fc"], k=12, alpha=200.0, seed=0))
        model.add_adapter("b", LfmaConfig(target_modules=["c_attn"], k=20, alpha=300.0, seed=5))
    return randomize(randomize(model), "b", seed=9).eval()


def test_gpt2_forward_and_generate_with_mixed_names():
    model = gpt2_two_adapters()
    names = ["default", "b", "__base__", "b", "default"]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(0))

    def alone(i, name, run):
        if name == "__base__":
            with model.disable_adapter():
                return run(ids[i:i + 1])
        model.set_adapter(name)
        out = run(ids[i:i + 1])
        model.set_adapter("default")
        return out

    with torch.no_grad():
        want = torch.cat([alone(i, n, lambda t: model(input_ids=t).logits) for i, n in enumerate(names)])
        assert rel_err(model(input_ids=ids, adapter_names=names).logits, want) <= 1e-5
        for beams in (1, 3):
            kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=beams)
            got = model.generate(input_ids=ids[:, :3], adapter_names=names, **kwargs)
            for i, name in enumerate(names):
                expected = alone(i, name, lambda t: model.generate(input_ids=t[:, :3], **kwargs))
                assert torch.equal(got[i:i + 1], expected), (beams, name)


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
def test_mixed_batch_on_quantized_bases(kind):
    """The base layer runs once on the whole batch (LLM.int8's output depends on the batch: its outlier
    columns are the batch's) and each adapter adds x dW^T on its samples: against the float64 oracle."""
    from test_quantized import linear, quantize  # skips without bitsandbytes / torchao

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = quantize(kind, linear(64, 96, seed=0))

        def forward(self, x):
            return self.proj(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Net(), LfmaConfig(target_modules=["proj"], k=40, alpha=60.0, seed=0))
        model.add_adapter("other", LfmaConfig(target_modules=["proj"], k=25, alpha=80.0, seed=3))
    randomize(randomize(model), "other", seed=4).eval()
    layer = model.base_model.model.proj
    x = torch.randn(len(NAMES), 7, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = layer.base_layer(x).double()
        for i, name in enumerate(NAMES):
            if name != "__base__":
                dw = lfma.reference.delta_weight(layer.lfma_coeffs[name].double(), layer.lfma_rows[name],
                                                 layer.lfma_cols[name], (96, 64), layer.lfma_alpha[name])
                want[i] += x[i].double() @ dw.T
        for path in [None, "rows", "separable", "dense"]:
            with planner.force(delta=path) if path else warnings.catch_warnings():
                assert rel_err(model(x, adapter_names=NAMES), want) <= 1e-5, path
        with planner.force(delta="fold"), pytest.raises(ValueError, match="beside a quantized base"):
            model(x, adapter_names=NAMES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_model(dtype):
    model = two_adapters().to(dtype)
    x = inputs("mlp", n=len(NAMES)).to(dtype)
    with torch.no_grad():
        want = one_at_a_time(model, x, NAMES)
        for path in [None] + PATHS:
            with planner.force(delta=path) if path else warnings.catch_warnings():
                got = model(x, adapter_names=NAMES)
            assert got.dtype == dtype and rel_err(got, want) <= 1e-2, path


def test_fold_setting_reaches_layers_built_later_and_clear_cache():
    model = two_adapters()
    model.set_mixed_batch_folds(0)
    model.add_adapter("head_only", LfmaConfig(target_modules=["head"], k=3, seed=1))
    assert all(layer._folds.capacity == 0 for layer in model.modules() if isinstance(layer, LfmaLayer))
    model.set_mixed_batch_folds(2)
    x = inputs("mlp", n=64)
    with torch.no_grad():
        model(x, adapter_names=["default", "other"] * 32)
        layer = model.base_model.model.lin0
        assert layer._folds._caches and layer._folds._caches["default"]._entry is not None
        layer.clear_cache()
        assert not layer._folds._caches and layer._cache._entry is None


def test_names_are_checked_with_a_clear_message():
    model = two_adapters()
    x = inputs("mlp", n=2)
    with pytest.raises(TypeError, match="must all be str, got 1"):
        model(x, adapter_names=["default", 1])
    with pytest.raises(TypeError, match="expected a list of str"):
        model(x, adapter_names=(n for n in ["default", "other"]))


def test_generate_with_sampled_return_sequences_and_a_generation_config():
    model = gpt2_two_adapters()
    names = ["default", "b"]
    ids = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=names, do_sample=True, num_return_sequences=2,
                             max_new_tokens=3, pad_token_id=0)
        assert out.shape == (4, 6)
        config = transformers.GenerationConfig(num_beams=2, max_new_tokens=3, do_sample=False, pad_token_id=0)
        beams = model.generate(input_ids=ids, adapter_names=names, generation_config=config)
        for i, name in enumerate(names):
            model.set_adapter(name)
            assert torch.equal(beams[i:i + 1], model.generate(input_ids=ids[i:i + 1], generation_config=config))
