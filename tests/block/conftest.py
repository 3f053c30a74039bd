"""Shared fixtures for the format-driver tests: the image corpus and a chain reader.

Images come from the recipes in ``images/manifest.d`` built by
``images/generate.py`` into a session directory (quick: recipes are small),
so the tests never depend on a stale ``build/images``.  The expected bytes of
an image are what ``qemu-img convert -O raw`` makes of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from testbed.block.driver import (
    BackingReader,
    ChildSpec,
    FdFile,
    FormatImage,
    LocalOpenContext,
    MemFile,
)
from testbed.block.formats import all_drivers, get_driver
from testbed.errors import BlockError, CorruptImageError
from testbed.pytest_plugin import require

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1 << 20
#: How deep a test chain may go before we call it a loop we failed to spot.
MAX_CHAIN = 16


def _generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "images_generate", REPO / "images" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipes(fmt: str) -> list[dict[str, object]]:
    """The recipes of one format (read at collection time: only TOML parsing)."""
    generate = _generate_module()
    return [r for r in generate.load_recipes(REPO / "images" / "manifest.d") if r["format"] == fmt]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``recipe`` / ``corrupt_recipe`` over the recipes of the module's formats.

    A module names one format (``IMAGE_FORMAT``) or several (``IMAGE_FORMATS``);
    a recipe's name starts with its format, so the test ids name it.
    """
    fmt = getattr(metafunc.module, "IMAGE_FORMAT", None)
    formats = getattr(metafunc.module, "IMAGE_FORMATS", (fmt,) if fmt else ())
    for fixture, corrupt in (("recipe", False), ("corrupt_recipe", True)):
        if not formats or fixture not in metafunc.fixturenames:
            continue
        chosen = [
            r for f in formats for r in recipes(f) if bool(r.get("corrupt", False)) == corrupt
        ]
        metafunc.parametrize(fixture, chosen, ids=[str(r["name"]) for r in chosen])


@dataclass(frozen=True, kw_only=True)
class BuiltImage:
    name: str
    format: str
    main: Path
    tags: tuple[str, ...]

    def expected_field(self) -> str | None:
        for tag in self.tags:
            if tag.startswith("field:"):
                return tag.removeprefix("field:")
        return None


class Corpus:
    """Builds recipes on first use into one session directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: set[str] = set()
        self._expected: dict[str, list[str]] = {}

    def image(self, recipe: dict[str, object]) -> BuiltImage:
        name = str(recipe["name"])
        if name not in self._built:
            proc = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "images" / "generate.py"),
                    "--out",
                    str(self.root),
                    "--only",
                    name,
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, (
                f"building image {name} failed:\n{proc.stdout}{proc.stderr}"
            )
            self._built.add(name)
        return BuiltImage(
            name=name,
            format=str(recipe["format"]),
            main=self.root / name / str(recipe["main"]),
            tags=tuple(str(t) for t in recipe.get("tags", [])),  # type: ignore[attr-defined]
        )

    def by_name(self, name: str) -> BuiltImage:
        """Build and return the recipe called ``name`` (any format)."""
        generate = _generate_module()
        for recipe in generate.load_recipes(REPO / "images" / "manifest.d"):
            if recipe["name"] == name:
                return self.image(recipe)
        raise LookupError(f"no image recipe named {name!r}")

    def expected_chunks(self, image: BuiltImage) -> list[str]:
        """SHA-256 of each MiB of ``qemu-img convert -O raw`` output."""
        if image.name not in self._expected:
            out = self.root / f"{image.name}.expected.raw"
            subprocess.run(
                ["qemu-img", "convert", "-f", image.format, "-O", "raw", str(image.main), str(out)],
                check=True,
                capture_output=True,
                timeout=300,
                # QEMU 7.2 opens a qcow2 external data file by its stored
                # name relative to the *working directory*; the model (and
                # the recipes) mean relative to the image.
                cwd=image.main.parent,
            )
            self._expected[image.name] = chunk_hashes(out.read_bytes())
            out.unlink()
        return self._expected[image.name]


def chunk_hashes(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i : i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    require(shutil.which("qemu-io") is not None, "qemu-io (apt-get install qemu-utils)")
    return Corpus(tmp_path_factory.mktemp("images"))


def probe_format(path: str) -> str:
    """Pick a format as bdrv_probe does: the highest score over the first 2048 bytes."""
    with open(path, "rb") as f:
        buf = f.read(2048)
    scores = {name: driver.probe(buf, path) for name, driver in all_drivers().items()}
    return max(scores, key=lambda name: scores[name])


class Chain:
    """A tiny stand-in for the core: opens an image and its backing files locally."""

    def __init__(self) -> None:
        self.ctx = LocalOpenContext(read_only=True)
        self.fds: list[int] = []
        self.images: list[tuple[str, FormatImage]] = []

    def open(self, path: str, fmt: str | None = None, seen: tuple[str, ...] = ()) -> BackingReader:
        real = os.path.realpath(path)
        if real in seen:
            raise BlockError(f"backing loop: {path} is already in the chain")
        if len(seen) >= MAX_CHAIN:
            raise BlockError(f"chain deeper than {MAX_CHAIN} at {path}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)
        image = get_driver(fmt or probe_format(path)).open(FdFile(fd, path), self.ctx)
        self.images.append((path, image))
        lower: BackingReader
        if image.backing_filename:
            name = image.backing_filename
            if not os.path.isabs(name):
                name = os.path.join(os.path.dirname(path), name)
            lower = self.open(name, image.backing_format, (*seen, real))
        else:

            def lower(offset: int, length: int) -> bytes:
                return bytes(length)

        size = image.virtual_size

        def read(offset: int, length: int) -> bytes:
            # A backing file shorter than its overlay reads as zeros past its end.
            inside = max(0, min(length, size - offset))
            data = image.read(offset, inside, lower) if inside else b""
            return data + bytes(length - inside)

        return read

    def disk_hashes(self, image: BuiltImage) -> list[str]:
        """SHA-256 of each MiB of the whole disk as the model reads it."""
        read = self.open(str(image.main), image.format)
        size = self.images[0][1].virtual_size
        return [
            hashlib.sha256(read(pos, min(CHUNK, size - pos))).hexdigest()
            for pos in range(0, size, CHUNK)
        ]

    def close(self) -> None:
        for _, image in self.images:
            image.close()
        for fd in self.fds:
            os.close(fd)
        self.ctx.close()


@pytest.fixture
def chain() -> Iterator[Chain]:
    c = Chain()
    yield c
    c.close()


class MemContext:
    """An OpenContext whose children are empty in-memory files."""

    read_only = True

    def open_file(self, filename: str, *, child: ChildSpec, relative_to: object) -> MemFile:
        return MemFile(b"", filename)


def _fuzz_open_and_read(driver_name: str, data: bytes) -> None:
    """Open ``data`` as an image and read its edges: the only error allowed is CorruptImageError."""
    try:
        image = get_driver(driver_name).open(MemFile(data), MemContext())
        size = image.virtual_size
        for offset in (0, max(0, size - 65536)):
            length = min(65536, size - offset)
            image.read(offset, length, lambda o, n: bytes(n))
    except CorruptImageError:
        pass


@pytest.fixture(scope="session")
def fuzz_open() -> Callable[[str, bytes], None]:
    """Open bytes as an image of a format and read its edges; only CorruptImageError may escape."""
    return _fuzz_open_and_read


@pytest.fixture(scope="session")
def open_bytes() -> Callable[[str, bytes], FormatImage]:
    """Open in-memory bytes as an image of the named format (children are empty files)."""

    def opener(driver_name: str, data: bytes) -> FormatImage:
        return get_driver(driver_name).open(MemFile(data), MemContext())

    return opener
