"""Build script of contsup_fast (greedy local learning with context supply, arXiv 2312.07636).

The package is pure Python plus one OPTIONAL compiled extension, ``contsup_fast._C``
(csrc/: C++ CPU kernels, and CUDA kernels when a CUDA toolkit is found), which backs
``backend="native"``. Installing never fails because of the extension: when it cannot be
built the package is installed without it, one warning says why, and the other backends
("torch", "triton") keep working.

Typical installs::

    pip install --no-build-isolation -e .        # dev install, builds against your torch
    pip install --no-build-isolation -e ".[vision,triton]"
    pip install --no-build-isolation -e ".[timm]"     # timm models: --model timm:<name>

Environment variables:

``CONTSUP_NO_EXT=1``      skip the extension entirely (pure-Python install).
``CONTSUP_NO_CUDA=1``     build the CPU-only extension even if a CUDA toolkit is found.
``CUDA_HOME``             CUDA toolkit to use (must contain bin/nvcc); otherwise
                          /usr/local/cuda is used if it has bin/nvcc. (A bare ``nvcc``
                          on PATH is deliberately NOT used to guess the toolkit root.)
``TORCH_CUDA_ARCH_LIST``  GPU architectures to compile for; default "8.0;9.0+PTX"
                          (A100, H100, PTX for newer GPUs).
``MAX_JOBS``              parallel compile jobs (ninja).

Extras: ``vision`` (torchvision, needed by the torchvision models in
``contsup_fast.models``), ``timm`` (timm models, ``build_model("timm:<name>")`` and
``--model timm:<name>``), ``triton`` (Triton kernels, ``backend="triton"``), ``test``.
"""
from __future__ import annotations

import os
import sys
import time

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _plain_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "contsup_fast._C"
# csrc/: op_*.cpp the device-agnostic operators (op_registration.cpp registers them),
# cpu_*.cpp their CPU passes, cuda_*.cu their CUDA passes (cuda_emulation.* is test-only)
CPP_SOURCES = [
    "csrc/op_registration.cpp",
    "csrc/op_bn_relu_pool.cpp",
    "csrc/op_residual_context.cpp",
    "csrc/op_image_context.cpp",
    "csrc/cpu_bn_pool.cpp",
    "csrc/cpu_residual_context.cpp",
    "csrc/cpu_image_context.cpp",
]
CUDA_SOURCES = ["csrc/cuda_bn_pool.cu", "csrc/cuda_residual_context.cu", "csrc/cuda_image_context.cu"]
CUDA_ONLY_LIBS = ("cudart", "c10_cuda", "torch_cuda")


def _warn(msg: str) -> None:
    bar = "=" * 78
    sys.stderr.write(f"\n{bar}\nWARNING (contsup_fast): {msg}\n{bar}\n\n")
    sys.stderr.flush()


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA toolkit root: $CUDA_HOME (or $CUDA_PATH) if it has bin/nvcc, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if os.path.isfile(os.path.join(path, "bin", "nvcc")):
                return path
            _warn(f"{var}={path} has no bin/nvcc; building the CPU-only extension.")
            return None
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _make_extensions():
    """(ext_modules, cmdclass, description) -- never raises."""
    if _truthy("CONTSUP_NO_EXT"):
        sys.stderr.write("contsup_fast: CONTSUP_NO_EXT=1, skipping the native extension.\n")
        return [], {}, "skipped (CONTSUP_NO_EXT=1)"
    # commands that do not build anything (egg_info, sdist, ...) must not need torch
    try:
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken torch install
        _warn(
            f"torch is not importable at build time ({exc!r}); installing WITHOUT the native "
            "extension contsup_fast._C (backend='native' unavailable). With pip, reinstall "
            "with --no-build-isolation so the build sees your installed torch."
        )
        return [], {}, "skipped (no torch)"

    cuda_home = None
    if not _truthy("CONTSUP_NO_CUDA") and torch.version.cuda:
        cuda_home = _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension resolves CUDA_HOME at import time: set it first, and
        # patch the module attribute too in case it was imported already.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    cxx_flags = ["-O3", "-g0"]  # -g0: no debug info (smaller .so, faster build)
    if cuda_home:
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            CPP_SOURCES + CUDA_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("CONTSUP_WITH_CUDA", None)],
            # no --use_fast_math: BatchNorm statistics need IEEE division/sqrt
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
        kind = f"CPU+CUDA (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
    else:
        ext = cpp_extension.CppExtension(
            EXT_NAME,
            CPP_SOURCES,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
        kind = "CPU-only"

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """BuildExtension whose failure never fails the install.

        If the CUDA build fails, the CPU-only extension is tried once; if that fails too
        (or the CPU-only build fails), the package is installed without contsup_fast._C
        and ONE warning explains why.
        """

        _gave_up = False

        def _give_up(self, exc):
            # setuptools then skips the missing output instead of failing (e.g. when an
            # editable install copies the built extension into the source tree)
            for e in self.extensions:
                e.optional = True
            if not self._gave_up:
                self._gave_up = True
                _warn(
                    f"building the native extension {EXT_NAME} failed ({_short(exc)}); "
                    "contsup_fast is installed WITHOUT it (backend='native' unavailable; 'torch' and "
                    "'triton' still work). Re-run pip with -v to see the compiler output."
                )

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler probing etc. before any extension is built
                self._give_up(exc)

        def build_extensions(self):
            t0 = time.time()
            try:
                super().build_extensions()
                sys.stderr.write(f"contsup_fast: built {EXT_NAME} [{kind}] in {time.time() - t0:.0f} s\n")
                return
            except Exception as exc:  # CompileError, LinkError, RuntimeError from ninja, ...
                first_error = exc
            if any(str(s).endswith(".cu") for e in self.extensions for s in e.sources):
                for e in self.extensions:
                    _strip_cuda(e)
                try:
                    super().build_extensions()
                    _warn(
                        f"the CUDA kernels of {EXT_NAME} failed to compile ({_short(first_error)}); "
                        "built the CPU-only extension instead (backend='native' runs on CPU only). "
                        "Check CUDA_HOME / TORCH_CUDA_ARCH_LIST, or see the build log with pip -v."
                    )
                    return
                except Exception as exc2:
                    first_error = exc2
            self._give_up(first_error)

        def get_outputs(self):
            # an extension that failed to build must not be reported as an output
            return [p for p in super().get_outputs() if os.path.exists(p)]

    def _strip_cuda(e):
        e.sources = [s for s in e.sources if not str(s).endswith(".cu")]
        e.define_macros = [d for d in e.define_macros if d[0] != "CONTSUP_WITH_CUDA"]
        e.libraries = [lib for lib in e.libraries if lib not in CUDA_ONLY_LIBS]
        e.library_dirs = [d for d in e.library_dirs if not (cuda_home and str(d).startswith(cuda_home))]
        if isinstance(e.extra_compile_args, dict):
            e.extra_compile_args.pop("nvcc", None)

    return [ext], {"build_ext": OptionalBuildExt}, kind


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _packages():
    found = set(find_packages(include=["contsup_fast", "contsup_fast.*"]))
    found.add("contsup_fast")
    # top-level folder kernels/ is installed as contsup_fast.kernels (never as `kernels`)
    found.add("contsup_fast.kernels")
    found.update(
        "contsup_fast.kernels." + p for p in find_packages(where=os.path.join(ROOT, "kernels"))
    )
    return sorted(found)


def _package_dir():
    pkg_dir = {"contsup_fast.kernels": "kernels"}
    for p in find_packages(where=os.path.join(ROOT, "kernels")):
        pkg_dir["contsup_fast.kernels." + p] = os.path.join("kernels", *p.split("."))
    return pkg_dir


ext_modules, cmdclass, _ = _make_extensions()

setup(
    name="contsup_fast",
    version="0.1.0",
    description=(
        "Fast greedy local learning with context supply (ContSup, arXiv 2312.07636) for "
        "PyTorch: fused boundary ops (Triton, C++/CUDA) and training tools."
    ),
    long_description=__doc__,
    long_description_content_type="text/plain",
    license="MIT",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir=_package_dir(),
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton"],
        "vision": ["torchvision"],
        "timm": ["timm", "torchvision"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "contsup-train = contsup_fast.train:main",
            "contsup-memory = contsup_fast.memory:main",
            "contsup-check = contsup_fast.check:cli",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
