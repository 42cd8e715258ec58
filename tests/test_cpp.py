"""The C++/CUDA extension (csrc/): every CPU algorithm against the float64 oracle, the adjoint
identity between dW and dL/dcoeffs, gradcheck, opcheck on the raw lfma_ext ops and the lfma:: ops
running them, the bindings' input validation, the loader's messages; the CUDA kernels when a GPU is present.

The generic backend tests of test_ops.py run on ``cpp`` as well (it is in FAST_BACKENDS once the
extension loads)."""
import os

import pytest
import torch

import lfma_kernels as lfma
from lfma_kernels.ops import backends, dispatch, extension, library, linear_op, planner
from lfma_kernels.ops.decision import count_positions
from conftest import random_frequencies, rel_err

_reason = dispatch.unavailable_reason("cpp")
if _reason is not None and "failed" in _reason:  # a broken build or library is an error, not a skip
    pytest.fail(f"the C++ extension is broken: {_reason}", pytrace=False)
if _reason is not None:  # no prebuilt extension and no toolchain to build one
    pytest.skip(f"backend 'cpp' is not available: {_reason}", allow_module_level=True)

from lfma_kernels.ops import cpp_ops  # noqa: E402  (loads the extension)

ops = torch.ops.lfma_ext
ALGOS = ["separable", "hybrid", "fft"]
# The odd shapes of the foundation tests, K = 1, K odd, large K (past d_out*d_in/2, with repeats),
# and every position of a small matrix once; 1-wide and 2-wide edges for the FFT paths.
SHAPES_K = [((48, 80), 1), ((48, 80), 37), ((97, 64), 1), ((97, 64), 203), ((33, 33), 33), ((33, 33), 1089),
            ((16, 24), 384), ((1, 7), 3), ((7, 1), 3), ((2, 2), 4), ((1, 1), 1)]
HAS_CUDA = torch.cuda.is_available() and "cuda" in lfma.available_backends()


def all_positions(shape):
    rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return rows.flatten(), cols.flatten()


def frequencies(shape, k, gen, dtype=torch.float64, device="cpu"):
    if k == shape[0] * shape[1] and k > 1:  # each position exactly once
        rows, cols = all_positions(shape)
        return torch.randn(k, 2, generator=gen, dtype=torch.float64).to(device, dtype), rows.to(device), cols.to(device)
    return random_frequencies(shape, k, generator=gen, dtype=dtype, device=device)


def oracle_grad(g, rows, cols, alpha):
    """dL/dcoeffs for G = g the paper's way (autograd through ifft2), in float64."""
    return lfma.reference.coeff_grad(g.double().cpu(), rows.cpu(), cols.cpu(), alpha)


@pytest.fixture(params=ALGOS)
def algo(request):
    """Force one CPU algorithm, in the raw ops (the returned code) and in the cpp backend."""
    with planner.force(dw=request.param, grad=request.param):
        yield cpp_ops.ALGO_CODES[request.param]


# ---------------------------------------------------------------------------------------------
# raw ops against the oracle, per algorithm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape, k", SHAPES_K)
def test_delta_weight_matches_oracle(shape, k, dtype, tol, algo, gen):
    coeffs, rows, cols = frequencies(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 1.7)
    out = ops.delta_weight(coeffs.to(dtype), rows, cols, shape[0], shape[1], 1.7, algo)
    assert out.dtype == dtype and tuple(out.shape) == shape and out.is_contiguous()
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape, k", SHAPES_K)
def test_coeff_grad_matches_oracle(shape, k, dtype, tol, algo, gen):
    _, rows, cols = frequencies(shape, k, gen)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = ops.coeff_grad(g.to(dtype), rows, cols, 0.8, algo)
    assert out.dtype == dtype and tuple(out.shape) == (k, 2)
    assert rel_err(out, oracle_grad(g, rows, cols, 0.8)) <= tol


@pytest.mark.parametrize("shape, k", [((48, 80), 37), ((97, 64), 203), ((33, 33), 1), ((5, 9), 45)])
def test_coeff_grad_is_the_adjoint_of_delta_weight(shape, k, algo, gen):
    """<dW(c), G> = <c, coeff_grad(G)> for every c and G (float64): the backward is exact."""
    coeffs, rows, cols = frequencies(shape, k, gen)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    lhs = (ops.delta_weight(coeffs, rows, cols, shape[0], shape[1], 2.5, algo) * g).sum()
    rhs = (coeffs * ops.coeff_grad(g, rows, cols, 2.5, algo)).sum()
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))


# ---------------------------------------------------------------------------------------------
# the batch path lfma_ext::coeff_grad_batch: dL/dcoeffs from x and dL/dout without forming G
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape, k", SHAPES_K)
@pytest.mark.parametrize("tokens", [1, 37])
def test_coeff_grad_batch_matches_oracle(shape, k, tokens, dtype, tol, gen):
    _, rows, cols = frequencies(shape, k, gen)
    x = torch.randn(tokens, shape[1], generator=gen, dtype=torch.float64)
    g = torch.randn(tokens, shape[0], generator=gen, dtype=torch.float64)
    out = ops.coeff_grad_batch(x.to(dtype), g.to(dtype), rows, cols, 0.8)
    assert out.dtype == dtype and tuple(out.shape) == (k, 2)
    assert rel_err(out, oracle_grad(g.T @ x, rows, cols, 0.8)) <= tol


@pytest.mark.parametrize("shape, k", [((48, 80), 60), ((97, 64), 301), ((33, 17), 99), ((16, 16), 256)])
@pytest.mark.parametrize("hermitian", [False, True])
def test_coeff_grad_batch_selected_frequencies(shape, k, hermitian, gen):
    """The paper's selection picks conjugate pairs, which the kernel merges into one term; the
    Hermitian half has none; all 256 positions of 16x16 include the self-conjugate bins."""
    init = torch.randn(shape, generator=gen, dtype=torch.float64)
    sel = lfma.select_frequencies(init, min(k, shape[0] * shape[1] // (2 if hermitian else 1)), hermitian=hermitian)
    x = torch.randn(300, shape[1], generator=gen, dtype=torch.float64)
    g = torch.randn(300, shape[0], generator=gen, dtype=torch.float64)
    ref = oracle_grad(g.T @ x, sel.rows, sel.cols, 1.3)
    assert rel_err(ops.coeff_grad_batch(x, g, sel.rows, sel.cols, 1.3), ref) <= 1e-12
    assert rel_err(ops.coeff_grad_batch(x.float(), g.float(), sel.rows, sel.cols, 1.3), ref) <= 1e-5


@pytest.mark.parametrize("tokens", [255, 256, 1029])
def test_coeff_grad_batch_many_tokens(tokens, gen):
    """Token blocks (256), runs summed in float32 (32), eight-token vector passes and a scalar tail,
    and one chunk per thread: all must add up to the oracle's sum over every token."""
    init = torch.randn(96, 80, generator=gen, dtype=torch.float64)
    sel = lfma.select_frequencies(init, 150)
    x = torch.randn(tokens, 80, generator=gen, dtype=torch.float64) + 0.5  # a mean: large u = v = 0 sums
    g = torch.randn(tokens, 96, generator=gen, dtype=torch.float64)
    ref = oracle_grad(g.T @ x, sel.rows, sel.cols, 0.7)
    assert rel_err(ops.coeff_grad_batch(x, g, sel.rows, sel.cols, 0.7), ref) <= 1e-12
    assert rel_err(ops.coeff_grad_batch(x.float(), g.float(), sel.rows, sel.cols, 0.7), ref) <= 1e-5


def test_coeff_grad_batch_dtypes_layouts_and_empty(gen):
    _, rows, cols = frequencies((12, 10), 9, gen)
    x = torch.randn(10, 20, generator=gen, dtype=torch.float64).T  # non-contiguous [20, 10]
    g = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    ref = oracle_grad(g.T @ x, rows, cols, 1.0)
    assert rel_err(ops.coeff_grad_batch(x, g, rows, cols, 1.0), ref) <= 1e-12
    mixed = ops.coeff_grad_batch(x.to(torch.bfloat16), g.float(), rows, cols, 1.0)
    assert mixed.dtype == torch.float32 and rel_err(mixed, ref) <= 2e-2
    assert ops.coeff_grad_batch(x, g.float(), rows, cols, 1.0).dtype == torch.float64
    assert torch.equal(ops.coeff_grad_batch(x[:0], g[:0], rows, cols, 1.0), torch.zeros(9, 2, dtype=torch.float64))
    assert ops.coeff_grad_batch(x, g, rows[:0], cols[:0], 1.0).shape == (0, 2)
    torch.library.opcheck(ops.coeff_grad_batch.default, (x.contiguous(), g, rows, cols, 1.5))
    torch.library.opcheck(ops.coeff_grad_batch.default, (x.float(), g.float(), rows, cols, 1.5))


def test_cpp_backward_takes_the_batch_path(gen):
    """With the planner asking for "fft", the cpp backend's backward runs its own kernel (not
    torch_kernels' version) and matches the dense path."""
    coeffs, rows, cols = frequencies((24, 40), 11, gen, dtype=torch.float32)
    x, weight = torch.randn(3, 5, 40, generator=gen), torch.randn(24, 40, generator=gen)
    grads = {}
    for path in ("dense", "fft"):
        c = coeffs.clone().requires_grad_(True)
        with planner.force(backward=path), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            lfma.lfma_linear(x, weight, None, c, rows, cols, 2.0, backend="cpp").square().sum().backward()
        names = {e.key for e in prof.key_averages()}
        assert ("lfma_ext::coeff_grad_batch" in names) == (path == "fft"), names
        grads[path] = c.grad
    assert rel_err(grads["fft"], grads["dense"]) <= 1e-5


def test_batch_path_cost_model_picks():
    """The measured pair cost sends the paper's shapes through the batch kernel and very large K
    through G (benchmarks/bench_cpp.py --batch-grad)."""
    def pick(tokens, k, shape):
        return dispatch.decide("cpp", "cpu", torch.float32, k, shape, tokens=tokens).backward

    assert pick(1024, 943, (768, 768)) == "fft" and pick(4096, 176, (768, 768)) == "fft"
    assert pick(1024, 29491, (768, 768)) == "dense"


@pytest.mark.parametrize("shape, k", [((48, 80), 60), ((97, 64), 301), ((32, 32), 200), ((33, 17), 99)])
@pytest.mark.parametrize("hermitian", [False, True])
def test_selected_frequencies(shape, k, hermitian, algo, gen):
    """Top-K selections of a real init: both members of each conjugate pair (merged into one term
    by the hybrid), or one member per pair; self-conjugate bins included."""
    init = torch.randn(shape, generator=gen, dtype=torch.float64)
    freqs = lfma.select_frequencies(init, k, hermitian=hermitian)
    coeffs = torch.view_as_real(freqs.values).contiguous() + 0.1 * torch.randn(k, 2, generator=gen,
                                                                               dtype=torch.float64)
    ref = lfma.reference.delta_weight(coeffs, freqs.rows, freqs.cols, shape, 3.0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        out = ops.delta_weight(coeffs.to(dtype), freqs.rows, freqs.cols, *shape, 3.0, algo)
        assert rel_err(out, ref) <= tol
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = ops.coeff_grad(g.to(dtype), freqs.rows, freqs.cols, 3.0, algo)
        assert rel_err(grad, oracle_grad(g, freqs.rows, freqs.cols, 3.0)) <= tol


@pytest.mark.parametrize("w_dtype, c_dtype, tol", [
    (torch.float32, torch.float32, 1e-6), (torch.float64, torch.float64, 1e-14),
    (torch.bfloat16, torch.float32, 1e-2), (torch.float16, torch.float32, 1e-3),
    (torch.float32, torch.float64, 1e-6), (torch.float64, torch.float32, 1e-6),
])
@pytest.mark.parametrize("shape, k", [((48, 80), 37), ((97, 64), 203), ((33, 33), 1)])
def test_folded_weight(shape, k, w_dtype, c_dtype, tol, algo, gen):
    """W + dW in W's dtype, the add in float32 (float64 for float64 coefficients or weight)."""
    coeffs, rows, cols = frequencies(shape, k, gen)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(w_dtype)
    ref = weight.double() + lfma.reference.delta_weight(coeffs, rows, cols, shape, 40.0)
    out = ops.folded_weight(weight, coeffs.to(c_dtype), rows, cols, 40.0, algo)
    assert out.dtype == w_dtype and out.shape == weight.shape
    assert rel_err(out, ref) <= tol


def test_non_contiguous_and_low_precision_inputs(gen):
    """Strided inputs are made contiguous; bf16/fp16 coefficients accumulate in float32."""
    shape = (40, 24)
    coeffs, rows, cols = frequencies(shape, 9, gen)
    ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 3.0)
    strided = coeffs.T.contiguous().T  # [K, 2] with strides (1, K)
    assert not strided.is_contiguous()
    assert rel_err(ops.delta_weight(strided.float(), rows, cols, *shape, 3.0, 1), ref) <= 1e-5
    for low in (torch.bfloat16, torch.float16):
        out = ops.delta_weight(coeffs.to(low), rows, cols, *shape, 3.0, 2)
        assert out.dtype == torch.float32
        assert rel_err(out, lfma.reference.delta_weight(coeffs.to(low).double(), rows, cols, shape, 3.0)) <= 1e-5
    weight_t = torch.randn(shape[1], shape[0], generator=gen).T  # transposed view
    out = ops.folded_weight(weight_t, coeffs.float(), rows, cols, 3.0, 0)
    assert rel_err(out, weight_t.double() + ref) <= 1e-5
    g_t = torch.randn(shape[1], shape[0], generator=gen, dtype=torch.float64).T
    assert rel_err(ops.coeff_grad(g_t, rows, cols, 3.0, 0), oracle_grad(g_t, rows, cols, 3.0)) <= 1e-12


def test_phase_precision_large(gen):
    """Exact integer phase reduction at 4096 (a float32 angle would be off by ~1e-4): every algorithm
    in float32 within 1e-5 of the float64 oracle."""
    shape, k = (4096, 4096), 9
    coeffs, rows, cols = frequencies(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 1.0)
    for code in (0, 1, 2):
        assert rel_err(ops.delta_weight(coeffs.float(), rows, cols, *shape, 1.0, code), ref) <= 1e-5


def test_cost_model_picks_each_algorithm_where_it_wins():
    """The cpp backend's cost model (ops/backends/cpp.py, fitted to bench_cpp.py --crossover): a tiny K runs
    the separable product, the paper's K the hybrid, a large K one 2-D FFT."""
    def picks(k, shape, positions=None):
        decision = dispatch.decide("cpp", "cpu", torch.float32, k, shape, positions=positions)
        return decision.dw, decision.grad

    assert picks(2, (768, 768)) == ("separable", "separable")
    assert picks(176, (768, 768)) == ("hybrid", "hybrid")
    assert picks(29491, (768, 768)) == ("fft", "fft")
    # Merged conjugate pairs make the hybrid cheaper: counted positions lower its estimate.
    sel = lfma.select_frequencies(torch.randn(768, 768), 943)
    counted = count_positions(sel.rows, sel.cols, (768, 768))
    assert counted.terms <= 943 // 2 + 4
    table = planner.table_for("cpu")
    cpp = backends.REGISTRY["cpp"]
    assert (cpp.algorithm_costs(table, 943, (768, 768), counted, gradient=False)["hybrid"]
            < cpp.algorithm_costs(table, 943, (768, 768), None, gradient=False)["hybrid"])


def test_count_positions_counts_terms_and_columns(gen):
    """Distinct (column, row step) terms with a frequency past d_in / 2 entered as its mirror's conjugate."""
    def brute(rows, cols, m, n):
        terms = {((n - v) % n, (m - u) % m) if 2 * v > n else (v, u) for u, v in zip(rows.tolist(), cols.tolist())}
        return len(terms), len({c for c, _ in terms})

    for shape, k in [((48, 80), 60), ((33, 17), 99), ((8, 8), 64)]:
        coeffs, rows, cols = frequencies(shape, k, gen)
        counted = count_positions(rows, cols, shape)
        assert counted[:2] == brute(rows, cols, *shape)
        # the transposed weight (a Conv1D folded in its stored layout): rows and columns exchanged
        assert counted.transposed()[:2] == brute(cols, rows, *shape[::-1]) == counted[2:]
    assert count_positions(torch.zeros(10_000, dtype=torch.long), torch.zeros(10_000, dtype=torch.long), (8, 8)) is None


def test_auto_picks_cpp_on_cpu():
    """cpp measured at least as fast as torch everywhere on CPU (the planner's CPU table)."""
    cpu = torch.device("cpu")
    for k, shape in [(1, (8, 8)), (176, (768, 768)), (29491, (768, 768))]:
        assert dispatch.decide("auto", cpu, torch.float32, k, shape).backend == "cpp"


def test_zero_frequencies():
    rows = torch.zeros(0, dtype=torch.long)
    coeffs = torch.zeros(0, 2)
    assert torch.equal(ops.delta_weight(coeffs, rows, rows, 3, 4, 1.0, 0), torch.zeros(3, 4))
    w = torch.randn(3, 4)
    assert torch.equal(ops.folded_weight(w, coeffs, rows, rows, 1.0, 0), w)
    assert ops.coeff_grad(torch.randn(3, 4), rows, rows, 1.0, 0).shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# the cpp backend: autograd (from library.py), gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, k", [((6, 10), 3), ((7, 5), 9), ((4, 4), 16)])
def test_delta_weight_gradcheck(shape, k, algo, gen):
    coeffs, rows, cols = frequencies(shape, k, gen)
    coeffs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: lfma.delta_weight(c, rows, cols, shape, 1.3, backend="cpp"), (coeffs,))


@pytest.mark.parametrize("with_bias", [True, False])
def test_lfma_linear_gradcheck(with_bias, algo, gen):
    shape, k = (6, 9), 5
    coeffs, rows, cols = frequencies(shape, k, gen)
    x = torch.randn(2, 3, shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[0], generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = (x, weight, coeffs.requires_grad_(True)) + ((bias,) if with_bias else ())

    def fn(x, weight, coeffs, *b):
        return lfma.lfma_linear(x, weight, b[0] if b else None, coeffs, rows, cols, 2.5, backend="cpp")

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("shape", [(48, 80), (97, 64), (7, 5)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_delta_rows_grouped_matches_oracle(shape, dtype, tol, gen):
    """Several adapters' x dW^T in one call (a mixed batch while decoding): groups of 1 token (entries as they
    come), several tokens (merged), none; a full-spectrum selection (conjugate pairs) and Nyquist rows."""
    d_out, d_in = shape
    groups = [(1, 5, False), (3, 40, False), (0, 7, False), (4, min(60, d_out * d_in), True), (1, 1, True)]
    adapters, xs = [], []
    for tokens, k, full in groups:
        if full:
            f = lfma.select_frequencies(torch.randn(shape, generator=gen), k)
            rows, cols = f.rows, f.cols
        else:
            rows = torch.randint(0, d_out, (k,), generator=gen)
            rows[0] = d_out // 2
            cols = torch.randint(0, d_in, (k,), generator=gen)
        adapters.append((torch.randn(k, 2, generator=gen, dtype=dtype), rows, cols, float(k) / 3))
        xs.append(torch.randn(tokens, d_in, generator=gen, dtype=dtype))
    out = ops.delta_rows_grouped(torch.cat(xs), torch.cat([a[0] for a in adapters]),
                                 torch.cat([a[1] for a in adapters]), torch.cat([a[2] for a in adapters]),
                                 [len(a[1]) for a in adapters], [len(x) for x in xs], [a[3] for a in adapters], d_out)
    want = torch.cat([x.double() @ lfma.reference.delta_weight(c.double(), r, v, shape, alpha).T
                      for x, (c, r, v, alpha) in zip(xs, adapters)])
    assert out.dtype == dtype and rel_err(out, want) <= tol
    torch.library.opcheck(ops.delta_rows_grouped.default, (torch.cat(xs), torch.cat([a[0] for a in adapters]),
                                                           torch.cat([a[1] for a in adapters]),
                                                           torch.cat([a[2] for a in adapters]),
                                                           [len(a[1]) for a in adapters], [len(x) for x in xs],
                                                           [a[3] for a in adapters], d_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_raw_ops(dtype, gen):
    """Schema, fake implementation and AOT dispatch of the C++ ops (no autograd of their own)."""
    coeffs, rows, cols = frequencies((12, 10), 5, gen, dtype=dtype)
    weight = torch.randn(12, 10, generator=gen, dtype=dtype)
    for algo in (0, 1, 2):
        torch.library.opcheck(ops.delta_weight.default, (coeffs, rows, cols, 12, 10, 1.5, algo))
        torch.library.opcheck(ops.folded_weight.default, (weight, coeffs, rows, cols, 1.5, algo))
        torch.library.opcheck(ops.coeff_grad.default, (weight, rows, cols, 1.5, algo))
    torch.library.opcheck(ops.folded_weight.default, (weight.to(torch.bfloat16), coeffs.float(), rows, cols, 1.5, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("algo", ["separable", "hybrid", "fft"])
def test_opcheck_lfma_ops_on_cpp(dtype, algo, gen):
    """The lfma:: ops (library.py, linear_op.py) running the cpp kernels, each algorithm (autograd included)."""
    coeffs, rows, cols = frequencies((12, 10), 5, gen, dtype=dtype)
    coeffs.requires_grad_(True)
    lib = torch.ops.lfma
    torch.library.opcheck(lib.delta_weight.default, (coeffs, rows, cols, 12, 10, 1.5, "cpp", algo, algo))
    torch.library.opcheck(lib.folded_weight.default, (torch.randn(12, 10, dtype=dtype), coeffs.detach(), rows,
                                                      cols, 1.5, "cpp", algo))
    torch.library.opcheck(lib.coeff_grad.default, (torch.randn(12, 10, dtype=dtype), rows, cols, 1.5, "cpp", algo,
                                                   algo))
    x = torch.randn(3, 4, 10, dtype=dtype, requires_grad=True)
    for path in ("dense", "gemm", "fft"):
        torch.library.opcheck(lib.linear.default, (x, torch.randn(12, 10, dtype=dtype), torch.randn(12, dtype=dtype),
                                                   coeffs, rows, cols, 1.5, "cpp", algo, algo, path))


def test_torch_compile_fullgraph(gen):
    """The cpp ops trace into one graph (fake implementations, no graph break) and agree with eager;
    test_layer.py compiles whole models on every backend."""
    shape, k = (24, 40), 7
    coeffs, rows, cols = frequencies(shape, k, gen, dtype=torch.float32)
    x = torch.randn(5, shape[1], generator=gen)
    weight = torch.randn(shape, generator=gen)

    layer = dispatch.decide("cpp", x.device, x.dtype, k, shape, tokens=x.shape[0])
    alone = dispatch.decide("cpp", x.device, x.dtype, k, shape)

    def step(x, c):  # the ops themselves (the public functions check index ranges on the host)
        return (linear_op.lfma_linear(layer, x, weight, None, c, rows, cols, 3.0)
                + library.delta_weight(alone, c, rows, cols, shape, 1.0).sum())

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    c1, c2 = coeffs.clone().requires_grad_(True), coeffs.clone().requires_grad_(True)
    # A random dL/dout: with a plain sum every frequency with u != 0 would get an exactly zero gradient.
    g = torch.randn(5, shape[0], generator=gen)
    step(x, c1).backward(g)
    out = compiled(x, c2)
    out.backward(g)
    assert rel_err(out, step(x, coeffs)) <= 1e-6 and rel_err(c2.grad, c1.grad) <= 1e-6


def test_layer_with_cpp_backend(gen):
    layer = lfma.LFMALinear(torch.nn.Linear(20, 12), k=6, backend="cpp")
    ref = lfma.LFMALinear(torch.nn.Linear(20, 12), k=6, backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20, generator=gen)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert rel_err(layer.coeffs.grad, ref.coeffs.grad) <= 1e-5
    layer.eval()
    with torch.no_grad():
        assert rel_err(layer(x), ref.eval()(x)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# bad input: TORCH_CHECK errors from the bindings, naming the op and the argument
# ---------------------------------------------------------------------------------------------
def _good():
    return torch.randn(3, 2), torch.tensor([0, 1, 7]), torch.tensor([2, 0, 9]), torch.randn(8, 10)


@pytest.mark.parametrize("call, message", [
    (lambda c, r, v, w: ops.delta_weight(c[:, :1], r, v, 8, 10, 1.0, 0), r"delta_weight: coeffs must have shape \[K, 2\]"),
    (lambda c, r, v, w: ops.delta_weight(c.flatten(), r, v, 8, 10, 1.0, 0), r"coeffs must have shape \[K, 2\]"),
    (lambda c, r, v, w: ops.delta_weight(c.long(), r, v, 8, 10, 1.0, 0), "coeffs must be a real floating-point"),
    (lambda c, r, v, w: ops.delta_weight(torch.complex(c, c), r, v, 8, 10, 1.0, 0), "coeffs must be a real floating"),
    (lambda c, r, v, w: ops.delta_weight(c, r.float(), v, 8, 10, 1.0, 0), "rows must be a 1-D int64 tensor"),
    (lambda c, r, v, w: ops.delta_weight(c, r, v.int(), 8, 10, 1.0, 0), "cols must be a 1-D int64 tensor"),
    (lambda c, r, v, w: ops.delta_weight(c, r[None], v, 8, 10, 1.0, 0), "rows must be a 1-D int64 tensor"),
    (lambda c, r, v, w: ops.delta_weight(c, r[:2], v, 8, 10, 1.0, 0), "rows and cols must have the same length"),
    (lambda c, r, v, w: ops.delta_weight(c[:2], r, v, 8, 10, 1.0, 0), "rows, cols and coeffs must have the same length"),
    (lambda c, r, v, w: ops.delta_weight(c, r, v, 7, 10, 1.0, 0), r"rows must lie in \[0, d_out = 7\), found 7"),
    (lambda c, r, v, w: ops.delta_weight(c, r, v - 3, 8, 10, 1.0, 0),
     r"cols must lie in \[0, d_in = 10\), found -1 at index 0"),
    (lambda c, r, v, w: ops.delta_weight(c, r, v, 8, 0, 1.0, 0), "d_out and d_in must be positive"),
    (lambda c, r, v, w: ops.delta_weight(c, r, v, 8, 10, 1.0, 3), "algo must be 0"),
    (lambda c, r, v, w: ops.folded_weight(w[0], c, r, v, 1.0, 0), r"folded_weight: weight must be 2-D"),
    (lambda c, r, v, w: ops.folded_weight(w.long(), c, r, v, 1.0, 0), "weight must be float16, bfloat16"),
    (lambda c, r, v, w: ops.folded_weight(w[:7], c, r, v, 1.0, 0), r"rows must lie in \[0, d_out = 7\)"),
    (lambda c, r, v, w: ops.folded_weight(w, c[:, :1], r, v, 1.0, 0), r"coeffs must have shape \[K, 2\]"),
    (lambda c, r, v, w: ops.coeff_grad(w[None], r, v, 1.0, 0), r"coeff_grad: grad_dw must be 2-D"),
    (lambda c, r, v, w: ops.coeff_grad(w[:, :0], r, v, 1.0, 0), "d_out and d_in must be positive"),
    (lambda c, r, v, w: ops.coeff_grad(w, r, v[:1], 1.0, 0), "rows and cols must have the same length"),
    (lambda c, r, v, w: ops.coeff_grad(w, r, v + 1, 1.0, 0), r"cols must lie in \[0, d_in = 10\), found 10"),
    (lambda c, r, v, w: ops.coeff_grad_batch(w[0], w, r, v, 1.0), r"coeff_grad_batch: x must be 2-D"),
    (lambda c, r, v, w: ops.coeff_grad_batch(w, w.long(), r, v, 1.0), "grad_out must be float16, bfloat16"),
    (lambda c, r, v, w: ops.coeff_grad_batch(w, w[:5], r, v, 1.0), "same number of tokens, got 8 and 5"),
    (lambda c, r, v, w: ops.coeff_grad_batch(w[:, :0], w, r, v, 1.0), "d_out and d_in must be positive"),
    (lambda c, r, v, w: ops.coeff_grad_batch(w, w[:, :7], r, v, 1.0), r"rows must lie in \[0, d_out = 7\)"),
    (lambda c, r, v, w: ops.coeff_grad_batch(w[:, :9], w, r, v, 1.0), r"cols must lie in \[0, d_in = 9\)"),
    (lambda c, r, v, w: ops.delta_rows_grouped(w, c, r, v, [2], [8], [1.0], 8), "k_counts add up to 2"),
    (lambda c, r, v, w: ops.delta_rows_grouped(w, c, r, v, [len(r)], [7], [1.0], 8), "t_counts add up to 7"),
    (lambda c, r, v, w: ops.delta_rows_grouped(w, c, r, v, [len(r)], [8], [], 8), "one entry per adapter"),
    (lambda c, r, v, w: ops.delta_rows_grouped(w, c, r, v, [len(r)], [8], [1.0], 7), r"rows must lie in \[0, d_out = 7\)"),
])
def test_binding_errors(call, message):
    c, r, v, w = _good()
    before = [t.clone() for t in (c, r, v, w)]
    with pytest.raises(RuntimeError, match=message):
        call(c, r, v, w)
    assert all(torch.equal(a, b) for a, b in zip(before, (c, r, v, w)))


# ---------------------------------------------------------------------------------------------
# loading: how it was found, and what is said when it cannot be
# ---------------------------------------------------------------------------------------------
def test_extension_loaded_and_described():
    how = extension.load("cpp")
    assert how.startswith("prebuilt ") or how == "built on first use"
    assert extension.source_dir() is not None
    with pytest.raises(ValueError, match="'cpp' or 'cuda'"):
        extension.unavailable_reason("rocm")


def test_jit_fallback_reasons(monkeypatch):
    monkeypatch.setenv("LFMA_NO_JIT", "1")
    assert "LFMA_NO_JIT=1" in extension._jit_missing("cpp")
    monkeypatch.delenv("LFMA_NO_JIT")
    monkeypatch.setenv("CXX", "no-such-compiler-lfma")
    assert "no C++ compiler was found" in extension._jit_missing("cpp")
    monkeypatch.setattr(extension, "source_dir", lambda: None)
    assert "sources (csrc/) are not shipped" in extension._jit_missing("cpp")


def test_stale_prebuilt_library_is_not_loaded(tmp_path, monkeypatch):
    """A prebuilt library older than csrc/ (edited after `pip install -e .`) is passed over."""
    lib, src = tmp_path / "_C.so", tmp_path / "csrc"
    src.mkdir()
    lib.write_bytes(b"")
    (src / "cpu_kernels.cpp").write_text("")
    monkeypatch.setattr(extension, "source_dir", lambda: str(src))
    os.utime(lib, (1000, 1000))
    os.utime(src / "cpu_kernels.cpp", (2000, 2000))
    assert extension._stale(str(lib))
    os.utime(src / "cpu_kernels.cpp", (500, 500))
    assert not extension._stale(str(lib))


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_unavailable_reason_without_gpu():
    reason = dispatch.unavailable_reason("cuda")
    assert reason is not None and ("CUDA" in reason or "cuda" in reason)
    coeffs, rows, cols = random_frequencies((8, 8), 2)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        lfma.delta_weight(coeffs, rows, cols, (8, 8), 1.0, backend="cuda")


# ---------------------------------------------------------------------------------------------
# CUDA kernels (skipped without a GPU)
# ---------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not HAS_CUDA, reason=f"backend 'cuda' is not available: "
                                               f"{dispatch.unavailable_reason('cuda') if not HAS_CUDA else ''}")


@cuda
@pytest.mark.parametrize("shape, k", SHAPES_K + [((768, 768), 176), ((1024, 1024), 524), ((4096, 4096), 7)])
def test_cuda_delta_weight_and_grad_match_oracle(shape, k, gen):
    coeffs, rows, cols = frequencies(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 1.7)
    dc, dr, dv = coeffs.cuda(), rows.cuda(), cols.cuda()
    out = ops.delta_weight(dc.float(), dr, dv, shape[0], shape[1], 1.7, 0)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) <= 1e-5
    assert rel_err(ops.delta_weight(dc, dr, dv, shape[0], shape[1], 1.7, 0).cpu(), ref) <= 1e-12
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = oracle_grad(g, rows, cols, 0.8)
    assert rel_err(ops.coeff_grad(g.cuda().float(), dr, dv, 0.8, 0).cpu(), want) <= 1e-5
    assert rel_err(ops.coeff_grad(g.cuda(), dr, dv, 0.8, 0).cpu(), want) <= 1e-12


@cuda
@pytest.mark.parametrize("w_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3),
                                          (torch.float64, 1e-14)])
def test_cuda_folded_weight_dtypes(w_dtype, tol, gen):
    shape, k = (97, 64), 203
    coeffs, rows, cols = frequencies(shape, k, gen)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(w_dtype)
    ref = weight.double() + lfma.reference.delta_weight(coeffs, rows, cols, shape, 40.0)
    c = coeffs.double() if w_dtype == torch.float64 else coeffs.float()
    out = ops.folded_weight(weight.cuda(), c.cuda(), rows.cuda(), cols.cuda(), 40.0, 0)
    assert out.dtype == w_dtype and out.device.type == "cuda"
    assert rel_err(out.cpu(), ref) <= tol


@cuda
def test_cuda_matches_cpp_and_gradcheck(gen):
    shape, k = (48, 80), 37
    coeffs, rows, cols = frequencies(shape, k, gen)
    cpu = lfma.delta_weight(coeffs, rows, cols, shape, 2.0, backend="cpp")
    gpu = lfma.delta_weight(coeffs.cuda(), rows.cuda(), cols.cuda(), shape, 2.0, backend="cuda")
    assert rel_err(gpu.cpu(), cpu) <= 1e-12
    c = coeffs[:5].cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c: lfma.delta_weight(c, rows[:5].cuda(), cols[:5].cuda(), shape, 1.3, backend="cuda"), (c,))
    x = torch.randn(3, shape[1], dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(shape, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(
        lambda x, c: lfma.lfma_linear(x, w, None, c, rows[:5].cuda(), cols[:5].cuda(), 2.0, backend="cuda"), (x, c))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_opcheck(dtype, gen):
    coeffs, rows, cols = frequencies((12, 10), 5, gen, dtype=dtype, device="cuda")
    weight = torch.randn(12, 10, dtype=dtype, device="cuda")
    torch.library.opcheck(ops.delta_weight.default, (coeffs, rows, cols, 12, 10, 1.5, 0))
    torch.library.opcheck(ops.folded_weight.default, (weight, coeffs, rows, cols, 1.5, 0))
    torch.library.opcheck(ops.coeff_grad.default, (weight, rows, cols, 1.5, 0))
    coeffs.requires_grad_(True)
    torch.library.opcheck(torch.ops.lfma.cuda_delta_weight.default, (coeffs, rows, cols, 12, 10, 1.5))


@cuda
def test_cuda_device_mismatch_error():
    c, r, v, _ = _good()
    with pytest.raises(RuntimeError, match="all inputs must be on one device"):
        ops.delta_weight(c.cuda(), r, v.cuda(), 8, 10, 1.0, 0)
