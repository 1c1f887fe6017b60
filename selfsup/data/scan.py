"""The file scan of an image tree, cached in an index keyed by the tree's directory mtimes.

Listing a 1.28M-file ImageNet train tree costs tens of seconds on a network or cold disk, at
every start of every run. A directory's mtime changes whenever an entry is added, removed or
renamed in it, so the set of files is unchanged as long as every directory of the tree keeps
its mtime: checking that costs one stat per directory (1,001 for ImageNet), not one entry per
file. The index stores each directory's (relative path, mtime_ns) and the image paths;
it is valid when the extensions match, every recorded directory below the root still has its
mtime (a new subdirectory changes its parent's mtime, so it is seen too), and the root still
lists the same folders and images. The root is checked by its listing (one scandir of ~1,000
entries for ImageNet), not its mtime, because writing the index into it changes that mtime.

Where: `<root>/.selfsup-scan.idx` when the tree is writable (a hidden file: torchvision's
ImageFolder takes every folder at the root for a class, hidden or not, but ignores files),
else `$XDG_CACHE_HOME/selfsup/scan/<hash of the root's real path>.idx` (~/.cache by default).
Written atomically (a temporary hidden file beside it, then os.replace). SELFSUP_SCAN_CACHE=
off disables the cache, =home skips the in-tree location.

Racy mtimes: a directory changed within MTIME_SLACK_NS of the scan could change again inside
the same mtime tick (coarse-timestamp filesystems) unnoticed, so such a scan is not cached;
the next start scans again. Hidden entries (names starting with ".") are skipped; symlinked
directories are followed once each (a loop is not followed twice).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

INDEX_NAME = ".selfsup-scan.idx"
HEADER = "selfsup-scan 2"
CACHE_ENV = "SELFSUP_SCAN_CACHE"
MTIME_SLACK_NS = 2_000_000_000  # 2 s: FAT's mtime tick; ext4/xfs/NFS are finer


def top_level(root: str, extensions: tuple[str, ...]) -> list[str]:
    """What the root lists, as the index records it: folders ("name/") and images, sorted."""
    exts = tuple(e.lower() for e in extensions)
    out = []
    with os.scandir(root) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    out.append(e.name + "/")
                elif e.name.lower().endswith(exts) and e.is_file():
                    out.append(e.name)
            except OSError:
                continue
    return sorted(out)


def walk(root: str | os.PathLike, extensions: tuple[str, ...]
         ) -> tuple[list[str], list[tuple[str, int]]]:
    """Scan the tree: (image paths relative to root with "/" separators, sorted by their
    parts; [(directory relative path, mtime_ns)], the root first as "")."""
    root = os.fspath(root)
    exts = tuple(e.lower() for e in extensions)
    children: dict[str, list[tuple[str, bool]]] = {}  # dir -> its sorted (name, is_dir)
    dirs: list[tuple[str, int]] = []
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            continue  # a symlink loop, or a directory linked twice
        seen.add((st.st_dev, st.st_ino))
        dirs.append((rel, st.st_mtime_ns))
        prefix = rel + "/" if rel else ""
        names = []
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_dir():
                        names.append((e.name, True))
                        stack.append(prefix + e.name)
                    elif e.name.lower().endswith(exts) and e.is_file():
                        names.append((e.name, False))
                except OSError:  # a dangling symlink, a racing delete: not an image
                    continue
        names.sort()  # names are unique in a folder: is_dir never decides
        children[rel] = names
    return _in_order(children), dirs


def _in_order(children: dict[str, list[tuple[str, bool]]]) -> list[str]:
    """Files depth first over sorted folders: the order of sorting the paths by their parts,
    without sorting a million split paths."""
    files: list[str] = []
    stack = [("", iter(children[""]))]
    while stack:
        rel, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, is_dir = nxt
        path = rel + "/" + name if rel else name
        if not is_dir:
            files.append(path)
        elif path in children:  # (not there: a loop, or a folder already walked)
            stack.append((path, iter(children[path])))
    return files


# ----------------------------------------------------------------------------- index files
def _home_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "selfsup" / "scan"


def index_locations(root: str | os.PathLike) -> list[Path]:
    """Where the index of `root` may live, in the order they are tried."""
    mode = os.environ.get(CACHE_ENV, "auto").strip().lower()
    if mode in ("0", "off", "no", "false"):
        return []
    real = os.path.realpath(root)
    home = _home_cache() / (hashlib.sha1(real.encode()).hexdigest()[:20] + ".idx")
    if mode == "home":
        return [home]
    return [Path(real) / INDEX_NAME, home]


def _read(index: Path, root: str, extensions: tuple[str, ...]) -> list[str] | None:
    """The cached file list if `index` is valid for the tree as it is now, else None."""
    try:
        text = index.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return None
    head, _, body = text.partition("\n")
    meta_line, _, body = body.partition("\n")
    if head != HEADER:
        return None
    try:
        meta = json.loads(meta_line)
        if meta["root"] != os.path.realpath(root) or meta["ext"] != list(extensions):
            return None
        if meta["top"] != top_level(root, extensions):
            return None
        for rel, mtime in meta["dirs"]:
            if rel and os.stat(os.path.join(root, rel)).st_mtime_ns != mtime:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = body.split("\n")[:-1] if body else []  # each path ends with a newline
    return files if len(files) == meta.get("n") else None


def _write(index: Path, root: str, extensions, files: list[str],
           dirs: list[tuple[str, int]], top: list[str]) -> bool:
    """Write the index atomically; False where it cannot be (read-only, odd names)."""
    if any("\n" in f for f in files):
        return False
    meta = {"root": os.path.realpath(root), "ext": list(extensions), "top": top,
            "n": len(files), "dirs": [[rel, m] for rel, m in dirs]}
    text = f"{HEADER}\n{json.dumps(meta)}\n" + "".join(f + "\n" for f in files)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".selfsup-scan-", dir=index.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(text)
            os.replace(tmp, index)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        return False
    return True


def scan_images(root: str | os.PathLike, extensions: tuple[str, ...]) -> list[str]:
    """Image paths under `root` (relative, "/"-separated, sorted by parts), from the index
    when it is still valid, else by a walk that then refreshes the index."""
    root = os.fspath(root)
    places = index_locations(root)
    for index in places:
        files = _read(index, root, extensions)
        if files is not None:
            return files
    start = time.time_ns()
    top = top_level(root, extensions) if places else []
    files, dirs = walk(root, extensions)
    if any(rel and m > start - MTIME_SLACK_NS for rel, m in dirs):
        return files  # racy: a change in the same mtime tick could be missed
    for index in places:
        if _write(index, root, extensions, files, dirs, top):
            break
    return files
