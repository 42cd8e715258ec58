"""The planner (lfma_kernels/ops/planner.py): one place for every path choice. What auto picks per
device and dtype (a CUDA device is planned on a CPU machine), forcing paths, the explanations of
lfma.explain and LFMALinear.plan, the fake implementations' input checks, and the package's import
graph (no cycles)."""
import ast
import pathlib

import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels.ops import dispatch, planner
from conftest import FAST_BACKENDS, random_frequencies

PACKAGE = pathlib.Path(lfma.__file__).parent
CUDA = torch.device("cuda")


# ---------------------------------------------------------------------------------------------
# what auto picks
# ---------------------------------------------------------------------------------------------
def _all_usable(name, device):
    return None


def test_float64_on_cuda_plans_the_torch_backend():
    """Triton has no float64 tl.dot: its kernels would fall back to CUDA-core broadcast products. The
    CUDA table sends float64 to the torch backend (cuBLAS / cuFFT), every K and shape."""
    for shape, k in [((768, 768), 1), ((768, 768), 176), ((1024, 1024), 524), ((64, 64), 4000)]:
        assert planner.choose_backend(CUDA, torch.float64, k, shape, _all_usable) == "torch"
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert planner.choose_backend(CUDA, dtype, k, shape, _all_usable) == "triton"
        plan = lfma.explain(shape, k, device="cuda", dtype=torch.float64, tokens=512)
        assert plan.backend == "torch" and plan.device == "cuda"
        triton = next(r for r in plan.refused if r.what == "backend" and r.choice == "triton")
        assert "float64" in triton.reason


def test_auto_order_on_cuda_without_triton():
    """Without triton, the CUDA kernels where the torch backend would run the separable product too,
    torch where it would switch to an FFT."""
    def no_triton(name, device):
        return "not here" if name == "triton" else None

    assert planner.choose_backend(CUDA, torch.float32, 4, (768, 768), no_triton) == "cuda"
    assert planner.choose_backend(CUDA, torch.float32, 2000, (768, 768), no_triton) == "torch"
    assert planner.choose_backend(torch.device("cpu"), torch.float32, 4, (768, 768), _all_usable) == "cpp"
    assert planner.choose_backend(torch.device("cpu"), torch.float64, 4, (768, 768), _all_usable) == "cpp"
    assert planner.choose_backend(torch.device("cpu"), torch.float32, 4, (768, 768),
                                  lambda n, d: None if n == "torch" else "no") == "torch"


def test_every_table_cites_its_sources_and_the_gpu_table_says_estimates():
    text = (pathlib.Path(planner.__file__).parent / "cost_tables.py").read_text()
    assert "RESULTS.md" in text and "benchmarks/bench_cpp.py --batch-grad" in text
    assert "benchmarks/crossover.py" in text and "bench_gpu.py --crossover" in text
    assert "ESTIMATES" in planner.CUDA.status and "measured" in planner.CPU.status
    assert planner.table_for("mps") is planner.CPU


def test_no_cost_table_or_path_decision_outside_the_planner():
    """Cost tables are built, and path costs compared, in the planner alone."""
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("planner.py", "cost_tables.py"):
            continue
        text = path.read_text()
        assert "CostTable(" not in text and "_cheapest(" not in text and "min(costs" not in text, path


# ---------------------------------------------------------------------------------------------
# forcing
# ---------------------------------------------------------------------------------------------
def test_force_rejects_unknown_names_at_the_call():
    for kwargs in ({"dw": "seperable"}, {"grad": "fft2"}, {"backward": "sparse"}, {"dw": "dense"},
                   {"delta": "gemm"}):
        with pytest.raises(ValueError, match="unknown path"):
            planner.force(**kwargs).__enter__()
    assert planner.forced() == {"dw": None, "grad": None, "backward": None, "delta": None}


def test_force_nests_and_restores():
    with planner.force(dw="fft"):
        assert planner.dw_algorithm("torch", "cpu", 1, (768, 768)) == "fft"
        with planner.force(dw="separable", backward="gemm"):
            assert planner.dw_algorithm("torch", "cpu", 29491, (768, 768)) == "separable"
            assert planner.backward_path("torch", "cpu", 4096, 29491, (768, 768)) == "gemm"
            # dL/dW needs G: the dense path, whatever is forced
            assert planner.backward_path("torch", "cpu", 4096, 1, (768, 768), weight_grad=True) == "dense"
        assert planner.forced() == {"dw": "fft", "grad": None, "backward": None, "delta": None}
    assert planner.forced() == {"dw": None, "grad": None, "backward": None, "delta": None}


def test_forcing_an_algorithm_a_backend_lacks_is_an_error_at_its_call(gen):
    coeffs, rows, cols = random_frequencies((12, 10), 3, generator=gen)
    with planner.force(dw="hybrid"):
        with pytest.raises(ValueError, match="backend 'torch' has no 'hybrid'"):
            lfma.delta_weight(coeffs, rows, cols, (12, 10), 1.0, backend="torch")
        if "cpp" in FAST_BACKENDS:  # the C++ kernels have it
            lfma.delta_weight(coeffs, rows, cols, (12, 10), 1.0, backend="cpp")


@pytest.mark.parametrize("path", planner.BACKWARD_PATHS)
def test_forced_backward_path_is_planned_and_run(path, gen):
    coeffs, rows, cols = random_frequencies((12, 10), 3, generator=gen)
    with planner.force(backward=path):
        plan = lfma.explain((12, 10), 3, tokens=64, backend="torch")
        assert plan.backward == path and "forced" in plan.reasons["backward"]
        c = coeffs.clone().requires_grad_(True)
        lfma.lfma_linear(torch.randn(64, 10, generator=gen), torch.randn(12, 10), None, c, rows, cols, 1.0,
                         backend="torch").sum().backward()
        assert c.grad is not None


# ---------------------------------------------------------------------------------------------
# explaining
# ---------------------------------------------------------------------------------------------
def test_explain_the_papers_shapes():
    for shape, k in [((768, 768), 176), ((1024, 1024), 524)]:
        plan = lfma.explain(shape, k, tokens=4096)
        assert plan.backend == dispatch.auto_backend(torch.device("cpu"), torch.float32, k, shape)
        assert plan.backward in planner.BACKWARD_PATHS and plan.dw in planner.DW_ALGORITHMS
        text = str(plan)
        assert f"{shape[0]}x{shape[1]}, K={k}" in text and "refused" in text and "backward" in text
        refused = {(r.what, r.choice) for r in plan.refused}
        assert ("backend", "reference") in refused
        assert {("backward", p) for p in planner.BACKWARD_PATHS if p != plan.backward} <= refused


def test_explain_reports_what_the_cpp_kernels_choose(gen):
    if "cpp" not in lfma.available_backends():
        pytest.skip("the C++ extension is not available")
    from lfma_kernels.ops import cpp_ops

    sel = lfma.select_frequencies(torch.randn(768, 768, generator=gen), 176)
    plan = lfma.explain((768, 768), rows=sel.rows, cols=sel.cols, tokens=4096, backend="cpp")
    assert plan.dw == "hybrid" and "distinct terms" in plan.reasons["dW"]
    assert lfma.explain((768, 768), 2, backend="cpp").dw == "separable"
    assert lfma.explain((768, 768), 29491, backend="cpp").dw == "fft"
    for what in ("dw", "grad"):
        pick, costs, _ = cpp_ops.algorithm_report(176, (768, 768), what, sel.rows, sel.cols)
        assert pick == min(costs, key=costs.get) and set(costs) == set(planner.DW_ALGORITHMS)
    with planner.force(dw="fft"):
        assert lfma.explain((768, 768), 176, backend="cpp").dw == "fft"


def test_docs_explain_block_is_current():
    """docs/backends.md's lfma.explain output (lines with "..." elided) is what lfma.explain prints now."""
    if "cpp" not in lfma.available_backends():
        pytest.skip("the documented plans are the cpp backend's")
    text = (PACKAGE.parent / "docs" / "backends.md").read_text()
    block = text.split("<!-- readme-explain")[1].split("```text\n")[1].split("```")[0]
    chunks = block.split(">>> ")[1:]
    assert len(chunks) == 2
    for chunk in chunks:
        command, *expected = chunk.rstrip("\n").split("\n")
        assert command.startswith("print(lfma.explain(") and command.endswith("))")
        got = str(eval(command[len("print("):-1], {"lfma": lfma, "torch": torch})).split("\n")
        for line in expected:
            assert "..." in line or line in got, line


def test_explain_checks_its_input():
    with pytest.raises(ValueError, match="shape"):
        lfma.explain((0, 4), 1)
    with pytest.raises(ValueError, match="k must be"):
        lfma.explain((4, 4), 17)
    with pytest.raises(ValueError, match="pass k"):
        lfma.explain((4, 4))
    with pytest.raises(ValueError, match="tokens"):
        lfma.explain((4, 4), 2, tokens=-1)
    with pytest.raises(RuntimeError, match="unknown backend"):
        lfma.explain((4, 4), 2, backend="fft")


def test_layer_plan_matches_what_the_forward_runs(monkeypatch):
    torch.manual_seed(0)
    layer = lfma.LFMALinear(nn.Linear(80, 48), k=17)
    x = torch.randn(3, 5, 80)
    plan = layer.plan(x)
    assert plan.tokens == 15 and plan.shape == (48, 80) and plan.k == 17
    assert plan.backend == dispatch.auto_backend(x.device, x.dtype, 17, (48, 80))
    assert any("training" in n for n in plan.notes)
    assert any("eval" in n for n in layer.eval().plan(x).notes)
    assert layer.plan().tokens is None and layer.plan().backward is None
    seen = []
    record = dispatch.resolve(plan.backend, x.device, x.dtype, 17, (48, 80))
    original = record.lfma_linear
    monkeypatch.setattr(record, "lfma_linear", lambda *a: seen.append(1) or original(*a))
    layer.train()(x)
    assert seen == [1]


def test_peft_layer_plan():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from lfma_kernels.peft import LfmaConfig, LfmaLinear

    model = nn.Sequential(nn.Linear(20, 36), nn.ReLU(), nn.Linear(36, 8))
    model = get_peft_model(model, LfmaConfig(target_modules=["0"], k=12))
    layer = next(m for m in model.modules() if isinstance(m, LfmaLinear))
    plan = layer.plan(torch.randn(7, 20))
    assert plan.shape == (36, 20) and plan.k == 12 and plan.tokens == 7


# ---------------------------------------------------------------------------------------------
# fake implementations check their inputs (a bad call under torch.compile fails at trace time)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fakes_check_their_inputs(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    lib = torch.ops.lfma
    with FakeTensorMode():
        coeffs, rows, cols = torch.randn(5, 2), torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        weight = torch.randn(12, 10)
        getattr(lib, f"{backend}_delta_weight")(coeffs, rows, cols, 12, 10, 1.0)  # fine
        bad = [
            (lambda: getattr(lib, f"{backend}_delta_weight")(coeffs[:, :1], rows, cols, 12, 10, 1.0), r"\[K, 2\]"),
            (lambda: getattr(lib, f"{backend}_delta_weight")(coeffs, rows[:4], cols, 12, 10, 1.0), "same length"),
            (lambda: getattr(lib, f"{backend}_delta_weight")(coeffs, rows.float(), cols, 12, 10, 1.0), "int64"),
            (lambda: getattr(lib, f"{backend}_folded_weight")(weight[0], coeffs, rows, cols, 1.0), "2-D"),
            (lambda: getattr(lib, f"{backend}_coeff_grad")(weight, rows, cols[:2], 1.0), "same length"),
            (lambda: getattr(lib, f"{backend}_linear")(torch.randn(3, 9), weight, None, coeffs, rows, cols, 1.0),
             "d_in = 10"),
            (lambda: getattr(lib, f"{backend}_linear")(torch.randn(3, 10), weight, torch.randn(11), coeffs, rows,
                                                       cols, 1.0), "bias"),
        ]
        for call, message in bad:
            with pytest.raises(RuntimeError, match=message):
                call()


def test_a_bad_call_fails_at_trace_time():
    coeffs = torch.randn(5, 2)
    rows = torch.zeros(5, dtype=torch.int64)

    def step(c, r):
        return torch.ops.lfma.torch_delta_weight(c, r, r[:3], 12, 10, 1.0)

    with pytest.raises(Exception, match="rows and cols must have the same length"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(coeffs, rows)


# ---------------------------------------------------------------------------------------------
# the import graph
# ---------------------------------------------------------------------------------------------
def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules) -> set:
    """Every module of the package that ``path`` imports, anywhere in the file (function bodies too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = (base + "." + node.module if node.module else base) if node.level else node.module
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_inside_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    # A submodule importing its own package's __init__ (``from .. import x`` of a module x) is an
    # edge to x, not to the package: drop package edges a module gets only through that form.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in modules and modules[nxt].name == "__init__.py" and node.startswith(nxt + "."):
                continue  # a submodule and its parent package: Python imports the parent first anyway
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert "lfma_kernels.ops.torch_ops" not in graph["lfma_kernels.ops.library"]
    # The planner imports nothing from the package but its tables and the calibration file reader, which
    # import nothing.
    assert graph["lfma_kernels.ops.planner"] <= {"lfma_kernels.ops", "lfma_kernels.ops.calibration",
                                                 "lfma_kernels.ops.cost_tables"}
    for leaf in ("lfma_kernels.ops.calibration", "lfma_kernels.ops.cost_tables"):
        assert not graph[leaf] - {"lfma_kernels.ops"}, leaf


def test_mixed_batch_paths():
    """One adapter's rows of a mixed batch (CPU table): a few rows take the rows way, many rows the fold when
    its W + dW is kept (one more pass over the weight), a quantized base never folds, and an adapter that has
    the whole batch folds for free (no base GEMM runs beside it)."""
    shape = (768, 768)
    assert planner.mixed_path("cpp", "cpu", 1, 943, shape, fold=True) == "rows"
    assert planner.mixed_path("cpp", "cpu", 256, 943, shape, fold=True) == "fold"
    assert planner.mixed_path("cpp", "cpu", 256, 943, shape, fold=False) == "rows"  # no room: built each call
    assert planner.mixed_path("cpp", "cpu", 4096, 943, shape, fold=None) != "fold"
    assert planner.mixed_path("cpp", "cpu", 1, 943, shape, fold=True, whole_batch=True) == "fold"
    with planner.force(delta="separable"):
        assert planner.mixed_path("cpp", "cpu", 1, 943, shape, fold=True) == "separable"
    with planner.force(delta="fold"), pytest.raises(ValueError, match="beside a quantized base"):
        planner.mixed_path("cpp", "cpu", 1, 943, shape, fold=None)
