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
from conftest import AttentionBlock, rel_err  # noqa: E402


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


def peft_model(kind, seed=0, **kwargs):
    kwargs.setdefault("k", 7)
    kwargs.setdefault("alpha", 40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out forced for Conv1D: tested on its own
        return get_peft_model(fresh(kind, seed), LfmaConfig(target_modules=MODELS[kind][1], **kwargs))


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
    ({}, "exactly one of k and top_k_ratio"), ({"k": 3, "top_k_ratio": 0.1}, "exactly one"),
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
    assert set(state) == {f"base_model.model.{m}.lfma_{t}" for m in ("lin0", "lin1") for t in ("coeffs", "rows", "cols")}
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
    from lfma_kernels.ops import dispatch
    impl = dispatch.resolve("auto", torch.device("cpu"), torch.float32, 12, (36, 20))
    original = impl.lfma_linear
    monkeypatch.setattr(impl, "lfma_linear", lambda *a: calls.append(1) or original(*a))
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
    state = {k: v for k, v in big.state_dict().items() if "lfma_" in k}
    with pytest.raises(ValueError, match=r"loading base_model\.model\.lin0: rows must lie in \[0, 8\)"):
        small.load_state_dict(state, strict=False)
    assert torch.equal(small.base_model.model.lin0.lfma_rows["default"], rows)
    with pytest.raises(ValueError, match="rows must lie in"):
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
