"""Builds edgelm's optional CPU kernels (edgelm/kernels/csrc) with the machine's C compiler.

Everything else is declared in pyproject.toml. When no compiler is available the build of the extension
fails softly (optional=True) and edgelm runs on its portable PyTorch path.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(
        "edgelm.kernels._native",
        sources=["edgelm/kernels/csrc/module.c", "edgelm/kernels/csrc/kernels.c"],
        # No -march=native: the SIMD paths are chosen per function at run time, so the build is portable.
        # No errno from expf/sqrtf: lets the compiler vectorize the loops that call them.
        extra_compile_args=["-O3", "-pthread", "-fvisibility=hidden", "-fno-math-errno"],
        extra_link_args=["-pthread"],
        libraries=["m"],
        optional=True,
    )
])
