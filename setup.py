from setuptools import find_packages, setup


import os
import platform

# The balanced-assignment kernel for each x86-64 level, as PyTorch builds its CPU kernels:
# fairseq_base/assignment.py loads the widest one the CPU it runs on supports. Elsewhere (ARM)
# the portable build alone. Keep in step with KERNEL_VARIANTS in fairseq_base/assignment.py.
X86_64_LEVELS = {"_avx2": ["-mavx2", "-mfma", "-mbmi2", "-mf16c"],
                 "_avx512": ["-mavx2", "-mfma", "-mbmi2", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                             "-mavx512dq"]}


def assignment_kernel():
    """The balanced-assignment kernel, compiled at install as fairseq compiles its libbase. Where
    the build has no torch (pip's build isolation), it is compiled at its first use instead.
    No -march=native: the machine that installs may not be the one that trains."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    levels = {"": [], **(X86_64_LEVELS if platform.machine() in ("x86_64", "AMD64") else {})}
    kernels = [CppExtension(f"fairseq_base._auction{suffix}", [f"fairseq_base/csrc/auction{suffix}.cpp"],
                            extra_compile_args=["-O3", "-fopenmp", *flags], extra_link_args=["-fopenmp"])
               for suffix, flags in levels.items()]

    class BuildSideBySide(BuildExtension.with_options(use_ninja=False)):
        """The widths compile at once, one per core (ninja's one build file per folder would not
        allow it): 100 s rather than 140 s on 2 cores."""
        def finalize_options(self):
            super().finalize_options()
            if self.parallel is None:
                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
                self.parallel = min(len(kernels), cores or 1)

    return {"ext_modules": kernels, "cmdclass": {"build_ext": BuildSideBySide}}


setup(
    name="fairseq-base",
    version="0.1.0",
    description="BASE layers (Lewis et al., ICML 2021) as a fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fairseq_base", "fairseq_base.*"]),
    python_requires=">=3.9",
    # Install torch first (scripts/setup.sh does): fairseq-fixed compiles against it.
    # numpy 1 or 2: under numpy 2 the plugin restores the one name fairseq 0.12 still uses
    # (np.compat.long, in fairseq_patches/numpy_compat.py), rather than holding users back on numpy 1.
    install_requires=["torch>=2.0", "fairseq-fixed>=0.12.3.1", "hydra-core>=1.3,<1.4", "numpy>=1.21", "ninja"],
    entry_points={"console_scripts": ["fairseq-base-reshard = fairseq_base.reshard:cli_main",
                                        "fairseq-base-upcycle = fairseq_base.upcycle:cli_main"]},
    **assignment_kernel(),
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "scipy", "tensorboardX"],
                    "repro": ["matplotlib", "regex"]},
)
