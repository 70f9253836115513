"""Build recipe of the CUDA extension ``persona_kernels._cuda`` (used by setup.py).

``cuda_extensions()`` returns the extension when nvcc is found, and ``BuildExt`` (a setuptools
``build_ext``) compiles its ``.cu`` sources with nvcc in parallel and everything else with the
host compiler. The module links libcudart only (no torch headers), so one build serves every
torch version.

Environment:

- ``PERSONA_KERNELS_CUDA``: ``1`` requires the CUDA build (error without nvcc), ``0`` skips it;
  unset builds it whenever nvcc is found.
- ``PERSONA_KERNELS_CUDA_ARCHS``: target archs, e.g. ``"80;90a"`` (default: ``90a`` plus the
  local GPU's arch when ``nvidia-smi`` reports one). ``sm_80`` is the minimum (bf16 tensor cores).
- ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit to use (default: the ``nvcc`` on ``PATH``).
- ``PERSONA_KERNELS_MAX_JOBS`` (or ``MAX_JOBS``): parallel nvcc processes (default: CPU count).
- ``PERSONA_KERNELS_PTXAS_VERBOSE=1``: print ptxas register/spill reports.

With nvcc present, a compile or link error fails the build (so CI catches it); set
``PERSONA_KERNELS_CUDA=0`` to install without the CUDA backend.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from setuptools import Extension
from setuptools.command.build_ext import build_ext as _build_ext

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
EXT_NAME = "persona_kernels._cuda"
DEFAULT_ARCHS = ("90a",)
MIN_ARCH = 80
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden")
HOST_FLAGS = ("-O3", "-std=c++17", "-fvisibility=hidden")


@dataclass(frozen=True)
class CudaToolkit:
    """Where nvcc, the CUDA headers and libcudart live, and nvcc's release."""

    nvcc: Path
    home: Path
    include_dirs: tuple[str, ...]
    library_dir: str
    version: str


class CudaExtension(Extension):
    """An Extension whose ``.cu`` sources ``BuildExt`` compiles with ``nvcc_args``."""

    def __init__(self, name: str, sources: list[str], *, nvcc_args: list[str], toolkit: CudaToolkit, **kwargs):
        super().__init__(name, sources, **kwargs)
        self.nvcc_args = nvcc_args
        self.toolkit = toolkit


def _log(message: str) -> None:
    print(f"persona-kernels: {message}", file=sys.stderr)


def _env_mode() -> str | None:
    value = os.environ.get("PERSONA_KERNELS_CUDA", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    return None


def find_nvcc() -> Path | None:
    """nvcc from CUDA_HOME/CUDA_PATH, else PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return Path(home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return fallback if fallback.is_file() else None


def _dryrun_vars(nvcc: Path) -> dict[str, str]:
    """nvcc's own idea of its paths (TOP, INCLUDES, LIBRARIES): right even when nvcc is a wrapper script."""
    null = os.devnull
    result = subprocess.run([str(nvcc), "-v", "--dryrun", "-x", "cu", "-c", null, "-o", null],
                            capture_output=True, text=True, timeout=60)
    found = {}
    for line in (result.stdout + result.stderr).splitlines():
        match = re.match(r"#\$ (\w+)=(.*)$", line.strip())
        if match and match.group(1) not in found:
            found[match.group(1)] = match.group(2).strip()
    return found


def locate_toolkit(nvcc: Path) -> CudaToolkit:
    """Resolve the toolkit that ``nvcc`` belongs to; raises RuntimeError naming what is missing."""
    dry = _dryrun_vars(nvcc)
    homes = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if "TOP" in dry:
        homes.append(Path(dry["TOP"]).resolve())
    homes.append(nvcc.resolve().parent.parent)
    home = next((h for h in homes if (h / "include" / "cuda_runtime_api.h").is_file()
                 or any(h.glob("targets/*/include/cuda_runtime_api.h"))), None)
    if home is None:
        raise RuntimeError(f"cannot find cuda_runtime_api.h for {nvcc} (looked in {[str(h) for h in homes]}); set CUDA_HOME")
    include_dirs = [str(p.resolve()) for p in [home / "include", *home.glob("targets/*/include")]
                    if (p / "cuda_runtime_api.h").is_file()]
    lib_candidates = [p.strip('"')[2:] for p in dry.get("LIBRARIES", "").split() if p.strip('"').startswith("-L")]
    lib_candidates += [str(home / d) for d in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")]
    library_dir = next((str(Path(d).resolve()) for d in lib_candidates
                        if not d.rstrip("/").endswith("stubs") and list(Path(d).glob("libcudart.so*"))), None)
    if library_dir is None:
        raise RuntimeError(f"cannot find libcudart.so under {home} (looked in {lib_candidates}); set CUDA_HOME")
    version_text = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release (\d+\.\d+)", version_text)
    return CudaToolkit(nvcc, home, tuple(dict.fromkeys(include_dirs)), library_dir, match.group(1) if match else "unknown")


def _local_archs() -> list[str]:
    """Compute capabilities of the local GPUs as nvcc arch names ("90"), from nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip().replace(".", "") for line in out.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]


def target_archs() -> list[str]:
    """Arch names to build for: PERSONA_KERNELS_CUDA_ARCHS, else 90a plus the local GPU's."""
    override = os.environ.get("PERSONA_KERNELS_CUDA_ARCHS", "").strip()
    if override:
        archs = [a.strip().removeprefix("sm_") for a in re.split(r"[;, ]+", override) if a.strip()]
    else:
        archs = list(DEFAULT_ARCHS) + _local_archs()
    for arch in archs:
        if not re.fullmatch(r"\d+[af]?", arch) or int(re.sub(r"\D", "", arch)) < MIN_ARCH:
            raise RuntimeError(f"CUDA arch {arch!r} is not supported: use sm_{MIN_ARCH} or newer, e.g. PERSONA_KERNELS_CUDA_ARCHS='80;90a'")
    # sm_90a machine code runs on every 9.0 device, so a plain 90 next to it adds nothing.
    return [a for i, a in enumerate(archs) if a not in archs[:i] and not (a + "a" in archs and not a.endswith("a"))]


def gencode_flags(archs: list[str]) -> list[str]:
    """One ``-gencode arch=compute_X,code=sm_X`` per arch (machine code only: small, fast builds)."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _source(path: Path) -> str:
    """setuptools wants sources relative to setup.py when building from the repository root."""
    try:
        return str(path.relative_to(Path.cwd())) if Path.cwd().resolve() == ROOT else str(path)
    except ValueError:
        return str(path)


def cuda_extensions(require: bool = False) -> list[Extension]:
    """The ``persona_kernels._cuda`` extension when nvcc is usable, else ``[]`` (with a message).

    ``require`` (or PERSONA_KERNELS_CUDA=1) turns "cannot build" into a RuntimeError.
    """
    mode = _env_mode()
    if mode == "off" and not require:
        _log("PERSONA_KERNELS_CUDA=0: skipping the CUDA extension")
        return []
    require = require or mode == "on"
    nvcc = find_nvcc()
    try:
        if nvcc is None:
            raise RuntimeError("nvcc not found (not on PATH, no CUDA_HOME, no /usr/local/cuda)")
        toolkit = locate_toolkit(nvcc)
        archs = target_archs()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        if require:
            raise RuntimeError(f"persona-kernels: cannot build the CUDA extension: {error}") from error
        _log(f"not building the CUDA extension ({error}); the 'cuda' backend will be unavailable. "
             "Set CUDA_HOME, or PERSONA_KERNELS_CUDA=1 to make this an error.")
        return []
    import pybind11

    cu_sources = sorted((CSRC / "masked_ffn").glob("*.cu"))
    headers = sorted(p for pattern in ("*.h", "*.cuh") for p in (CSRC / "masked_ffn").glob(pattern))
    _log(f"building {EXT_NAME} with CUDA {toolkit.version} ({toolkit.nvcc}) for sm_{', sm_'.join(archs)}")
    return [CudaExtension(
        EXT_NAME,
        sources=[_source(CSRC / "cuda_bindings.cpp")] + [_source(p) for p in cu_sources],
        nvcc_args=[*NVCC_FLAGS, *gencode_flags(archs), f"-I{CSRC}", f"-I{CSRC / 'masked_ffn'}"],
        toolkit=toolkit,
        include_dirs=[pybind11.get_include(), str(CSRC), *toolkit.include_dirs],
        library_dirs=[toolkit.library_dir],
        runtime_library_dirs=[toolkit.library_dir],
        libraries=["cudart"],
        define_macros=[("PERSONA_KERNELS_CUDA_ARCHS", f'"{";".join(archs)}"'),
                       ("PERSONA_KERNELS_NVCC_VERSION", f'"{toolkit.version}"')],
        extra_compile_args=list(HOST_FLAGS),
        depends=[_source(p) for p in [*cu_sources, *headers]],
        language="c++",
    )]


def _max_jobs() -> int:
    for var in ("PERSONA_KERNELS_MAX_JOBS", "MAX_JOBS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return os.cpu_count() or 1


class BuildExt(_build_ext):
    """build_ext that compiles the ``.cu`` sources of a CudaExtension with nvcc, in parallel.

    Objects go to ``build_temp/cuda-<hash of the nvcc command>/``, so changing archs or flags
    never reuses stale objects; an object is rebuilt when older than its source or any header.
    Other extensions (and the host ``.cpp`` sources) take the normal setuptools path.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        cu = [s for s in ext.sources if s.endswith(".cu")]
        objects = self._compile_cu(ext, cu)
        sources, extra_objects = ext.sources, ext.extra_objects
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = list(extra_objects or []) + objects
        try:
            super().build_extension(ext)
        finally:
            ext.sources, ext.extra_objects = sources, extra_objects

    def _compile_cu(self, ext: CudaExtension, sources: list[str]) -> list[str]:
        command = [str(ext.toolkit.nvcc), *ext.nvcc_args]
        if os.environ.get("PERSONA_KERNELS_PTXAS_VERBOSE") == "1":
            command += ["-Xptxas", "-v"]
        digest = hashlib.sha1(" ".join(command).encode()).hexdigest()[:12]
        out_dir = Path(self.build_temp) / f"cuda-{digest}"
        out_dir.mkdir(parents=True, exist_ok=True)
        newest_header = max((os.path.getmtime(h) for h in ext.depends if not h.endswith(".cu")), default=0.0)
        jobs = []
        for source in sources:
            obj = out_dir / (Path(source).stem + ".o")
            stale = (self.force or not obj.exists()
                     or obj.stat().st_mtime < max(os.path.getmtime(source), newest_header))
            jobs.append((source, obj, stale))
        todo = [(s, o) for s, o, stale in jobs if stale]
        if todo:
            _log(f"nvcc: compiling {len(todo)} CUDA file(s) with {min(_max_jobs(), len(todo))} job(s)")
            with ThreadPoolExecutor(max_workers=_max_jobs()) as pool:
                results = list(pool.map(lambda so: self._nvcc(command, *so), todo))
            failures = [r for r in results if r is not None]
            if failures:
                raise RuntimeError("persona-kernels: nvcc failed (set PERSONA_KERNELS_CUDA=0 to install without "
                                   "the CUDA backend):\n" + "\n\n".join(failures))
        return [str(o) for _, o, _ in jobs]

    @staticmethod
    def _nvcc(command: list[str], source: str, obj: Path) -> str | None:
        """Compile one file; the error report on failure, else None."""
        full = [*command, "-c", source, "-o", str(obj)]
        print(" ".join(full), file=sys.stderr)
        result = subprocess.run(full, capture_output=True, text=True)
        if result.stdout or result.stderr:
            print(result.stdout + result.stderr, file=sys.stderr)
        if result.returncode != 0:
            obj.unlink(missing_ok=True)
            return f"{' '.join(full)}\n{result.stdout}{result.stderr}"
        return None


def build_standalone(out_dir: str | os.PathLike) -> Path:
    """Build the extension into ``out_dir`` outside setup.py (for tests); returns the .so path."""
    from setuptools import Distribution

    extensions = cuda_extensions(require=True)
    dist = Distribution({"name": "persona-kernels-cuda", "ext_modules": extensions})
    command = BuildExt(dist)
    command.build_lib = str(out_dir)
    command.build_temp = str(Path(out_dir) / "temp")
    command.ensure_finalized()
    command.run()
    return Path(command.get_ext_fullpath(EXT_NAME))
