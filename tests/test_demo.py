"""The demo's --quick smoke run: every method trains, and the outputs the README promises appear."""
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
    assert [r["method"] for r in records] == list(demo.METHODS)
    for r in records:
        assert {"method", "trainable_real", "accuracy_mean", "accuracy_std", "step_ms"} <= r.keys()
        assert r["accuracy_mean"] > 0.35, f"{r['method']} did not learn (chance is 0.2)"
    by = {r["method"]: r for r in records}
    assert by["LFMA"]["coefficients"] == by["LFMA hermitian"]["coefficients"] == 2 * demo.LAYERS * demo.LFMA_K
    assert by["LFMA"]["trainable_real"] == by["LoRA r=1"]["trainable_real"] == by["FourierFT"]["trainable_real"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "| LFMA hermitian" in capsys.readouterr().out
