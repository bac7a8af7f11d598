"""llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) as a quality peer.

llama-cpp-python ships only the library, but its source distribution vendors all of llama.cpp. So the
tools are built from the very llama.cpp version the installed llama-cpp-python wraps:

    pip download llama-cpp-python==<installed version> --no-binary :all: --no-deps
    tar xzf llama_cpp_python-<version>.tar.gz
    cmake -S llama_cpp_python-<version>/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
    cmake --build build --target llama-quantize llama-imatrix llama-perplexity

`ensure_tools()` does exactly that once, into edgelm's cache directory (about 5 minutes on 2 cores), or uses
a directory of already-built tools (`EDGELM_LLAMA_CPP_BIN` or an explicit path).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import BenchmarkError

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
_FINAL_ESTIMATE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


@dataclass(frozen=True)
class LlamaCppTools:
    bin_dir: Path

    def path(self, tool: str) -> Path:
        return self.bin_dir / tool

    def quantize(self, base: Path, out: Path, type_name: str, *, imatrix: Path | None = None,
                 token_embedding_type: str | None = None, threads: int = 2) -> Path:
        """`llama-quantize [--imatrix F] [--token-embedding-type T] base out TYPE`, written atomically."""
        cmd = [str(self.path("llama-quantize"))]
        if imatrix is not None:
            cmd += ["--imatrix", str(imatrix)]
        if token_embedding_type is not None:
            cmd += ["--token-embedding-type", token_embedding_type]
        tmp = out.with_name(f".{out.name}.partial")
        cmd += [str(base), str(tmp), type_name, str(threads)]
        _run(cmd, f"llama-quantize to {type_name}")
        os.replace(tmp, out)
        return out

    def imatrix(self, model: Path, text: Path, out: Path, *, ctx: int = 512, chunks: int = 100,
                threads: int = 2) -> Path:
        tmp = out.with_name(f".{out.name}.partial.gguf")
        _run([str(self.path("llama-imatrix")), "-m", str(model), "-f", str(text), "-c", str(ctx),
              "--chunks", str(chunks), "-t", str(threads), "-o", str(tmp)], "llama-imatrix")
        os.replace(tmp, out)
        return out

    def perplexity(self, model: Path, text: Path, *, ctx: int = 512, chunks: int | None = None,
                   threads: int = 2) -> tuple[float, float]:
        """(PPL, its standard error) from llama-perplexity, flash attention off as in our reference numbers."""
        cmd = [str(self.path("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
               "-b", str(ctx), "-t", str(threads), "-fa", "off"]
        if chunks is not None:
            cmd += ["--chunks", str(chunks)]
        return parse_final_estimate(_run(cmd, "llama-perplexity"))


def parse_final_estimate(output: str) -> tuple[float, float]:
    match = _FINAL_ESTIMATE.search(output)
    if match is None:
        raise BenchmarkError("llama-perplexity printed no 'Final estimate' line; its output ends with: "
                             + output.strip()[-300:])
    return float(match.group(1)), float(match.group(2))


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchmarkError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout + proc.stderr


def find_tools(bin_dir: str | os.PathLike[str]) -> LlamaCppTools:
    bin_dir = Path(bin_dir)
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    if missing:
        raise BenchmarkError(f"{bin_dir} lacks {', '.join(missing)}; point to llama.cpp's build/bin directory "
                             "or leave it out to build the tools from llama-cpp-python's sources")
    return LlamaCppTools(bin_dir)


def llama_cpp_python_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise BenchmarkError("llama-cpp-python is not installed; pip install 'edgelm[llama]'") from None


def ensure_tools(bin_dir: str | os.PathLike[str] | None = None) -> LlamaCppTools:
    """Tools from `bin_dir`, `EDGELM_LLAMA_CPP_BIN`, or a cached build of llama-cpp-python's vendored llama.cpp."""
    explicit = bin_dir or os.environ.get("EDGELM_LLAMA_CPP_BIN")
    if explicit:
        return find_tools(explicit)
    from edgelm.registry import cache_dir

    version = llama_cpp_python_version()
    build_root = cache_dir().parent / "llama.cpp" / version
    bin_path = build_root / "build" / "bin"
    if all((bin_path / t).is_file() for t in TOOLS):
        return LlamaCppTools(bin_path)
    _build(version, build_root)
    return find_tools(bin_path)


def _build(version: str, build_root: Path) -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BenchmarkError(f"building llama.cpp's tools needs {tool}; install it (e.g. apt install cmake "
                                 "g++) or pass the directory of prebuilt tools")
    build_root.mkdir(parents=True, exist_ok=True)
    source = build_root / "src"
    if not (source / "CMakeLists.txt").is_file():
        print(f"downloading llama-cpp-python {version} sources ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=build_root) as tmp:
            _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
                  "--no-deps", "-d", tmp, "--quiet"], "pip download llama-cpp-python")
            archive = next(Path(tmp).glob("*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("*/vendor/llama.cpp"))
            shutil.rmtree(source, ignore_errors=True)
            shutil.move(str(vendored), source)
    print(f"building {', '.join(TOOLS)} (a few minutes) ...", file=sys.stderr)
    build = build_root / "build"
    _run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], "cmake configure")
    _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS], "cmake build")
