"""Atomic writes: a killed process leaves the previous output intact and never a half-written file or folder.

A write goes to a hidden temporary file or folder beside the target, named after the target and the writing process
(``.<name>.tmp-<pid>-<host>-<random>``); a process killed mid-write leaves it behind, and the next write to the same
target removes it once that process is provably gone (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embfactor.errors import InvalidInputError, some_names

# A folder is an embfactor output (safe to replace) only when it holds this marker.
MARKER_FILE = "embfactor.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, kind="file")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_writer_tag()}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON embfactor writes (sorted keys, indented, numpy/Path values converted), UTF-8 encoded."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode("utf-8")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


# Every folder atomic_directory writes lists its entries here; only a folder whose every entry is listed is replaced.
MANIFEST_FILE = "embfactor-manifest.json"

# What embfactor wrote into output folders before it kept a manifest (model, config, marker, the tokenizer files
# transformers writes, heal's classifier and resume state): an earlier output without a manifest is replaced only when
# it holds nothing else.
LEGACY_OUTPUT_FILES = frozenset({
    MARKER_FILE, "model.safetensors", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "classifier.safetensors", "classifier.json", "heal_state.safetensors", "heal_state.json",
})


def resolved(path: str | os.PathLike) -> Path:
    """The absolute path with ``~``, symbolic links and ``..`` resolved (also where it does not exist yet)."""
    return Path(path).expanduser().resolve()


def check_not_an_input(target: Path, inputs: tuple[str | os.PathLike | None, ...], *, what: str) -> None:
    """Refuse an output ``target`` (resolved) that is an input, holds an input or lies inside an input's folder.

    Replacing a folder deletes what is inside it, and writing inside the input model's folder changes the input.
    """
    for src in inputs:
        if src is None or not os.path.lexists(src):
            continue
        s = resolved(src)
        if s == target:
            raise InvalidInputError(f"{what} {target} is the input model's {'folder' if s.is_dir() else 'file'}; "
                                    "choose another output")
        if target in s.parents:
            raise InvalidInputError(
                f"{what} {target} contains the input model {s}: replacing it would delete the input; "
                "choose an output outside the input"
            )
        if s.is_dir() and s in target.parents:
            raise InvalidInputError(
                f"{what} {target} lies inside the input model's folder {s}; choose an output outside the input"
            )


def check_output_dir(target: str | os.PathLike, *, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Refuse an output folder that would overwrite an input or a file that is not ours, or that cannot be written.

    An existing folder may be replaced only when it is empty or an earlier embfactor output whose every entry
    embfactor wrote (:func:`foreign_entries`). The input models may be neither the output, inside it, nor around it
    (symbolic links and ``..`` resolved). Writability is probed by creating (and removing) the temporary folder
    the save will use. Returns the resolved target.

    Example:
        >>> check_output_dir("out/minilm-r6", inputs=("models/minilm",))   # doctest: +SKIP
        PosixPath('/home/me/out/minilm-r6')
    """
    target = resolved(target)
    check_name_lengths(target, flag="output folder")
    check_not_an_input(target, inputs, what="output folder")
    if target.exists():
        if not target.is_dir():
            raise InvalidInputError(f"output {target} exists and is not a folder")
        entries = list(target.iterdir())
        if entries and not (target / MARKER_FILE).is_file():
            raise InvalidInputError(
                f"output folder {target} exists, is not empty and is not an embfactor output; "
                "refusing to overwrite it (choose a new folder)"
            )
        if _immutable(target):
            raise InvalidInputError(
                f"output folder {target} is immutable or append-only (chattr +i / +a): it cannot be replaced; "
                "choose another folder"
            )
        foreign = foreign_entries(target) if entries else []
        if foreign:
            raise InvalidInputError(
                f"output folder {target} holds files embfactor did not write ({some_names(foreign)}); replacing the "
                "folder would delete them: move them out or choose a new folder"
            )
    check_writable(target, folder=True)
    return target


def check_output_file(
    path: str | os.PathLike, *, inputs: tuple[str | os.PathLike | None, ...] = (), flag: str = "output file"
) -> Path:
    """Refuse an output file (``--json``, ``--plot``) that is a folder or an input, or that cannot be written.

    Example:
        >>> check_output_file("report.json", flag="--json")   # doctest: +SKIP
    """
    target = resolved(path)
    check_name_lengths(target, flag=flag, file=True)
    if target.is_dir():
        raise InvalidInputError(f"{flag} {path} is a folder; give a file name")
    check_not_an_input(target, inputs, what=flag)  # embfactor never writes into the models it reads
    check_writable(target, folder=False, flag=flag)
    return target


def check_writable(target: Path, *, folder: bool, flag: str = "output") -> None:
    """Check that ``target`` (resolved) can be written as :func:`atomic_directory` / :func:`atomic_write_bytes` do.

    Permission bits say little (root ignores them; /proc, read-only mounts and immutable folders refuse anyway), so
    the temporary file or folder the write will make beside ``target`` is really created, then removed; the name
    length is checked with the temporary name's suffix included.
    """
    anchor = _existing_ancestor(target)
    if not anchor.is_dir():
        raise InvalidInputError(f"cannot write {flag} {target}: {anchor} is a file, not a folder")
    missing = target.relative_to(anchor).parts
    probe_file = not folder and len(missing) == 1  # the file goes straight into an existing folder
    try:
        if probe_file:
            fd, probe = tempfile.mkstemp(prefix=f".{missing[0]}.tmp-{_writer_tag()}-", suffix=".tmp", dir=anchor)
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=f".{missing[0]}.tmp-{_writer_tag()}-", dir=anchor))
    except OSError as e:
        raise InvalidInputError(f"cannot write {flag} {target}: {e.strerror or e} (in {anchor})") from None


def _immutable(path: Path) -> bool:
    """True for a Linux file or folder with the immutable or append-only attribute (which even root cannot rename)."""
    if not sys.platform.startswith("linux"):
        return False
    import array
    import fcntl

    fs_ioc_getflags, immutable_or_append = 0x80086601, 0x10 | 0x20
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        flags = array.array("l", [0])
        fcntl.ioctl(fd, fs_ioc_getflags, flags, True)
        return bool(flags[0] & immutable_or_append)
    except OSError:  # a file system without these attributes
        return False
    finally:
        os.close(fd)


def _existing_ancestor(target: Path) -> Path:
    anchor = target.parent
    while not os.path.lexists(anchor) and anchor != anchor.parent:
        anchor = anchor.parent
    return anchor


def check_name_lengths(target: Path, *, flag: str = "output", file: bool = False) -> None:
    """Refuse a path (resolved) with a name too long for its file system, its temporary name's suffix included.

    Checked first: a stat() of such a path already fails (ENAMETOOLONG).
    """
    try:
        name_max = os.pathconf(_existing_ancestor(target), "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    overhead = len(f"..tmp-{_writer_tag()}-") + 8 + (4 if file else 0)
    for i, part in enumerate(target.parts):
        limit = name_max - overhead if i == len(target.parts) - 1 else name_max
        if len(os.fsencode(part)) > limit:
            raise InvalidInputError(
                f"cannot write {flag} {str(target)[:80]}...: a name in it is {len(os.fsencode(part))} bytes long; "
                f"this file system allows {name_max} per name and embfactor needs {overhead} more for its temporary "
                f"name: use at most {limit} bytes"
            )


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """The entries of an earlier output folder that embfactor did not write (folder paths end in ``/``).

    A folder written by :func:`atomic_directory` lists its entries in its manifest (``embfactor-manifest.json``); one
    from an older embfactor without a manifest may hold only :data:`LEGACY_OUTPUT_FILES`. The hidden temporary file
    of an interrupted :func:`atomic_write_bytes` of one of these names counts as embfactor's too.

    Example:
        >>> foreign_entries("out/minilm-r6")   # doctest: +SKIP
        ['my_results.txt']
    """
    folder = Path(folder)
    listed = read_manifest(folder)
    allowed = set(LEGACY_OUTPUT_FILES) if listed is None else listed
    allowed.add(MANIFEST_FILE)
    foreign: list[str] = []

    def walk(d: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            rel = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if rel + ("/" if is_dir else "") in allowed or (not is_dir and _is_temporary_of(rel, allowed)):
                if is_dir:
                    walk(Path(entry.path), rel + "/")
            else:
                foreign.append(rel + ("/" if is_dir else ""))

    walk(folder, "")
    return foreign


def _is_temporary_of(rel: str, allowed: set[str]) -> bool:
    head, _, name = rel.rpartition("/")
    m = re.fullmatch(r"\.(?P<name>.+)\.tmp-[1-9][0-9]*-[0-9a-f]{8}-[a-z0-9_]{8}\.tmp", name)
    return m is not None and (f"{head}/" if head else "") + m["name"] in allowed


def read_manifest(folder: str | os.PathLike) -> set[str] | None:
    """The entries an output folder's manifest lists (folders end in ``/``), or None when it has no manifest."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # unreadable: nothing counts as ours, so the folder is never replaced blindly
    return {e for e in entries if isinstance(e, str)} if isinstance(entries, list) else set()


def add_to_manifest(folder: str | os.PathLike, entries: list[str]) -> None:
    """List ``entries`` (folders end in ``/``) in an output folder's manifest: files embfactor added to it later.

    A folder from an older embfactor without a manifest gets one listing the legacy files it holds plus ``entries``.
    """
    folder = Path(folder)
    listed = read_manifest(folder)
    if listed is None:
        listed = {e for e in LEGACY_OUTPUT_FILES if (folder / e.rstrip("/")).exists()}
    atomic_write_text(folder / MANIFEST_FILE, _manifest_json([*listed, *entries]))


def _manifest_entries(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder).as_posix()
        prefix = "" if rel == "." else rel + "/"
        out += [prefix + d + "/" for d in dirs] + [prefix + f for f in files if prefix or f != MANIFEST_FILE]
    return sorted(out)


def _manifest_json(entries: list[str]) -> str:
    return json.dumps({"embfactor_manifest": 1, "entries": sorted(set(entries))}, indent=1) + "\n"


def is_temporary_dir(path: str | os.PathLike) -> bool:
    """True for the hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` folders of :func:`atomic_directory`.

    A process killed mid-save leaves such a folder behind; it is incomplete by definition, so loaders refuse it.
    """
    name = Path(path).name
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` by renames.

    If the body raises (or the process dies) the temporary folder is removed (or left as a hidden
    ``.<name>.tmp-*`` folder that no loader reads) and any earlier ``target`` is untouched.

    Example:
        >>> with atomic_directory("out/model") as tmp:     # doctest: +SKIP
        ...     (tmp / "model.safetensors").write_bytes(data)
    """
    target = check_output_dir(target, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, kind="tmp")  # before writing: a killed save's folder may be what fills the disk
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_writer_tag()}-", dir=target.parent))
    try:
        yield tmp
        (tmp / MANIFEST_FILE).write_text(_manifest_json(_manifest_entries(tmp)), encoding="utf-8")
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any folder the user makes
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            # Again, just before the swap: a long run (heal) may find files the user added since it started.
            check_output_dir(target, inputs=inputs)
            try:
                exchanged = rename_exchange(tmp, target)
            except OSError as e:  # EPERM (immutable), EBUSY (a mount point), ...: the earlier output is untouched
                raise InvalidInputError(f"cannot replace output folder {target}: {e.strerror}; nothing was written") from None
            if exchanged:
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the earlier output
            else:
                # Two renames: a kill between them leaves the earlier output in .<name>.old-*/x, not at target.
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_writer_tag()}-", dir=target.parent))
                os.replace(target, old / "x")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
        # Only now: a killed two-rename replace left the earlier output in .<name>.old-*/x, its only copy until the
        # target holds a complete output again.
        remove_stale_temporaries(target, kind="old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writer_tag() -> str:
    """``<pid>-<host key>`` of this process, put in the name of every temporary file and folder it writes."""
    return f"{os.getpid()}-{_host_key()}"


@functools.cache
def _host_key() -> str:
    # A PID only identifies a process on its own machine and in its own PID namespace: a folder shared by containers
    # or over NFS may hold the temporary folder of a live writer elsewhere whose PID is free here. Such names carry
    # another host key and are never removed.
    ns = ""
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(f"{socket.gethostname()}|{ns}".encode()).hexdigest()[:8]


def _temporary_name(name: str, kind: str) -> re.Pattern[str]:
    # Exactly the names mkdtemp/mkstemp make above for this target: ".<name>.tmp-<pid>-<host>-<8 random chars>".
    suffix = r"\.tmp" if kind == "file" else ""
    stem = "old" if kind == "old" else "tmp"
    writer = r"(?P<pid>[1-9][0-9]*)-(?P<host>[0-9a-f]{8})"
    return re.compile(rf"\.{re.escape(name)}\.{stem}-{writer}-[a-z0-9_]{{8}}{suffix}")


def writer_is_gone(pid: int) -> bool:
    """True only when no process with ``pid`` can still write: none exists, or it is a zombie (killed, not reaped).

    Anything uncertain (this process, another user's process, a non-POSIX system, an error) counts as alive.
    """
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: an existence and permission check, nothing is sent
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].startswith("Z")  # the state field follows the parenthesized command name


def remove_stale_temporaries(target: str | os.PathLike, *, kind: str = "tmp") -> list[Path]:
    """Remove what earlier, killed writes of ``target`` left beside it; return the removed paths.

    Only what is provably ours and stale goes: a name this module makes for exactly this target (``kind`` "tmp" and
    "old": the folders of :func:`atomic_directory`; "file": the files of :func:`atomic_write_bytes`), with this
    machine's host key, owned by this user, not a symbolic link, and whose writer process is gone
    (:func:`writer_is_gone`). A live writer's (a concurrent save, this process), another target's, another host's
    and a name without a PID (from an older embfactor) are left alone.

    Example:
        >>> remove_stale_temporaries("out/minilm-r6")   # doctest: +SKIP
        [PosixPath('out/.minilm-r6.tmp-4242-1f2e3d4c-k2x9_a7q')]
    """
    if kind not in ("tmp", "old", "file"):
        raise ValueError(f"kind must be 'tmp', 'old' or 'file', got {kind!r}")
    if os.name != "posix":  # no os.kill(pid, 0) liveness check to rely on
        return []
    target = Path(target)
    pattern, host = _temporary_name(target.name, kind), _host_key()
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m["host"] != host:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        is_kind = entry.is_file(follow_symlinks=False) if kind == "file" else entry.is_dir(follow_symlinks=False)
        if not is_kind or st.st_uid != os.getuid() or not writer_is_gone(int(m["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if kind == "file":
                path.unlink()
            else:
                shutil.rmtree(path)
            removed.append(path)
    return removed


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Replacing an existing folder with plain renames needs two steps, and a process killed between them leaves no
    folder at the target; the exchange has no such window. Returns False when the OS or file system cannot do it.
    """
    if not sys.platform.startswith("linux"):
        return False
    fn = libc_function("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))
    if fn is None:
        return False
    at_fdcwd, rename_exchange_flag = -100, 2
    if fn(at_fdcwd, os.fsencode(os.fspath(a)), at_fdcwd, os.fsencode(os.fspath(b)), rename_exchange_flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


@functools.cache
def libc_function(name: str, argtypes: tuple[Any, ...] = ()) -> Any | None:
    """The C library function ``name`` of this process with its argument types set, or None where there is none.

    One place for the libc calls (renameat2, madvise, malloc_trim): looked up once, in the process's own namespace.
    """
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # no such symbol (musl, macOS) or no dlopen(NULL) (Windows)
        return None
    fn.argtypes = list(argtypes)
    return fn


def release_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: hand the C heap's free pages back to the OS (nothing where there is none).

    Freed tensors, numpy arrays and Python objects stay in glibc's heap, and so in the process's RSS, until trimmed:
    the server calls this after each model call, the GGUF loader after dropping the file's metadata objects.
    """
    trim = libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is not None:
        trim(0)


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable (a power loss right after could otherwise lose it).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def release_mapped_pages(tensor: Any) -> int:
    """Drop a dead tensor's pages of a memory-mapped weights file from this process's resident memory.

    transformers maps a safetensors file into memory and its tensors are views of that one mapping, so freeing a
    tensor frees nothing: its pages stay resident until the whole model is gone. ``compress`` calls this on the dense
    embedding once the factors replace it (47 of MiniLM's 87 MB), so saving the rest of the model does not hold both.

    Only a file-backed mapping is touched, and only the pages that lie wholly inside the tensor. They stay mapped: a
    later read pages them in again from the file (an in-place edit of those pages would be lost, so call this only
    on a tensor nothing uses any more). Returns the bytes released (0 off Linux, for anonymous memory or on error).
    ``tensor`` may also be a numpy array, such as a view of a ``np.memmap`` (the GGUF loader releases each quantized
    tensor's pages once it is dequantized).
    """
    if not sys.platform.startswith("linux"):
        return 0
    if hasattr(tensor, "__array_interface__"):  # numpy: no torch.from_numpy, which warns on a read-only memmap
        if not tensor.flags.c_contiguous:
            return 0
        start = tensor.__array_interface__["data"][0]
        end = start + tensor.nbytes
    else:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return 0
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read().splitlines()
    except OSError:
        return 0
    for line in maps:
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start and end <= hi:
            # inode 0 = anonymous memory: MADV_DONTNEED would zero it, so never touch it
            if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/"):
                return 0
            break
    else:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    madvise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
    madv_dontneed = 4
    return last - first if madvise is not None and madvise(first, last - first, madv_dontneed) == 0 else 0
