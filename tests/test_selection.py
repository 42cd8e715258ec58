"""Frequency selection, parameter counts from the paper, Hermitian mode, init matrices."""
import pytest
import torch
import torch.nn as nn

import lfma_kernels as lfma
from lfma_kernels.selection import hermitian_half_mask, init_matrix


@pytest.mark.parametrize("layers, shape, ratio, expected", [
    (12, (768, 768), 0.1, 707_784),      # ViT-B query
    (12, (768, 768), 0.05, 353_892),
    (12, (768, 768), 0.0003, 2_112),
    (24, (1024, 1024), 0.1, 2_516_568),  # ViT-L query
    (24, (1024, 1024), 0.05, 1_258_272),
    (24, (1024, 1024), 0.0003, 7_536),
    (24, (768, 768), 0.0016, 22_632),    # RoBERTa-base query + value
    (48, (1024, 1024), 0.0005, 25_152),  # RoBERTa-large query + value
])
def test_paper_parameter_counts(layers, shape, ratio, expected):
    assert layers * lfma.num_frequencies(shape, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="top_k_ratio"):
        lfma.num_frequencies((8, 8), ratio)


def test_ratio_selecting_nothing():
    with pytest.raises(ValueError, match="selects no frequency"):
        lfma.num_frequencies((8, 8), 0.001)


@pytest.mark.parametrize("k", [0, -3, 65])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be"):
        lfma.select_frequencies(torch.randn(8, 8), k)


@pytest.mark.parametrize("shape", [(48, 80), (97, 64), (33, 33)])
def test_select_top_k(shape, gen):
    init = torch.randn(shape, generator=gen)
    k = 57
    rows, cols, values = lfma.select_frequencies(init, k)
    spectrum = torch.fft.fft2(init)
    assert rows.dtype == cols.dtype == torch.int64 and values.is_complex() and len(rows) == k
    assert torch.equal(values, spectrum[rows, cols])
    magnitude = values.abs()
    assert torch.all(magnitude[:-1] >= magnitude[1:]), "not sorted by descending magnitude"
    assert len(set(zip(rows.tolist(), cols.tolist()))) == k, "duplicate positions"
    # nothing left out is larger than the smallest kept magnitude
    assert spectrum.abs().flatten().sort(descending=True).values[k - 1] == pytest.approx(magnitude[-1].item())


def _partners(rows, cols, shape):
    return set(zip(((-rows) % shape[0]).tolist(), ((-cols) % shape[1]).tolist()))


@pytest.mark.parametrize("shape", [(16, 16), (15, 22), (97, 64)])
def test_paper_selection_picks_conjugate_pairs(shape, gen):
    rows, cols, _ = lfma.select_frequencies(torch.randn(shape, generator=gen, dtype=torch.float64), 40)
    chosen = set(zip(rows.tolist(), cols.tolist()))
    assert len(chosen & _partners(rows, cols, shape)) >= 30


@pytest.mark.parametrize("shape", [(16, 16), (15, 22), (97, 64), (8, 9)])
def test_hermitian_selects_no_partner(shape, gen):
    k = min(40, int(hermitian_half_mask(shape).sum()))
    rows, cols, values = lfma.select_frequencies(torch.randn(shape, generator=gen), k, hermitian=True)
    chosen = set(zip(rows.tolist(), cols.tolist()))
    own = {(r, c) for r, c in chosen if ((-r) % shape[0], (-c) % shape[1]) == (r, c)}
    assert not (chosen - own) & _partners(rows, cols, shape)
    assert len(chosen) == k
    assert torch.all(values.abs()[:-1] >= values.abs()[1:])


def test_hermitian_half_counts():
    # (d_out*d_in + number of self-conjugate bins) / 2 representatives
    for shape, selfconj in [((16, 16), 4), ((15, 22), 2), ((9, 7), 1)]:
        assert int(hermitian_half_mask(shape).sum()) == (shape[0] * shape[1] + selfconj) // 2
    with pytest.raises(ValueError, match="independent frequencies"):
        lfma.select_frequencies(torch.randn(4, 4), 11, hermitian=True)


def _jacobian_rank(hermitian: bool) -> int:
    shape, k = (12, 10), 24
    rows, cols, values = lfma.select_frequencies(
        torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64), k, hermitian=hermitian)
    jac = torch.autograd.functional.jacobian(
        lambda c: lfma.reference.delta_weight(c, rows, cols, shape, 1.0).flatten(), torch.view_as_real(values))
    return int(torch.linalg.matrix_rank(jac.reshape(shape[0] * shape[1], 2 * k)))


def test_hermitian_doubles_the_jacobian_rank():
    paper, hermitian = _jacobian_rank(False), _jacobian_rank(True)
    assert paper <= 24 + 2          # pairs act through one complex sum: about K real directions
    assert hermitian >= 2 * 24 - 4  # every real scalar is its own direction (but for self-conjugate bins)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    weight = torch.empty(12, 20)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a = init_matrix("random", weight, std=1e-3, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, init_matrix("random", weight, std=1e-3, seed=3))
    assert not torch.equal(a, init_matrix("random", weight, std=1e-3, seed=4))
    assert a.std().item() == pytest.approx(1e-3, rel=0.2)


def test_weight_and_tensor_init():
    lin = nn.Linear(20, 12)
    assert torch.equal(init_matrix("weight", lin.weight), lin.weight.detach())
    given = torch.randn(12, 20)
    assert torch.equal(init_matrix(given, lin.weight), given)
    with pytest.raises(ValueError, match="shape"):
        init_matrix(torch.randn(20, 12), lin.weight)
    with pytest.raises(ValueError, match="init must be"):
        init_matrix("zeros", lin.weight)
