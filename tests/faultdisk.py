"""A Disk for the fault tests: fails the Nth call, and knows what a power cut would leave.

It wraps the real file system (the storage under test reads and writes real
files) and keeps, beside it, a model of what is durable: each file's content
as of its last fsync and each directory's entries as of its last fsync, plus
what changed since. `materialize` writes what a power cut at this moment would
leave into a fresh directory: only what was synced, or (the `lucky` mode)
that plus a random subset of the unsynced writes to files, applied in order, as a
real disk may persist some of them, and a random prefix of each directory's
unsynced changes (file systems journal those in order).
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from server.storage.disk import Disk


class PowerCut(OSError):
    """The machine is off: nothing reaches the disk any more."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "power cut")


@dataclass(eq=False)
class Inode:
    is_dir: bool
    content: bytearray = field(default_factory=bytearray)  # files: what the page cache has
    durable: bytes = b""  # files: what an fsync made durable
    changes: list[tuple[int, bytes | None]] = field(
        default_factory=list
    )  # files: unsynced (offset, data) or (size, None) for a truncate
    entries: dict[str, Inode] = field(default_factory=dict)  # dirs: names now
    durable_entries: dict[str, Inode] = field(default_factory=dict)  # dirs: names an fsync made durable
    entry_changes: list[tuple[str, Inode | None]] = field(default_factory=list)  # dirs: unsynced (name, inode or None)


class SimulatedDisk(Disk):
    """Real file calls, counted, failing where told, and a model of what is durable."""

    COUNTED = ("open", "write", "pwrite", "fsync", "fdatasync", "ftruncate", "rename", "unlink", "mkdir")

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.calls = 0
        self.fail_at: int | None = None  # the call number that fails (1-based)
        self.fail_errno = errno.EIO
        self.persistent = False  # every call from fail_at on fails, until cleared
        self.cut_at: int | None = None  # the call number at which the power goes
        self.dead = False
        # A test can hold the storage's thread just before a call (to line up what happens meanwhile).
        self.pause_at: int | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()
        self._lock = threading.Lock()
        self._fds: dict[int, Inode] = {}
        self.tree = self._scan(self.root)

    # The model ------------------------------------------------------------------

    def _scan(self, path: Path) -> Inode:
        """What exists when the disk is created is durable."""
        if path.is_dir():
            node = Inode(is_dir=True)
            for child in path.iterdir():
                node.entries[child.name] = self._scan(child)
            node.durable_entries = dict(node.entries)
            return node
        data = path.read_bytes()
        return Inode(is_dir=False, content=bytearray(data), durable=data)

    def _lookup(self, path: Path) -> tuple[Inode | None, str, Inode | None]:
        """(parent directory, name, the inode if it exists) in the model, for a path under root."""
        parts = Path(os.path.abspath(path)).relative_to(self.root).parts
        if not parts:
            return None, "", self.tree
        node = self.tree
        for part in parts[:-1]:
            node = node.entries.get(part)
            if node is None:
                return None, parts[-1], None
        return node, parts[-1], node.entries.get(parts[-1])

    def _inside(self, path: Path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(self.root)

    def _call(self, name: str) -> OSError | None:
        """Count a call; raise PowerCut once the power is gone; return the error to inject, if any."""
        if self.pause_at is not None and self.calls + 1 == self.pause_at:
            self.paused.set()
            self.resume.wait(10)
        with self._lock:
            if self.dead:
                raise PowerCut()
            self.calls += 1
            if self.cut_at is not None and self.calls >= self.cut_at:
                self.dead = True
                raise PowerCut()
            if self.fail_at is not None and (
                self.calls == self.fail_at or (self.persistent and self.calls > self.fail_at)
            ):
                return OSError(self.fail_errno, f"injected {os.strerror(self.fail_errno)} ({name}, call {self.calls})")
            return None

    def _fail(self, name: str) -> None:
        error = self._call(name)
        if error is not None:
            raise error

    # Disk -------------------------------------------------------------------------

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        self._fail("open")
        fd = super().open(path, flags, mode)
        if not self._inside(path):
            return fd
        with self._lock:
            parent, name, node = self._lookup(path)
            if node is None:
                assert parent is not None, f"{path}: parent not in the model"
                node = Inode(is_dir=False)
                parent.entries[name] = node
                parent.entry_changes.append((name, node))
            if flags & os.O_TRUNC and node.content:
                node.content.clear()
                node.changes.append((0, None))
            self._fds[fd] = node
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
        super().close(fd)

    def write(self, fd: int, data: bytes) -> None:
        # Every write of the storage appends (O_APPEND); a failing one writes half first, as a full disk may.
        error = self._call("write")
        if error is not None:
            data = data[: len(data) // 2]
        super().write(fd, data)
        node = self._fds.get(fd)
        if node is not None:
            with self._lock:
                node.changes.append((len(node.content), bytes(data)))
                node.content.extend(data)
        if error is not None:
            raise error

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        # In place (an erasure); a failing one writes half first.
        error = self._call("pwrite")
        if error is not None:
            data = data[: len(data) // 2]
        super().pwrite(fd, data, offset)
        node = self._fds.get(fd)
        if node is not None:
            with self._lock:
                node.changes.append((offset, bytes(data)))
                _resize(node.content, max(len(node.content), offset + len(data)))
                node.content[offset : offset + len(data)] = data
        if error is not None:
            raise error

    def ftruncate(self, fd: int, size: int) -> None:
        self._fail("ftruncate")
        super().ftruncate(fd, size)
        node = self._fds.get(fd)
        if node is not None:
            with self._lock:
                _resize(node.content, size)
                node.changes.append((size, None))

    def fsync(self, fd: int) -> None:
        self._fail("fsync")
        super().fsync(fd)
        self._synced(fd)

    def fdatasync(self, fd: int) -> None:
        self._fail("fdatasync")
        super().fdatasync(fd)
        self._synced(fd)

    def _synced(self, fd: int) -> None:
        node = self._fds.get(fd)
        if node is None:
            return
        with self._lock:
            if node.is_dir:
                node.durable_entries = dict(node.entries)
                node.entry_changes.clear()
            else:
                node.durable = bytes(node.content)
                node.changes.clear()

    def rename(self, source: Path, target: Path) -> None:
        self._fail("rename")
        super().rename(source, target)
        with self._lock:
            parent, name, node = self._lookup(source)
            target_parent, target_name, _ = self._lookup(target)
            assert parent is not None and node is not None and target_parent is not None
            del parent.entries[name]
            parent.entry_changes.append((name, None))
            target_parent.entries[target_name] = node
            target_parent.entry_changes.append((target_name, node))

    def unlink(self, path: Path) -> None:
        self._fail("unlink")
        super().unlink(path)
        with self._lock:
            parent, name, _ = self._lookup(path)
            assert parent is not None
            del parent.entries[name]
            parent.entry_changes.append((name, None))

    def mkdir(self, path: Path) -> None:
        self._fail("mkdir")
        super().mkdir(path)
        with self._lock:
            parent, name, _ = self._lookup(path)
            assert parent is not None
            node = Inode(is_dir=True)
            parent.entries[name] = node
            parent.entry_changes.append((name, node))

    # After the power cut --------------------------------------------------------

    def materialize(self, target: Path, rng: random.Random | None = None) -> None:
        """Write what a power cut now would leave into `target` (an empty directory).

        Without `rng`: only what was synced. With it: plus each unsynced write
        kept with probability 1/2, and a prefix of each directory's changes (the "lucky disk").
        """
        with self._lock:
            self._write_dir(self.tree, target, rng)

    def _write_dir(self, node: Inode, target: Path, rng: random.Random | None) -> None:
        entries = dict(node.durable_entries)
        if rng is not None:
            # Directory changes are journaled in order (ext4, xfs): a prefix of them survives.
            for name, child in node.entry_changes[: rng.randint(0, len(node.entry_changes))]:
                if child is None:
                    entries.pop(name, None)
                else:
                    entries[name] = child
        for name, child in entries.items():
            path = target / name
            if child.is_dir:
                path.mkdir()
                self._write_dir(child, path, rng)
            else:
                data = bytearray(child.durable)
                if rng is not None:
                    for at, written in child.changes:
                        if rng.random() < 0.5:
                            if written is None:
                                _resize(data, at)
                            else:
                                # A later write kept without an earlier one leaves a hole of zeros.
                                _resize(data, max(len(data), at))
                                data[at : at + len(written)] = written
                path.write_bytes(bytes(data))


def _resize(data: bytearray, size: int) -> None:
    del data[size:]
    data.extend(b"\0" * (size - len(data)))
