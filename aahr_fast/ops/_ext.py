"""JIT build and one-time loading of the C++ (and, on CUDA torch, CUDA) extension in ``csrc/``.

The extension is one shared library, ``aahr_fast_ops``, registering every op in the single torch
namespace ``aahr_fast`` (``torch.ops.aahr_fast.*``). ``csrc/aahr_ops.cpp`` holds the one
``TORCH_LIBRARY(aahr_fast, m)``; other source files add kernels with ``TORCH_LIBRARY_IMPL(aahr_fast, CPU, m)``
(and may add schemas with ``TORCH_LIBRARY_FRAGMENT(aahr_fast, m)``).

Sources are discovered, so new files need no change here:
``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` always; ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp`` only when torch
has CUDA (:func:`cuda_sources`, the hook for the CUDA backend; extra nvcc flags go in
:data:`EXTRA_CUDA_CFLAGS`). The source folder is the installed package ``aahr_fast._csrc`` (the repo's
``csrc/``).

Build: ``torch.utils.cpp_extension.load`` + ninja with ``-O3 -fopenmp`` (``-fopenmp`` also at link
time, or ``at::parallel_for`` runs on one thread) and the SIMD flags of :func:`simd_level` (for
``at::vec::Vectorized``): ``-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -DCPU_CAPABILITY=AVX512`` when
``/proc/cpuinfo`` lists those subsets, else ``-mavx2 -mfma -DCPU_CAPABILITY=AVX2`` when it lists avx2 and fma;
``AAHR_EXT_SIMD=avx512|avx2|none`` forces one. The build
folder is ``$TORCH_EXTENSIONS_DIR`` (or ``~/.cache/aahr_fast/torch_extensions``) /
``aahr_fast_ops-torch<version>-<python>-<hash of sources + flags>``, so a source edit gives a new folder
and an existing ``aahr_fast_ops.so`` there is loaded directly (no compiler, no ninja).

The compiler runs in a child process with a timeout (``AAHR_EXT_BUILD_TIMEOUT`` seconds, default 900), so
a hung build or a lock held by a dead build never hangs the caller: a ``lock`` file older than
``AAHR_EXT_LOCK_STALE_MIN`` minutes (default 10) is removed with a message, a build past the timeout is
killed, and either way the caller gets :class:`ExtensionBuildError` (the dispatcher then warns once and
uses the reference). ``AAHR_DISABLE_EXT=1`` disables the extension (reference everywhere by default).
If the CUDA sources fail to build or load, the library is rebuilt CPU-only (the cpp backend survives a
broken CUDA toolchain; :func:`extension_error` with ``cuda=True`` reports the CUDA failure).

The library is loaded at most once per process. If the ``aahr_fast`` namespace is already registered
(e.g. by an installed build), it is used as is and no second library is loaded (two libraries defining
the same ``TORCH_LIBRARY`` namespace abort the process).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..utils.errors import AAHRError

LIB_NAME = "aahr_fast_ops"
NAMESPACE = "aahr_fast"
#: extra nvcc flags for CUDA sources (the CUDA backend may extend this list before the first load).
EXTRA_CUDA_CFLAGS: list[str] = ["-O3"]


class ExtensionBuildError(AAHRError, RuntimeError):
    """The C++/CUDA extension could not be built or loaded (the message says why and where)."""


def default_source_dir() -> Path:
    """Folder of the installed ``aahr_fast._csrc`` package (the repository's ``csrc/``)."""
    import aahr_fast._csrc as csrc

    return Path(csrc.__file__).resolve().parent


def default_build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` if set, else ``$XDG_CACHE_HOME`` (or ~/.cache) ``/aahr_fast/torch_extensions``."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "aahr_fast" / "torch_extensions"


def _cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: the AVX-512 subsets ``at::vec::Vectorized`` needs for its 512-bit code (as PyTorch's own AVX512 kernels)
_AVX512_SUBSETS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")

#: C++ flags per SIMD level; ``CPU_CAPABILITY_*`` selects the matching ``at::vec::Vectorized`` width
SIMD_CFLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "none": [],
}


def simd_level() -> str:
    """The SIMD level the extension is built for: ``"avx512"``, ``"avx2"`` or ``"none"``.

    ``AAHR_EXT_SIMD`` (one of those names) forces a level; otherwise the widest one this CPU supports
    (``/proc/cpuinfo``): avx512 needs avx512f/bw/vl/dq and fma, avx2 needs avx2 and fma.

    Raises:
        ExtensionBuildError: ``AAHR_EXT_SIMD`` is set to something else (the dispatcher then warns once and
            uses the reference, as for any failed build).
    """
    forced = os.environ.get("AAHR_EXT_SIMD", "").strip().lower()
    if forced:
        if forced not in SIMD_CFLAGS:
            raise ExtensionBuildError(f"AAHR_EXT_SIMD={forced!r}: expected one of {', '.join(SIMD_CFLAGS)}")
        return forced
    flags = _cpu_flags()
    if "fma" in flags and all(f in flags for f in _AVX512_SUBSETS):
        return "avx512"
    if "fma" in flags and "avx2" in flags:
        return "avx2"
    return "none"


def torch_has_cuda() -> bool:
    """True when this torch build has CUDA and a CUDA toolkit was found (CUDA sources can build)."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def cpu_sources(source_dir: Path) -> list[Path]:
    """``csrc/*.cpp`` and ``csrc/cpu/*.cpp``, sorted."""
    return sorted(source_dir.glob("*.cpp")) + sorted((source_dir / "cpu").glob("*.cpp"))


def cuda_sources(source_dir: Path) -> list[Path]:
    """``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``, sorted (compiled only when :func:`torch_has_cuda`)."""
    cuda = source_dir / "cuda"
    return sorted(cuda.glob("*.cu")) + sorted(cuda.glob("*.cpp"))


def _headers(source_dir: Path) -> list[Path]:
    pats = ("*.h", "cpu/*.h", "cpu/*.hpp", "cuda/*.h", "cuda/*.cuh")
    return sorted(p for pat in pats for p in source_dir.glob(pat))


class ExtensionLoader:
    """Builds (in a child process, with a timeout) and loads one extension library, once.

    Args:
        source_dir: the ``csrc`` folder (default :func:`default_source_dir`).
        build_root: parent of the build folders (default :func:`default_build_root`).
        name: library name (``aahr_fast_ops``).
        with_cuda: compile CUDA sources (default: :func:`torch_has_cuda` and any CUDA source present).
    """

    def __init__(
        self,
        source_dir: Optional[os.PathLike] = None,
        build_root: Optional[os.PathLike] = None,
        name: str = LIB_NAME,
        with_cuda: Optional[bool] = None,
    ) -> None:
        self.source_dir = Path(source_dir) if source_dir is not None else default_source_dir()
        self._build_root = Path(build_root) if build_root is not None else None
        self.name = name
        if with_cuda is None:
            with_cuda = torch_has_cuda() and bool(cuda_sources(self.source_dir))
        self.with_cuda = with_cuda
        #: why the CUDA part is missing after a failed CUDA build (the CPU part then still loads)
        self.cuda_error: Optional[str] = None
        self._lock = threading.Lock()
        self._state: Optional[tuple[Optional[Path], Optional[str]]] = None  # (library, error)

    # ---------------------------------------------------------------- configuration
    def sources(self) -> list[Path]:
        """Every source file that goes into the library."""
        srcs = cpu_sources(self.source_dir)
        if self.with_cuda:
            srcs += cuda_sources(self.source_dir)
        return srcs

    def cflags(self) -> list[str]:
        """C++ compiler flags (see module docstring)."""
        flags = ["-O3", "-fopenmp"] + SIMD_CFLAGS[simd_level()]
        if self.with_cuda:
            flags.append("-DAAHR_WITH_CUDA")
        return flags

    def ldflags(self) -> list[str]:
        """Linker flags."""
        return ["-fopenmp"]

    def key(self) -> str:
        """Build-folder name: torch version, python tag and a hash of sources, headers and flags."""
        h = hashlib.sha256()
        for p in self.sources() + _headers(self.source_dir):
            h.update(str(p.relative_to(self.source_dir)).encode())
            h.update(p.read_bytes())
        h.update(repr((self.cflags(), self.ldflags(), self.with_cuda, EXTRA_CUDA_CFLAGS)).encode())
        tv = torch.__version__.replace("+", "_")
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        return f"{self.name}-torch{tv}-{py}-{h.hexdigest()[:16]}"

    @property
    def build_root(self) -> Path:
        return self._build_root if self._build_root is not None else default_build_root()

    @property
    def build_dir(self) -> Path:
        return self.build_root / self.key()

    @property
    def library_path(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    @property
    def stamp_path(self) -> Path:
        """Written by the build child after a complete, loadable build (guards half-written .so files)."""
        return self.build_dir / f"{self.name}.ok"

    # ---------------------------------------------------------------- build + load
    def load(self) -> Optional[Path]:
        """Build if needed and load the library into this process, once.

        Returns:
            Path of the loaded library, or None when the namespace was already registered by another
            library (that one is used).
        Raises:
            ExtensionBuildError: disabled, no sources, compiler error, timeout, or load failure
            (the same error again on later calls; the build is not retried in this process).
        """
        with self._lock:
            if self._state is None:
                try:
                    self._state = (self._load_uncached(), None)
                except ExtensionBuildError as exc:
                    self._state = (None, str(exc))
            lib, err = self._state
        if err is not None:
            raise ExtensionBuildError(err)
        return lib

    def error(self) -> Optional[str]:
        """None when the library is loaded (building/loading it now if needed), else the reason."""
        try:
            self.load()
        except ExtensionBuildError as exc:
            return str(exc)
        return None

    def _load_uncached(self) -> Optional[Path]:
        if os.environ.get("AAHR_DISABLE_EXT", "") not in ("", "0"):
            raise ExtensionBuildError("disabled by AAHR_DISABLE_EXT")
        is_default_source = self.source_dir == default_source_dir()
        if is_default_source and _namespace_loaded():
            return None  # e.g. an installed build already registered the namespace: use it
        if not self.sources():
            raise ExtensionBuildError(f"no C++ sources found under {self.source_dir}")
        try:
            return self._build_and_load()
        except ExtensionBuildError as exc:
            if not self.with_cuda:
                raise
            # a broken CUDA toolchain must not take the C++ CPU backend down with it
            self.cuda_error = f"the CUDA part of the extension failed, using a CPU-only build: {exc}"
            print(f"aahr_fast: {self.cuda_error}", file=sys.stderr)
            self.with_cuda = False
            return self._build_and_load()

    def _build_and_load(self) -> Path:
        lib = self.library_path
        if not (lib.is_file() and self.stamp_path.is_file()):
            self._build()
        if not lib.is_file():
            raise ExtensionBuildError(f"build finished but {lib} is missing")
        if _namespace_loaded():
            # loading a second library that defines TORCH_LIBRARY(aahr_fast) would abort the process
            raise ExtensionBuildError(
                f"built {lib}, but the {NAMESPACE} op namespace is already registered in this process "
                "by another library; not loading a second one"
            )
        try:
            torch.ops.load_library(str(lib))
        except Exception as exc:
            raise ExtensionBuildError(f"loading {lib} failed: {type(exc).__name__}: {exc}") from exc
        return lib

    def _build(self) -> None:
        build_dir = self.build_dir
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        stale_min = float(os.environ.get("AAHR_EXT_LOCK_STALE_MIN", "10"))
        timeout = float(os.environ.get("AAHR_EXT_BUILD_TIMEOUT", "900"))
        if lock.exists():
            age_min = (time.time() - lock.stat().st_mtime) / 60.0
            if age_min > stale_min:
                print(
                    f"aahr_fast: removing stale build lock {lock} ({age_min:.1f} min old > "
                    f"AAHR_EXT_LOCK_STALE_MIN={stale_min:g}); a previous build was probably killed",
                    file=sys.stderr,
                )
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
        lock_existed = lock.exists()
        cmd = [
            sys.executable, "-m", "aahr_fast.ops._ext", "build",
            "--name", self.name, "--build-dir", str(build_dir),
            "--cflags=" + " ".join(self.cflags()), "--ldflags=" + " ".join(self.ldflags()),
        ]
        if self.with_cuda:
            cmd += ["--cuda-cflags=" + " ".join(EXTRA_CUDA_CFLAGS)]
        cmd += ["--"] + [str(p) for p in self.sources()]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if not lock_existed:  # our killed child held it
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
            why = (
                f"another process holds {lock} (remove it if no build is running)"
                if lock_existed else "the compiler did not finish"
            )
            raise ExtensionBuildError(
                f"building {self.name} in {build_dir} exceeded AAHR_EXT_BUILD_TIMEOUT={timeout:g}s: {why}"
            ) from None
        if proc.returncode != 0:
            tail = "\n".join(out.strip().splitlines()[-40:])
            raise ExtensionBuildError(
                f"building {self.name} from {self.source_dir} failed (exit {proc.returncode}); "
                f"build folder {build_dir}; compiler output (last lines):\n{tail}"
            )


def _namespace_loaded() -> bool:
    """True when some library already registered ``torch.ops.aahr_fast.build_info``."""
    try:
        getattr(torch.ops.aahr_fast, "build_info")
    except (AttributeError, RuntimeError):
        return False
    return True


_DEFAULT: Optional[ExtensionLoader] = None
_DEFAULT_LOCK = threading.Lock()


def default_loader() -> ExtensionLoader:
    """The process-wide loader for the installed ``csrc/`` sources."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = ExtensionLoader()
        return _DEFAULT


@contextlib.contextmanager
def use_loader(loader: ExtensionLoader) -> Iterator[ExtensionLoader]:
    """Temporarily make ``loader`` the process-wide loader (tests: a broken source folder)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        old, _DEFAULT = _DEFAULT, loader
    try:
        yield loader
    finally:
        with _DEFAULT_LOCK:
            _DEFAULT = old


def load_extension() -> Optional[Path]:
    """Build/load the default extension once; see :meth:`ExtensionLoader.load`."""
    return default_loader().load()


#: dtypes the C++ CPU kernels (``csrc/cpu/*.cpp``) are compiled for; the cpp glue runs others in the reference.
CPP_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


def ops_namespace():
    """Build/load the default extension once (:func:`load_extension`) and return ``torch.ops.aahr_fast``.

    The one accessor the backend glue modules (``_cpp_*.py``, ``*_cuda.py``) use before calling a kernel.

    Raises:
        ExtensionBuildError: the extension cannot be built or loaded (as :func:`load_extension`).
    """
    load_extension()
    return torch.ops.aahr_fast


def extension_error(cuda: bool = False) -> Optional[str]:
    """None when the extension (with its CUDA part if ``cuda``) is usable, else the reason (a string).

    The first call may build the extension (tens of seconds, once per source version). If the CUDA
    sources fail to build, the library is rebuilt without them: ``cuda=False`` is then fine and
    ``cuda=True`` reports the CUDA failure.
    """
    loader = default_loader()
    if cuda:
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        if not torch_has_cuda():
            return "no CUDA toolkit found (CUDA_HOME) to build the CUDA sources"
        if not cuda_sources(loader.source_dir):
            return f"no CUDA sources in {loader.source_dir / 'cuda'}"
    err = loader.error()
    if err is not None:
        return err
    if cuda and loader.cuda_error is not None:
        return loader.cuda_error
    if cuda and not loader.with_cuda:
        return "the loaded library was built without CUDA sources"
    return None


def build_info() -> str:
    """``torch.ops.aahr_fast.build_info()`` of the loaded library (loads it first)."""
    load_extension()
    return str(torch.ops.aahr_fast.build_info())


def _main(argv: Optional[list[str]] = None) -> int:
    """Child-process entry: ``python -m aahr_fast.ops._ext build ... -- sources``."""
    ap = argparse.ArgumentParser(prog="python -m aahr_fast.ops._ext")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--name", required=True)
    b.add_argument("--build-dir", required=True)
    b.add_argument("--cflags", default="")
    b.add_argument("--ldflags", default="")
    b.add_argument("--cuda-cflags", default=None)
    b.add_argument("sources", nargs="+")
    args = ap.parse_args(argv)
    from torch.utils.cpp_extension import load

    kwargs = {}
    if args.cuda_cflags is not None:
        kwargs = {"with_cuda": True, "extra_cuda_cflags": args.cuda_cflags.split()}
    load(
        name=args.name,
        sources=args.sources,
        extra_cflags=args.cflags.split(),
        extra_ldflags=args.ldflags.split(),
        build_directory=args.build_dir,
        is_python_module=False,
        verbose=True,
        **kwargs,
    )
    from ..utils.io import atomic_write

    with atomic_write(Path(args.build_dir) / f"{args.name}.ok", "w") as fh:
        fh.write("ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
