"""The scripts people copy: examples/ (shortened) and the README's snippets, run as written."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def run_readme_block(marker: str, directory, monkeypatch) -> dict:
    """Run the README's python block after ``<!-- readme-{marker}`` as written, in ``directory``; its
    namespace."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(rf"<!-- readme-{marker}.*?-->\n```python\n(.*?)```", readme, re.S)
    assert block, f"the README's {marker} (and its marker) is missing"
    monkeypatch.chdir(directory)
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    return namespace


def run_example(name, *args, cwd=None):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                            text=True, timeout=600, cwd=cwd, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_peft_trainer_example(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("peft_trainer.py", "--epochs", "2", "--pretrain-epochs", "3", "--output-dir", str(tmp_path))
    accuracies = re.search(r"trained ([\d.]+)%, reloaded ([\d.]+)%, merged ([\d.]+)%", out).groups()
    assert len(set(accuracies)) == 1, out
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_gpt2_example(tmp_path):
    out = run_example("gpt2_lfma.py", "--steps", "6", "--output-dir", str(tmp_path))
    assert "reloaded outputs identical: True" in out and "merged (Conv1D)" in out


def test_readme_peft_snippet_runs_verbatim(tmp_path, monkeypatch):
    namespace = run_readme_block("peft-snippet", tmp_path, monkeypatch)
    merged = namespace["merged"]
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert (tmp_path / "lfma-gpt2" / "adapter_config.json").is_file()


def test_qlfma_example(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = run_example("qlfma.py", "--steps", "6", "--output-dir", str(tmp_path))
    assert "c_attn is a Linear4bit" in out and "reloaded on nf4 identical: True" in out and "(Conv1D)" in out, out


def test_readme_quantized_snippet_runs_verbatim(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    namespace = run_readme_block("quantized-snippet", tmp_path, monkeypatch)
    model = namespace["model"]
    assert all("lfma_" in n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None)
    assert type(model.base_model.model.transformer.h[0].attn.c_attn.base_layer).__name__ == "Linear4bit"
    assert type(namespace["merged"].transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_readme_serving_snippet_runs_verbatim(tmp_path, monkeypatch):
    namespace = run_readme_block("serving-snippet", tmp_path, monkeypatch)
    model, as_lora, ids = namespace["model"], namespace["as_lora"], namespace["ids"]
    assert namespace["tokens"].shape == (4, 24)
    with torch.no_grad():
        model.set_adapter("fr")
        want = model(input_ids=ids).logits
        assert torch.allclose(namespace["logits"][[0, 3]], want[[0, 3]], rtol=1e-5, atol=1e-5)
        assert torch.allclose(as_lora.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert type(as_lora.peft_config["default"]).__name__ == "LoraConfig"


def test_readme_quickstart_snippet_runs_verbatim(tmp_path, monkeypatch):
    namespace = run_readme_block("quickstart-snippet", tmp_path, monkeypatch)
    assert namespace["layer"].merged and (tmp_path / "adapter" / "lfma_config.json").is_file()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme[:readme.index("<!-- readme-quickstart-snippet")].count("\n") < 60  # working code early on


def test_readme_is_a_guide_and_its_links_resolve():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme.count("\n") < 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        assert os.path.exists(os.path.join(ROOT, target)), target
