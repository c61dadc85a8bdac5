"""Build step for the native sparse execution provider; metadata lives in pyproject.toml.

The library is an optional extension: when it cannot be built (no C++ compiler, ORT headers
unreachable) pip still installs the pure-Python tool, prints a warning, and leaves
onnxslim_cnn/runtime/_sparse_ep.BUILD_FAILED.txt saying why (onnxslim_cnn.runtime quotes it).
Why setuptools rather than scikit-build-core: see runtime/build_ep.py.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "runtime" / "src"


def _load_build_module():
    # By path, not as onnxslim_cnn.runtime.build_ep: importing the package needs onnx & co.,
    # which the isolated build environment does not have.
    spec = importlib.util.spec_from_file_location("_onnxslim_build_ep", ROOT / "runtime" / "build_ep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message: str) -> None:
    bar = "=" * 78
    sys.stderr.write(f"\n{bar}\nWARNING onnxslim-cnn: {message}\n{bar}\n\n")


class BuildSparseEp(build_ext):
    """Builds the ORT plugin library with a direct compiler call (it is no Python module)."""

    def get_ext_filename(self, fullname):
        base = fullname.split(".")
        return os.path.join(*base) + (".dll" if sys.platform == "win32" else ".so")

    @staticmethod
    def _siblings(library: Path) -> "list[Path]":
        """What a build leaves beside the EP library: its failure note, the optional CUDA library
        and that one's failure note."""
        cuda = library.with_name("_sparse_cuda" + library.suffix)
        return [library.with_name(library.stem + ".BUILD_FAILED.txt"), cuda,
                cuda.with_name(cuda.stem + ".BUILD_FAILED.txt")]

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name))
        failed = output.with_name(output.stem + ".BUILD_FAILED.txt")
        for stale in self._siblings(output):  # a reused build/ folder must not ship an earlier outcome
            stale.unlink(missing_ok=True)
        builder = _load_build_module()
        if os.environ.get("ONNXSLIM_SKIP_NATIVE") == "1":
            reason = "ONNXSLIM_SKIP_NATIVE=1 was set at install time"
        else:
            try:
                builder.build_library(SRC, output, Path(self.build_temp) / "sparse_ep", log=print)
                reason = None
            except Exception as exc:  # any failure leaves the pure-Python tool installable
                reason = str(exc)
        if reason is None:
            failed.unlink(missing_ok=True)
            self._build_cuda(builder, output)
            return
        output.unlink(missing_ok=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(reason + "\n")
        _warn("the sparse execution provider library was NOT built; the tool installs without it "
              f"(onnxslim_cnn.runtime is unavailable). Reason: {reason.splitlines()[0]}")

    def _build_cuda(self, builder, cpu_output: Path) -> None:
        cuda_output = cpu_output.with_name("_sparse_cuda" + cpu_output.suffix)
        failed = cuda_output.with_name(cuda_output.stem + ".BUILD_FAILED.txt")
        try:
            built = builder.build_cuda_library(SRC / "cuda", cuda_output, Path(self.build_temp) / "sparse_cuda")
            failed.unlink(missing_ok=True)
            if built is None:
                cuda_output.unlink(missing_ok=True)
        except Exception as exc:  # the CUDA target never breaks the install
            cuda_output.unlink(missing_ok=True)
            failed.write_text(str(exc) + "\n")
            _warn(f"the optional CUDA sparse library was NOT built: {str(exc).splitlines()[0]}")

    def copy_extensions_to_source(self):
        # Editable installs: setuptools copies the library into the source tree only when it was
        # built, and nothing else. Mirror this build's whole outcome instead, so the tree never
        # keeps a library from older sources and loader.py can quote why it was not built.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            built = Path(self.build_lib) / self.get_ext_filename(self.get_ext_fullname(ext.name))
            package_dir = Path(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            for source in [built, *self._siblings(built)]:
                target = package_dir / source.name
                if source.is_file():
                    self.copy_file(str(source), str(target), level=self.verbose)
                else:
                    target.unlink(missing_ok=True)

    def get_outputs(self):
        # Only what exists: an optional library that failed must not be listed for the wheel.
        return [p for p in super().get_outputs() if os.path.exists(p)]


setup(
    ext_modules=[Extension("onnxslim_cnn.runtime._sparse_ep",
                           sources=sorted(str(p.relative_to(ROOT)) for p in SRC.glob("*.cc")),
                           optional=True)],
    cmdclass={"build_ext": BuildSparseEp},
)
