"""The benchmark scripts' machinery: round-robin timing, a tiny bench_layer run end to end, and the
model-level table's ratios and missing-peer rows (the timings themselves are never asserted)."""
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import timing  # noqa: E402


@pytest.fixture
def quiet_machine(monkeypatch):
    """Don't wait for, or repeat because of, other processes' load (CI machines are busy)."""
    monkeypatch.setattr(timing, "wait_for_quiet", lambda max_wait_s, threshold=0.1: True)
    monkeypatch.setattr(timing, "other_load", lambda fn: (fn(), 0.0))


def test_interleaved_ms_times_every_function_each_round(quiet_machine):
    calls = []
    ms = timing.interleaved_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=6, warmup=1)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert calls.count("a") == calls.count("b") == 7
    rounds = [calls[i:i + 2] for i in range(2, len(calls), 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds)  # one call of each per round
    assert len({tuple(r) for r in rounds}) == 2          # in a varying order


def test_interleaved_ms_reports_load(monkeypatch):
    monkeypatch.setattr(timing, "wait_for_quiet", lambda max_wait_s, threshold=0.1: False)
    monkeypatch.setattr(timing, "other_load", lambda fn: (fn(), 0.5))
    noisy = []
    timing.interleaved_ms({"a": lambda: None}, rounds=5, tries=2, noisy=noisy, label="case")
    assert noisy == ["case (other processes used 50% of the CPUs)"]


def test_bench_layer_end_to_end(quiet_machine, tmp_path):
    import bench_layer

    out = tmp_path / "RESULTS.md"
    assert bench_layer.main(["--shapes", "24x40", "--ratios", "0.01", "--quick", "--output", str(out)]) == 0
    text = out.read_text()
    assert "<!-- section: layer cpu float32 -->" in text and "round-robin" in text
    train = text.split("### Layer training step")[1].split("###")[0]
    row = next(line for line in train.splitlines() if line.startswith("| 24x40"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "n/a" not in cells and "-" not in cells[3:8], row  # every column measured
    assert "Errors" not in text


def test_bench_models_table_ratios_and_missing_peers():
    pytest.importorskip("transformers")
    import bench_models

    rows = [{"variant": "frozen", "note": "head only", "trainable": 10, "step_ms": 50.0, "eval_ms": 40.0,
             "peak_mb": 10.0},
            {"variant": bench_models.FLOOR, "note": "head only, dL/dx", "trainable": 10, "step_ms": 80.0,
             "eval_ms": 40.0, "peak_mb": 11.0},
            {"variant": "LoRA r=8", "note": "peft not installed (pip install -e '.[bench]')"},
            {"variant": "LFMA auto", "note": "K=3, cpp", "trainable": 16, "step_ms": 84.0, "eval_ms": 42.0,
             "peak_mb": 12.0}]
    lines = bench_models.table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = {name: i for i, name in enumerate(header)}

    def cells(variant):
        return [c.strip() for c in next(line for line in lines if line.startswith(f"| {variant}")).strip("|").split("|")]

    lora = next(line for line in lines if line.startswith("| LoRA r=8"))
    assert "missing" in lora and "peft not installed" in lora
    lfma = cells("LFMA auto")
    assert lfma[column["step / floor"]] == "1.05x"  # 84 / 80
    assert lfma[column["step / LoRA"]] == "-"       # no LoRA to divide by
    assert lfma[column["eval / frozen"]] == "1.05x"  # 42 / 40
    assert lfma[column["step / LFMA auto"]] == "1.00x"
    assert cells("frozen, full")[column["step / floor"]] == "1.00x"


@pytest.mark.parametrize("model_name", ["ViT-B/16", "GPT-2"])
@pytest.mark.parametrize("variant, backbone_backward", [("frozen", False), ("frozen, full backward", True)])
def test_bench_models_floor_runs_the_backbone_backward(model_name, variant, backbone_backward):
    """The floor row trains the head alone, yet its backward reaches the embeddings' output (through
    every layer); plain "frozen" stops at the head."""
    pytest.importorskip("transformers")
    import bench_models

    spec = bench_models.MODELS[model_name]
    model, inputs = bench_models.build(model_name, 1, 1, 8, "cpu", torch.float32)
    model, _ = bench_models.adapt(model, variant, spec)
    seen = []
    spec.embeddings(model).register_forward_hook(lambda module, args, out: seen.append(out))
    model(**inputs).loss.backward()
    assert (seen[0].grad is not None) == backbone_backward
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all(name.startswith(spec.head) for name in trained)
    with torch.no_grad():  # eval forwards are the plain frozen model's
        model(**inputs)
    assert not seen[1].requires_grad


@pytest.mark.parametrize("model_name", ["ViT-B/16", "GPT-2"])
def test_bench_models_lfma_rows_train_the_same_adapter(model_name):
    """"LFMA auto" (native) and "LFMA via PEFT" adapt the same layers with the same K and give the
    same outputs, so the two rows time the same work."""
    pytest.importorskip("peft")
    import bench_models

    spec = bench_models.MODELS[model_name]
    outputs, notes = [], []
    for variant in ("LFMA auto", "LFMA via PEFT"):
        model, inputs = bench_models.build(model_name, 1, 2, 8, "cpu", torch.float32)
        model, note = bench_models.adapt(model, variant, spec)
        notes.append(note.split(",")[0])
        with torch.no_grad():
            outputs.append(model(**{k: v for k, v in inputs.items() if k != "labels"}).logits)
    assert notes[0] == notes[1] and notes[0].startswith("K=")
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_bench_models_ratios_are_medians_of_per_round_ratios():
    """A ratio between two timed rows is the median of their per-round ratios: a machine that slows
    down mid-run (here the third round) moves both rows of that round alike, not one row's median."""
    pytest.importorskip("transformers")
    import bench_models

    def row(variant, step_rounds):
        return {"variant": variant, "note": "", "trainable": 1, "step_ms": sorted(step_rounds)[1], "eval_ms": 1.0,
                "peak_mb": 1.0, "step_rounds": step_rounds, "eval_rounds": [1.0, 1.0, 1.0]}

    rows = [row("LoRA r=8", [10.0, 10.0, 60.0]), row("LFMA auto", [9.0, 9.5, 30.0])]
    lines = bench_models.table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    lfma = [c.strip() for c in next(line for line in lines if line.startswith("| LFMA auto")).strip("|").split("|")]
    assert lfma[header.index("step / LoRA")] == "0.90x"  # per round 0.9, 0.95, 0.5; medians 9.5 / 10 = 0.95
    assert timing.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 6.0]) == 2.0


def test_bench_mixed_end_to_end(quiet_machine, tmp_path):
    """A tiny mixed-adapter-batch run: every variant timed for each adapter count, the kept W + dW reported."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import bench_mixed

    out = tmp_path / "RESULTS.md"
    assert bench_mixed.main(["--models", "GPT-2", "--layers", "1", "--batch", "2", "--seq", "4", "--adapters", "1,2",
                             "--repeats", "2", "--output", str(out)]) == 0
    text = out.read_text()
    assert "<!-- section: mixed cpu seq 4 -->" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 8 and all("-" not in line.split("|")[4] for line in rows)  # 2 counts x 4 variants
    assert sum(bench_mixed.LFMA in line for line in rows) == 4
