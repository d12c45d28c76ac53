"""Build script. The package is pure Python unless GEMS_BUILD_CUDA=1 asks for the CUDA extension
(csrc/), which needs a CUDA build of torch and nvcc; without it the CUDA backend is compiled just in
time on first use, or reported unavailable."""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("GEMS_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # needs torch at build time

    sources = ["csrc/binding.cpp"] + sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cu")
    )
    ext_modules.append(
        CUDAExtension(
            "gems._C",
            sources,
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90a,code=sm_90a"],
            },
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
