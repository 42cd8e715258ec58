"""Model tooling: apply, freeze, count, save/load, merge/unmerge/unload, bad input."""
import json
import os

import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from conftest import AttentionBlock, rel_err
from lfma_kernels.model import lfma_layers


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.query(x) * torch.sigmoid(self.key(x)) + self.value(x))


class TinyEncoder(nn.Module):
    def __init__(self, d=24, layers=3, classes=5):
        super().__init__()
        self.layer = nn.ModuleList(Attention(d) for _ in range(layers))
        self.classifier = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return self.classifier(x.mean(1))


def fresh_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyEncoder(**kwargs)


def test_apply_by_suffix_freezes_and_counts():
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query", "value"], k=7, modules_to_save=["classifier"]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, lfma.LFMALinear)]
    assert adapted == [f"layer.{i}.{p}" for i in range(3) for p in ("query", "value")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.coeffs" for n in adapted} | {"classifier.weight", "classifier.bias"}
    count = lfma.trainable_parameters(model)
    assert count == lfma.ParameterCount(6 * 7, 6 * 14 + 24 * 5 + 5, sum(p.numel() for p in model.parameters()))
    # layers of one shape draw different init matrices, hence different frequencies
    assert not torch.equal(model.layer[0].query.rows, model.layer[1].query.rows)


def test_apply_by_regex_and_dotted_suffix():
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(r"layer\.[02]\.key", top_k_ratio=0.05))
    assert isinstance(model.layer[0].key, lfma.LFMALinear) and isinstance(model.layer[2].key, lfma.LFMALinear)
    assert not isinstance(model.layer[1].key, lfma.LFMALinear)
    assert model.layer[0].key.k == int(24 * 24 * 0.05)
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["1.query"], k=3))
    assert [n for n, m in model.named_modules() if isinstance(m, lfma.LFMALinear)] == ["layer.1.query"]


@pytest.mark.parametrize("layers, shape, ratio, targets, expected", [
    (12, 768, 0.0003, ["query"], 2_112),            # ViT-B, query
    (12, 768, 0.0016, ["query", "value"], 22_632),  # RoBERTa-base, query + value
])
def test_paper_counts_on_models(layers, shape, ratio, targets, expected):
    model = nn.Module()
    model.layer = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(shape, shape), "value": nn.Linear(shape, shape)})
                                for _ in range(layers))
    lfma.apply_lfma(model, lfma.LFMAConfig(targets, top_k_ratio=ratio))
    count = lfma.trainable_parameters(model)
    assert count.coefficients == expected and count.real == 2 * expected


def test_save_load_gives_identical_outputs(tmp_path):
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query", "value"], top_k_ratio=0.02, hermitian=True,
                                                           alpha=5.0, modules_to_save=["classifier"]))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 6, 24)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    lfma.save_lfma(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors", "lfma_config.json"]
    saved = json.load(open(tmp_path / "lfma_config.json"))
    assert saved["config"]["hermitian"] is True and saved["config"]["alpha"] == 5.0

    loaded = lfma.load_lfma(fresh_model(), tmp_path)  # same base weights (seed 0), fresh head
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    state, state2 = lfma.lfma_state_dict(model), lfma.lfma_state_dict(loaded)
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert "classifier.weight" in state and "layer.0.query.coeffs" in state
    assert lfma.trainable_parameters(loaded) == lfma.trainable_parameters(model)


def _saved(tmp_path, **config):
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query"], k=5, modules_to_save=["classifier"], **config))
    lfma.save_lfma(model, tmp_path)
    return model


@pytest.mark.parametrize("target, match", [
    (lambda: fresh_model(d=16), "layer.0.query"),             # other shapes
    (lambda: fresh_model(layers=2), r"the model lacks: \['layer.2.query'\]"),  # other structure
    (lambda: fresh_model(classes=3), "classifier"),            # head of another size
])
def test_load_mismatch_names_layer_and_changes_nothing(tmp_path, target, match):
    _saved(tmp_path)
    model = target()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lfma.load_lfma(model, tmp_path)
    assert not any(isinstance(m, lfma.LFMALinear) for m in model.modules())
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_rejects_config_mismatch(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "lfma_config.json"
    saved = json.load(open(path))
    saved["config"]["k"] = 6
    json.dump(saved, open(path, "w"))
    with pytest.raises(ValueError, match="layer.0.query"):
        lfma.load_lfma(fresh_model(), tmp_path)
    with pytest.raises(FileNotFoundError):
        lfma.load_lfma(fresh_model(), tmp_path / "nowhere")


def test_merge_unmerge_unload(tmp_path):
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query", "value"], k=9))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lfma.LFMALinear):
                m.coeffs.mul_(50.0)  # make dW matter
    x = torch.randn(2, 5, 24)
    expected = model(x).detach()
    weight = model.layer[0].query.base.weight.detach().clone()
    lfma.merge_lfma(model, safe=True)
    assert all(m.merged for m in model.modules() if isinstance(m, lfma.LFMALinear))
    assert rel_err(model(x), expected) <= 1e-5
    lfma.unmerge_lfma(model)
    assert torch.allclose(model.layer[0].query.base.weight, weight, atol=1e-6)
    plain = lfma.unload_lfma(model)
    assert not any(isinstance(m, lfma.LFMALinear) for m in plain.modules())
    assert type(plain.layer[0].query) is nn.Linear
    assert rel_err(plain(x), expected) <= 1e-5


def test_merge_safe_checks_every_layer_first():
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query"], k=3))
    with torch.no_grad():
        model.layer[2].query.coeffs[0, 0] = float("nan")
    weights = [model.layer[i].query.base.weight.detach().clone() for i in range(3)]
    with pytest.raises(ValueError, match="layer.2.query"):
        lfma.merge_lfma(model, safe=True)
    assert all(torch.equal(model.layer[i].query.base.weight, weights[i]) for i in range(3))
    assert not any(model.layer[i].query.merged for i in range(3))


def test_bad_targets_change_nothing():
    model = fresh_model()
    with pytest.raises(ValueError, match=r"matched no module.*layer\.\*\.query, layer\.\*\.key, layer\.\*\.value, classifier"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["q_proj"], k=2))
    with pytest.raises(TypeError, match="layer.0.norm"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["norm"], k=2))
    with pytest.raises(ValueError, match=r"layer\.0\.query.*got 1000"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["query"], k=1000))
    with pytest.raises(ValueError, match="modules_to_save"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["query"], k=2, modules_to_save=["head"]))
    assert not any(isinstance(m, lfma.LFMALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    for kwargs in ({}, {"k": 2, "top_k_ratio": 0.1}, {"top_k_ratio": 0.0}, {"k": 2, "backend": "numpy"}):
        with pytest.raises(ValueError):
            lfma.LFMAConfig(["query"], **kwargs)


def model_state(model):
    """Everything apply_lfma could change: the module tree, the parameters and their flags."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            getattr(model, "lfma_config", None))


def assert_unchanged(model, before):
    modules, params, config = model_state(model)
    assert modules == before[0] and config is before[2]
    assert params.keys() == before[1].keys()
    for n, (tensor, flag) in params.items():
        assert torch.equal(tensor, before[1][n][0]) and flag == before[1][n][1], n


@pytest.mark.parametrize("second", [["layer.2.query"], ["query"]])
def test_second_apply_is_refused_and_changes_nothing(tmp_path, second):
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["layer.0.query"], k=4))
    before = model_state(model)
    with pytest.raises(ValueError, match=r"already has LFMA adapters at layer\.0\.query"):
        lfma.apply_lfma(model, lfma.LFMAConfig(second, k=4))
    assert_unchanged(model, before)
    assert model.layer[0].query.coeffs.requires_grad
    lfma.save_lfma(model, tmp_path)
    loaded = lfma.load_lfma(fresh_model(), tmp_path)
    x = torch.randn(2, 3, 24)
    assert torch.equal(loaded(x), model(x))


def test_failed_apply_restores_every_flag():
    """A refusal met while building the third layer (hermitian K above the half-spectrum of a
    smaller layer) leaves no base frozen by the layers built before it."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(4, 3)

    model = Mixed()
    before = model_state(model)
    with pytest.raises(ValueError, match="layer 'c'.*hermitian"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["a", "b", "c"], k=12, hermitian=True))
    assert_unchanged(model, before)


def test_ratio_giving_no_frequency_names_the_layer():
    model = fresh_model()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"layer 'layer\.0\.query'.*selects no frequency"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["query"], top_k_ratio=0.001))
    assert_unchanged(model, before)


def test_unmatched_modules_to_save_lists_candidates():
    with pytest.raises(ValueError, match=r"\['head'\] matched no module.*classifier"):
        lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query"], k=2, modules_to_save=["head"]))


@pytest.mark.parametrize("targets", ["(", "query[", ["query", ""], ["query", 3]])
def test_malformed_target_modules_is_a_value_error(targets):
    with pytest.raises(ValueError, match="target_modules") as info:
        lfma.LFMAConfig(targets, k=3)
    if isinstance(targets, str):
        assert repr(targets) in str(info.value)


def test_multihead_attention_out_proj_is_refused():
    model = AttentionBlock()
    before = model_state(model)
    with pytest.raises(TypeError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["out_proj", "fc"], k=3))
    assert_unchanged(model, before)


class TiedHead(nn.Module):
    """GPT-2's layout: the output projection's weight is the embedding's."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(self.wte(ids))


def test_merge_refuses_a_tied_weight_and_changes_nothing():
    torch.manual_seed(0)
    model = lfma.apply_lfma(TiedHead(), lfma.LFMAConfig(["lm_head"], k=9))
    ids = torch.randint(0, 40, (2, 5))
    before, embedding = model(ids).detach(), model.wte.weight.detach().clone()
    for merge in (lfma.merge_lfma, lfma.unload_lfma):
        with pytest.raises(ValueError, match=r"'lm_head' is tied to wte\.weight.*nothing was merged"):
            merge(model)
        assert torch.equal(model.wte.weight, embedding) and not model.lm_head.merged
        assert torch.equal(model(ids), before)
    # Given a weight of its own, the layer merges and the embedding stays as it was.
    model.lm_head.base.weight = nn.Parameter(model.lm_head.base.weight.detach().clone(), requires_grad=False)
    lfma.merge_lfma(model)
    assert torch.equal(model.wte.weight, embedding) and rel_err(model(ids), before) <= 1e-5


def test_a_module_registered_under_two_names_is_refused():
    model = fresh_model()
    model.alias = model.layer[0].query  # the same module, a second name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"registered under several names \(layer\.0\.query, alias\)"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["query"], k=5))
    assert not lfma_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_saved_backend_is_a_preference(tmp_path):
    """An adapter saved with a backend this machine lacks loads with "auto" and one warning;
    ``backend=`` overrides the saved one."""
    _saved(tmp_path)
    path = tmp_path / "lfma_config.json"
    saved = json.load(open(path))
    missing = next((b for b in ("cuda", "triton", "cpp") if b not in lfma.available_backends()), None)
    if missing is None:
        pytest.skip("every backend is available here")
    saved["config"]["backend"] = missing
    json.dump(saved, open(path, "w"))
    with pytest.warns(UserWarning, match=f"backend='{missing}', which cannot run here.*using backend='auto'") as w:
        model = lfma.load_lfma(fresh_model(), tmp_path)
    assert len([x for x in w if "backend" in str(x.message)]) == 1
    assert {m.backend for m in lfma_layers(model).values()} == {"auto"}
    model = lfma.load_lfma(fresh_model(), tmp_path, backend="torch")
    assert {m.backend for m in lfma_layers(model).values()} == {"torch"}


@pytest.mark.parametrize("field, value", [("alpha", float("nan")), ("alpha", float("inf")), ("init_std", 0.0)])
def test_a_saved_config_with_a_bad_number_is_refused(tmp_path, field, value):
    _saved(tmp_path)
    path = tmp_path / "lfma_config.json"
    saved = json.load(open(path))
    saved["config"][field] = value
    json.dump(saved, open(path, "w"))
    model = fresh_model()
    with pytest.raises(ValueError, match=rf"lfma_config\.json: LFMAConfig: {field} must be"):
        lfma.load_lfma(model, tmp_path)
    assert not lfma_layers(model)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": float("nan")}, "alpha must be a finite number"), ({"alpha": -float("inf")}, "alpha"),
    ({"init_std": 0.0}, "init_std must be a positive"), ({"init_std": -1e-3}, "init_std"),
    ({"init_scale": float("nan")}, "init_scale"), ({"seed": 1.5}, "seed must be an int"),
    ({"init": "zeros"}, "init must be"), ({"alpha": "12"}, "alpha must be a real number"),
])
def test_config_is_checked_when_built(kwargs, match):
    kwargs.setdefault("k", 4)
    with pytest.raises(ValueError, match=match):
        lfma.LFMAConfig(["query"], **kwargs)


def test_numpy_and_tensor_scalars_are_stored_as_python_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    config = lfma.LFMAConfig(["query"], top_k_ratio=np.float32(0.05), alpha=np.float32(8.0),
                             init_std=torch.tensor(2e-3), init_scale=np.float64(0.5), seed=np.int64(3))
    assert all(type(getattr(config, f)) is float for f in ("top_k_ratio", "alpha", "init_std", "init_scale"))
    assert type(config.seed) is int and config.alpha == 8.0
    model = lfma.apply_lfma(fresh_model(), config)
    lfma.save_lfma(model, tmp_path)  # JSON: would fail on numpy scalars
    assert json.load(open(tmp_path / "lfma_config.json"))["config"]["alpha"] == 8.0


def test_merge_refuses_a_weight_sharing_storage_with_another_parameter():
    torch.manual_seed(0)
    model = TiedHead()
    model.lm_head.weight = nn.Parameter(model.wte.weight.data)  # another Parameter, the same storage
    lfma.apply_lfma(model, lfma.LFMAConfig(["lm_head"], k=9))
    with pytest.raises(ValueError, match=r"tied to wte\.weight"):
        lfma.merge_lfma(model)


def test_a_merged_model_reloads_its_own_state_dict():
    model = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query"], k=5))
    with torch.no_grad():
        for layer in lfma_layers(model).values():
            layer.coeffs.normal_()
    lfma.merge_lfma(model)
    model.load_state_dict(model.state_dict())
    other = lfma.apply_lfma(fresh_model(), lfma.LFMAConfig(["query"], k=5, seed=3)).state_dict()
    with pytest.raises(ValueError, match="the layer is merged"):
        model.load_state_dict(other)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 10 ** 400}, "alpha must be a finite number"), ({"seed": 10 ** 22}, "seed must lie in"),
    ({"seed": torch.tensor(True)}, "seed must be an int"),
])
def test_more_bad_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lfma.LFMAConfig(["query"], k=4, **kwargs)
    with pytest.raises(ValueError, match="k must be a positive int"):
        lfma.LFMAConfig(["query"], k=torch.tensor(True))


def test_float32_ratios_count_what_was_written():
    np = pytest.importorskip("numpy")
    for ratio in (np.float32(0.01), torch.tensor(0.01), np.float16(0.01)):
        assert lfma.num_frequencies((100, 100), ratio) == 100
        assert lfma.LFMAConfig(["query"], top_k_ratio=ratio).top_k_ratio == 0.01
    assert lfma.num_frequencies((100, 100), np.float32(0.0016)) == 16
    assert lfma.LFMAConfig(["query"], k=3, alpha=np.array(2.0)).alpha == 2.0
