"""The planner (lfma_kernels/ops/planner.py): one place for every path choice. What auto picks per
device and dtype (a CUDA device is planned on a CPU machine), forcing paths, the explanations of
lfma.explain and LFMALinear.plan, the fake implementations' input checks, and the package's import
graph (no cycles)."""
import ast
import dataclasses
import pathlib

import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels.ops import backends, dispatch, linear_op, planner, quantized_ops
from lfma_kernels.ops.decision import Call, Forced, MixedFold, count_positions
from conftest import FAST_BACKENDS, random_frequencies

PACKAGE = pathlib.Path(lfma.__file__).parent
CUDA = torch.device("cuda")


# ---------------------------------------------------------------------------------------------
# what auto picks
# ---------------------------------------------------------------------------------------------
def _all_usable(name):
    return None


def _auto(device, dtype, k, shape, why_not=_all_usable):
    """What auto picks for a call on ``device`` (a CUDA device is planned on a CPU machine too)."""
    return planner.decide(Call(torch.device(device).type, dtype, k, shape), why_not).backend


def test_float64_on_cuda_plans_the_torch_backend():
    """Triton has no float64 tl.dot: its kernels would fall back to CUDA-core broadcast products. The
    CUDA table sends float64 to the torch backend (cuBLAS / cuFFT), every K and shape."""
    for shape, k in [((768, 768), 1), ((768, 768), 176), ((1024, 1024), 524), ((64, 64), 4000)]:
        assert _auto(CUDA, torch.float64, k, shape) == "torch"
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert _auto(CUDA, dtype, k, shape) == "triton"
        plan = lfma.explain(shape, k, device="cuda", dtype=torch.float64, tokens=512)
        assert plan.backend == "torch" and plan.device == "cuda"
        triton = next(r for r in plan.refused if r.what == "backend" and r.choice == "triton")
        assert "float64" in triton.reason


def test_auto_order_on_cuda_without_triton():
    """Without triton, the CUDA kernels where the torch backend would run the separable product too,
    torch where it would switch to an FFT."""
    def no_triton(name):
        return "not here" if name == "triton" else None

    assert _auto(CUDA, torch.float32, 4, (768, 768), no_triton) == "cuda"
    assert _auto(CUDA, torch.float32, 2000, (768, 768), no_triton) == "torch"
    assert _auto("cpu", torch.float32, 4, (768, 768)) == "cpp"
    assert _auto("cpu", torch.float64, 4, (768, 768)) == "cpp"
    assert _auto("cpu", torch.float32, 4, (768, 768), lambda n: None if n == "torch" else "no") == "torch"


def test_every_table_cites_its_sources_and_the_gpu_table_says_estimates():
    text = (pathlib.Path(planner.__file__).parent / "cost_tables.py").read_text()
    section = "Where the planner's constants come from"
    assert "RESULTS.md" in text and section in text
    results = (PACKAGE.parent / "benchmarks" / "RESULTS.md").read_text().split(f"## {section}")[1]
    for command in ("benchmarks/bench_cpp.py --batch-grad", "benchmarks/crossover.py", "bench_cpp.py --crossover",
                    "bench_gpu.py --crossover", "benchmarks/bench_layer.py"):
        assert command in results, command
    assert "ESTIMATES" in planner.CUDA.status and "measured" in planner.CPU.status
    assert planner.table_for("mps") is planner.CPU


def test_no_cost_table_or_path_decision_outside_the_planner():
    """Cost tables are built in cost_tables.py alone, and path costs compared only by the planner, the shared
    cost formulas and the backends' own objects."""
    ops = PACKAGE / "ops"
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "cost_tables.py":
            assert "CostTable(" not in text, path
        if path.parent != ops / "backends" and path not in (ops / "planner.py", ops / "costs.py"):
            assert "cheapest(" not in text and "min(costs" not in text, path


# ---------------------------------------------------------------------------------------------
# forcing
# ---------------------------------------------------------------------------------------------
def test_force_rejects_unknown_names_at_the_call():
    for kwargs in ({"dw": "seperable"}, {"grad": "fft2"}, {"backward": "sparse"}, {"dw": "dense"},
                   {"delta": "gemm"}):
        with pytest.raises(ValueError, match="unknown path"):
            planner.force(**kwargs).__enter__()
    assert planner.forced() == Forced()


def test_force_nests_and_restores():
    def torch_call(k, **facts):
        return dispatch.decide("torch", "cpu", torch.float32, k, (768, 768), **facts)

    with planner.force(dw="fft"):
        assert torch_call(1).dw == "fft"
        with planner.force(dw="separable", backward="gemm"):
            assert torch_call(29491).dw == "separable"
            assert torch_call(29491, tokens=4096).backward == "gemm"
            # dL/dW needs G: the dense path, whatever is forced
            assert torch_call(1, tokens=4096, weight_grad=True).backward == "dense"
        assert planner.forced() == Forced(dw="fft")
    assert planner.forced() == Forced()


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
        assert plan.backend == dispatch.decide("auto", torch.device("cpu"), torch.float32, k, shape).backend
        assert plan.backward in planner.BACKWARD_PATHS and plan.dw in planner.DW_ALGORITHMS
        text = str(plan)
        assert f"{shape[0]}x{shape[1]}, K={k}" in text and "refused" in text and "backward" in text
        refused = {(r.what, r.choice) for r in plan.refused}
        assert ("backend", "reference") in refused
        assert {("backward", p) for p in planner.BACKWARD_PATHS if p != plan.backward} <= refused


def test_explain_reports_the_cpp_cost_model(gen):
    sel = lfma.select_frequencies(torch.randn(768, 768, generator=gen), 176)
    plan = lfma.explain((768, 768), rows=sel.rows, cols=sel.cols, tokens=4096, backend="cpp")
    assert plan.dw == "hybrid" and "distinct terms" in plan.reasons["dW"]
    assert lfma.explain((768, 768), 2, backend="cpp").dw == "separable"
    assert lfma.explain((768, 768), 29491, backend="cpp").dw == "fft"
    for label, pick in (("dW", plan.dw), ("gradient", plan.grad)):
        costs = plan.estimates[label]
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
    assert plan.backend == dispatch.decide("auto", x.device, x.dtype, 17, (48, 80)).backend
    assert any("training" in n for n in plan.notes)
    assert any("eval" in n for n in layer.eval().plan(x).notes)
    assert layer.plan().tokens is None and layer.plan().backward is None
    seen = []
    original = linear_op.lfma_linear
    monkeypatch.setattr(linear_op, "lfma_linear", lambda d, *a: seen.append(d) or original(d, *a))
    layer.train()(x)
    assert len(seen) == 1 and dataclasses.replace(seen[0], notes=plan.notes) == plan


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
    a = backends.REGISTRY[backend].algorithms[0]
    with FakeTensorMode():
        coeffs, rows, cols = torch.randn(5, 2), torch.zeros(5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
        weight = torch.randn(12, 10)
        lib.delta_weight(coeffs, rows, cols, 12, 10, 1.0, backend, a, a)  # fine
        bad = [
            (lambda: lib.delta_weight(coeffs[:, :1], rows, cols, 12, 10, 1.0, backend, a, a), r"\[K, 2\]"),
            (lambda: lib.delta_weight(coeffs, rows[:4], cols, 12, 10, 1.0, backend, a, a), "same length"),
            (lambda: lib.delta_weight(coeffs, rows.float(), cols, 12, 10, 1.0, backend, a, a), "int64"),
            (lambda: lib.folded_weight(weight[0], coeffs, rows, cols, 1.0, backend, a), "2-D"),
            (lambda: lib.coeff_grad(weight, rows, cols[:2], 1.0, backend, a, a), "same length"),
            (lambda: lib.linear(torch.randn(3, 9), weight, None, coeffs, rows, cols, 1.0, backend, a, a, "dense"),
             "d_in = 10"),
            (lambda: lib.linear(torch.randn(3, 10), weight, torch.randn(11), coeffs, rows, cols, 1.0, backend, a, a,
                                "dense"), "bias"),
        ]
        for call, message in bad:
            with pytest.raises(RuntimeError, match=message):
                call()


def test_a_bad_call_fails_at_trace_time():
    coeffs = torch.randn(5, 2)
    rows = torch.zeros(5, dtype=torch.int64)

    def step(c, r):
        return torch.ops.lfma.delta_weight(c, r, r[:3], 12, 10, 1.0, "torch", "separable", "separable")

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
    # The planner imports nothing from the package but the backends' declarations, the cost formulas and
    # tables, the decision's types and the calibration file reader: no kernels.
    assert graph["lfma_kernels.ops.planner"] <= {"lfma_kernels.ops", "lfma_kernels.ops.calibration",
                                                 "lfma_kernels.ops.cost_tables", "lfma_kernels.ops.costs",
                                                 "lfma_kernels.ops.decision", "lfma_kernels.ops.backends"}
    for leaf in ("lfma_kernels.ops.calibration", "lfma_kernels.ops.cost_tables"):
        assert not graph[leaf] - {"lfma_kernels.ops"}, leaf


def test_mixed_batch_paths():
    """One adapter's rows of a mixed batch (CPU table): a few rows take the rows way, many rows the fold when
    its W + dW is kept (one more pass over the weight), a quantized base never folds, and an adapter that has
    the whole batch folds for free (no base GEMM runs beside it)."""
    def path(tokens, fold, whole_batch=False):
        return dispatch.decide("cpp", "cpu", torch.float32, 943, (768, 768), tokens=tokens,
                               mixed=MixedFold(fold, whole_batch)).delta

    assert path(1, True) == "rows"
    assert path(256, True) == "fold"
    assert path(256, False) == "rows"  # no room: built each call
    assert path(4096, None) != "fold"
    assert path(1, True, whole_batch=True) == "fold"
    with planner.force(delta="separable"):
        assert path(1, True) == "separable"
    with planner.force(delta="fold"), pytest.raises(ValueError, match="beside a quantized base"):
        path(1, None)


# ---------------------------------------------------------------------------------------------
# explain prints the decision that runs
# ---------------------------------------------------------------------------------------------
def _recording(monkeypatch, backend):
    """Record what the kernels of ``backend`` are asked to run, and which backward and delta paths run."""
    ran = {"dw": [], "grad": [], "backward": [], "delta": []}
    kernels = dispatch.kernels(backend)

    def recorded(kernel, what):
        def run(*args):
            ran[what].append(args[-1])
            return kernel(*args)
        return run

    monkeypatch.setitem(dispatch._kernels, backend, kernels._replace(
        folded_weight=recorded(kernels.folded_weight, "dw"), coeff_grad=recorded(kernels.coeff_grad, "grad")))
    layer_coeff_grad, delta_way = linear_op.layer_coeff_grad, quantized_ops._delta_way
    monkeypatch.setattr(linear_op, "layer_coeff_grad", lambda b, path, *a: ran["backward"].append(path)
                        or layer_coeff_grad(b, path, *a))
    monkeypatch.setattr(quantized_ops, "_delta_way", lambda d: ran["delta"].append(d.delta) or delta_way(d))
    return ran


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_explain_names_what_ran(backend, monkeypatch, gen):
    """Force every algorithm and backward path the backend has, run a training step, and check that the
    layer's plan (what lfma.explain prints) names exactly what the kernels were asked to run."""
    algorithms = backends.REGISTRY[backend].algorithms
    shape, k = (24, 40), 9
    layer = lfma.LFMALinear(nn.Linear(shape[1], shape[0]), k=k, backend=backend)
    x = torch.randn(6, shape[1], generator=gen)
    ran = _recording(monkeypatch, backend)
    for dw in algorithms:
        for path in planner.BACKWARD_PATHS:
            with planner.force(dw=dw, grad=dw, backward=path):
                plan = layer.plan(x)
                for found in ran.values():
                    found.clear()
                out = layer(x)
                out.backward(torch.randn(out.shape, generator=gen))
            assert ran["dw"] == [plan.dw] == [dw]
            assert ran["backward"] == [plan.backward] == [path]
            assert ran["grad"] == ([plan.grad] if path == "dense" else [])
            text = str(plan)
            assert f"dW        {dw}" in text and f"backward  {path}" in text
    # Unforced: whatever the cost model picks is what runs.
    plan = layer.plan(x)
    for found in ran.values():
        found.clear()
    layer(x).backward(torch.randn(6, shape[0], generator=gen))
    assert ran["dw"] == [plan.dw] and ran["backward"] == [plan.backward]


@pytest.mark.parametrize("delta", ["rows", "separable", "dense"])
def test_explain_names_the_delta_path_that_ran(delta, monkeypatch, gen):
    backend = FAST_BACKENDS[0]
    layer = lfma.LFMALinear(nn.Linear(40, 24), k=9, backend=backend)
    x = torch.randn(6, 40, generator=gen, requires_grad=True)
    ran = _recording(monkeypatch, backend)
    with planner.force(delta=delta):
        plan = layer.plan(x)
        layer(x).backward(torch.randn(6, 24, generator=gen))
    assert plan.delta == delta and ran["delta"] == [delta, delta]  # the forward and its adjoint
    assert ran["backward"] == [plan.backward] and f"delta     {delta}" in str(plan)


def test_a_conv1d_fold_is_decided_in_its_stored_layout(monkeypatch, gen):
    """A transformers Conv1D's W + dW is folded in its stored (d_in, d_out) layout with rows and columns
    exchanged: the decision costs dW there (shape and position facts transposed), and that is what runs."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    backend = FAST_BACKENDS[0]
    layer = lfma.LFMALinear(Conv1D(72, 24), k=40, backend=backend)  # logical (72, 24), stored (24, 72)
    x = torch.randn(5, 24, generator=gen)
    plan = layer.plan(x)
    assert plan.call.transposed and plan.shape == (72, 24)
    cost = backends.REGISTRY[plan.backend].algorithm_costs
    table = planner.table_for("cpu")
    positions = plan.call.positions
    assert plan.estimates["dW"] == cost(table, 40, (24, 72), positions and positions.transposed(), gradient=False)
    assert plan.estimates["gradient"] == cost(table, 40, (72, 24), positions, gradient=True)
    ran = _recording(monkeypatch, plan.backend)
    layer(x).backward(torch.randn(5, 72, generator=gen))
    assert ran["dw"] == [plan.dw] and ran["backward"] == [plan.backward]


def test_compiled_training_with_a_dynamic_token_count(gen):
    """torch.compile(dynamic=True), compiled before any eager call (so Dynamo traces the decision itself): the
    token count is symbolic, so the backward path is decided for a typical step (adapter.SYMBOLIC_TOKENS)
    rather than from the value; every length matches eager."""
    from lfma_kernels import adapter

    layer = lfma.LFMALinear(nn.Linear(40, 24), k=9)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for tokens in (6, 11):
        x = torch.randn(tokens, 40, generator=gen)
        g = torch.randn(tokens, 24, generator=gen)
        got = torch.autograd.grad(compiled(x), layer.coeffs, g)[0]
        want = torch.autograd.grad(layer(x), layer.coeffs, g)[0]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    symbolic = dispatch.decide("auto", "cpu", torch.float32, 9, (24, 40), tokens=adapter.SYMBOLIC_TOKENS)
    assert symbolic.backward in planner.BACKWARD_PATHS


def test_position_facts_follow_loads_and_layouts(tmp_path, gen):
    """Counted when positions are set, again after a load (native and PEFT), never from a meta tensor."""
    layer = lfma.LFMALinear(nn.Linear(40, 24), k=30, seed=1)
    other = lfma.LFMALinear(nn.Linear(40, 24), k=30, seed=2)
    assert layer._positions != other._positions or not torch.equal(layer.rows, other.rows)
    layer.load_state_dict(other.state_dict())
    assert layer._positions == other._positions == count_positions(other.rows, other.cols, (24, 40))
    meta = torch.zeros(5, dtype=torch.long, device="meta")
    assert count_positions(meta, meta, (24, 40)) is None
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from lfma_kernels.peft import LfmaConfig

    def model(seed):
        torch.manual_seed(0)
        return get_peft_model(nn.Sequential(nn.Linear(40, 24)), LfmaConfig(target_modules=["0"], k=30, seed=seed))

    saved = model(3)
    saved.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(nn.Sequential(nn.Linear(40, 24)), tmp_path)
    layer = loaded.base_model.model[0]
    want = count_positions(layer.lfma_rows["default"], layer.lfma_cols["default"], (24, 40))
    assert layer.lfma_positions["default"] == want == saved.base_model.model[0].lfma_positions["default"]
