"""Build script. The package is pure Python unless GEMS_BUILD_CUDA=1 asks for the CUDA extension
(csrc/), which needs a CUDA build of torch and nvcc; without it the CUDA backend is compiled just in
time on first use (gems.cuda_backend.load), or reported unavailable (gems.cuda_backend.available).

    GEMS_BUILD_CUDA=1 pip install --no-build-isolation -e .      # builds gems._C with ninja
    GEMS_CUDA_ARCHS="80;90a"                                      # optional: arches to build (default)
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("GEMS_BUILD_CUDA") == "1":
    import torch  # needs torch at build time (use --no-build-isolation)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError(
            f"GEMS_BUILD_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} is CPU-only. "
            "Install without GEMS_BUILD_CUDA for the pure-Python package."
        )
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    # relative paths: setuptools wants sources relative to setup.py
    sources = ["csrc/binding.cpp"] + sorted(f"csrc/{f}" for f in os.listdir(csrc) if f.endswith(".cu"))
    archs = [a for a in os.environ.get("GEMS_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext_modules.append(
        CUDAExtension(
            "gems._C",
            sources,
            include_dirs=[csrc],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17"],
                # no --use_fast_math: the Adam and update kernels mirror torch's IEEE roundings
                "nvcc": ["-O3", "-std=c++17", *gencode],
            },
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
