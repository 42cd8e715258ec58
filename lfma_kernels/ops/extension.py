"""Finding, loading or building the compiled extension of csrc/ behind the ``cpp`` and ``cuda`` backends.

Two shared libraries register the ``torch.ops.lfma_ext`` operators:

* ``lfma_kernels._C`` (csrc/bindings.cpp, csrc/cpu_kernels.cpp, csrc/cpu_plan.cpp): the op schemas and the CPU kernels;
* ``lfma_kernels._C_cuda`` (csrc/cuda_bindings.cpp, csrc/lfma_cuda.cu): CUDA kernels for the same ops.

Each is taken from the package when ``setup.py`` built it (``pip install --no-build-isolation -e .``),
otherwise compiled on first use with ``torch.utils.cpp_extension.load`` and cached by torch
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; a rebuild happens only when the
sources or flags change). ``LFMA_NO_JIT=1`` turns the on-the-fly build off. Nothing here raises
on import: :func:`unavailable_reason` says what is missing and how to get it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import warnings
from typing import Dict, List, Optional

import torch

__all__ = ["unavailable_reason", "load", "source_dir", "CPU_SOURCES", "CUDA_SOURCES", "cxx_flags", "nvcc_flags",
           "link_flags", "cuda_home", "use_cuda_home", "with_interpreter_bin_on_path"]

CPU_SOURCES = ("bindings.cpp", "cpu_kernels.cpp", "cpu_plan.cpp")
CUDA_SOURCES = ("cuda_bindings.cpp", "lfma_cuda.cu")
_MODULE = {"cpp": "lfma_kernels._C", "cuda": "lfma_kernels._C_cuda"}
_JIT_NAME = {"cpp": "lfma_kernels_C", "cuda": "lfma_kernels_C_cuda"}
_REBUILD = ("to prebuild it, install lfma_kernels after torch with `pip install --no-build-isolation` "
            "(in a source checkout: `make venv`)")

_lock = threading.Lock()
_reasons: Dict[str, Optional[str]] = {}
_how: Dict[str, str] = {}  # part -> "prebuilt <path>" or "built on first use"


# Compiler flags, shared with setup.py (which loads this file by path). OpenMP: the kernels use
# ATen's at::parallel_for, which is OpenMP inside torch's own runtime on Linux (torch's
# libgomp.so.1 is already loaded when the extension is, so there is one thread pool). On macOS,
# Apple's clang has no -fopenmp and the kernels run on one thread.
def cxx_flags() -> List[str]:
    if sys.platform == "win32":
        return ["/O2", "/DNDEBUG", "/openmp"]
    if sys.platform == "darwin":
        return ["-O3", "-DNDEBUG"]
    return ["-O3", "-DNDEBUG", "-fopenmp"]


def link_flags() -> List[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def nvcc_flags() -> List[str]:
    # lfma_cuda.cu includes no torch header, so it does not need torch's C++20.
    return ["-O3", "-std=c++17", "-DNDEBUG"]


def source_dir() -> Optional[str]:
    """csrc/ shipped inside the package (wheels) or beside it (a source tree, editable installs)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in CPU_SOURCES):
            return candidate
    return None


def _prebuilt(part: str) -> Optional[str]:
    try:
        spec = importlib.util.find_spec(_MODULE[part])
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def cuda_home() -> Optional[str]:
    """The CUDA toolkit with bin/nvcc: CUDA_HOME/CUDA_PATH, torch's guess (CUDA builds of torch
    only), or the toolkit behind the nvcc on PATH (following links and /usr/local/cuda). Shared with
    setup.py."""
    from torch.utils import cpp_extension

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def use_cuda_home(home: str) -> None:
    """Make torch's builders compile .cu files with ``home``'s nvcc: torch looks for the toolkit only
    when it was built with CUDA (and then not behind every wrapper)."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = home


def with_interpreter_bin_on_path() -> None:
    # A virtual environment's ninja (pip install ninja) lives beside its python, which need not
    # be on PATH when the interpreter is called by its full path (.venv/bin/python).
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")


def _jit_missing(part: str) -> Optional[str]:
    """Why the on-the-fly build cannot run here (None if it can)."""
    from torch.utils import cpp_extension

    if os.environ.get("LFMA_NO_JIT") == "1":
        return "LFMA_NO_JIT=1 disables building it on first use"
    if source_dir() is None:
        return "its C++ sources (csrc/) are not shipped with this installation"
    with_interpreter_bin_on_path()
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler was found to build it on first use (looked for {cxx!r}; install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja, which torch needs to build it on first use, was not found (pip install ninja)"
    if part == "cuda":
        home = cuda_home()
        if home is None:
            return "nvcc was not found to build the CUDA kernels on first use (install the CUDA toolkit or set CUDA_HOME)"
        use_cuda_home(home)
    return None


def _jit_build(part: str) -> str:
    from torch.utils import cpp_extension

    src = source_dir()
    names = CPU_SOURCES if part == "cpp" else CUDA_SOURCES
    try:  # where torch caches it (a private helper; only used to decide whether to announce a build)
        build_dir = cpp_extension._get_build_directory(_JIT_NAME[part], verbose=False)
    except Exception:
        build_dir = None
    if build_dir is None or not os.path.exists(os.path.join(build_dir, _JIT_NAME[part] + ".so")):
        warnings.warn(f"lfma_kernels: compiling the {part.upper()} extension on first use (a minute or two; "
                      f"cached in {build_dir or 'torch_extensions'} for later runs); {_REBUILD}", RuntimeWarning,
                      stacklevel=4)
    return cpp_extension.load(
        name=_JIT_NAME[part],
        sources=[os.path.join(src, f) for f in names],
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=nvcc_flags() if part == "cuda" else None,
        extra_ldflags=link_flags(),
        extra_include_paths=[src],
        is_python_module=False,
        verbose=os.environ.get("LFMA_VERBOSE_BUILD") == "1",
    )


def _stale(path: str) -> bool:
    """Whether a prebuilt library is older than the C++/CUDA sources beside it: in a source checkout
    with an editable install, csrc/ edited after the last `pip install -e .` / `make venv`."""
    src = source_dir()
    if src is None:
        return False
    try:
        newest = max(os.path.getmtime(os.path.join(src, f)) for f in os.listdir(src)
                     if f.endswith((".cpp", ".h", ".cu", ".cuh")))
        return newest > os.path.getmtime(path)
    except (OSError, ValueError):
        return False


def _load(part: str) -> Optional[str]:
    path = _prebuilt(part)
    prebuilt_error = None
    if path is not None and _stale(path):
        warnings.warn(f"lfma_kernels: {path} is older than the sources in {source_dir()}; using the current "
                      f"sources, compiled on first use (`make venv` or `pip install --no-build-isolation -e .` "
                      f"refreshes the prebuilt library)", RuntimeWarning, stacklevel=4)
        path = None
    if path is not None:
        try:
            torch.ops.load_library(path)
            _how[part] = f"prebuilt {path}"
            return None
        except OSError as exc:  # built against another torch, or its runtime libraries are missing
            prebuilt_error = f"the prebuilt {_MODULE[part]} ({path}) failed to load: {exc}"
    missing = _jit_missing(part)
    what = "the C++ extension" if part == "cpp" else "the CUDA kernels of the C++ extension"
    if missing is not None:
        head = prebuilt_error or f"{what} ({_MODULE[part]}) was not built with this installation"
        return f"{head}, and {missing}; {_REBUILD}"
    try:
        _jit_build(part)
    except Exception as exc:  # compiler errors, missing headers, ...
        head = f"{prebuilt_error}; " if prebuilt_error else ""
        return (f"{head}building {what} on first use failed: {type(exc).__name__}: {exc} "
                f"(set LFMA_VERBOSE_BUILD=1 to see the compiler output)")
    _how[part] = "built on first use"
    return None


def _cuda_runtime_missing() -> Optional[str]:
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) was built without CUDA; install a CUDA build of torch "
                f"to use backend='cuda'")
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no usable CUDA device or driver"
    return None


def unavailable_reason(part: str) -> Optional[str]:
    """``None`` when ``part`` ("cpp" or "cuda", named like the backends they serve) is loaded (loading or building it now if needed),
    otherwise what is missing and how to get it. The answer is cached for the process."""
    if part not in _MODULE:
        raise ValueError(f"part must be 'cpp' or 'cuda', got {part!r}")
    with _lock:
        if part == "cuda" and "cuda" not in _reasons:
            # The CUDA library registers kernels for the ops the CPU library defines: that first.
            _reasons["cuda"] = _cuda_runtime_missing() or _cached_load("cpp") or _load("cuda")
        return _cached_load(part)


def _cached_load(part: str) -> Optional[str]:
    if part not in _reasons:
        _reasons[part] = _load(part)
    return _reasons[part]


def load(part: str) -> str:
    """Make sure ``part`` is loaded; ``RuntimeError`` saying why not. Returns how it was loaded."""
    reason = unavailable_reason(part)
    if reason is not None:
        raise RuntimeError(f"lfma_kernels {part} extension is not available: {reason}")
    return _how[part]
