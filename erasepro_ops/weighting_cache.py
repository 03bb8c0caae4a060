"""Where the retain bank's weightings are kept between solves: in memory, or as files."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import log
from .fingerprint import hash_exact
from .linalg import PreserveWeighting, all_finite


class WeightingCache:
    """The retain bank's weightings ``C^{-1/2}``, per text-encoder site, of the models solved on.

    They depend on the model's text encoder and the bank, not on the concepts, so a later solve on
    the same model skips them, and one that adds a site (a bridge, a deeper ``S``) builds only that
    one. Each is keyed by the host's digest of the encoder's embeddings and the blocks up to its
    own (a LoRA on them changes it). Kept in float32 (36 MiB per 3072-wide site, 100 per
    5120-wide: SD1.5 at S = 3 with its bridge 144 MiB, SDXL 1144 MiB), the least recently used
    dropped beyond ``max_bytes`` (never one the current solve uses). The solve always uses the
    stored copy, so a first and a second solve give the same edit.

    With a ``directory`` (on ComfyUI ``user/__erasepro/weightings``, set by ``erasepro_comfy.host``)
    they are kept there as safetensors files, not in memory, and read back a site at a time as the
    chain reaches it (:meth:`get` returns loaders): between solves they take no memory, later
    sessions reuse them, and a file that does not read back as the weighting it is named for is
    built again. Each file carries the SHA-256 of what it holds (:func:`content_digest`: the format,
    the key, ``c_max`` and the factor's bytes) and is used only when its content matches: a file
    whose numbers changed (a bad disk, a partial copy, another version's format under the same
    name) is built again with a warning, never used. Without one, in :attr:`entries`."""

    FORMAT = "2"  # of the files; part of their names (1: no content digest)
    STALE_PARTIAL_SECONDS = 3600  # a write takes seconds

    def __init__(self, max_bytes: int = 2 << 30, directory: Path | None = None):
        self.max_bytes, self.entries, self.directory = max_bytes, {}, directory

    @staticmethod
    def _bytes(weighting) -> int:
        return 0 if weighting is None else weighting.chol.numel() * weighting.chol.element_size()

    def get(self, keys: Sequence, build: Callable[[list[int]], Iterable]) -> list:
        """The weightings at ``keys``, or with a :attr:`directory`, a loader of each (called with no
        argument); ``build(missing)`` gives those of the indices not held, in order (one call for
        all of them)."""
        if self.directory is not None:
            return self._on_disk(keys, build)
        missing = [j for j, key in enumerate(keys) if key not in self.entries]
        if missing:
            for j, weighting in _one_at_a_time(missing, build(missing)):
                self.entries[keys[j]] = None if weighting is None else weighting.to("cpu", torch.float32)
                del weighting  # before the next site's is built
        for key in keys:  # most recent last
            self.entries[key] = self.entries.pop(key)
        wanted = set(keys)
        for key in list(self.entries):
            if sum(map(self._bytes, self.entries.values())) <= self.max_bytes:
                break
            if key not in wanted and self._bytes(self.entries[key]):
                del self.entries[key]
        return [self.entries[key] for key in keys]

    def path(self, key) -> Path:
        name = hashlib.sha256(repr((self.FORMAT, key)).encode()).hexdigest()[:40]
        return Path(self.directory) / f"weighting-{self.FORMAT}-{name}.safetensors"

    def _on_disk(self, keys: Sequence, build) -> list:
        paths = [self.path(key) for key in keys]
        missing = [j for j, path in enumerate(paths) if _read_weighting(path, keys[j], header_only=True) is False]
        unsaved = {}  # the directory refused them: kept in memory for this solve
        if missing:
            for j, weighting in _one_at_a_time(missing, build(missing)):
                if not self._store(keys[j], weighting):
                    unsaved[j] = None if weighting is None else weighting.to("cpu", torch.float32)
                del weighting  # before the next site's is built
        self._evict(set(paths))

        def loader(j):
            def load():
                if j in unsaved:
                    return unsaved[j]
                held = _read_weighting(paths[j], keys[j])
                if held is False:  # removed since it was checked, or damaged: built again
                    why = ("was removed (another ComfyUI sharing the folder, or by hand)" if not paths[j].exists()
                           else "is damaged (its content does not match its checksum)")
                    log.warning("ErasePro: the cached retain weighting %s %s; building it again", paths[j], why)
                    (held,) = build([j])
                    held = None if held is None else held.to("cpu", torch.float32)
                    self._store(keys[j], held)
                return held
            return load
        return [loader(j) for j in range(len(keys))]

    def _store(self, key, weighting) -> bool:
        """Write one weighting's file, whole or not at all; False (and a warning) when it cannot."""
        # Lᵀ, row-major: the transpose of the column-major factor, stored without another copy
        upper = torch.zeros(0) if weighting is None else weighting.chol.mT.to("cpu", torch.float32).contiguous()
        c_max = "none" if weighting is None else repr(weighting.c_max)
        meta = {"format": self.FORMAT, "key": repr(key), "c_max": c_max,
                "sha256": content_digest(self.FORMAT, key, c_max, upper)}
        path = self.path(key)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"upper": upper}, str(partial), metadata=meta)
            os.replace(partial, path)
            return True
        except OSError as e:
            log.warning("ErasePro: cannot keep the retain weighting in %s (%s); it is kept in memory for this solve",
                        path.parent, e)
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
            return False

    def _evict(self, in_use: set) -> None:
        """The least recently used files beyond ``max_bytes`` go (never those in ``in_use``), and so
        do partial files older than ``STALE_PARTIAL_SECONDS`` (a process stopped while writing)."""
        try:
            now = time.time()
            for path in Path(self.directory).glob("weighting-*.partial"):
                if now - path.stat().st_mtime > self.STALE_PARTIAL_SECONDS:
                    path.unlink(missing_ok=True)
            files = []
            for path in Path(self.directory).glob("weighting-*.safetensors"):  # other formats' count too
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path not in in_use:
                    path.unlink(missing_ok=True)
                    total -= size
        except OSError:  # another process's eviction, a read-only folder: the next solve tries again
            pass


def _one_at_a_time(indices: Sequence[int], built: Iterable):
    """``zip(indices, built, strict=True)`` without zip's reused result tuple, which would hold the
    last weighting (72 MiB at 3072 wide) while the next one is built."""
    built = iter(built)
    for j in indices:
        weighting = next(built, _MISSING)
        if weighting is _MISSING:
            raise ValueError(f"the build gave fewer weightings than the {len(indices)} asked for")
        yield j, weighting
        del weighting
    if next(built, _MISSING) is not _MISSING:
        raise ValueError(f"the build gave more weightings than the {len(indices)} asked for")


_MISSING = object()


def content_digest(version: str, key, c_max: str, upper: torch.Tensor) -> str:
    """SHA-256 of a weighting file's content: its format ``version``, ``key``, ``c_max`` (as stored)
    and the stored factor's dtype, shape and bytes (read in place, no copy)."""
    h = hashlib.sha256(repr((version, key, c_max)).encode())
    hash_exact(h, upper)
    return h.hexdigest()


def _read_weighting(path: Path, key, header_only: bool = False):
    """The weighting stored at ``path`` for ``key`` (None for a site without one), True when only
    the header was asked for and it matches, False when the file is missing or is not that weighting
    (another key or format, a truncated file, content that does not match its digest, NaN/Inf):
    never unpickled, safetensors only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("format") != WeightingCache.FORMAT or meta.get("key") != repr(key)
                    or list(f.keys()) != ["upper"] or len(meta.get("sha256", "")) != 64):
                return False
            shape = f.get_slice("upper").get_shape()
            none = meta.get("c_max") == "none"
            if (shape != [0] if none else len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0):
                return False
            if header_only:
                try:
                    os.utime(path)  # recently used
                except OSError:
                    pass
                return True
            upper = f.get_tensor("upper")
            if content_digest(WeightingCache.FORMAT, key, meta["c_max"], upper) != meta["sha256"]:
                return False
            if none:
                return None
            chol = upper.mT
            c_max = float(meta["c_max"])
    except (OSError, ValueError, KeyError, SafetensorError):
        return False
    if chol.dtype != torch.float32 or not all_finite(chol) or not c_max > 0:
        return False
    return PreserveWeighting(chol, c_max)


RETAIN_WEIGHTINGS = WeightingCache()


class Loaded(list):
    """A list whose callable items are called when read (:meth:`WeightingCache.get`'s loaders): the
    chain reads each site's weighting as it solves that site, so one is in memory at a time."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return item() if callable(item) else item
