"""LFMA beside a quantized base (bitsandbytes 4-bit / 8-bit, torchao int8 / int4): every way of forming the
output (planner.force(delta=...)) on every backend, against the oracle: the base layer's own output (and
its own dL/dx) plus ``x dW^T`` with the paper's float64 ``dW``. Then building, training, merging, saving."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from conftest import FAST_BACKENDS, TRITON_INTERPRETED, rel_err
from lfma_kernels.model import lfma_layers
from lfma_kernels.ops import dispatch, planner
from lfma_kernels.ops.decision import QuantizedBase

bnb = pytest.importorskip("bitsandbytes")
torchao_quantization = pytest.importorskip("torchao.quantization")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

D_OUT, D_IN = 48, 80


def linear(d_in=D_IN, d_out=D_OUT, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def quantize(kind, lin):
    """``lin`` (an nn.Linear) in ``kind``'s quantized format: a new module, or ``lin`` quantized in place."""
    if kind.startswith(("nf4", "fp4")):
        options = dict(quant_type=kind[:3], compute_dtype=torch.bfloat16 if "bf16" in kind else torch.float32,
                       compress_statistics="nodq" not in kind,
                       quant_storage=torch.bfloat16 if "storage" in kind else torch.uint8)
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, **options)
    elif kind == "int8":
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
    else:
        config = (torchao_quantization.Int8WeightOnlyConfig() if kind == "ao-int8" else
                  torchao_quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4))
        torchao_quantization.quantize_(lin, config)
        return lin
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move


KINDS = ["nf4", "fp4", "nf4-nodq", "nf4-storage", "int8", "ao-int8", "ao-int4"]
PATHS = list(planner.DELTA_PATHS)


def oracle(layer, x, grad_out):
    """Output, dL/dx, dL/dcoeffs of an ``LFMALinear``: :func:`oracle_of` its base and adapter."""
    return oracle_of(layer.base, layer.coeffs, layer.rows, layer.cols, layer.alpha, x, grad_out)


def oracle_of(base, coeffs, rows, cols, alpha, x, grad_out):
    """The base's own output and dL/dx (its autograd) plus x dW^T and g dW with the float64 dW of the
    paper's formulation; dL/dcoeffs by autograd through it."""
    xb = x.detach().clone().requires_grad_(True)
    yb = base(xb)
    (gxb,) = torch.autograd.grad(yb, xb, grad_out)
    c = coeffs.detach().double().requires_grad_(True)
    dw = lfma.reference.delta_weight(c, rows, cols, (yb.shape[-1], x.shape[-1]), alpha)
    out = yb.detach().double() + x.detach().double() @ dw.T
    (gc,) = torch.autograd.grad(out, c, grad_out.double())
    return out, gxb.double() + grad_out.double() @ dw.detach(), gc


def oracle_output(layer, x):
    """The oracle's output alone, without gradients (a base bitsandbytes repacked in eval runs no backward)."""
    dw = lfma.reference.delta_weight(layer.coeffs.detach().double(), layer.rows, layer.cols,
                                     (layer.out_features, layer.in_features), layer.alpha)
    with torch.no_grad():
        return layer.base(x).double() + x.double() @ dw.T


def adapted(kind, backend="auto", k=17, d_in=D_IN, d_out=D_OUT, **kwargs):
    layer = lfma.LFMALinear(quantize(kind, linear(d_in, d_out)), k=k, alpha=30.0, backend=backend, **kwargs)
    with torch.no_grad():
        layer.coeffs.copy_(torch.randn(layer.coeffs.shape, generator=torch.Generator().manual_seed(5)))
    return layer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_oracle(kind, path):
    matches_the_oracle(adapted(kind), path)


def matches_the_oracle(layer, path, tokens=(3, 5), seed=1):
    """Output, dL/dx and dL/dcoeffs of ``layer`` with ``path`` forced, within 1e-4 of :func:`oracle`."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, layer.in_features, generator=gen, requires_grad=True)
    g = torch.randn(*tokens, layer.out_features, generator=gen)
    with planner.force(delta=path):
        out = layer(x)
        gx, gc = torch.autograd.grad(out, (x, layer.coeffs), g)
    for got, want in zip((out, gx, gc), oracle(layer, x, g)):
        assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_every_backend_on_an_nf4_base(backend, path):
    matches_the_oracle(adapted("nf4", backend=backend, k=9), path, tokens=(4,), seed=2)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_compute(path):
    """compute_dtype=bfloat16: bitsandbytes casts x to it, and so does the adapter. Tolerance: bf16's
    own rounding of an output (8 bits of mantissa: ~4e-3 relative), as the 1e-2 every bf16 output is held to."""
    layer = adapted("nf4-bf16")
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    with planner.force(delta=path), torch.no_grad():
        out = layer(x)
    want, _, _ = oracle(layer, x, torch.zeros(6, D_OUT))
    assert out.dtype == torch.float32 and rel_err(out, want) <= 1e-2


def test_the_plan_says_which_path_and_why():
    layer = adapted("nf4")
    text = str(layer.plan(torch.randn(64, D_IN, requires_grad=True)))
    assert "delta" in text and "bitsandbytes 4-bit" in text and "no eval cache" in text
    with planner.force(delta="rows"):
        assert layer.plan(torch.randn(64, D_IN)).delta == "rows"
        assert "forced (delta='rows')" in str(layer.plan(torch.randn(64, D_IN)))
    # Many tokens: building dW once beats an x dW^T per token; one token: the reverse.
    def path(tokens, can_dequantize=True):
        base = QuantizedBase("nf4", training=True, base_dequantizes=True, can_dequantize=can_dequantize)
        return dispatch.decide("cpp", "cpu", torch.float32, 176, (768, 768), tokens=tokens, quantized=base).delta

    assert path(4096) == "fold"
    assert path(16) == "rows"
    assert path(4096, can_dequantize=False) != "fold"


@pytest.mark.parametrize("path", PATHS)
def test_eval_runs_without_a_dense_cache(path):
    """In eval without gradients bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel
    (where the CPU has it; only for d_out a multiple of 32 and d_in of the block size, 64); the fold
    path and merging read the weight back in its usual layout. Tolerance: that kernel computes in
    bfloat16."""
    layer = adapted("nf4", d_in=128, d_out=96).eval()
    x = torch.randn(7, 128)
    with torch.no_grad():
        first = layer(x)
        with planner.force(delta=path):
            second = layer(x)
    assert layer._cache._entry is None and rel_err(second, first) <= 1e-2
    assert rel_err(first, oracle_output(layer, x)) <= 1e-2
    layer.train()  # a training step after eval forwards: the layer puts the weight back for bitsandbytes
    g = torch.randn(7, 96)
    out = layer(x.requires_grad_(True))
    gx, gc = torch.autograd.grad(out, (x, layer.coeffs), g)
    for got, want in zip((out, gx, gc), oracle(layer, x, g)):
        assert rel_err(got, want) <= 1e-4


def test_training_on_a_quantized_base_learns():
    """A target from the quantized base's own output plus a teacher x dW_t^T on the same support:
    the loss falls 20x in tens of steps, and only the coefficients train."""
    layer = lfma.LFMALinear(quantize("nf4", linear()), k=24, alpha=30.0)
    teacher = torch.randn(layer.coeffs.shape, generator=torch.Generator().manual_seed(8))
    dw_t = lfma.reference.delta_weight(teacher, layer.rows, layer.cols, (D_OUT, D_IN), 30.0)
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        target = layer.base(x) + x @ dw_t.T
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["coeffs"]
    opt = torch.optim.Adam([layer.coeffs], lr=0.1)
    losses = []
    for _ in range(60):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= losses[0] / 20, losses[::10]


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8", "ao-int4"])
def test_merge_requantizes_and_unmerge_restores(kind):
    layer = adapted(kind)
    with torch.no_grad():
        layer.coeffs.mul_(0.01)  # a small dW, as after training: the rounding below is the quantization's
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base_out, adapted_out = layer.base(x), layer(x)
    with pytest.warns(UserWarning, match="requantized"):
        layer.merge()
    with torch.no_grad():
        merged_out = layer(x)
    # The merged weight is W + dW requantized: within the quantization's own error of the adapter's output.
    quant_error = rel_err(quantize(kind, linear())(x).detach(), linear()(x).detach())
    assert rel_err(merged_out, adapted_out) <= 3 * quant_error + 1e-6
    with pytest.warns(UserWarning, match="requantized"):
        layer.unmerge()
    with torch.no_grad():
        assert rel_err(layer.base(x), base_out) <= 3 * quant_error + 1e-6


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    layer = adapted("nf4")
    weight = layer.base.weight.data.clone()
    with torch.no_grad():
        layer.coeffs[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.base.weight.data, weight) and not layer.merged


def test_init_weight_selects_from_the_dequantized_weight():
    base = quantize("nf4", linear())
    dense = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    layer = lfma.LFMALinear(base, k=12, init="weight")
    want = lfma.select_frequencies(dense, 12)
    assert torch.equal(layer.rows, want.rows) and torch.equal(layer.cols, want.cols)


def test_unknown_packed_weights_are_refused_when_built():
    packed = nn.Linear(D_IN, D_OUT)
    packed.weight = nn.Parameter(torch.randint(-8, 8, (D_OUT, D_IN), dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"Parameter of dtype torch\.int8, not a plain floating-point.*bitsandbytes"):
        lfma.LFMALinear(packed, k=5)
    model = nn.Sequential(packed)
    with pytest.raises(TypeError, match="layer '0'"):
        lfma.apply_lfma(model, lfma.LFMAConfig(["0"], k=5))
    assert type(model[0]) is nn.Linear


class Pair(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_an_adapter_moves_between_quantized_and_full_precision_bases(tmp_path):
    """Save from a model on an nf4 base, load onto the full-precision model (the QLoRA deployment
    path) and back: the same frequencies and coefficients, and outputs within the quantization's error."""
    def full():
        return Pair(linear(D_IN, 32, seed=0), linear(32, 10, seed=1))

    def quantized():
        return Pair(quantize("nf4", linear(D_IN, 32, seed=0)), quantize("nf4", linear(32, 10, seed=1)))

    trained = lfma.apply_lfma(quantized(), lfma.LFMAConfig(["a", "b"], k=20, alpha=20.0))
    with torch.no_grad():
        for layer in lfma_layers(trained).values():
            layer.coeffs.normal_()
    lfma.save_lfma(trained, tmp_path)
    on_full = lfma.load_lfma(full(), tmp_path)
    back = lfma.load_lfma(quantized(), tmp_path)
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        assert torch.equal(back(x), trained(x))
        quant_error = rel_err(quantized()(x), full()(x))
        assert rel_err(on_full(x), trained(x)) <= 3 * quant_error
    for name, layer in lfma_layers(trained).items():
        assert torch.equal(lfma_layers(on_full)[name].coeffs, layer.coeffs)


def test_import_lfma_kernels_imports_neither_bitsandbytes_nor_torchao():
    code = "import sys, lfma_kernels; assert not {'bitsandbytes', 'torchao', 'hqq'} & set(sys.modules), 'imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(TRITON_INTERPRETED, reason="the Triton interpreter runs this slowly; covered above")
def test_second_derivatives_are_refused_clearly():
    layer = adapted("nf4")
    x = torch.randn(4, D_IN, requires_grad=True)
    with planner.force(delta="rows"):
        (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|trying to differentiate"):
        torch.autograd.grad(gx.pow(2).sum(), layer.coeffs)


def test_warnings_do_not_leak():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = adapted("ao-int8")
        layer(torch.randn(2, D_IN))


# ---------------------------------------------------------------------------------------------
# through PEFT: QLoRA-style (prepare_model_for_kbit_training, get_peft_model, save, reload, merge)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def gpt2(path, bits=None):
    """The saved small GPT-2, full precision or quantized by transformers (c_attn becomes Linear4bit /
    Linear8bitLt, in the logical (out, in) layout)."""
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    if bits is None:
        return GPT2LMHeadModel.from_pretrained(path)
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32) if bits == 4
              else BitsAndBytesConfig(load_in_8bit=True))
    return GPT2LMHeadModel.from_pretrained(path, quantization_config=config)


@pytest.mark.parametrize("bits", [4, 8])
def test_peft_qlora_flow(gpt2_dir, tmp_path, bits):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from lfma_kernels.peft import LfmaConfig

    model = prepare_model_for_kbit_training(gpt2(gpt2_dir, bits), use_gradient_checkpointing=True)
    model = get_peft_model(model, LfmaConfig(target_modules=["c_attn"], k=64, alpha=50.0, seed=0,
                                             modules_to_save=["lm_head"]))
    assert all("lfma_" in n or "lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # gradient checkpointing recomputes the forward in the backward
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(gpt2(gpt2_dir, bits), tmp_path).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        on_full = PeftModel.from_pretrained(gpt2(gpt2_dir), tmp_path).eval()  # the deployment path
        quant_error = rel_err(gpt2(gpt2_dir, bits)(input_ids=ids).logits, gpt2(gpt2_dir)(input_ids=ids).logits)
        assert rel_err(on_full(input_ids=ids).logits, expected) <= 3 * quant_error
        merged = reloaded.merge_and_unload()
        assert rel_err(merged(input_ids=ids).logits, expected) <= 3 * quant_error
    layer = merged.transformer.h[0].attn.c_attn
    assert type(layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")


def test_peft_several_adapters_on_an_nf4_base():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from lfma_kernels.peft import LfmaConfig

    model = get_peft_model(Pair(quantize("nf4", linear(D_IN, 32, seed=0)), linear(32, 10, seed=1)),
                           LfmaConfig(target_modules=["a"], k=12, alpha=20.0, seed=0))
    model.add_adapter("other", LfmaConfig(target_modules=["a"], k=7, alpha=10.0, seed=1))
    layer = model.base_model.model.a
    with torch.no_grad():
        for name in ("default", "other"):
            layer.lfma_coeffs[name].normal_()
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(2))
    dw = sum(lfma.reference.delta_weight(layer.lfma_coeffs[n].detach().double(), layer.lfma_rows[n],
                                         layer.lfma_cols[n], (32, D_IN), layer.lfma_alpha[n]) for n in ("default", "other"))
    with torch.no_grad():
        hidden = layer.base_layer(x).double() + x.double() @ dw.T
        want = model.base_model.model.b(torch.relu(hidden).float())
        assert rel_err(model(x), want) <= 1e-4


# ---------------------------------------------------------------------------------------------
# HQQ (HQQLinear is not an nn.Linear; merging gives a new layer)
# ---------------------------------------------------------------------------------------------
def hqq_linear(seed=0, d_in=D_IN, d_out=D_OUT):
    hqq = pytest.importorskip("hqq.core.quantize")
    return hqq.HQQLinear(linear(d_in, d_out, seed), hqq.BaseQuantizeConfig(nbits=4, group_size=16),
                         compute_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("path", PATHS)
def test_hqq_every_path_matches_the_oracle(path):
    layer = lfma.LFMALinear(hqq_linear(), k=17, alpha=30.0)
    with torch.no_grad():
        layer.coeffs.normal_()
    matches_the_oracle(layer, path)


def test_hqq_merge_replaces_the_layer_and_peft_loads_it():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from lfma_kernels.peft import LfmaConfig

    layer = lfma.LFMALinear(hqq_linear(), k=12, alpha=30.0, init="weight")
    with torch.no_grad():
        layer.coeffs.mul_(0.01)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        adapted_out = layer(x)
    old = layer.base
    with pytest.warns(UserWarning, match="requantized"):
        layer.merge()
    assert layer.base is not old and type(layer.base).__name__ == "HQQLinear"
    quant_error = rel_err(hqq_linear()(x).detach(), linear()(x).detach())
    with torch.no_grad():
        assert rel_err(layer(x), adapted_out) <= 3 * quant_error

    model = get_peft_model(Pair(hqq_linear(0, D_IN, 32), linear(32, 10, seed=1)),
                           LfmaConfig(target_modules=["a"], k=9, alpha=20.0, seed=0))
    out = model(x)
    out.sum().backward()
    assert model.base_model.model.a.lfma_coeffs["default"].grad is not None
    merged = model.merge_and_unload()
    assert type(merged.a).__name__ == "HQQLinear"


class FakeGPTQ(nn.Module):
    """Stands in for a layer PEFT can only run forward (gptqmodel does not install on this CPU): packed
    integers LFMA cannot read, and a forward of their own."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.register_buffer("qweight", torch.round(lin.weight.detach() * 64).to(torch.int32))
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.qweight.float() / 64, self.bias)


@pytest.fixture
def forward_only(monkeypatch):
    """PEFT's resolver (peft >= 0.21) answering for FakeGPTQ as it answers for GPTQ layers."""
    utils = pytest.importorskip("peft.utils.quantization_utils")
    original = utils.resolve_quantization_backend
    monkeypatch.setattr(utils, "resolve_quantization_backend", lambda base, **kw: (
        utils.ForwardOnlyQuantizationBackend("gptq") if isinstance(base, FakeGPTQ) else original(base, **kw)))


def test_a_forward_only_layer_gets_the_delta_path_only(forward_only):
    from peft import get_peft_model

    from lfma_kernels.peft import LfmaConfig

    model = get_peft_model(Pair(FakeGPTQ(linear(D_IN, 32)), linear(32, 10, seed=1)),
                           LfmaConfig(target_modules=["a"], k=9, alpha=20.0, seed=0))
    layer = model.base_model.model.a
    with torch.no_grad():
        layer.lfma_coeffs["default"].normal_()
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(3))
    plan = layer.plan(x)
    assert plan.delta != "fold" and "delta fold: a gptq layer cannot be dequantized" in str(plan)
    with pytest.raises(ValueError, match="cannot be dequantized"):
        with planner.force(delta="fold"):
            layer(x)
    dw = lfma.reference.delta_weight(layer.lfma_coeffs["default"].detach().double(), layer.lfma_rows["default"],
                                     layer.lfma_cols["default"], (32, D_IN), 20.0)
    with torch.no_grad():
        assert rel_err(layer(x), layer.base_layer(x).double() + x.double() @ dw.T) <= 1e-5
    with pytest.raises(TypeError, match="gptq layer cannot be dequantized and requantized"):
        model.merge_adapter()
    with pytest.raises(TypeError, match="gptq layer cannot be dequantized"):
        get_peft_model(Pair(FakeGPTQ(linear(D_IN, 32)), linear(32, 10)),
                       LfmaConfig(target_modules=["a"], k=9, init="weight"))


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
@pytest.mark.parametrize("path", PATHS)
def test_peft_layer_matches_the_oracle(kind, path):
    """The PEFT layer on each quantized base: output, dL/dx and dL/dcoeffs against the base's own output
    and dL/dx plus the float64 x dW^T (the native layer's check, through get_peft_model)."""
    pytest.importorskip("peft")
    from peft import get_peft_model

    from lfma_kernels.peft import LfmaConfig

    model = get_peft_model(nn.Sequential(quantize(kind, linear())), LfmaConfig(target_modules=["0"], k=17,
                                                                                  alpha=30.0, seed=0))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lfma_coeffs["default"].normal_()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, D_IN, generator=gen, requires_grad=True)
    g = torch.randn(2, 7, D_OUT, generator=gen)
    with planner.force(delta=path):
        out = model(x)
        gx, gc = torch.autograd.grad(out, (x, layer.lfma_coeffs["default"]), g)
    want = oracle_of(layer.base_layer, layer.lfma_coeffs["default"], layer.lfma_rows["default"],
                     layer.lfma_cols["default"], 30.0, x, g)
    for got, expected in zip((out, gx, gc), want):
        assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("conv1d", [False, True])
def test_forced_delta_paths_on_a_full_precision_base_match_the_fold(path, conv1d):
    """On a float base the layer always folds; forced, it runs each delta path, which must give the
    fold's output and gradients (float32, against the float32 fold)."""
    base = linear()
    if conv1d:
        transformers = pytest.importorskip("transformers")
        conv = transformers.pytorch_utils.Conv1D(D_OUT, D_IN)
        with torch.no_grad():
            conv.weight.copy_(base.weight.t())
            conv.bias.copy_(base.bias)
        base = conv
    layer = lfma.LFMALinear(base, k=17, alpha=30.0)
    with torch.no_grad():
        layer.coeffs.normal_()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, D_IN, generator=gen, requires_grad=True)
    g = torch.randn(6, D_OUT, generator=gen)
    want = [layer(x)]
    want += torch.autograd.grad(want[0], (x, layer.coeffs), g)
    with planner.force(delta=path):
        got = [layer(x)]
        got += torch.autograd.grad(got[0], (x, layer.coeffs), g)
        assert layer.plan(x).delta == path
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def _delta_ways():
    from lfma_kernels.ops import delta_kernels, dispatch

    ways = {"torch rows": delta_kernels.delta_rows, "torch separable": delta_kernels.delta_separable,
            "torch dense": delta_kernels.delta_dense(
                lambda *args: dispatch.kernels("torch").delta_weight(*args, "separable"))}
    if "cpp" in FAST_BACKENDS:
        ways["cpp rows"] = dispatch.kernels("cpp").delta_rows
    return ways


@pytest.mark.parametrize("way", list(_delta_ways()))
@pytest.mark.parametrize("shape, tokens", [((48, 80), 11), ((97, 64), 257), ((7, 5), 3), ((8, 8), 1), ((64, 97), 0),
                                           ((33, 40), 1029)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_kernels_and_their_adjoints(way, shape, tokens, dtype):
    """x dW^T and g dW (the same map, rows and columns swapped) against the float64 dW, with repeated
    positions, Nyquist and zero bins, and token counts spanning the C++ kernel's blocks (256)."""
    from lfma_kernels.ops import delta_kernels

    run = _delta_ways()[way]
    gen = torch.Generator().manual_seed(tokens + shape[0])
    k = 23
    rows = torch.cat([torch.randint(0, shape[0], (k - 3,), generator=gen), torch.tensor([0, shape[0] // 2, 0])])
    cols = torch.cat([torch.randint(0, shape[1], (k - 3,), generator=gen), torch.tensor([0, shape[1] // 2, 0])])
    coeffs = torch.randn(k, 2, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, shape[1], generator=gen, dtype=torch.float64)
    g = torch.randn(tokens, shape[0], generator=gen, dtype=torch.float64)
    dw = lfma.reference.delta_weight(coeffs, rows, cols, shape, 3.0)
    got = run(x.to(dtype), coeffs.to(dtype), rows, cols, shape, 3.0)
    got_adj = delta_kernels.adjoint(run)(g.to(dtype), coeffs.to(dtype), rows, cols, shape, 3.0)
    assert got.shape == (tokens, shape[0]) and got_adj.shape == (tokens, shape[1])
    if tokens:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert rel_err(got, x @ dw.T) <= tol and rel_err(got_adj, g @ dw) <= tol
