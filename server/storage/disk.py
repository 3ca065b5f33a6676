# The one seam between the file storage and the file system.
#
# Every call that can change what is on disk, or open a file, goes through a
# `Disk`: open, write, pwrite, fsync, fdatasync, truncate, rename, unlink, mkdir, and
# whole-file reads. The server uses `Disk` itself (plain `os` calls, made in
# the storage's worker threads through aiofiles); the fault tests put a
# subclass in its place that fails the Nth call or simulates a power cut by
# keeping only what was synced (tests/faultdisk.py). Nothing else in the file
# storage touches `os` for files, so nothing escapes the tests.

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path


class Disk:
    """Plain blocking file system calls; methods run in worker threads."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes) -> None:
        """Write all of `data` (a short write is retried; an error leaves an unknown prefix written)."""
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write all of `data` at `offset`, in place (never on an O_APPEND descriptor: Linux would append)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def rename(self, source: Path, target: Path) -> None:
        os.rename(source, target)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def read(self, fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    # Built from the calls above, so that faults reach them too. -----------------

    def read_file(self, path: Path) -> bytes:
        """The whole file; FileNotFoundError if there is none."""
        fd = self.open(path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := self.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self.close(fd)

    def size_of(self, path: Path) -> int:
        """The file's size; 0 if there is none."""
        try:
            fd = self.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            return self.size(fd)
        finally:
            self.close(fd)

    def read_at(self, path: Path, size: int, offset: int) -> bytes:
        """`size` bytes (-1: all) from `offset`; empty if there is no file."""
        try:
            fd = self.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return b""
        try:
            if size < 0:
                size = max(self.size(fd) - offset, 0)
            chunks = []
            while size > 0 and (chunk := self.pread(fd, min(size, 1 << 24), offset)):
                chunks.append(chunk)
                offset += len(chunk)
                size -= len(chunk)
            return b"".join(chunks)
        finally:
            self.close(fd)

    def sync_path(self, path: Path) -> None:
        """fsync a file or directory by name (a directory: so that its new entries survive a power cut)."""
        fd = self.open(path, os.O_RDONLY)
        try:
            self.fsync(fd)
        finally:
            self.close(fd)

    def truncate_path(self, path: Path, size: int) -> None:
        """Cut a file back to `size` and make that durable; never grows it."""
        fd = self.open(path, os.O_WRONLY)
        try:
            if self.size(fd) > size:
                self.ftruncate(fd, size)
            self.fsync(fd)
        finally:
            self.close(fd)

    def makedirs(self, path: Path) -> list[Path]:
        """Create `path` and missing parents; return the directories whose entries changed."""
        if path.is_dir():
            return []
        changed = self.makedirs(path.parent)
        try:
            self.mkdir(path)
        except FileExistsError:
            return changed
        return [*changed, path.parent]

    def write_atomically(self, path: Path, data: bytes | Iterable[bytes]) -> None:
        """Replace `path` with `data` (or its chunks) durably: a new file, synced, renamed over, the directory synced."""
        temporary = path.with_name(path.name + ".new")
        fd = self.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                self.write(fd, chunk)
            self.fsync(fd)
        finally:
            self.close(fd)
        self.rename(temporary, path)
        self.sync_path(path.parent)


def out_of_descriptors(error: OSError) -> bool:
    return error.errno in (errno.EMFILE, errno.ENFILE)
