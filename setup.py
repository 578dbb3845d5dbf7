"""Build script for segkernels' compiled extension (the metadata is in pyproject.toml).

One extension, ``segkernels._C``: the C++ CPU kernels always, the CUDA kernels
when a CUDA toolkit and a CUDA build of torch are present.

Environment switches:
  SEGKERNELS_FORCE_CUDA=1   build the CUDA kernels even without a visible GPU
                            (CI uses this to compile every .cu on a GPU-less box)
  SEGKERNELS_SKIP_CUDA=1    never build the CUDA kernels
  SEGKERNELS_BUILD_TESTING=1  also build the test-only ops (the segkernels_testing library,
                            csrc/testing.cpp and csrc/<op>/<op>_testing.cpp) and output
                            poisoning; `make test` and CI set it, releases do not
  TORCH_CUDA_ARCH_LIST      honoured; defaults to "8.0;9.0+PTX"
  CUDA_HOME                 honoured; otherwise found from the real nvcc
"""

import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _real_cuda_home():
    """Find the toolkit folder behind nvcc.

    The nvcc on PATH may be a wrapper script (``exec /usr/local/cuda-X/bin/nvcc "$@"``);
    torch would then guess the wrapper's folder and fail to link, so follow it.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isdir(os.path.join(c, "include")):
            return os.path.realpath(c)
    return None


_cuda_home = None if _flag("SEGKERNELS_SKIP_CUDA") else _real_cuda_home()
if _cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _wheel_cuda_include_dirs():
    """Headers of the CUDA libraries (cuBLAS, cuSPARSE, ...) installed as nvidia-* wheels."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        nv = os.path.join(base, "nvidia")
        dirs += sorted(glob.glob(os.path.join(nv, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(nv, "*", "include")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _want_cuda() -> bool:
    if _flag("SEGKERNELS_SKIP_CUDA"):
        return False
    if torch.version.cuda is None:
        if _flag("SEGKERNELS_FORCE_CUDA"):
            sys.exit("segkernels: SEGKERNELS_FORCE_CUDA=1 but this torch is a CPU-only build")
        return False
    if _cuda_home is None:
        if _flag("SEGKERNELS_FORCE_CUDA"):
            sys.exit("segkernels: SEGKERNELS_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found")
        return False
    return _flag("SEGKERNELS_FORCE_CUDA") or torch.cuda.is_available()


def _is_testing_source(path: str) -> bool:
    name = os.path.basename(path)
    return name == "testing.cpp" or name.endswith("_testing.cpp")


def _extensions():
    with_cuda = _want_cuda()
    with_testing = _flag("SEGKERNELS_BUILD_TESTING")
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not with_testing:
        cpp_sources = [s for s in cpp_sources if not _is_testing_source(s)]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # FMA contraction stays on (GCC's default): the kd_loss kernels subtract the row maximum
    # before scaling by 1 / T, which is exact at the maximum fused or not. -ffp-contract=off
    # had cost the bfloat16 distillation kernels about 20%.
    cxx_flags = ["-O3", "-fopenmp", "-DSEGKERNELS_BUILD"]
    # Every translation unit sees the same flag: new_output (common_host.h) is inline in all.
    testing_flags = ["-DSEGKERNELS_BUILD_TESTING"] if with_testing else []
    cxx_flags += testing_flags
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DSEGKERNELS_WITH_CUDA"] + testing_flags
        print(
            f"segkernels: building CPU + CUDA kernels ({len(cpp_sources)} C++ and {len(cuda_sources)} CUDA "
            f"sources; CUDA_HOME={_cuda_home}; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
            f"{'; with the test-only ops' if with_testing else ''})"
        )
        ext = CUDAExtension(
            "segkernels._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs + _wheel_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags + ["-DSEGKERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(
            f"segkernels: building CPU kernels only ({len(cpp_sources)} C++ sources"
            f"{'; with the test-only ops' if with_testing else ''})"
        )
        ext = CppExtension(
            "segkernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext]


# The package metadata lives in pyproject.toml (PEP 621); this file only builds the extension.
setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
