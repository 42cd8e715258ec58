"""The triton backend's kernels themselves: fused forward (dW and W + dW), the partial-DFT gradient,
the fused batch gradient, float64, odd shapes, phase precision, the cost model and the options.

On CPU these run through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` when there is
no GPU): float32, small shapes, one fixed block config. On a CUDA machine the same tests run on
the GPU with the autotuned configs, plus the ``cuda``-only tests at the end (paper sizes, bf16/fp16,
TF32 options, ``torch.compile`` with Inductor).

    PYTHONPATH=. python -m pytest -q tests/test_triton.py        # CPU (interpreter) or GPU
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels.ops import backends, dispatch, library, planner, torch_kernels
from conftest import TRITON_INTERPRETED, compiled_matches_eager, linear_against_oracle, random_frequencies, rel_err

TRITON_AVAILABLE = dispatch.unavailable_reason("triton") is None
pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE,
                                reason=f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")

if TRITON_AVAILABLE:
    from lfma_kernels.ops import triton_ops
# Under the interpreter the kernels take CPU tensors; otherwise (a GPU) CUDA tensors.
DEVICE = "cpu" if TRITON_INTERPRETED else "cuda"
cuda_only = pytest.mark.skipif(TRITON_INTERPRETED or not torch.cuda.is_available(),
                               reason="needs a CUDA GPU (not run under the Triton interpreter)")

# The shapes; K = 1, K not a multiple of and larger than one chunk (32 under the
# interpreter, 16-32 when autotuned), and K across many chunks.
SHAPES = [(48, 80), (97, 64), (33, 33), (128, 256)]
KS = [1, 37, 203]


@pytest.fixture
def kernels(monkeypatch):
    """Force the fused kernels (never the FFT fallback) and count their launches."""
    launches = {"delta_weight": 0, "coeff_grad": 0, "batch": 0}
    for name, key in (("_launch_delta_weight", "delta_weight"), ("_launch_coeff_grad", "coeff_grad"),
                      ("_launch_coeff_grad_batch", "batch")):
        original = getattr(triton_ops, name)

        def counting(*args, _original=original, _key=key, **kwargs):
            launches[_key] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(triton_ops, name, counting)
    with planner.force(dw="separable", grad="separable"):
        yield launches


def _freqs(shape, k, gen, dtype=torch.float32):
    coeffs, rows, cols = random_frequencies(shape, k, generator=gen, dtype=dtype)
    return coeffs.to(DEVICE), rows.to(DEVICE), cols.to(DEVICE)


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
def test_available_and_reports_why_not(monkeypatch):
    assert "triton" in lfma.available_backends()
    assert dispatch.unavailable_reason("triton") is None
    # Without a GPU and without the interpreter the probe says why and how to get it.
    monkeypatch.setattr(backends.triton, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe = backends.REGISTRY["triton"].unavailable_reason
    reason = probe()
    assert "CUDA" in reason and "TRITON_INTERPRET=1" in reason
    with monkeypatch.context() as m:
        m.setattr(backends.triton.importlib.util, "find_spec", lambda name: None)
        assert "pip install triton" in probe()
    # ...and asking for it then raises RuntimeError with that reason.
    monkeypatch.setitem(dispatch._reasons, "triton", reason)
    coeffs, rows, cols = random_frequencies((8, 8), 2)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: .*TRITON_INTERPRET=1"):
        lfma.delta_weight(coeffs, rows, cols, (8, 8), 1.0, backend="triton")
    assert "triton" not in lfma.available_backends()


def _folded(weight, coeffs, rows, cols, alpha):
    """W + dW on the triton backend, as a layer's fold runs it."""
    decision = dispatch.decide("triton", weight.device, weight.dtype, rows.shape[0], weight.shape)
    return library.folded_weight(decision, weight, coeffs, rows, cols, alpha)


# ---------------------------------------------------------------------------------------------
# forward: dW and the W + dW epilogue
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", KS)
def test_delta_weight_kernel_matches_oracle(shape, k, kernels, gen):
    coeffs, rows, cols = _freqs(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 12.0)
    out = lfma.delta_weight(coeffs, rows, cols, shape, 12.0, backend="triton")
    assert kernels["delta_weight"] == 1
    assert out.dtype == torch.float32 and out.shape == shape and out.device.type == DEVICE
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("shape, k", [((48, 80), 37), ((97, 64), 1), ((33, 33), 203)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_folded_weight_epilogue(shape, k, wdtype, kernels, gen):
    """W + dW with the add fused in the epilogue, stored in W's dtype (W here a transposed view)."""
    coeffs, rows, cols = _freqs(shape, k, gen)
    dw = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 12.0)
    weight = (torch.randn(shape[::-1], generator=gen, dtype=torch.float64) * dw.std()).to(DEVICE).T
    weight = weight.to(wdtype)
    assert not weight.is_contiguous()
    out = _folded(weight, coeffs, rows, cols, 12.0)
    assert kernels["delta_weight"] == 1
    assert out.dtype == wdtype and out.shape == shape
    want = weight.double() + dw
    if wdtype == torch.float32:
        assert rel_err(out, want) <= 1e-5
    else:
        # One rounding to the 16-bit dtype (the interpreter truncates bf16 instead of rounding).
        assert rel_err(out, want) <= 1e-2
        torch_rounded = (weight.double() + dw).to(wdtype)
        assert rel_err(out, want) <= 2.5 * rel_err(torch_rounded, want) + 1e-3


def test_float64_kernels(kernels, gen):
    """float64 runs the broadcast-product path of the same kernels: agreement to float64 rounding."""
    shape, k = (33, 48), 37
    coeffs, rows, cols = _freqs(shape, k, gen, dtype=torch.float64)
    ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 1.7)
    out = lfma.delta_weight(coeffs, rows, cols, shape, 1.7, backend="triton")
    assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-12
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    assert rel_err(_folded(weight, coeffs, rows, cols, 1.7), weight + ref) <= 1e-12
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grad = triton_ops._launch_coeff_grad(g, rows, cols, 1.7)
    assert grad.dtype == torch.float64
    assert rel_err(grad, lfma.reference.coeff_grad(g, rows, cols, 1.7)) <= 1e-12
    x = torch.randn(5, shape[1], generator=gen, dtype=torch.float64).to(DEVICE)
    gy = torch.randn(5, shape[0], generator=gen, dtype=torch.float64).to(DEVICE)
    batch = triton_ops.coeff_grad_batch_gemm(x, gy, rows, cols, shape, 1.7, torch.float64)
    assert rel_err(batch, lfma.reference.coeff_grad(gy.T @ x, rows, cols, 1.7)) <= 1e-12
    assert kernels == {"delta_weight": 2, "coeff_grad": 1, "batch": 1}


def test_strided_inputs(kernels, gen):
    """Non-contiguous coefficients, weight and gradient views are read through their strides."""
    shape, k = (40, 24), 19
    coeffs, rows, cols = _freqs(shape, k, gen)
    wide = torch.zeros(k, 4, device=DEVICE)
    wide[:, ::2] = coeffs
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 3.0)
    assert rel_err(lfma.delta_weight(strided, rows, cols, shape, 3.0, backend="triton"), ref) <= 1e-5
    g = torch.randn(shape[::-1], generator=gen).to(DEVICE).T
    assert rel_err(triton_ops._launch_coeff_grad(g, rows, cols, 3.0),
                   lfma.reference.coeff_grad(g.double(), rows, cols, 3.0)) <= 1e-5
    x = torch.randn(9, 2 * shape[1], generator=gen).to(DEVICE)[:, ::2]
    gy = torch.randn(9, shape[0], generator=gen).to(DEVICE)
    assert rel_err(triton_ops.coeff_grad_batch_gemm(x, gy, rows, cols, shape, 3.0, torch.float32),
                   lfma.reference.coeff_grad((gy.T @ x).double(), rows, cols, 3.0)) <= 1e-5


def test_deterministic(kernels, gen):
    """No atomics: the gradient kernels reduce fixed regions, so repeated runs agree bit for bit."""
    shape, k = (97, 64), 37
    coeffs, rows, cols = _freqs(shape, k, gen)
    g = torch.randn(shape, generator=gen).to(DEVICE)
    x = torch.randn(70, shape[1], generator=gen).to(DEVICE)
    gy = torch.randn(70, shape[0], generator=gen).to(DEVICE)
    assert torch.equal(lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton"),
                       lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton"))
    assert torch.equal(triton_ops._launch_coeff_grad(g, rows, cols, 1.0), triton_ops._launch_coeff_grad(g, rows, cols, 1.0))
    first = triton_ops.coeff_grad_batch_gemm(x, gy, rows, cols, shape, 1.0, torch.float32)
    assert torch.equal(first, triton_ops.coeff_grad_batch_gemm(x, gy, rows, cols, shape, 1.0, torch.float32))


# ---------------------------------------------------------------------------------------------
# phase precision: exact integer reduction, int64 products past int32
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, k", [((251, 1021), 40), ((1021, 97), 9)])
def test_phase_precision_odd_shapes(shape, k, kernels, gen):
    """At d ~ 1000 a float32 angle 2*pi*m*u/d is off by ~1e-4; exact integer reduction keeps 1e-5.
    (The 4096 x 4096 version of this test runs on CUDA: too slow for the interpreter.)"""
    coeffs, rows, cols = _freqs(shape, k, gen)
    rows[0], cols[0] = shape[0] - 1, shape[1] - 1          # the largest products m*u, n*v
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 1.0)
    assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton"), ref) <= 1e-5
    g = torch.randn(shape, generator=gen).to(DEVICE)
    assert rel_err(triton_ops._launch_coeff_grad(g, rows, cols, 1.0),
                   lfma.reference.coeff_grad(g.double(), rows, cols, 1.0)) <= 1e-5


def test_int64_threshold():
    """int32 phase products are safe up to the threshold: (d + largest block) * d < 2**31."""
    limit = 32768
    assert (limit + 128) * limit < 2 ** 31
    assert not triton_ops._wide(limit, 7) and triton_ops._wide(limit + 1, 7) and triton_ops._wide(3, 50021)


def test_int64_phase_path(kernels, monkeypatch, gen):
    """The int64 phase products (used from d > 32768 on) in all three kernels, at a small shape."""
    monkeypatch.setattr(triton_ops, "_wide", lambda *dims: True)
    shape, k = (97, 64), 37
    coeffs, rows, cols = _freqs(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 1.0)
    assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton"), ref) <= 1e-5
    g = torch.randn(shape, generator=gen).to(DEVICE)
    want = lfma.reference.coeff_grad(g.double(), rows, cols, 1.0)
    assert rel_err(triton_ops._launch_coeff_grad(g, rows, cols, 1.0), want) <= 1e-5
    x = torch.randn(9, shape[1], generator=gen).to(DEVICE)
    gy = torch.randn(9, shape[0], generator=gen).to(DEVICE)
    assert rel_err(triton_ops.coeff_grad_batch_gemm(x, gy, rows, cols, shape, 1.0, torch.float32),
                   lfma.reference.coeff_grad((gy.T @ x).double(), rows, cols, 1.0)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# gradients: the partial-DFT kernel (from G) and the fused batch kernel (from x and g)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", KS)
def test_coeff_grad_kernel_matches_oracle(shape, k, kernels, gen):
    coeffs, rows, cols = _freqs(shape, k, gen)
    grad = torch.randn(shape, generator=gen).to(DEVICE)
    c = coeffs.detach().clone().requires_grad_(True)
    lfma.delta_weight(c, rows, cols, shape, 12.0, backend="triton").backward(grad)
    ref_c = coeffs.double().requires_grad_(True)
    lfma.reference.delta_weight(ref_c, rows, cols, shape, 12.0).backward(grad.double())
    assert kernels["coeff_grad"] == 1
    assert c.grad.dtype == torch.float32 and rel_err(c.grad, ref_c.grad) <= 1e-5


@pytest.mark.parametrize("shape, k", [((48, 80), 1), ((97, 64), 37), ((33, 33), 203), ((128, 256), 37)])
@pytest.mark.parametrize("tokens", [1, 70])
@pytest.mark.parametrize("path", ["dense", "gemm"])
def test_lfma_linear_kernels_match_oracle(shape, k, tokens, path, kernels, gen):
    """A layer step: W + dW by the fused kernel (for the forward and dL/dx), dL/dcoeffs by the partial
    DFT of G = g^T x ("dense") or the fused batch kernel ("gemm")."""
    coeffs, rows, cols = _freqs(shape, k, gen)
    x = torch.randn(tokens, shape[1], generator=gen).to(DEVICE)
    weight = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(DEVICE)
    bias = torch.randn(shape[0], generator=gen).to(DEVICE)
    g = torch.randn(tokens, shape[0], generator=gen).to(DEVICE)

    with planner.force(backward=path):
        results = linear_against_oracle("triton", x, weight, bias, coeffs, rows, cols, g)
    for name, got, want in results:
        assert rel_err(got, want) <= 1e-5, name
    # W + dW is built once (the forward keeps it for dL/dx)
    assert kernels == {"delta_weight": 1, "coeff_grad": int(path == "dense"), "batch": int(path == "gemm")}


@pytest.mark.parametrize("path", ["dense", "gemm"])
def test_lfma_linear_full_gradcheck(path, kernels, gen):
    """float64 gradcheck (every Jacobian entry) through the fused fold and each gradient kernel."""
    shape, k = (6, 9), 4
    coeffs, rows, cols = _freqs(shape, k, gen, dtype=torch.float64)
    x = torch.randn(2, 3, shape[1], generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE)
    coeffs.requires_grad_(True)
    with planner.force(backward=path):
        assert torch.autograd.gradcheck(
            lambda x, c: lfma.lfma_linear(x, weight, None, c, rows, cols, 2.5, backend="triton"), (x, coeffs))
    assert kernels["coeff_grad" if path == "dense" else "batch"] > 0


def test_batch_kernel_low_precision_activations(kernels, gen):
    """bf16/fp16 activations: the batch kernel's products run in that dtype (tensor cores on the
    GPU; upcast under the interpreter) with float32 accumulation."""
    shape, k = (48, 80), 37
    coeffs, rows, cols = _freqs(shape, k, gen)
    x = torch.randn(50, shape[1], generator=gen).to(DEVICE)
    g = torch.randn(50, shape[0], generator=gen).to(DEVICE)
    want = lfma.reference.coeff_grad((g.double().T @ x.double()), rows, cols, 12.0)
    for dtype in (torch.bfloat16, torch.float16):
        got = triton_ops.coeff_grad_batch_gemm(x.to(dtype), g.to(dtype), rows, cols, shape, 12.0, torch.float32)
        assert got.dtype == torch.float32
        # the inputs' own rounding bounds what any dtype-faithful implementation can do
        rounded = lfma.reference.coeff_grad((g.to(dtype).double().T @ x.to(dtype).double()), rows, cols, 12.0)
        assert rel_err(got, want) <= 2 * rel_err(rounded, want) + 5e-3


def test_no_tokens(kernels, gen):
    shape, k = (12, 20), 5
    coeffs, rows, cols = _freqs(shape, k, gen)
    coeffs.requires_grad_(True)
    x = torch.zeros(0, shape[1], device=DEVICE)
    out = lfma.lfma_linear(x, torch.randn(shape, device=DEVICE), None, coeffs, rows, cols, 1.0, backend="triton")
    out.sum().backward()
    assert out.shape == (0, shape[0]) and torch.equal(coeffs.grad, torch.zeros_like(coeffs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_batch_op(dtype, gen):
    coeffs, rows, cols = _freqs((12, 10), 5, gen, dtype=dtype)
    x = torch.randn(7, 10, dtype=dtype).to(DEVICE)
    g = torch.randn(7, 12, dtype=dtype).to(DEVICE)
    torch.library.opcheck(torch.ops.lfma.triton_coeff_grad_batch.default, (x, g, rows, cols, 12, 10, 1.5, dtype))


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="on a GPU every test goes through the autotuner")
def test_autotuned_launch_path(kernels, monkeypatch, gen):
    """The GPU launch path (triton.autotune: keys, config pruning, grids from the tuned block sizes)
    driven through the interpreter; the pruning is cut to one survivor, so no timing is needed."""
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    for tuned in (triton_ops._delta_weight_tuned, triton_ops._coeff_grad_tuned, triton_ops._coeff_grad_batch_tuned):
        prune = tuned.early_config_prune
        monkeypatch.setattr(tuned, "early_config_prune", lambda *a, _prune=prune, **kw: _prune(*a, **kw)[:1])
        monkeypatch.setattr(tuned, "cache", {})
    shape, k = (97, 64), 37
    coeffs, rows, cols = _freqs(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 1.0)
    assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton"), ref) <= 1e-5
    g = torch.randn(shape, generator=gen).to(DEVICE)
    assert rel_err(triton_ops._launch_coeff_grad(g, rows, cols, 1.0),
                   lfma.reference.coeff_grad(g.double(), rows, cols, 1.0)) <= 1e-5
    x = torch.randn(9, shape[1], generator=gen).to(DEVICE)
    gy = torch.randn(9, shape[0], generator=gen).to(DEVICE)
    assert rel_err(triton_ops.coeff_grad_batch_gemm(x, gy, rows, cols, shape, 1.0, torch.float32),
                   lfma.reference.coeff_grad((gy.T @ x).double(), rows, cols, 1.0)) <= 1e-5
    assert all(tuned.cache for tuned in (triton_ops._delta_weight_tuned, triton_ops._coeff_grad_tuned,
                                         triton_ops._coeff_grad_batch_tuned))


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="on a GPU the tests compile the kernels themselves")
def test_kernels_compile_for_sm90():
    """The interpreter runs the kernels' Python source; only the compiler sees what it rejects. Compile
    them to sm_90 cubins (Triton's compiler and bundled ptxas, no GPU needed) in a fresh process."""
    import triton
    if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = pathlib.Path(__file__).with_name("triton_compile_check.py")
    proc = subprocess.run([sys.executable, str(script), "--arch", "90"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# cost model and options
# ---------------------------------------------------------------------------------------------
def test_cost_model_switches_to_fft_for_large_k():
    def kernel(k, shape, gradient=False):
        decision = dispatch.decide("triton", "cuda", torch.float32, k, shape)
        return (decision.grad if gradient else decision.dw) == "separable"

    for shape in [(768, 768), (1024, 1024), (768, 3072), (3072, 768), (4096, 4096)]:
        n = shape[0] * shape[1]
        assert kernel(1, shape) and kernel(1, shape, gradient=True)
        assert not kernel(int(0.05 * n), shape)
        assert not kernel(int(0.05 * n), shape, gradient=True)
        picks = [kernel(k, shape) for k in range(1, 3000, 7)]
        assert picks == sorted(picks, reverse=True), "kernel for small K, FFT from one K on"
    assert kernel(176, (768, 768))  # the paper's ViT-B setting stays on the kernel


def test_fft_fallback_is_used_past_the_crossover(monkeypatch, gen):
    calls = []
    original = torch_kernels.delta_weight_fft
    monkeypatch.setattr(torch_kernels, "delta_weight_fft", lambda *a: calls.append(1) or original(*a))
    shape, k = (20, 30), 9
    coeffs, rows, cols = _freqs(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 2.0)
    with planner.force(dw="fft"):
        assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 2.0, backend="triton"), ref) <= 1e-5
    assert calls == [1]


def test_dot_precision_option(kernels, gen):
    assert triton_ops.get_dot_precision() == "ieee"
    with pytest.raises(ValueError, match="dot precision"):
        triton_ops.set_dot_precision("fp8")
    shape, k = (48, 80), 37
    coeffs, rows, cols = _freqs(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 12.0)
    try:
        for precision, tol in (("tf32x3", 1e-5), ("tf32", 1e-2)):
            triton_ops.set_dot_precision(precision)
            assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 12.0, backend="triton"), ref) <= tol, precision
    finally:
        triton_ops.set_dot_precision("ieee")


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
def _assert_dw_and_grad_match_oracle(shape, coeffs, rows, cols):
    """dW against the float64 oracle, and the gradient kernel against a float64 rfft2 of G."""
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 1.0)
    assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton"), ref) <= 1e-5
    g = torch.randn(shape, device=DEVICE)
    assert rel_err(triton_ops._launch_coeff_grad(g, rows, cols, 1.0),
                   lfma.reference.coeff_grad(g.double(), rows, cols, 1.0)) <= 1e-5


@cuda_only
@pytest.mark.parametrize("k", [7, 400])
def test_cuda_phase_precision_4096(k, kernels, gen):
    shape = (4096, 4096)
    coeffs, rows, cols = _freqs(shape, k, gen)
    _assert_dw_and_grad_match_oracle(shape, coeffs, rows, cols)


@cuda_only
def test_cuda_int64_phase_products(kernels, gen):
    """d = 50021: m*u overflows int32, so the kernels take the int64 phase path."""
    shape, k = (3, 50021), 5
    coeffs, rows, cols = _freqs(shape, k, gen)
    rows[0], cols[0] = shape[0] - 1, shape[1] - 1
    _assert_dw_and_grad_match_oracle(shape, coeffs, rows, cols)


@cuda_only
@pytest.mark.parametrize("shape, k", [((768, 768), 176), ((1024, 1024), 314), ((768, 3072), 37)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["dense", "gemm"])
def test_cuda_low_precision_layer(shape, k, dtype, path, kernels, gen):
    """bf16/fp16 activations and weight at the paper's sizes: the error against the float64 oracle
    is judged against PyTorch's own error in that dtype (the paper's formulation run in it)."""
    coeffs, rows, cols = _freqs(shape, k, gen)
    coeffs = coeffs * 50.0  # a dW comparable to W, so the adapter's error is visible
    x = torch.randn(512, shape[1], device=DEVICE)
    weight = torch.randn(shape, device=DEVICE) / shape[1] ** 0.5
    g = torch.randn(512, shape[0], device=DEVICE)

    def run(fn, dtype):
        xl = x.to(dtype).requires_grad_(True)
        c = coeffs.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
        out = fn(xl, weight.to(dtype), c)
        out.backward(g.to(dtype))
        return out, xl.grad, c.grad

    ref = run(lambda x, w, c: lfma.reference.lfma_linear(x, w, None, c, rows, cols, 12.0), torch.float64)
    torch_lp = run(lambda x, w, c: lfma.reference.lfma_linear(x, w, None, c, rows, cols, 12.0), dtype)
    with planner.force(backward=path):
        ours = run(lambda x, w, c: lfma.lfma_linear(x, w, None, c, rows, cols, 12.0, backend="triton"), dtype)
    for got, base, want, name in zip(ours, torch_lp, ref, ("output", "grad x", "grad coeffs")):
        assert got.dtype == base.dtype, name
        # bf16 phase tables in the batch path (as in the torch backend): allow one epsilon of the dtype
        assert rel_err(got, want) <= max(2 * rel_err(base, want), torch.finfo(dtype).eps), name


@cuda_only
@pytest.mark.parametrize("op", ["delta_weight", "folded_weight", "coeff_grad", "linear", "coeff_grad_batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_opcheck(op, dtype, gen):
    """test_ops.py's opcheck runs on CPU tensors (the interpreter); on a GPU, the same on CUDA."""
    coeffs, rows, cols = _freqs((12, 10), 5, gen, dtype=dtype)
    coeffs.requires_grad_(True)

    def t(*shape, grad=False):
        return torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=grad)
    args = {
        "delta_weight": (coeffs, rows, cols, 12, 10, 1.5),
        "folded_weight": (t(12, 10), coeffs.detach(), rows, cols, 1.5),
        "coeff_grad": (t(12, 10), rows, cols, 1.5),
        "linear": (t(3, 4, 10, grad=True), t(12, 10), t(12), coeffs, rows, cols, 1.5),
        "coeff_grad_batch": (t(7, 10), t(7, 12), rows, cols, 12, 10, 1.5, dtype),
    }[op]
    torch.library.opcheck(getattr(torch.ops.lfma, f"triton_{op}").default, args)


@cuda_only
@pytest.mark.parametrize("shape, k", [((6, 10), 3), ((7, 5), 9)])
def test_cuda_delta_weight_gradcheck(shape, k, kernels, gen):
    coeffs, rows, cols = _freqs(shape, k, gen, dtype=torch.float64)
    coeffs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: lfma.delta_weight(c, rows, cols, shape, 1.7, backend="triton"), (coeffs,))


@cuda_only
def test_cuda_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128)).to(DEVICE)
    lfma.apply_lfma(model, lfma.LFMAConfig(["0", "2"], k=40, backend="triton"))
    compiled_matches_eager(model, torch.randn(4, 64, 256, device=DEVICE), out_tol=1e-5, grad_tol=1e-4,
                           loss=lambda out: out.pow(2).mean())


@cuda_only
def test_cuda_auto_prefers_triton_and_matches():
    shape, k = (768, 768), 176
    coeffs, rows, cols = random_frequencies(shape, k, device=DEVICE)
    assert dispatch.decide("auto", coeffs.device, coeffs.dtype, k, shape).backend == "triton"
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 12.0)
    assert rel_err(lfma.delta_weight(coeffs, rows, cols, shape, 12.0), ref) <= 1e-5


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_second_device(gen):
    shape, k = (96, 80), 21
    coeffs, rows, cols = random_frequencies(shape, k, generator=gen, device="cuda:1")
    ref = lfma.reference.delta_weight(coeffs.double(), rows, cols, shape, 1.0)
    out = lfma.delta_weight(coeffs, rows, cols, shape, 1.0, backend="triton")
    assert out.device == torch.device("cuda:1") and rel_err(out, ref) <= 1e-5

