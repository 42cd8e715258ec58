"""The demo's --quick smoke run: every method trains, and the outputs docs/demo.md describes appear."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lfma_kernels import demo  # noqa: E402


def test_splits_are_fixed_and_disjoint():
    a, b = demo.load_digits_splits(), demo.load_digits_splits()
    assert a.test.x.equal(b.test.x) and a.train.y.equal(b.train.y)
    sizes = [len(s.y) for s in (a.pretrain_train, a.pretrain_val, a.train, a.val, a.test)]
    assert sum(sizes) == 1797
    assert set(a.train.y.tolist()) == set(range(5)) and set(a.test.y.tolist()) == set(range(5))


def test_quick_run_writes_table_json_and_plot(tmp_path, capsys):
    assert demo.main(["--quick", "--quiet", "--output-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "demo.json").read_text())
    points = [(m, b) for m, method in demo.METHODS.items() for b in method.budgets if b in demo.QUICK_BUDGETS or b == 0]
    assert [(r["method"], r["budget"]) for r in records] == points
    for r in records:
        assert {"method", "budget", "trainable_real", "accuracy_mean", "accuracy_std", "step_ms", "runs"} <= r.keys()
        assert r["accuracy_mean"] > 0.35, f"{r['method']} {r['size']} did not learn (chance is 0.2)"
    by = {(r["method"], r["budget"]): r for r in records}
    for budget in demo.QUICK_BUDGETS:
        lfma = by[("LFMA", budget)]
        assert lfma["coefficients"] == 2 * demo.LAYERS * budget // 2
        same = {by[(m, budget)]["trainable_real"] for m in demo.METHODS if (m, budget) in by}
        assert len(same) == 1, f"methods at budget {budget} train different numbers of scalars: {same}"
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "| LFMA hermitian" in capsys.readouterr().out


def test_every_point_has_a_swept_learning_rate():
    for name, method in demo.METHODS.items():
        assert set(method.budgets) <= set(demo.LEARNING_RATES[name]), name
        assert all(lr in demo.SWEEP_GRID for lr in demo.LEARNING_RATES[name].values()), name


def test_one_process_and_worker_processes_give_the_same_runs():
    """Every run is seeded on its own, so the worker pool changes nothing but the wall time."""
    data = demo.load_digits_splits()
    backbone = demo.pretrain(data, epochs=1, quiet=True)
    tasks = [("LFMA", 128, 3e-2, 1, 0), ("LoRA", 128, 3e-2, 1, 1)]
    here = demo.run_grid(tasks, backbone, data, jobs=1, quiet=True)
    pooled = demo.run_grid(tasks, backbone, data, jobs=2, quiet=True)
    assert [(r.val, r.test, r.trainable_real) for r in here] == [(r.val, r.test, r.trainable_real) for r in pooled]
