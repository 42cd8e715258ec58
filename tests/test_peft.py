"""LFMA as a PEFT method (lfma_kernels.peft): the behaviours PEFT holds every method to (its
tests/test_custom_models.py), written here, on a plain MLP, a transformers Conv1D model, a ViT and
a GPT-2 built from configs; plus equality with the native layer and the float64 oracle."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lfma_kernels as lfma  # noqa: E402
from lfma_kernels.peft import LfmaConfig, LfmaLayer, LfmaLinear, LfmaModel  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from conftest import AttentionBlock, rel_err, swap_in_checkpoints  # noqa: E402
from lfma_kernels import adapter  # noqa: E402


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(20, 36, bias=bias), nn.Linear(36, 24, bias=bias), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Conv1DModel(nn.Module):
    """GPT-2's layout: c_attn 20 -> 60 (non-square, several outputs), c_proj 20 -> 20."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj, self.head = Conv1D(60, 20), Conv1D(20, 20), nn.Linear(20, 3)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(20, dim=-1)
        return self.head(self.c_proj(torch.tanh(q) * k + v))


MODELS = {"mlp": (MLP, ["lin0", "lin1"], 20), "conv1d": (Conv1DModel, ["c_attn", "c_proj"], 20)}


def fresh(kind, seed=0):
    torch.manual_seed(seed)
    return MODELS[kind][0]()


def peft_model(kind, model_seed=0, **kwargs):
    """A PEFT model with the adapter ``kwargs`` say; ``seed=0`` unless given, so that it selects what
    the native ``apply_lfma`` selects (the PEFT config's default draws from the global RNG)."""
    kwargs.setdefault("k", 7)
    kwargs.setdefault("alpha", 40.0)
    kwargs.setdefault("seed", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out forced for Conv1D: tested on its own
        return get_peft_model(fresh(kind, model_seed), LfmaConfig(target_modules=MODELS[kind][1], **kwargs))


def inputs(kind, n=4, seed=1):
    return torch.randn(n, 5, MODELS[kind][2], generator=torch.Generator().manual_seed(seed))


def lfma_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LfmaLayer)}


def randomize(model, adapter="default", seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lfma_layers(model).values():
            if adapter in layer.lfma_coeffs:
                layer.lfma_coeffs[adapter].copy_(torch.randn(layer.lfma_coeffs[adapter].shape, generator=gen))
    return model


def oracle(kind, model, x, adapters=("default",)):
    """The float64 reference: the untouched base model (``fresh(kind)``), each adapted layer's
    weight plus the reference dW of every adapter."""
    base = fresh(kind).double()
    for name, layer in lfma_layers(model).items():
        target = base.get_submodule(name.removeprefix("base_model.model."))
        with torch.no_grad():
            for a in adapters:
                dw = lfma.reference.delta_weight(layer.lfma_coeffs[a].detach().double(), layer.lfma_rows[a],
                                                 layer.lfma_cols[a], (layer.out_features, layer.in_features),
                                                 layer.lfma_alpha[a])
                target.weight += dw.t() if isinstance(target, Conv1D) else dw
    return base(x.double())


# ---------------------------------------------------------------------------------------------
# registration and config
# ---------------------------------------------------------------------------------------------
def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PeftType("LFMA") is PeftType.LFMA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LFMA] is LfmaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LFMA] is LfmaModel
    assert LfmaConfig(target_modules=["q"], k=3).peft_type == PeftType.LFMA


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_lfma_kernels_alone_does_not_import_peft():
    result = run_python("import sys, lfma_kernels; assert 'peft' not in sys.modules, 'peft imported'")
    assert result.returncode == 0, result.stderr


def test_second_import_reload_keeps_one_registration():
    result = run_python(
        "import importlib, lfma_kernels.peft as m; importlib.reload(m)\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as T; from peft.utils import PeftType\n"
        "assert T[PeftType.LFMA] is m.LfmaModel; print('ok')")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("code, match", [
    ("import sys; sys.modules['peft'] = None\nimport lfma_kernels.peft", r"lfma_kernels\[peft\]"),
    ("import peft; peft.__version__ = '0.14.0'\nimport lfma_kernels.peft", r"peft >= 0\.18.*0\.14\.0 is installed"),
    ("import sys; sys.modules['aenum'] = None\nimport lfma_kernels.peft", r"aenum.*lfma_kernels\[peft\]"),
])
def test_missing_or_unsupported_peft_is_a_clear_import_error(code, match):
    result = run_python(code)
    assert result.returncode != 0 and "ImportError" in result.stderr
    import re
    assert re.search(match, result.stderr), result.stderr[-800:]


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 3, "top_k_ratio": 0.1}, "exactly one"),
    ({"alpha": float("nan")}, "alpha must be a finite number"), ({"alpha": float("inf")}, "alpha must be"),
    ({"init_std": 0.0}, "init_std must be a positive"), ({"init_std": -1.0}, "init_std"),
    ({"init_scale": float("inf")}, "init_scale"), ({"seed": "0"}, "seed must be an int"),
    ({"k": 0}, "k must be a positive int"), ({"top_k_ratio": 1.5}, "top_k_ratio"),
    ({"k": 3, "k_pattern": {"lin0": -1}}, "k_pattern"), ({"k": 3, "init": "zeros"}, "init must be"),
    ({"k": 3, "bias": "lora_only"}, "bias must be"), ({"k": 3, "backend": "jax"}, "unknown backend"),
    ({"k": 3, "target_modules": "("}, "not a valid regular expression"),
])
def test_bad_config(kwargs, match):
    kwargs.setdefault("target_modules", ["lin0"])
    with pytest.raises(ValueError, match=match):
        LfmaConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# the same adapter as the native layer; the oracle
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("init", ["random", "weight"])
def test_same_selection_outputs_and_gradients_as_native(kind, init):
    model = peft_model(kind, init=init)
    native = lfma.apply_lfma(fresh(kind), lfma.LFMAConfig(MODELS[kind][1], k=7, alpha=40.0, init=init))
    for name, layer in lfma_layers(model).items():
        twin = native.get_submodule(name.removeprefix("base_model.model."))
        assert torch.equal(layer.lfma_rows["default"], twin.rows) and torch.equal(layer.lfma_cols["default"], twin.cols)
        assert torch.equal(layer.lfma_coeffs["default"], twin.coeffs)
    randomize(model)
    for name, layer in lfma_layers(model).items():
        with torch.no_grad():
            native.get_submodule(name.removeprefix("base_model.model.")).coeffs.copy_(layer.lfma_coeffs["default"])
    x = inputs(kind)
    out, want = model(x), native(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(grad)
    want.backward(grad)
    assert rel_err(out, want) <= 1e-6
    for name, layer in lfma_layers(model).items():
        twin = native.get_submodule(name.removeprefix("base_model.model."))
        assert rel_err(layer.lfma_coeffs["default"].grad, twin.coeffs.grad) <= 1e-6
    assert rel_err(out, oracle(kind, model, x)) <= 1e-5


def test_init_weights_true_starts_as_the_base_model():
    model = peft_model("mlp", init_weights=True)
    x = inputs("mlp")
    with model.disable_adapter():
        base_out = model(x)
    assert torch.equal(model(x), base_out)
    for layer in lfma_layers(model).values():
        assert not layer.lfma_coeffs["default"].any()


def test_init_scale_matches_the_native_layer():
    model = peft_model("mlp", init="weight", init_scale=0.01)
    native = lfma.apply_lfma(fresh("mlp"), lfma.LFMAConfig(MODELS["mlp"][1], k=7, alpha=40.0, init="weight",
                                                           init_scale=0.01))
    for name, layer in lfma_layers(model).items():
        twin = native.get_submodule(name.removeprefix("base_model.model."))
        assert torch.equal(layer.lfma_coeffs["default"], twin.coeffs) and twin.coeffs.abs().max() > 0
    with pytest.raises(ValueError, match="init_scale"):
        LfmaConfig(target_modules=["lin0"], k=3, init_scale=float("inf"))


def test_k_pattern_and_top_k_ratio():
    model = get_peft_model(fresh("mlp"), LfmaConfig(target_modules=["lin0", "lin1"], top_k_ratio=0.01,
                                                    k_pattern={"lin1": 5}))
    layers = {n.split(".")[-1]: m for n, m in lfma_layers(model).items()}
    assert layers["lin0"].lfma_coeffs["default"].shape == (int(36 * 20 * 0.01), 2)
    assert layers["lin1"].lfma_coeffs["default"].shape == (5, 2)
    # A pattern's K is checked against its layer like k: lin1 has 36 * 24 = 864 weights.
    model = fresh("mlp")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer 'lin1': k must be in \[1, d_out\*d_in = 864\].*got 865"):
        get_peft_model(model, LfmaConfig(target_modules=["lin0", "lin1"], k=3, k_pattern={"lin1": 865}))
    assert all(type(m) is nn.Linear for m in (model.lin0, model.lin1))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_trainable_parameters_are_the_coefficients_only():
    model = peft_model("mlp")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{m}.lfma_coeffs.default" for m in ("lin0", "lin1")}
    assert model.get_nb_trainable_parameters()[0] == 2 * 2 * 7
    with_head = peft_model("mlp", modules_to_save=["head"])
    assert with_head.get_nb_trainable_parameters()[0] == 2 * 2 * 7 + 24 * 3 + 3


@pytest.mark.parametrize("bias", ["all", "lfma_only"])
def test_bias_modes(bias):
    model = peft_model("mlp", bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin0.base_layer.bias" in trainable
    assert ("base_model.model.head.bias" in trainable) == (bias == "all")


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("init", ["random", "weight"])
def test_save_pretrained_and_from_pretrained(kind, init, tmp_path):
    model = randomize(peft_model(kind, init=init, modules_to_save=["head"]))
    with torch.no_grad():
        model.base_model.model.head.weight.mul_(2.0)  # a trained head, saved with the adapter
    x = inputs(kind)
    expected = model(x)
    model.save_pretrained(tmp_path)
    config = __import__("json").load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LFMA" and config["k"] == 7 and config["init"] == init
    from safetensors.torch import load_file
    state = load_file(tmp_path / "adapter_model.safetensors")
    adapter_keys = [k for k in state if "head" not in k]
    assert adapter_keys and all("lfma_" in k for k in adapter_keys)
    assert all(state[k].dtype == torch.int64 for k in adapter_keys if "lfma_rows" in k or "lfma_cols" in k)
    # a fresh backbone: a "weight" selection must come from the file, not be recomputed
    loaded = PeftModel.from_pretrained(fresh(kind), tmp_path)
    assert torch.equal(loaded(x), expected)
    low_mem = PeftModel.from_pretrained(fresh(kind), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(low_mem(x), expected)


def test_positions_come_from_the_file_not_the_backbone(tmp_path):
    """init="weight" depends on the base weights: loading onto a backbone whose weights differ
    (a fine-tuned checkpoint, say) must still use the saved positions."""
    model = randomize(peft_model("mlp", init="weight"))
    model.save_pretrained(tmp_path)
    other = PeftModel.from_pretrained(fresh("mlp", seed=5), tmp_path)
    for name, layer in lfma_layers(other).items():
        saved = model.get_submodule(name)
        assert torch.equal(layer.lfma_rows["default"], saved.lfma_rows["default"])
        assert torch.equal(layer.lfma_coeffs["default"], saved.lfma_coeffs["default"])


def test_state_dict_helpers_and_load_adapter(tmp_path):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = randomize(peft_model("mlp"))
    state = get_peft_model_state_dict(model)
    assert set(state) == {f"base_model.model.{m}.lfma_{t}" for m in ("lin0", "lin1")
                          for t in ("coeffs", "rows", "cols", "shape")}
    other = peft_model("mlp")
    set_peft_model_state_dict(other, state)
    x = inputs("mlp")
    assert torch.equal(other(x), model(x))
    model.save_pretrained(tmp_path)
    host = peft_model("mlp")
    host.load_adapter(tmp_path, adapter_name="loaded")
    host.set_adapter("loaded")
    assert torch.equal(host(x), model(x))


def test_positions_survive_dtype_moves():
    """Integer positions through a bfloat16 base model (PEFT moves adapter tensors to the base
    layer's device and dtype when it builds them) and a later model.to(dtype): bfloat16 holds
    integers exactly only up to 256, so a wide layer would show any cast."""
    def wide(dtype):
        torch.manual_seed(0)
        return get_peft_model(nn.Sequential(nn.Linear(300, 290)).to(dtype),
                              LfmaConfig(target_modules=["0"], k=40))

    want, got = wide(torch.float32), wide(torch.bfloat16).to(torch.float16)
    for name in ("lfma_rows", "lfma_cols"):
        a, b = getattr(want.base_model.model[0], name)["default"], getattr(got.base_model.model[0], name)["default"]
        assert b.dtype == torch.int64 and int(b.max()) > 256 and torch.equal(a, b)
    model = peft_model("mlp").to(torch.bfloat16)
    for layer in lfma_layers(model).values():
        assert layer.lfma_rows["default"].dtype == torch.int64 and layer.lfma_cols["default"].dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# merge, unload, disable
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_merge_unmerge_merge_and_unload(kind):
    model = randomize(peft_model(kind))
    x = inputs(kind)
    expected = model(x).detach()
    base_weights = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert all(layer.merged for layer in lfma_layers(model).values())
    assert rel_err(model(x), expected) <= 1e-5
    model.merge_adapter()  # idempotent
    assert rel_err(model(x), expected) <= 1e-5
    model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        if n in base_weights:
            assert torch.allclose(p, base_weights[n], atol=1e-5), n
    merged = model.merge_and_unload()
    assert not lfma_layers(merged)
    assert all(type(merged.get_submodule(t)) is type(fresh(kind).get_submodule(t)) for t in MODELS[kind][1])
    assert rel_err(merged(x), expected) <= 1e-5


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model = randomize(peft_model("mlp"))
    with torch.no_grad():
        model.base_model.model.lin1.lfma_coeffs["default"][0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for call in (lambda: model.merge_and_unload(safe_merge=True), lambda: model.merge_adapter(safe_merge=True)):
        with pytest.raises(ValueError, match="lin1"):
            call()
        assert lfma_layers(model) and not any(layer.merged for layer in lfma_layers(model).values())
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) or (p.isnan() == before[n].isnan()).all(), n


def test_unload_gives_back_the_base_model():
    model = randomize(peft_model("mlp"))
    x = inputs("mlp")
    with model.disable_adapter():
        base_out = model(x)
    assert not torch.equal(model(x), base_out)
    plain = model.unload()
    assert not lfma_layers(plain) and torch.equal(plain(x), base_out)


def test_disable_adapter_context_with_a_merged_adapter():
    model = randomize(peft_model("mlp"))
    x = inputs("mlp")
    adapted = model(x).detach()
    with model.disable_adapter():
        plain = model(x).detach()
    model.merge_adapter()
    with model.disable_adapter():
        assert rel_err(model(x), plain) <= 1e-5
    assert rel_err(model(x), adapted) <= 1e-5


# ---------------------------------------------------------------------------------------------
# several adapters
# ---------------------------------------------------------------------------------------------
def add_second(model, kind="mlp", **kwargs):
    kwargs.setdefault("k", 5)
    model.add_adapter("other", LfmaConfig(target_modules=MODELS[kind][1], alpha=20.0, seed=7, **kwargs))
    return randomize(model, "other", seed=4)


def test_add_set_delete_adapter_leaves_nothing_behind():
    model = add_second(randomize(peft_model("mlp")))
    x = inputs("mlp")
    default_out = model(x).detach()
    model.set_adapter("other")
    other_out = model(x).detach()
    assert not torch.allclose(default_out, other_out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".other" in n for n in trainable) and trainable
    model.delete_adapter("other")
    assert model.active_adapters == ["default"]
    for layer in lfma_layers(model).values():
        for attr in LfmaLayer.adapter_layer_names + LfmaLayer.other_param_names:
            assert "other" not in getattr(layer, attr), attr
    assert not any("other" in k for k in model.state_dict())
    assert torch.equal(model(x), default_out)


def test_several_active_adapters_add_up_in_one_fold(monkeypatch):
    model = add_second(randomize(peft_model("mlp")))
    model.base_model.set_adapter(["default", "other"])
    x = inputs("mlp")
    calls = []
    from lfma_kernels.ops import linear_op
    original = linear_op.lfma_linear
    monkeypatch.setattr(linear_op, "lfma_linear", lambda *a: calls.append(1) or original(*a))
    out = model(x)
    assert len(calls) == 2, "one folded GEMM per adapted layer, not one per adapter"
    assert rel_err(out, oracle("mlp", model, x, adapters=("default", "other"))) <= 1e-5
    # both adapters train, and merging them merges their sum
    out.backward(torch.randn(out.shape))
    layer = model.base_model.model.lin0
    assert layer.lfma_coeffs["default"].grad is not None and layer.lfma_coeffs["other"].grad is not None
    expected = out.detach()
    model.merge_adapter(["default", "other"])
    assert rel_err(model(x), expected) <= 1e-5


# ---------------------------------------------------------------------------------------------
# dtypes, the eval cache, bad targets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", MODELS)
def test_half_precision_base_model(kind, dtype):
    """Forward, merge and unmerge in half precision, judged against PyTorch's own error: the
    half-precision base model (adapters disabled) against its float32 self."""
    model = randomize(peft_model(kind))
    x = inputs(kind)
    want = model(x).detach()
    with model.disable_adapter():
        want_base = model(x).detach()
    model.to(dtype)
    xh = x.to(dtype)
    with model.disable_adapter():
        torch_err = rel_err(model(xh), want_base)
    tol = max(3 * torch_err, 1e-3)
    out = model(xh)
    assert out.dtype == dtype and rel_err(out, want) <= tol
    model.merge_adapter()
    assert rel_err(model(xh), want) <= tol
    model.unmerge_adapter()
    assert rel_err(model(xh), want) <= tol


def test_eval_cache_follows_a_fused_optimizer():
    model = randomize(peft_model("mlp")).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = inputs("mlp")
    with torch.no_grad():
        before = model(x)
    model(x).backward(torch.randn(before.shape))
    opt.step()
    with torch.no_grad():
        after = model(x)
    model.train()
    assert not torch.equal(after, before) and rel_err(after, model(x)) <= 1e-6


def test_conv1d_target_forces_fan_in_fan_out_with_a_warning():
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):
        model = get_peft_model(fresh("conv1d"), LfmaConfig(target_modules=["c_attn"], k=3))
    assert model.peft_config["default"].fan_in_fan_out
    assert model.base_model.model.c_attn.fan_in_fan_out


@pytest.mark.parametrize("targets, error, match", [
    (["lin0", "relu"], TypeError, "'relu' is a ReLU"),
    (["lin0", "lin1"], ValueError, r"layer 'lin1': k must be in \[1, d_out\*d_in = 864\].*got 900"),
])
def test_bad_targets_change_nothing(targets, error, match):
    class WithReLU(MLP):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

    torch.manual_seed(0)
    model = WithReLU()
    if "relu" not in targets:
        model.lin1 = nn.Linear(36, 24)
        model.lin0 = nn.Linear(20, 50)  # 1000 weights: k=900 fits lin0 but not lin1 (864)
    before = [(n, type(m)) for n, m in model.named_modules()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        get_peft_model(model, LfmaConfig(target_modules=targets, k=900 if "relu" not in targets else 3))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_inject_adapter_in_model():
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(LfmaConfig(target_modules=["lin0"], k=4), fresh("mlp"))
    assert isinstance(model.lin0, LfmaLinear) and model(inputs("mlp")).shape == (4, 5, 3)


# ---------------------------------------------------------------------------------------------
# transformers models from configs
# ---------------------------------------------------------------------------------------------
def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tiny_vit():
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=48, num_labels=3)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def test_gpt2_trains_saves_reloads_and_merges(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gpt2(), LfmaConfig(target_modules=["c_attn"], k=16, alpha=40.0))
    assert isinstance(model.base_model.model.transformer.h[0].attn.c_attn, LfmaLinear)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
        merged = loaded.merge_and_unload()
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
        assert rel_err(merged(input_ids=ids).logits, expected) <= 1e-5


def test_vit_default_targets_are_query_and_value():
    model = get_peft_model(tiny_vit(), LfmaConfig(k=8))
    adapted = sorted(n.split(".")[-1] for n in lfma_layers(model))
    assert adapted in (["query", "query", "value", "value"], ["q_proj", "q_proj", "v_proj", "v_proj"])
    pixels = torch.randn(2, 1, 8, 8)
    assert model(pixel_values=pixels).logits.shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# found by a break-it review
# ---------------------------------------------------------------------------------------------
def test_multihead_attention_out_proj_is_refused():
    model = AttentionBlock()
    with pytest.raises(TypeError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        get_peft_model(model, LfmaConfig(target_modules=["fc", "out_proj"], k=3))
    assert type(model.fc) is nn.Linear and type(model.attn.out_proj) is not LfmaLinear


def test_loading_positions_out_of_range_is_refused(tmp_path):
    """An adapter saved for a larger layer must not load into a smaller one (PEFT loads positions as
    plain buffers): a ValueError naming the layer, before anything is loaded into it."""
    class Wide(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin0 = nn.Linear(d, d)

        def forward(self, x):
            return self.lin0(x)

    torch.manual_seed(0)
    big = get_peft_model(Wide(32), LfmaConfig(target_modules=["lin0"], k=6))
    big.save_pretrained(tmp_path)
    small = get_peft_model(Wide(8), LfmaConfig(target_modules=["lin0"], k=6))
    rows = small.base_model.model.lin0.lfma_rows["default"].clone()
    # Without the recorded shape (an adapter saved before shapes were recorded), the positions' range.
    state = {k: v for k, v in big.state_dict().items() if "lfma_" in k and "lfma_shape" not in k}
    with pytest.raises(ValueError, match=r"loading base_model\.model\.lin0: rows must lie in \[0, 8\)"):
        small.load_state_dict(state, strict=False)
    assert torch.equal(small.base_model.model.lin0.lfma_rows["default"], rows)
    with pytest.raises(ValueError, match=r"saved for a layer of shape \(32, 32\).*this layer's is \(8, 8\)"):
        PeftModel.from_pretrained(Wide(8), tmp_path)


def test_safe_merge_with_an_adapter_already_merged_changes_nothing():
    model = add_second(randomize(peft_model("mlp")))
    model.merge_adapter(["default"])
    with torch.no_grad():
        model.base_model.model.lin1.lfma_coeffs["other"][0, 0] = float("inf")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with pytest.raises(ValueError, match="lin1"):
        model.merge_adapter(["other"], safe_merge=True)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    assert all(layer.merged_adapters == ["default"] for layer in lfma_layers(model).values())


def test_a_re_added_adapter_selects_like_a_fresh_one():
    model = add_second(peft_model("mlp"))
    model.delete_adapter("other")
    model.add_adapter("other", LfmaConfig(target_modules=["lin1"], k=5, seed=7))
    fresh_model = get_peft_model(fresh("mlp"), LfmaConfig(target_modules=["lin1"], k=5, seed=7))
    assert torch.equal(model.base_model.model.lin1.lfma_rows["other"],
                       fresh_model.base_model.model.lin1.lfma_rows["default"])


def test_numpy_k_is_accepted():
    np = pytest.importorskip("numpy")
    config = LfmaConfig(target_modules=["lin0"], k=np.int64(4), k_pattern={"lin1": np.int32(3)})
    assert type(config.k) is int and config.k == 4 and type(config.k_pattern["lin1"]) is int


# ---------------------------------------------------------------------------------------------
# reliability: what a demanding user hit (each failed before its fix)
# ---------------------------------------------------------------------------------------------
def test_eval_cache_is_never_fooled_by_a_reused_address():
    model = randomize(peft_model("mlp")).eval()
    layer = model.base_model.model.lin0
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))

    def both():
        base = layer.base_layer
        want = lfma.reference.lfma_linear(x.double(), base.weight.double(), base.bias.double(),
                                          layer.lfma_coeffs["default"].double(), layer.lfma_rows["default"],
                                          layer.lfma_cols["default"], layer.lfma_alpha["default"])
        return layer(x), want

    for got, want in swap_in_checkpoints(layer, "base_layer.", both, 36, 20):
        assert rel_err(got, want) <= 1e-5


class Narrow(nn.Module):
    def __init__(self, d_out):
        super().__init__()
        self.fc1, self.head = nn.Linear(16, d_out), nn.Linear(d_out, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(x)))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_an_adapter_for_another_shape_is_refused_and_leaves_nothing(tmp_path):
    torch.manual_seed(0)
    get_peft_model(Narrow(24), LfmaConfig(target_modules=["fc1"], k=20)).save_pretrained(tmp_path)
    match = r"loading base_model\.model\.fc1: LFMA adapter '(default|other)' was saved for a layer of shape \(24, 16\)"
    with pytest.raises(ValueError, match=match + r".*this layer's is \(32, 16\)"):
        PeftModel.from_pretrained(Narrow(32), tmp_path)
    host = get_peft_model(Narrow(32), LfmaConfig(target_modules=["fc1"], k=20))
    before = snapshot(host)
    with pytest.raises(ValueError, match=match):
        host.load_adapter(tmp_path, adapter_name="other")
    assert list(host.peft_config) == ["default"] and unchanged(host, before)
    for layer in lfma_layers(host).values():
        for attr in LfmaLayer.adapter_layer_names + LfmaLayer.other_param_names:
            assert "other" not in getattr(layer, attr), attr
    # The adapter loads into the shape it was saved for.
    fits = get_peft_model(Narrow(24), LfmaConfig(target_modules=["fc1"], k=20))
    fits.load_adapter(tmp_path, adapter_name="other")
    assert "other" in fits.base_model.model.fc1.lfma_coeffs


def test_a_refused_load_into_an_existing_adapter_changes_nothing():
    host = randomize(peft_model("mlp"))
    before = snapshot(host)
    donor = {k.replace("default", "x"): v for k, v in randomize(peft_model("mlp"), seed=8).state_dict().items()}
    donor = {k.replace(".x", ".default"): v for k, v in donor.items() if "lfma_" in k}
    donor["base_model.model.lin1.lfma_shape.default"] = torch.tensor([99, 36])
    with pytest.raises(ValueError, match=r"lin1: .*saved for a layer of shape \(99, 36\)"):
        host.load_state_dict(donor, strict=False)
    assert unchanged(host, before), "no layer may load when any is refused (lin0 comes first)"
    assert list(host.peft_config) == ["default"]


@pytest.mark.parametrize("failure", ["a target too small for k", "a layer failing while built"])
def test_a_failed_add_adapter_leaves_the_model_as_before(failure, monkeypatch, tmp_path):
    model = randomize(peft_model("mlp"))
    before, x = snapshot(model), inputs("mlp")
    expected = model(x).detach()
    config = LfmaConfig(target_modules=["lin0", "head"], k=80 if failure.startswith("a target") else 5)
    if failure.startswith("a layer"):
        original = adapter.choose_frequencies

        def fail_on_head(base, **kwargs):
            if base.out_features == 3:
                raise RuntimeError("out of memory (simulated)")
            return original(base, **kwargs)

        monkeypatch.setattr(adapter, "choose_frequencies", fail_on_head)
    with pytest.raises((ValueError, RuntimeError), match="layer 'head'|simulated"):
        model.add_adapter("b", config)
    monkeypatch.undo()
    assert list(model.peft_config) == ["default"] and unchanged(model, before)
    assert type(model.base_model.model.head) is nn.Linear
    assert all("b" not in layer.lfma_coeffs for layer in lfma_layers(model).values())
    assert torch.equal(model(x), expected)
    # The name is free again, and a good config under it builds what a fresh model builds.
    model.add_adapter("b", LfmaConfig(target_modules=["lin0"], k=5, seed=3))
    twin = get_peft_model(fresh("mlp"), LfmaConfig(target_modules=["lin0"], k=5, seed=3))
    assert torch.equal(model.base_model.model.lin0.lfma_rows["b"], twin.base_model.model.lin0.lfma_rows["default"])
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    from safetensors.torch import load_file
    assert all("lin1" not in k and "head" not in k for k in load_file(tmp_path / "b" / "adapter_model.safetensors"))


class Wide(nn.Module):
    def __init__(self, head=2):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, head)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def test_a_config_from_target_modules_alone():
    """Every PEFT config works from target_modules alone: K = DEFAULT_K (1000) frequencies."""
    from lfma_kernels.peft import DEFAULT_K

    model = get_peft_model(Wide(), LfmaConfig(target_modules=["lin0", "lin1"]))
    assert DEFAULT_K == 1000 and model.peft_config["default"].k == 1000
    assert {tuple(layer.lfma_coeffs["default"].shape) for layer in lfma_layers(model).values()} == {(1000, 2)}
    with pytest.raises(ValueError, match=r"layer 'head': k must be in \[1, d_out\*d_in = 512\].*default budget.*"
                                         r"set a smaller k, a top_k_ratio, or a k_pattern entry"):
        get_peft_model(Wide(), LfmaConfig(target_modules=["lin0", "head"]))
    model = get_peft_model(Wide(), LfmaConfig(target_modules=["lin0", "head"], k_pattern={"head": 64}))
    assert model.base_model.model.head.lfma_coeffs["default"].shape[0] == 64


def test_adapters_added_without_a_seed_differ_and_manual_seed_reproduces():
    def build():
        model = get_peft_model(fresh("mlp"), LfmaConfig(target_modules=["lin0"], k=6))
        model.add_adapter("other", LfmaConfig(target_modules=["lin0"], k=6))
        return model.base_model.model.lin0

    torch.manual_seed(11)
    first = build()
    assert not torch.equal(first.lfma_coeffs["default"], first.lfma_coeffs["other"])
    torch.manual_seed(11)
    again = build()
    for name in ("default", "other"):
        assert torch.equal(first.lfma_rows[name], again.lfma_rows[name])
        assert torch.equal(first.lfma_coeffs[name], again.lfma_coeffs[name])
    # init="weight" depends on the weight alone; an int seed on the seed alone (as the native API).
    model = get_peft_model(fresh("mlp"), LfmaConfig(target_modules=["lin0"], k=6, init="weight"))
    model.add_adapter("other", LfmaConfig(target_modules=["lin0"], k=6, init="weight"))
    layer = model.base_model.model.lin0
    assert torch.equal(layer.lfma_rows["default"], layer.lfma_rows["other"])
    native = lfma.apply_lfma(fresh("mlp"), lfma.LFMAConfig(["lin0"], k=6, seed=4))
    seeded = get_peft_model(fresh("mlp"), LfmaConfig(target_modules=["lin0"], k=6, seed=4))
    assert torch.equal(seeded.base_model.model.lin0.lfma_rows["default"], native.lin0.rows)


def test_numpy_scalars_are_stored_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    config = LfmaConfig(target_modules=["lin0"], alpha=np.float32(30.0), top_k_ratio=np.float32(0.05),
                        init_std=np.float64(2e-3), init_scale=torch.tensor(0.5), seed=np.int64(2))
    assert all(type(getattr(config, f)) is float for f in ("alpha", "top_k_ratio", "init_std", "init_scale"))
    model = get_peft_model(fresh("mlp"), config)
    model.save_pretrained(tmp_path)  # JSON: failed on numpy scalars
    saved = __import__("json").load(open(tmp_path / "adapter_config.json"))
    assert saved["alpha"] == 30.0 and saved["seed"] == 2


@pytest.mark.parametrize("field, value", [("alpha", float("nan")), ("alpha", float("inf")), ("init_std", 0.0)])
def test_a_saved_config_with_a_bad_number_is_refused(tmp_path, field, value):
    peft_model("mlp").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = __import__("json").load(open(path))
    saved[field] = value
    __import__("json").dump(saved, open(path, "w"))
    with pytest.raises(ValueError, match=f"LfmaConfig: {field} must be"):
        PeftModel.from_pretrained(fresh("mlp"), tmp_path)


def test_saved_backend_is_a_preference(tmp_path):
    missing = next((b for b in ("cuda", "triton", "cpp") if b not in lfma.available_backends()), None)
    if missing is None:
        pytest.skip("every backend is available here")
    model = randomize(peft_model("mlp"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = __import__("json").load(open(path))
    saved["backend"] = missing
    __import__("json").dump(saved, open(path, "w"))
    with pytest.warns(UserWarning, match=f"backend='{missing}', which cannot run here.*using backend='auto'"):
        loaded = PeftModel.from_pretrained(fresh("mlp"), tmp_path)
    assert loaded.peft_config["default"].backend == "auto"
    x = inputs("mlp")
    assert torch.equal(loaded(x), model(x))


def test_loading_into_a_merged_adapter_is_refused():
    model = randomize(peft_model("mlp"))
    x = inputs("mlp")
    model.merge_adapter()
    before, expected = snapshot(model), model(x).detach()
    state = {k: v for k, v in randomize(peft_model("mlp"), seed=5).state_dict().items() if "lfma_" in k}
    with pytest.raises(ValueError, match=r"lin0: LFMA adapter 'default' is merged into the weight; unmerge it"):
        model.load_state_dict(state, strict=False)
    assert unchanged(model, before)
    model.unmerge_adapter()
    assert rel_err(model(x), expected) <= 1e-5


def test_a_module_registered_under_two_names_is_refused():
    model = fresh("mlp")
    model.alias = model.lin0
    with pytest.raises(ValueError, match=r"registered under several names \(lin0, alias\)"):
        get_peft_model(model, LfmaConfig(target_modules=["lin0"], k=5))
    assert type(model.lin0) is nn.Linear and model.alias is model.lin0


def test_per_sample_gradients_through_the_peft_model():
    """torch.func over a PeftModel: vmap(grad) over the samples equals a loop of ordinary backward
    passes, every LFMA coefficient included."""
    from torch.func import functional_call, grad, vmap

    model = randomize(peft_model("mlp")).double()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x, target = inputs("mlp").double(), torch.randn(4, 5, 3, dtype=torch.float64)

    def loss(p, xi, ti):
        return (functional_call(model, p, (xi,)) * ti).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(4):
        model.zero_grad()
        (model(x[i]) * target[i]).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert rel_err(per_sample[n][i], p.grad) <= 1e-10, n


def test_a_config_read_from_a_checkpoint_marks_one_adapter_once(tmp_path):
    """An adapter built from LfmaConfig.from_pretrained is removed by a refused first load only until it
    is used: after a forward, a refused load changes nothing, and the config's mark is spent."""
    from peft import set_peft_model_state_dict

    get_peft_model(Narrow(24), LfmaConfig(target_modules=["fc1"], k=20)).save_pretrained(tmp_path)
    config = LfmaConfig.from_pretrained(tmp_path)
    model = get_peft_model(Narrow(32), config)
    model(torch.randn(2, 16))
    wrong = {"base_model.model.fc1.lfma_shape": torch.tensor([24, 16]),
             "base_model.model.fc1.lfma_coeffs": torch.zeros(20, 2)}
    with pytest.raises(ValueError, match=r"saved for a layer of shape \(24, 16\)"):
        set_peft_model_state_dict(model, wrong)
    assert list(model.peft_config) == ["default"] and "default" in model.base_model.model.fc1.lfma_coeffs
    model.add_adapter("again", config)  # the mark was spent on the first adapter
    with pytest.raises(ValueError, match="saved for a layer of shape"):
        set_peft_model_state_dict(model, wrong, adapter_name="again")
    assert "again" in model.peft_config


def test_a_refused_from_pretrained_leaves_the_base_model_plain(tmp_path):
    get_peft_model(Narrow(24), LfmaConfig(target_modules=["fc1"], k=20)).save_pretrained(tmp_path)
    base = Narrow(32)
    with pytest.raises(ValueError, match="saved for a layer of shape"):
        PeftModel.from_pretrained(base, tmp_path)
    assert type(base.fc1) is nn.Linear


def test_state_saved_without_shapes_still_loads_with_one_warning(tmp_path):
    model = randomize(peft_model("mlp"))
    state = {k: v for k, v in model.state_dict().items() if "lfma_" in k and "lfma_shape" not in k}
    host = peft_model("mlp")
    with pytest.warns(UserWarning, match="carries no layer shape"):
        result = host.load_state_dict(state, strict=False)
    assert not [k for k in result.missing_keys if "lfma_shape" in k]
    x = inputs("mlp")
    assert torch.equal(host(x), model(x))


def test_a_merged_adapter_reloads_its_own_state():
    model = randomize(peft_model("mlp"))
    model.merge_adapter()
    model.load_state_dict(model.state_dict())  # identical: nothing to refuse
    assert all(layer.merged for layer in lfma_layers(model).values())
