"""Optional ahead-of-time build of the C++/CUDA extension (``sparsekern._C``).

By default nothing is compiled at install time: the extension is built by ninja at first use and cached
(``sparsekern/ops/_ext.py``). To build it into the package instead (for a wheel, or a machine without a
compiler at run time)::

    SPARSEKERN_BUILD_EXT=1 pip install --no-build-isolation .      # CPU kernels, + CUDA when torch has it
    SPARSEKERN_BUILD_EXT=1 SPARSEKERN_SKIP_CUDA=1 pip install ...    # CPU kernels only

(``--no-build-isolation`` so the build sees the installed torch; the extension is tied to that torch version.)
"""
import os
from pathlib import Path

from setuptools import setup


def _extension():
    if os.environ.get("SPARSEKERN_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    root = Path("csrc")
    sources = [str(root / "ops.cpp"), *map(str, sorted((root / "cpu").glob("*.cpp")))]
    cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SPARSEKERN_SKIP_CUDA") != "1"
    flags = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]}
    if cuda:
        flags = {key: value + ["-DSPARSEKERN_WITH_CUDA"] for key, value in flags.items()}
        sources += map(str, sorted((root / "cuda").glob("*.cu")))
        ext = CUDAExtension("sparsekern._C", sources, include_dirs=[str(root.resolve())], extra_compile_args=flags)
    else:
        ext = CppExtension("sparsekern._C", sources, include_dirs=[str(root.resolve())],
                           extra_compile_args={"cxx": flags["cxx"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension())
