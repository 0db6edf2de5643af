"""Build script. Metadata lives in pyproject.toml; this file exists for the C++ extension
(csrc/), which compiles against the torch already installed: install with
``pip install --no-build-isolation -e ".[dev]"`` after installing torch.

The extension ``dpo_kernels._C`` (the CPU backend) is optional: when torch cannot be imported at
build time, when ``DPO_KERNELS_NO_EXTENSION=1`` is set, or when the compile fails, the package
installs without it and ``backend="auto"`` falls back to the reference backend on CPU tensors.

The kernels (csrc/token_logprobs_kernel.h) are compiled once per CPU capability, like ATen's own
kernels: a portable default build, plus AVX2 and AVX512 builds on x86-64 whose instruction-set
flags apply to their own translation unit only (never ``-march=native``); the library picks one at
run time from ``at::get_cpu_capability()`` (which honours ``ATEN_CPU_CAPABILITY``).
"""
import os
import platform
import sys
import warnings

from setuptools import setup

# Per-file flags for the capability builds: source file name -> extra compiler flags.
_CAPABILITY_FLAGS = {
    "kernel_default.cpp": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "kernel_avx2.cpp": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "kernel_avx512.cpp": [
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
    ],
}


def _x86_64_gcc_like() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def _extension_setup():
    if os.environ.get("DPO_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing or broken: install the pure-Python package
        warnings.warn(f"dpo_kernels: torch is not importable at build time ({exc}); "
                      "building without the C++ CPU backend")
        return {}

    sources = ["csrc/ops.cpp", "csrc/capability/kernel_default.cpp"]
    macros = []
    if _x86_64_gcc_like():
        sources += ["csrc/capability/kernel_avx2.cpp", "csrc/capability/kernel_avx512.cpp"]
        macros += [("DPO_KERNELS_HAVE_AVX2", None), ("DPO_KERNELS_HAVE_AVX512", None)]
    if sys.platform == "win32":
        cxx_flags, link_flags = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: at::parallel_for runs serially
        cxx_flags, link_flags = ["-O3"], []
    else:
        cxx_flags, link_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"], ["-fopenmp"]

    def _warn_failed(exc):
        warnings.warn(
            f"dpo_kernels: building the C++ CPU backend failed ({type(exc).__name__}: {exc}); installing "
            "without it (backend='auto' falls back to 'reference' on CPU). Rebuild with "
            "`pip install --no-build-isolation -e .` once the toolchain is fixed."
        )

    class BuildOptionalExtension(BuildExtension):
        """BuildExtension with per-file capability flags, that never fails the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # e.g. no usable compiler: torch's ABI check fails before compiling
                _warn_failed(exc)

        def get_outputs(self):  # nothing to install when the build failed
            return [path for path in super().get_outputs() if os.path.exists(path)]

        def build_extension(self, ext):
            original_compile = self.compiler._compile

            def compile_with_capability(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                extra = _CAPABILITY_FLAGS.get(os.path.basename(src), [])
                if extra:
                    if isinstance(extra_postargs, dict):
                        extra_postargs = {**extra_postargs, "cxx": list(extra_postargs["cxx"]) + extra}
                    else:
                        extra_postargs = list(extra_postargs or []) + extra
                return original_compile(obj, src, ext_, cc_args, extra_postargs, pp_opts)

            self.compiler._compile = compile_with_capability
            try:
                super().build_extension(ext)
            except Exception as exc:  # compile or link error: install without the extension
                _warn_failed(exc)
            finally:
                self.compiler._compile = original_compile

    ext = CppExtension(
        name="dpo_kernels._C",
        sources=sources,
        depends=["csrc/token_logprobs.h", "csrc/token_logprobs_kernel.h"],  # rebuild when they change
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
    # No ninja: its single flag set per extension cannot express the per-file capability flags.
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildOptionalExtension.with_options(use_ninja=False)}}


setup(**_extension_setup())
