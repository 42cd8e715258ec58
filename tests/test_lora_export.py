"""LFMA adapters as LoRA adapters (lfma_kernels.peft.convert_to_lora / save_as_lora / lora_ranks): the exact
factors against the float64 oracle, the smallest exact rank against the dense rank, optimal truncation,
and round trips through PEFT's LoRA loader on an MLP, GPT-2 (Conv1D), a RoBERTa-shaped model and a
native apply_lfma model."""
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lfma_kernels as lfma  # noqa: E402
from conftest import rel_err  # noqa: E402
from lfma_kernels import adapter  # noqa: E402
from lfma_kernels.peft import LfmaConfig, convert_to_lora, lora_ranks, save_as_lora  # noqa: E402
from lfma_kernels.peft.lora_export import _factors, _svd  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_peft import MLP, randomize, tiny_gpt2  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")


def random_adapter(shape, k, hermitian, seed, positions=None):
    gen = torch.Generator().manual_seed(seed)
    if positions is None:
        f = lfma.select_frequencies(torch.randn(shape, generator=gen), k, hermitian=hermitian)
        rows, cols = f.rows, f.cols
    else:
        rows, cols = (torch.tensor(p) for p in positions)
    return adapter.Adapter(torch.randn(len(rows), 2, generator=gen), rows, cols, 12.0)


NYQUIST_AND_ZERO = ([0, 0, 24, 24, 3, 45, 3], [0, 40, 0, 40, 79, 1, 1])  # 48x80: u, v in {0, d/2}; conjugates


@pytest.mark.parametrize("shape", [(48, 80), (97, 64), (7, 5), (64, 64)])
@pytest.mark.parametrize("k, hermitian", [(1, False), (6, True), (30, False), (30, True), (200, False)])
def test_exact_factors_and_rank(shape, k, hermitian):
    k = min(k, shape[0] * shape[1] // 2)
    a = random_adapter(shape, k, hermitian, seed=k)
    want = lfma.reference.delta_weight(a.coeffs.double(), a.rows, a.cols, shape, a.alpha)
    left, right = _factors(a, shape)
    assert rel_err(left @ right.T, want) <= 1e-12
    u, s, v = _svd(a, shape)
    assert rel_err((u * s) @ v.T, want) <= 1e-12
    assert len(s) == torch.linalg.matrix_rank(want).item() <= min(left.shape[1], min(shape))


def test_zero_and_nyquist_bins_and_repeated_positions():
    shape = (48, 80)
    a = random_adapter(shape, 0, False, seed=1, positions=NYQUIST_AND_ZERO)
    want = lfma.reference.delta_weight(a.coeffs.double(), a.rows, a.cols, shape, a.alpha)
    u, s, v = _svd(a, shape)
    assert rel_err((u * s) @ v.T, want) <= 1e-12 and len(s) == torch.linalg.matrix_rank(want).item()


def gpt2_lfma(**kwargs):
    kwargs = {"target_modules": ["c_attn", "c_fc"], "k": 30, "alpha": 300.0, "seed": 1, **kwargs}
    return randomize(get_peft_model(fresh_base("gpt2"), LfmaConfig(**kwargs))).eval()


ROBERTA = transformers.RobertaConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=40, num_labels=3)


def roberta_lfma():
    lfma_model = get_peft_model(fresh_base("roberta"), LfmaConfig(target_modules=["query", "value"], k=40, alpha=100.0, seed=2,
                                                  modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in lfma_model.base_model.model.classifier.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p))
    return randomize(lfma_model).eval()


def mlp_lfma():
    return randomize(get_peft_model(fresh_base("mlp"), LfmaConfig(target_modules=["lin0", "lin1"], k=9, alpha=40.0, seed=0))).eval()


def fresh_base(kind):
    """The base model the adapter of ``kind`` was built on, built again (same seed)."""
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP()
    if kind == "gpt2":
        return tiny_gpt2()
    return transformers.RobertaForSequenceClassification(ROBERTA)


def outputs(kind, model):
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        if kind == "mlp":
            return model(torch.randn(3, 5, 20, generator=gen))
        out = model(input_ids=torch.randint(2, 60, (3, 9), generator=gen))
        return out.logits


BUILD = {"mlp": mlp_lfma, "gpt2": gpt2_lfma, "roberta": roberta_lfma}


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "roberta"])
def test_exact_export_reloads_as_plain_lora(kind, tmp_path):
    model = BUILD[kind]()
    want = outputs(kind, model)
    save_as_lora(tmp_path, model)
    lora = PeftModel.from_pretrained(fresh_base(kind), tmp_path).eval()
    config = lora.peft_config["default"]
    assert isinstance(config, LoraConfig) and config.fan_in_fan_out == (kind == "gpt2")
    assert rel_err(outputs(kind, lora), want) <= 1e-5
    assert rel_err(want, outputs(kind, fresh_base(kind).eval())) > 1e-3  # the adapter matters
    ranks = lora_ranks(model)
    assert config.rank_pattern == {name: r.exact for name, r in ranks.items()}
    assert all(r.exported == r.exact and r.relative_error == 0.0 for r in ranks.values())


def test_truncation_error_falls_with_the_rank_and_is_reported(tmp_path):
    model = gpt2_lfma()
    want = outputs("gpt2", model)
    exact = max(r.exact for r in lora_ranks(model).values())
    errors = []
    for rank in (2, 8, 24, exact):
        report = lora_ranks(model, rank=rank)
        layer = model.base_model.model.transformer.h[0].attn.c_attn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config, state = convert_to_lora(model, rank=rank)
        assert any("truncates dW" in str(w.message) for w in caught) == (rank < exact)
        assert config.r == rank and all(v.shape[0] == rank for k, v in state.items() if "lora_A" in k)
        key = "base_model.model.transformer.h.0.attn.c_attn"
        dw = layer.get_delta_weight("default").double().T  # logical (d_out, d_in)
        got = state[f"{key}.lora_B.weight"].double() @ state[f"{key}.lora_A.weight"].double()
        assert abs(rel_err(got, dw) - report["transformer.h.0.attn.c_attn"].relative_error) <= 1e-5
        save_as_lora(tmp_path / str(rank), model, rank=rank)
        lora = PeftModel.from_pretrained(fresh_base("gpt2"), tmp_path / str(rank)).eval()
        errors.append(rel_err(outputs("gpt2", lora), want))
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1e-5 and errors[0] > 1e-3


def test_rank_arguments():
    model = mlp_lfma()
    s = _svd(model.base_model.model.lin0._adapters(["default"])[0], (36, 20))[1]
    from peft.tuners.lora.conversion import _find_cutoff_index
    assert lora_ranks(model, rank=0.7)["lin0"].exported == _find_cutoff_index(s.float(), 0.7)  # PEFT's rule
    assert lora_ranks(model, rank=20)["lin0"].exported == 20  # above the exact rank: zero-padded, exact
    with pytest.raises(ValueError, match="larger than the weight shape"):
        convert_to_lora(model, rank=21)
    for bad in (0, 1.5, 0.0):
        with pytest.raises(ValueError):
            convert_to_lora(model, rank=bad)
    with pytest.raises(TypeError, match="rank must be"):
        convert_to_lora(model, rank="8")


def test_peft_own_convert_to_lora_accepts_lfma():
    model = gpt2_lfma()
    want = outputs("gpt2", model)
    config, state = peft.convert_to_lora(model, rank=32)  # PEFT's: an SVD of get_delta_weight (full rank: exact)
    lora = get_peft_model(fresh_base("gpt2"), config).eval()
    peft.set_peft_model_state_dict(lora, state)
    assert rel_err(outputs("gpt2", lora), want) <= 1e-5


def test_native_apply_lfma_model_exports(tmp_path):
    torch.manual_seed(0)
    model = lfma.apply_lfma(MLP(), lfma.LFMAConfig(["lin0", "lin1"], k=9, alpha=40.0, modules_to_save=["head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    want = outputs("mlp", model)
    save_as_lora(tmp_path, model)
    lora = PeftModel.from_pretrained(fresh_base("mlp"), tmp_path).eval()
    assert lora.peft_config["default"].modules_to_save == ["head"]
    assert rel_err(outputs("mlp", lora), want) <= 1e-5


def test_refusals():
    with pytest.raises(ValueError, match="bias=all"):
        convert_to_lora(gpt2_lfma(bias="all"))
    zero = get_peft_model(tiny_gpt2(), LfmaConfig(target_modules=["c_attn"], k=5, init_weights=True))
    with pytest.raises(ValueError, match="dW = 0"):
        convert_to_lora(zero)
    with pytest.raises(TypeError, match="Could not detect"):
        convert_to_lora(gpt2_lfma(), adapter_name="missing")
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="Could not detect"):
        convert_to_lora(MLP())
    lora_model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(lora_model)


def test_layers_lacking_the_adapter_are_skipped_and_layers_sharing_one_are_one():
    model = mlp_lfma()
    model.add_adapter("lin0_only", LfmaConfig(target_modules=["lin0"], k=4, alpha=30.0, seed=2))
    randomize(model, "lin0_only", seed=6)
    config, state = convert_to_lora(model, adapter_name="lin0_only")
    assert set(config.rank_pattern) == {"lin0"} and all(".lin0." in k for k in state)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.bn, self.out = nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.bn(self.lin0(x)))


@pytest.mark.parametrize("native", [False, True])
def test_modules_to_save_carry_their_buffers(native, tmp_path):
    """A norm's running statistics are state PEFT's loader expects (and the outputs need)."""
    torch.manual_seed(0)
    if native:
        model = lfma.apply_lfma(NormNet(), lfma.LFMAConfig(["lin0"], k=9, alpha=40.0, modules_to_save=["bn"]))
    else:
        model = get_peft_model(NormNet(), LfmaConfig(target_modules=["lin0"], k=9, alpha=40.0, seed=0,
                                                     modules_to_save=["bn"]))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 12) * 3 + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "coeffs" in n:
                p.normal_()
    model.eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        want = model(x)
    save_as_lora(tmp_path, model)
    torch.manual_seed(0)
    lora = PeftModel.from_pretrained(NormNet(), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(lora(x), want) <= 1e-5


def test_config_r_is_the_largest_rank_and_numpy_ranks_work():
    import numpy as np

    model = gpt2_lfma()
    config, _ = convert_to_lora(model)
    assert config.r == config.lora_alpha == max(config.rank_pattern.values()) > 1  # what LoRA servers check
    config, state = convert_to_lora(model, rank=np.int64(6))
    assert config.r == 6 and all(v.shape[0] == 6 for k, v in state.items() if "lora_A" in k)
    assert convert_to_lora(model, rank=np.float32(0.5))[0].rank_pattern
