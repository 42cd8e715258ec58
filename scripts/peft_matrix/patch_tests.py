#!/usr/bin/env python
"""Add LFMA rows to PEFT 0.21.2's tests/test_custom_models.py, beside FourierFT's.

Usage: python patch_tests.py <unpacked sdist root> [--mixed]
       (patches tests/ in place; refuses a patched copy. --mixed: also the mixed-adapter-batch rows of
       edit 5, which FourierFT has none of: LFMA refuses adapter_names= until mixed batches exist)

Every edit is anchored on literal text of the pristine file and asserts that its anchor is found
exactly once, so a different peft version fails loudly instead of silently patching nothing.

Edits (all LFMA names contain "lfma"/"LFMA"/"Lfma", so `pytest -k lfma` selects exactly them):
  1. imports: `import lfma_kernels.peft` (registers the method) and LfmaConfig.
  2. MockTransformerWrapper: one extra model id "MLPWide" (Linear(10,128) -> Linear(128,2)): PEFT's
     MLP layers have 200 and 40 weights, too few for the default K=1000 of a config that passes only
     target_modules (FourierFT's n_frequency=1000 default has the same limit), so the target-only
     rows use it.
  3. TEST_CASES: LFMA rows mirroring each FourierFT row (n_frequency=10 -> k=10;
     n_frequency_pattern -> k_pattern), plus a k + k_pattern row, an EmbConv1D (transformers Conv1D)
     row, and target_modules-only rows on MLPWide (init_weights=True, as FourierFT's rows: PEFT's
     disable/merge tests assume an identity start).
     -> ALL_PEFT_CONFIG_CLASSES (built from TEST_CASES) then includes LfmaConfig, so the generic
        `config_cls(target_modules=[...])` tests run for LFMA too.
  4. MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES: "LFMA Same"/"LFMA Different" mirroring FourierFT's, plus
     "LFMA Same seeded" (seed 0 vs 1) to separate the seed convention from the rest.
  5. with --mixed only: MIXED_ADAPTER_TEST_CASES and the inline mixed-batch case lists (LoRA/RoAd/GLoRA
     only; no FourierFT): LFMA rows, for the mixed-adapter batches DESIGN section 3 announces.
  6. TestRequiresGrad: copies of test_requires_grad_fourierft_{different,same}_targets for LFMA
     (fourierft_spectrum -> lfma_coeffs).
  7. testing_common.py: the safe-merge test's FourierFT special case ("fourierft_spectrum" in the
     list of adapter tensors set to inf) gets "lfma_coeffs" beside it.
"""
import re
import sys
from pathlib import Path

MARK = "# --- LFMA rows (patch_tests.py) ---"


def once(src: str, anchor: str, what: str) -> int:
    n = src.count(anchor)
    assert n == 1, f"{what}: anchor found {n} times, expected 1: {anchor!r}"
    return src.index(anchor)


def insert_after(src: str, anchor: str, text: str, what: str) -> str:
    i = once(src, anchor, what) + len(anchor)
    return src[:i] + text + src[i:]


def insert_before(src: str, anchor: str, text: str, what: str) -> str:
    i = once(src, anchor, what)
    return src[:i] + text + src[i:]


def after_tuple(src: str, name_literal: str, text: str, what: str) -> str:
    """Insert ``text`` after the tuple whose first element is ``name_literal`` (e.g. '"FourierFT
    Different"'): the tuple's '(' line's indentation gives its closing '),' line."""
    i = once(src, name_literal, what)
    line_start = src.rindex("\n", 0, i) + 1
    prev_line_start = src.rindex("\n", 0, line_start - 1) + 1
    opener = src[prev_line_start:line_start - 1]
    if opener.strip() == "(":  # name on its own line after "("
        indent = opener[: len(opener) - len(opener.lstrip())]
    else:  # "(name, ..." on one line
        line = src[line_start: src.index("\n", i)]
        indent = line[: len(line) - len(line.lstrip())]
        assert line.lstrip().startswith("("), f"{what}: unexpected layout {line!r}"
    close = "\n" + indent + "),\n"
    j = src.index(close, i) + len(close)
    return src[:j] + text + src[j:]


TEST_CASES_ROWS = f'''    {MARK}
    ########
    # LFMA #
    ########
    # Mirrors FourierFT's rows. LFMA is not an identity transform by default either (init_weights=False:
    # c = fft2(D)[u, v], as the paper), hence init_weights=True where FourierFT sets it.
    (
        "Vanilla MLP 1 LFMA",
        "MLP",
        LfmaConfig,
        {{"k": 10, "target_modules": "lin0", "init_weights": True}},
    ),
    (
        "Vanilla MLP 2 LFMA",
        "MLP",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin0"], "init_weights": True}},
    ),
    (
        "Vanilla MLP 3 LFMA",
        "MLP",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin1"], "init_weights": True}},
    ),
    (
        "Vanilla MLP 5 LFMA",
        "MLP",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_weights": True}},
    ),
    (
        "Vanilla MLP 6 LFMA",
        "MLP",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin0", "lin1"], "modules_to_save": ["lin1"], "init_weights": True}},
    ),
    (
        # as FourierFT's row 7: the pattern only, no k (relies on the K=1000 default for unmatched layers)
        "Vanilla MLP 7 LFMA",
        "MLP",
        LfmaConfig,
        {{
            "k_pattern": {{"lin0": 5, "lin1": 10}},
            "target_modules": ["lin0", "lin1"],
            "modules_to_save": ["lin1"],
            "init_weights": True,
        }},
    ),
    (
        # the same with an explicit k, so that k_pattern is exercised apart from the K default
        "Vanilla MLP 7b LFMA",
        "MLP",
        LfmaConfig,
        {{
            "k": 10,
            "k_pattern": {{"lin0": 5, "lin1": 10}},
            "target_modules": ["lin0", "lin1"],
            "modules_to_save": ["lin1"],
            "init_weights": True,
        }},
    ),
    (
        # transformers Conv1D (weight stored (in, out)); FourierFT has no such row
        "Embedding + transformers Conv1D 1 LFMA",
        "EmbConv1D",
        LfmaConfig,
        {{"k": 3, "target_modules": ["conv1d"], "init_weights": True}},
    ),
    # target_modules only (K default 1000, seed default None): on MLPWide, whose lin0 has 1280 weights;
    # init_weights=True as in FourierFT's rows (PEFT's disable/merge tests assume an identity start)
    (
        "Vanilla MLPWide 1 LFMA target-only",
        "MLPWide",
        LfmaConfig,
        {{"target_modules": ["lin0"], "init_weights": True}},
    ),
    (
        "Vanilla MLPWide 2 LFMA target-only + modules_to_save",
        "MLPWide",
        LfmaConfig,
        {{"target_modules": ["lin0"], "modules_to_save": ["lin1"], "init_weights": True}},
    ),
'''

MULTI_ROWS = f'''    {MARK}
    (
        "LFMA Same",
        "lfma",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin0"]}},
        {{"k": 10, "target_modules": ["lin0"]}},
    ),
    (
        "LFMA Different",
        "lfma",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin0"]}},
        {{"k": 10, "target_modules": ["lin1"]}},
    ),
    (
        "LFMA Same seeded",
        "lfma",
        LfmaConfig,
        {{"k": 10, "target_modules": ["lin0"], "seed": 0}},
        {{"k": 10, "target_modules": ["lin0"], "seed": 1}},
    ),
'''

MIXED_ROWS = f'''    {MARK}
    (
        "LFMA mixed adapter",
        LfmaConfig(target_modules=["lin0"], k=10),
        LfmaConfig(target_modules=["lin0"], k=20, seed=1),
    ),
'''


def inline_mixed(kind: str, indent: str = "            ") -> str:
    c0, c1 = {
        "different": ('target_modules=["lin0"], k=10', 'target_modules=["lin1"], k=10, seed=1'),
        "mts": ('target_modules=["lin0"], modules_to_save=["lin1"], k=10',
                'target_modules=["lin0"], modules_to_save=["lin1"], k=10, seed=1'),
        "overlap": ('target_modules=["lin0"], k=10', 'target_modules=["lin0", "lin1"], k=10, seed=1'),
    }[kind]
    title = {"different": "LFMA mixed adapter with different target layers",
             "mts": "LFMA mixed adapter with modules to save",
             "overlap": "LFMA mixed adapter with overlapping layers"}[kind]
    return (f'{indent}(\n{indent}    "{title}",\n{indent}    LfmaConfig({c0}),\n'
            f'{indent}    LfmaConfig({c1}),\n{indent}),\n')


WRONG_NAME_ROW = '''            (
                "LFMA mixed batch wrong adapter name",
                LfmaConfig(target_modules=["lin0"], k=10),
            ),
'''

MLPWIDE_CLASS = f'''{MARK}
class MLPWide(MLP):
    # MLP with a hidden width of 128: lin0 has 1280 weights, enough for LFMA's default K=1000
    def __init__(self, bias=True):
        super().__init__(bias=bias)
        self.lin0 = nn.Linear(10, 128, bias=bias)
        self.lin1 = nn.Linear(128, 2, bias=bias)


'''


def copy_requires_grad_tests(src: str) -> str:
    start = once(src, "    def test_requires_grad_fourierft_different_targets(self):", "requires_grad copy")
    end_anchor = "    @pytest.mark.parametrize(\"config_cls\", ALL_PEFT_CONFIG_CLASSES)\n" \
                 "    @pytest.mark.parametrize(\"is_trainable\", [False, True])  # note: default is False\n" \
                 "    def test_loading_model_requires_grad_set_correctly("
    end = once(src, end_anchor, "requires_grad copy end")
    assert start < end
    body = src[start:end]
    assert "def test_requires_grad_fourierft_same_targets" in body
    new = (body.replace("FourierFTConfig(n_frequency=10, ", "LfmaConfig(k=10, ")
               .replace("fourierft_spectrum", "lfma_coeffs")
               .replace("_fourierft_", "_lfma_")
               .replace("fourierft adapters", "LFMA adapters"))
    assert "fourier" not in new.lower(), "leftover FourierFT text in the LFMA copy"
    return src[:end] + f"    {MARK}\n" + new + src[end:]


def patch_test_custom_models(path: Path, mixed: bool) -> None:
    src = path.read_text()
    assert MARK not in src, f"{path} is already patched; unpack a fresh copy"

    src = insert_after(src, "from peft.utils import AuxiliaryTrainingWrapper, infer_device\n",
                       f"\n{MARK}\nimport lfma_kernels.peft  # noqa: F401  registers the PEFT method \"lfma\"\n"
                       "from lfma_kernels.peft import LfmaConfig\n", "imports")

    # 2. the MLPWide model
    src = insert_before(src, "class MLPWithGRU(nn.Module):", MLPWIDE_CLASS, "MLPWide class")
    src = insert_after(src, '        if model_id == "MLP":\n            return MLP().to(dtype)\n',
                       '\n        if model_id == "MLPWide":\n            return MLPWide().to(dtype)\n',
                       "MLPWide model id")

    # 3. TEST_CASES, right after FourierFT's last row
    src = after_tuple(src, '"Vanilla MLP 7 FourierFT"', TEST_CASES_ROWS, "TEST_CASES")
    # 4. multi-adapter rows, right after FourierFT's
    src = after_tuple(src, '"FourierFT Different"', MULTI_ROWS, "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES")
    # 5. mixed adapter batches
    if not mixed:
        return finish(path, src)
    src = after_tuple(src, '"GLoRA mixed adapter"', MIXED_ROWS, "MIXED_ADAPTER_TEST_CASES")
    src = after_tuple(src, '"GLoRA mixed adapter with different target layers"', inline_mixed("different"),
                      "mixed different targets")
    src = after_tuple(src, '"GLoRA mixed adapter with modules to save"', inline_mixed("mts"), "mixed mts")
    src = after_tuple(src, '"GLoRA mixed adapter with overlapping layers"', inline_mixed("overlap"),
                      "mixed overlapping")
    src = after_tuple(src, '"GLoRA mixed batch wrong adapter name"', WRONG_NAME_ROW, "mixed wrong name")
    return finish(path, src)


def finish(path: Path, src: str) -> None:
    # 6. requires_grad tests
    path.write_text(copy_requires_grad_tests(src))


def patch_testing_common(path: Path) -> None:
    src = path.read_text()
    assert "lfma_coeffs" not in src, f"{path} is already patched"
    src = insert_after(src, '                    or "fourierft_spectrum" in name\n',
                       '                    or "lfma_coeffs" in name  # LFMA (patch_tests.py)\n',
                       "testing_common safe-merge inf list")
    path.write_text(src)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    tests = Path(args[0]) / "tests"
    patch_test_custom_models(tests / "test_custom_models.py", mixed="--mixed" in sys.argv[1:])
    patch_testing_common(tests / "testing_common.py")
    # the sdist has no tests/__init__.py, but the tests use relative imports (from .testing_common ...)
    (tests / "__init__.py").touch()
    compile((tests / "test_custom_models.py").read_text(), "test_custom_models.py", "exec")
    print(f"patched {tests}")


if __name__ == "__main__":
    main()
