"""Build script: metadata lives in pyproject.toml; this file adds the compiled extension of csrc/.

    lfma_kernels._C       csrc/bindings.cpp and the CPU kernels (csrc/cpu_*.cpp): the lfma_ext ops
                          and their CPU kernels (always, unless LFMA_SKIP_EXTENSION=1)
    lfma_kernels._C_cuda  csrc/cuda_bindings.cpp, csrc/lfma_cuda.cu: CUDA kernels for the same ops,
                          when torch is a CUDA build and nvcc is found, or LFMA_FORCE_CUDA=1

Environment:
    LFMA_SKIP_EXTENSION=1  pure-Python install; backend="cpp" then compiles the extension on first
                           use (torch.utils.cpp_extension.load, cached)
    LFMA_FORCE_CUDA=1      build the CUDA part even where torch has no CUDA (with a CPU-only torch
                           this is a compile-and-link check: the kernels can never be dispatched)
    TORCH_CUDA_ARCH_LIST   GPU architectures (torch's variable); LFMA_FORCE_CUDA on a CPU-only
                           torch defaults to sm_80 and sm_90
    MAX_JOBS               parallel compile jobs (ninja)

torch must be importable when this runs: install it first, then
``pip install --no-build-isolation -e .`` (what the Makefile does).
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHES = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def _log(message):
    print(f"lfma_kernels setup: {message}", file=sys.stderr)


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (as lfma_kernels/_csrc) so that an installation without the
    compiled extension can still build it on first use. Editable installs read csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "lfma_kernels", "_csrc")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(CSRC)):
            if name.endswith((".cpp", ".h", ".cu", ".cuh")):
                shutil.copy2(os.path.join(CSRC, name), os.path.join(target, name))


def _extensions():
    if os.environ.get("LFMA_SKIP_EXTENSION") == "1":
        _log("LFMA_SKIP_EXTENSION=1: pure-Python install (backend='cpp' compiles on first use)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _log(f"torch is not importable ({exc}); building without the C++ extension. Install torch first and "
             "use `pip install --no-build-isolation .` to compile it (or it compiles on first use).")
        return [], {}

    # The sources, flags and toolkit lookup the on-the-fly build uses too (lfma_kernels/ops/extension.py,
    # loaded by path: the package itself is not importable before it is installed).
    spec = importlib.util.spec_from_file_location(
        "_lfma_extension_flags", os.path.join(ROOT, "lfma_kernels", "ops", "extension.py"))
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    cxx, link, nvcc_flags = flags.cxx_flags(), flags.link_flags(), flags.nvcc_flags()
    cpu_sources = [os.path.join("csrc", f) for f in flags.CPU_SOURCES]
    cuda_sources = [os.path.join("csrc", f) for f in flags.CUDA_SOURCES]

    # A virtual environment's ninja sits beside its python, not necessarily on PATH.
    flags.with_interpreter_bin_on_path()

    ext_modules = [cpp_extension.CppExtension(
        "lfma_kernels._C", cpu_sources, include_dirs=[CSRC],
        extra_compile_args={"cxx": cxx}, extra_link_args=link)]

    force = os.environ.get("LFMA_FORCE_CUDA") == "1"
    torch_cuda = torch.version.cuda is not None
    cuda_home = flags.cuda_home()
    nvcc = cuda_home is not None
    if force and not nvcc:
        raise RuntimeError("LFMA_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if nvcc:  # BuildExtension compiles .cu files with $CUDA_HOME/bin/nvcc: the one found here
        flags.use_cuda_home(cuda_home)
    if torch_cuda and nvcc:
        _log(f"building the CUDA kernels (torch {torch.__version__}, CUDA_HOME={cpp_extension.CUDA_HOME})")
        ext_modules.append(cpp_extension.CUDAExtension(
            "lfma_kernels._C_cuda", cuda_sources, include_dirs=[CSRC],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}))
    elif force:
        # CPU-only torch: no torch CUDA libraries to link, and none are needed (cuda_bindings.cpp
        # uses only device-agnostic c10 APIs); the static CUDA runtime makes the library self-contained.
        arches = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else list(DEFAULT_ARCHES)
        _log(f"LFMA_FORCE_CUDA=1: building the CUDA kernels against a torch without CUDA "
             f"({torch.__version__}); compile and link check only")
        ext_modules.append(cpp_extension.CppExtension(
            "lfma_kernels._C_cuda", cuda_sources, include_dirs=[CSRC],
            library_dirs=[os.path.join(cuda_home, "lib64")],
            libraries=["cudart_static", "rt", "dl", "pthread"],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags + arches}))
    else:
        why = "torch has no CUDA" if not torch_cuda else "nvcc was not found"
        _log(f"skipping the CUDA kernels ({why}; LFMA_FORCE_CUDA=1 builds them anyway)")
    return ext_modules, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
