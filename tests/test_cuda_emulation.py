"""The CUDA kernels and launchers of csrc/lfma_cuda.cu, unchanged, run on CPU threads through
tests/cuda_emulation/emulate.cpp (one OS thread per CUDA thread, __syncthreads as a barrier), and
checked against the float64 oracle: tiling with partial edge tiles, several K chunks, every output
dtype, the coefficient-gradient reduction and the launchers' argument checks. This is what a
machine without a GPU can check of the CUDA code; test_cpp.py runs it on a real GPU when there is one.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import lfma_kernels as lfma
from conftest import random_frequencies, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32, F64, BF16, F16 = 0, 1, 2, 3
CODES = {torch.float32: F32, torch.float64: F64, torch.bfloat16: BF16, torch.float16: F16}
# Odd shapes, partial 64x64 tiles on both axes, K across several chunks (32 float32 / 16 float64
# frequencies per chunk), every position of a small matrix once.
SHAPES_K = [((48, 80), 37), ((97, 64), 203), ((130, 70), 45), ((33, 33), 1089), ((1, 1), 1), ((7, 1), 3)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "libemu.so"
    source = os.path.join(ROOT, "tests", "cuda_emulation", "emulate.cpp")
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           "-I", os.path.join(ROOT, "csrc"), source, "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if "<barrier>" in proc.stderr or "_Float16" in proc.stderr:
            pytest.skip(f"the C++ compiler lacks C++20 <barrier> or _Float16: {proc.stderr[-300:]}")
        pytest.fail(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{proc.stderr}")
    dll = ctypes.CDLL(str(lib))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.lfma_cuda_delta_weight.argtypes = [p, p, p, i64, i64, i64, ctypes.c_double, p, p, i32, i32, p]
    dll.lfma_cuda_delta_weight.restype = i32
    dll.lfma_cuda_coeff_grad_workspace.argtypes = [i64, i64, i64, i32]
    dll.lfma_cuda_coeff_grad_workspace.restype = ctypes.c_size_t
    dll.lfma_cuda_coeff_grad.argtypes = [p, p, p, i64, i64, i64, ctypes.c_double, p, p, i32, p]
    dll.lfma_cuda_coeff_grad.restype = i32
    dll.lfma_cuda_error_string.argtypes = [i32]
    dll.lfma_cuda_error_string.restype = ctypes.c_char_p
    return dll


def delta_weight(emu, coeffs, rows, cols, shape, alpha, *, weight=None, out_dtype=None):
    """What cuda_bindings.cpp does around lfma_cuda_delta_weight, on CPU tensors."""
    out_dtype = out_dtype or coeffs.dtype
    out = torch.empty(shape, dtype=out_dtype)
    s = alpha / (shape[0] * shape[1])
    coeffs, rows, cols = coeffs.contiguous(), rows.contiguous(), cols.contiguous()
    err = emu.lfma_cuda_delta_weight(coeffs.data_ptr(), rows.data_ptr(), cols.data_ptr(), rows.numel(), shape[0],
                                     shape[1], s, None if weight is None else weight.data_ptr(), out.data_ptr(),
                                     CODES[coeffs.dtype], CODES[out_dtype], None)
    assert err == 0, emu.lfma_cuda_error_string(err)
    return out


def coeff_grad(emu, g, rows, cols, alpha):
    k, (m, n) = rows.numel(), g.shape
    out = torch.empty(k, 2, dtype=g.dtype)
    work = torch.empty(emu.lfma_cuda_coeff_grad_workspace(k, m, n, CODES[g.dtype]), dtype=torch.uint8)
    err = emu.lfma_cuda_coeff_grad(g.contiguous().data_ptr(), rows.data_ptr(), cols.data_ptr(), k, m, n,
                                   alpha / (m * n), out.data_ptr(), work.data_ptr(), CODES[g.dtype], None)
    assert err == 0, emu.lfma_cuda_error_string(err)
    return out


def frequencies(shape, k, gen):
    if k == shape[0] * shape[1] and k > 1:
        rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
        return torch.randn(k, 2, generator=gen, dtype=torch.float64), rows.flatten(), cols.flatten()
    return random_frequencies(shape, k, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("shape, k", SHAPES_K)
def test_delta_weight_matches_oracle(emu, shape, k, gen):
    coeffs, rows, cols = frequencies(shape, k, gen)
    ref = lfma.reference.delta_weight(coeffs, rows, cols, shape, 1.7)
    assert rel_err(delta_weight(emu, coeffs.float(), rows, cols, shape, 1.7), ref) <= 1e-5
    assert rel_err(delta_weight(emu, coeffs, rows, cols, shape, 1.7), ref) <= 1e-12


@pytest.mark.parametrize("out_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3),
                                            (torch.float64, 1e-14)])
def test_folded_weight_output_dtypes(emu, out_dtype, tol, gen):
    shape, k = (97, 64), 70
    coeffs, rows, cols = frequencies(shape, k, gen)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(out_dtype)
    ref = weight.double() + lfma.reference.delta_weight(coeffs, rows, cols, shape, 40.0)
    c = coeffs if out_dtype == torch.float64 else coeffs.float()
    out = delta_weight(emu, c, rows, cols, shape, 40.0, weight=weight, out_dtype=out_dtype)
    assert rel_err(out, ref) <= tol
    # dW alone in a low-precision output: the float32 accumulation is rounded once at the end
    if out_dtype in (torch.bfloat16, torch.float16):
        alone = delta_weight(emu, c, rows, cols, shape, 40.0, out_dtype=out_dtype)
        dw = lfma.reference.delta_weight(coeffs, rows, cols, shape, 40.0)
        assert torch.equal(alone, dw.float().to(out_dtype)) or rel_err(alone, dw) <= tol


@pytest.mark.parametrize("shape, k", SHAPES_K)
def test_coeff_grad_matches_oracle(emu, shape, k, gen):
    _, rows, cols = frequencies(shape, k, gen)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = lfma.reference.coeff_grad(g, rows, cols, 0.8)
    out32 = coeff_grad(emu, g.float(), rows, cols, 0.8)
    assert rel_err(out32, ref) <= 1e-5
    assert rel_err(coeff_grad(emu, g, rows, cols, 0.8), ref) <= 1e-12
    assert torch.equal(coeff_grad(emu, g.float(), rows, cols, 0.8), out32)  # deterministic: no atomics


def test_launcher_argument_checks(emu, gen):
    coeffs, rows, cols = frequencies((8, 8), 3, gen)
    out = torch.empty(8, 8, dtype=torch.float32)
    c = coeffs.float()
    # float32 accumulation into a float64 output is not a pair the kernels provide
    assert emu.lfma_cuda_delta_weight(c.data_ptr(), rows.data_ptr(), cols.data_ptr(), 3, 8, 8, 1.0, None,
                                      out.data_ptr(), F32, F64, None) != 0
    assert emu.lfma_cuda_delta_weight(c.data_ptr(), rows.data_ptr(), cols.data_ptr(), 3, 0, 8, 1.0, None,
                                      out.data_ptr(), F32, F32, None) != 0
    assert emu.lfma_cuda_coeff_grad(out.data_ptr(), rows.data_ptr(), cols.data_ptr(), 3, 8, 8, 1.0, None, None,
                                    BF16, None) != 0
    assert emu.lfma_cuda_coeff_grad_workspace(3, 70, 8, F32) == 3 * 2 * 4 * 3  # ceil(70 / 32) row tiles
    # K = 0: out = W (and dW = 0)
    w = torch.randn(8, 8, generator=gen)
    empty = torch.zeros(0, dtype=torch.long)
    err = emu.lfma_cuda_delta_weight(torch.zeros(0, 2).data_ptr(), empty.data_ptr(), empty.data_ptr(), 0, 8, 8, 1.0,
                                     w.data_ptr(), out.data_ptr(), F32, F32, None)
    assert err == 0 and torch.equal(out, w)


def test_out_of_range_indices_wrap(emu, gen):
    """The kernels reduce indices modulo the size (no memory is addressed by them): a frequency at
    u + d_out is the frequency at u."""
    shape = (12, 10)
    coeffs, rows, cols = frequencies(shape, 4, gen)
    ref = delta_weight(emu, coeffs, rows, cols, shape, 1.0)
    wrapped = delta_weight(emu, coeffs, rows + shape[0], cols - shape[1], shape, 1.0)
    assert rel_err(wrapped, ref) <= 1e-14
