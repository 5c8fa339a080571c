"""The filesystem core: every operation of the mount on a datastore, without FUSE.

Paths are the mount's (e.g. "/vm1/disk.vmdk"). Methods raise OSError (with an errno) or a
`VmfsCryptError`; the FUSE adapter (vmfs_crypt/fuse) maps both to errno in one place and is
otherwise a thin translation. Key material comes through a `KeyAccess` (the agent client in
a mount, an in-process broker in tests); the core only ever holds DEKs, in the DEK cache, and
only while a file under them is open.

Locking: `_meta_lock` serialises changes to folder key files and the open-file table with
namespace operations; each encrypted file's data is guarded by its own readers-writer lock
(taken after `_meta_lock`, never before it). Key entries change before the visible change
(create, link, rename, unlink of a descriptor), or are rolled back.

Where a file's key lives (FORMAT.md 7.4) is kept true through every change (issue 7, case 8):
a name that gets a key in the folder key file is keyed by no descriptor (whose lines would
win), a descriptor that goes away (unlink, replaced, emptied) leaves its key to its extent
in the folder key file, and a descriptor-keyed flat extent changes size only together with
its extent line (case 9).
"""

import contextlib
import errno
import logging
import os
import posixpath
import stat
import time
from dataclasses import dataclass

from ..agent.protocol import KeyAccess
from ..crypto.sectors import SECTOR_SIZE
from ..errors import DataError, FormatError, InUseError, VmfsCryptError
from ..format.atomicio import NotRegularFile, read_regular, write_atomic
from ..format.descriptor import (DESCRIPTOR_MAGIC, DESCRIPTOR_MAX_SIZE, Extent, encryption_lines, extents,
                                 insert_encryption_lines, read_descriptor, read_key_record, set_extent_sectors,
                                 strip_encryption_lines)
from ..format.folder import (FOLDER_KEYS_MAX_SIZE, FOLDER_KEYS_NAME, FolderKeys, FolderState, VmFolder,
                             check_extent_length, is_hidden_name)
from ..format.keysafe import KeyRecord, KeyRef
from ..format.kinds import FileKind, classify, classify_name
from ..format.oplock import FolderOpLock
from . import sectorio
from .handles import DescriptorHandle, EncryptedHandle, Handle, PlainHandle
from .keycache import DekCache
from .namespace import check_move, is_fuse_hidden, plain_symlink_allowed, symlink_allowed, symlink_error
from ..sysutil import RENAME_NOREPLACE, renameat2
from .datapath import choose as choose_datapath
from .online import OnlineFolder
from .openfiles import DescriptorFile, EncryptedFile, OpenFileTable
from .tree import Entry, Tree
from .policy import new_folder_kek

log = logging.getLogger("vmfs_crypt.fs")
_O_DIRECT = getattr(os, "O_DIRECT", 0)
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2  # utimensat(2)'s special tv_nsec values
STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino", "st_rdev")
STATFS_FIELDS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                 "f_frsize", "f_namemax")


@dataclass(frozen=True)
class Caller:
    """Who asked (libfuse's request context): new files get this owner when the daemon runs as root."""

    uid: int
    gid: int
    pid: int = 0


def _dtype_mode(entry: os.DirEntry) -> int:
    """The file type bits of a directory entry, from d_type (no stat)."""
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


def _put_back(folder: VmFolder, keys: FolderKeys, name: str, previous: KeyRecord | None) -> None:
    """Undo a key entry change: `name` gets its previous record again (none: no entry), and the key file is saved."""
    if previous is None:
        keys.files.pop(name, None)
    else:
        keys.files[name] = previous
    folder.save_keys(keys)


def _enoent() -> OSError:
    return OSError(errno.ENOENT, os.strerror(errno.ENOENT))


KEYS_LOCK_WAIT_S = 10.0  # how long a key file update waits for an offline operation's commit, then EBUSY


class VmfsCore:
    """Operations of the mount on the datastore at `root`."""

    def __init__(self, root: str, keys: KeyAccess) -> None:
        self.tree = Tree(root)
        self.root = self.tree.root
        self.keys = keys
        self.files = OpenFileTable()
        self.deks = DekCache(keys)
        self._meta_lock = self.files.lock  # one lock for key files, names and the table
        self.revoked: set[KeyRef] = set()  # KEKs revoked under on_revoke = "lock", as the agent reports
        self._as_root = os.geteuid() == 0
        self.datapath = choose_datapath()
        log.info("data path: %s", self.datapath.description)
        # Folders (by backing inode) that an online operation rewrites (ops/online.py, issue 10).
        self.online: dict[tuple[int, int], OnlineFolder] = {}
        self._key_locks: dict[str, list] = {}  # folder -> [FolderOpLock, depth] (_keys_locked)

    def close(self) -> None:
        self.tree.close()

    # -- helpers -------------------------------------------------------------------------
    def folder_of(self, e: Entry) -> VmFolder:
        folder = VmFolder(e.parent_real, e.shown_parent)
        if self.online:
            st = os.fstat(e.dirfd)
            mark = self.online.get((st.st_dev, st.st_ino))
            if mark is not None:
                # Its key file records the operation in flight (FORMAT.md 7.8), which this mount
                # carries out itself; wait while the operation commits (a journal is present then).
                folder.allow_reencrypt = True
                with mark.gate:
                    pass
        return folder

    def _refuse_online(self, *entries: Entry) -> None:
        """Names do not change in a folder under an online operation: its file list is fixed (EBUSY)."""
        if not self.online:
            return
        for e in entries:
            st = os.fstat(e.dirfd)
            mark = self.online.get((st.st_dev, st.st_ino))
            if mark is not None:
                log.warning("%s: refused while an online %s runs in its folder (issue 10)", e.rel, mark.op)
                raise OSError(errno.EBUSY, f"an online {mark.op} runs in this folder")

    def _lstat(self, e: Entry) -> os.stat_result:
        return os.lstat(e.at, dir_fd=e.dirfd)

    def _kind(self, e: Entry, st: os.stat_result | None = None) -> tuple[FileKind, VmFolder, FolderState]:
        folder = self.folder_of(e)
        state = folder.state()
        kind = classify(folder, e.name, st, state)
        if kind is FileKind.HIDDEN:
            raise _enoent()
        return kind, folder, state

    def _is_revoked(self, kek: KeyRef | None) -> bool:
        return kek is not None and kek in self.revoked

    def _chown_new(self, e: Entry, caller: Caller | None, mode: int | None = None, fd: int | None = None) -> None:
        """Give a new entry the caller's uid, and its gid unless the directory is setgid (POSIX); then exactly `mode`.

        The kernel passes the mode with the caller's umask applied already (no FUSE_CAP_DONT_MASK),
        so the daemon's own umask must not apply a second time, and chown(2) clears the set-id
        bits a create asked for: the mode is set again after the chown (issue 12, chmod/12).
        A directory in a setgid directory keeps the S_ISGID it inherits; a new file of a group
        the caller does not belong to loses S_ISGID, as inode_init_owner does.
        """
        gid = caller.gid if caller is not None else -1
        parent_sgid = bool(os.stat(".", dir_fd=e.dirfd).st_mode & stat.S_ISGID)
        if caller is not None and self._as_root:
            os.chown(e.at, caller.uid, -1 if parent_sgid else gid, dir_fd=e.dirfd, follow_symlinks=False)
        if mode is None:
            return
        own = fd if fd is not None else os.open(e.at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
        try:
            st = os.fstat(own)
            bits = stat.S_IMODE(mode)
            if stat.S_ISDIR(st.st_mode) and parent_sgid:
                bits |= stat.S_ISGID
            elif (bits & stat.S_ISGID and caller is not None and caller.uid != 0 and st.st_gid != caller.gid):
                bits &= ~stat.S_ISGID
            if stat.S_IMODE(st.st_mode) != bits and not stat.S_ISLNK(st.st_mode):
                os.chmod(f"/proc/self/fd/{own}", bits)
        finally:
            if fd is None:
                os.close(own)

    @staticmethod
    def _damaged(folder: VmFolder) -> DataError:
        return DataError(folder.damage())

    # -- keys ----------------------------------------------------------------------------
    def _key_record(self, folder: VmFolder, name: str, size: int, what: str) -> tuple[KeyRecord, bytes | None]:
        """(key record, DEK if new) of an existing encrypted file; an empty file without a key gets one.

        The folder key file is parsed even when a descriptor holds the key: a broken one makes
        the whole folder unreadable (FORMAT.md 7.3, fail closed).
        """
        keys = folder.load_keys()
        found = folder.descriptor_record_for(name)
        if found:
            check_extent_length(what, size, found[0], found[2])
            return found[1], None
        record = keys.files.get(name)
        if record is not None:
            return record, None
        if size:
            raise DataError(f"{what}: no key for this encrypted file in {FOLDER_KEYS_NAME} or a descriptor")
        return self._allocate_key(folder, name, what)

    @contextlib.contextmanager
    def _keys_locked(self, folder: VmFolder):
        """Hold the folder's operation lock across a read-modify-write of its key file.

        An offline operation (a shallow rekey while mounted) holds it from reading the key file
        to its journal commit; without it, a key entry the mount added meanwhile was overwritten
        by the commit and the new file's data was lost (found by issue 10's kill tests). The
        caller holds `_meta_lock`, which makes this reentrant within the mount (a POSIX lock is
        the process's: an inner release would drop the outer one). A folder under this mount's
        own online operation is locked by that operation already.
        """
        if folder.allow_reencrypt:
            yield
            return
        held = self._key_locks.get(folder.backing_dir)
        if held is not None:
            held[1] += 1
            try:
                yield
            finally:
                held[1] -= 1
            return
        lock = FolderOpLock(folder.backing_dir, "vmfs-crypt mount (a key file update)")
        deadline = time.monotonic() + KEYS_LOCK_WAIT_S
        while True:
            try:
                lock.acquire()
                break
            except InUseError as exc:
                if time.monotonic() >= deadline:
                    log.warning("%s", exc)
                    raise OSError(errno.EBUSY, "another vmfs-crypt operation changes this folder") from None
                time.sleep(0.02)  # an offline commit takes milliseconds; the lock cannot be waited on (lockf NB)
        self._key_locks[folder.backing_dir] = [lock, 1]
        try:
            yield
        finally:
            del self._key_locks[folder.backing_dir]
            lock.release()

    def _allocate_key(self, folder: VmFolder, name: str, what: str) -> tuple[KeyRecord, bytes]:
        """A new DEK for `name`, recorded in the folder key file (and no descriptor keys `name` any more)."""
        with self._keys_locked(folder):
            keys = folder.load_keys()
            record, dek = self.keys.new_file_key(keys.kek)
            self._unkey_name(folder, name, os.path.dirname(what))
            keys.files[name] = record
            folder.save_keys(keys)
            return record, dek

    def _unkey_name(self, folder: VmFolder, name: str, parent_rel: str) -> list[tuple[str, bytes, int]]:
        """Strip the key lines of every descriptor that keys `name`: a new file of that name is keyed elsewhere.

        A descriptor's key lines win over the folder key file (FORMAT.md 7.4): left in place
        they would open the new file with the old file's DEK (garbage). Returns what was
        stripped, (path, old bytes, mode), for a rollback.
        """
        stripped = []
        for _ in range(64):  # each round strips one descriptor; a folder has few
            found = folder.descriptor_record_for(name)
            if not found:
                break
            stripped.append(self._strip_descriptor_keys(folder, found[0], parent_rel))
        return stripped

    def _strip_descriptor_keys(self, folder: VmFolder, desc_name: str, parent_rel: str) -> tuple[str, bytes, int]:
        """Remove a descriptor's key lines, at rest and in its open state; (path, old bytes, mode)."""
        path = os.path.join(folder.backing_dir, desc_name)
        found = read_descriptor(path)
        st = os.lstat(path)
        if found is not None and found.has_encryption_lines:
            write_atomic(path, strip_encryption_lines(found.raw), stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
        desc = self.files.descriptors.get(posixpath.join(parent_rel, desc_name))
        if desc is not None:
            with desc.lock:
                desc.key_lines = []
        return path, found.raw if found is not None else b"", stat.S_IMODE(st.st_mode)

    def _restore_descriptors(self, stripped: list[tuple[str, bytes, int]], parent_rel: str) -> None:
        for path, raw, mode in stripped:
            if raw:
                write_atomic(path, raw, mode)
                desc = self.files.descriptors.get(posixpath.join(parent_rel, os.path.basename(path)))
                if desc is not None:
                    with desc.lock:
                        desc.key_lines = encryption_lines(raw)

    def _leave_key_to_extent(self, folder: VmFolder, e: Entry, key_lines: list[bytes], text: bytes) -> None:
        """A descriptor stops holding its key (unlinked, replaced, emptied): its extent keeps it, in the folder key file.

        The extent's sectors are encrypted under that key; without this the extent could no
        longer be read (issue 7, case 8). An extent that does not exist needs no key. Damaged
        key lines are refused (FormatError): they may be the only copy of a repairable key.
        """
        if not key_lines:
            return
        record = read_key_record(b"".join(key_lines), e.shown)
        listed = extents(text)
        if len(listed) != 1:
            raise FormatError(f"{e.shown}: has encryption lines but {len(listed)} extents (FORMAT.md 6.2)")
        extent = listed[0].file_name
        if "/" in extent or extent in (".", "..") or is_hidden_name(extent):
            return
        try:
            if not stat.S_ISREG(os.lstat(os.path.join(folder.backing_dir, extent)).st_mode):
                return
        except FileNotFoundError:
            return
        with self._keys_locked(folder):
            keys = folder.load_keys()
            keys.files[extent] = record
            folder.save_keys(keys)
        log.info("%s: the key of %s moved from the descriptor to %s", e.rel, extent, FOLDER_KEYS_NAME)

    def _descriptor_keys_at(self, e: Entry) -> tuple[list[bytes], bytes]:
        """(key lines, text naming the extent) of the descriptor at `e`: its open state's lines, its stored extent lines."""
        found = read_descriptor(e.real)
        desc = self.files.descriptors.get(e.rel)
        if desc is not None:
            text = found.raw if found is not None else bytes(desc.view)
            return list(desc.key_lines), text
        if found is None:
            return [], b""
        return encryption_lines(found.raw), found.raw

    # -- metadata ------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict:
        with self.tree.entry(path) as e:
            if is_hidden_name(e.name):
                raise _enoent()
            st = self._lstat(e)
            attrs = {k: getattr(st, k) for k in STAT_FIELDS}
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            if stat.S_ISREG(st.st_mode) and e.name.lower().endswith(".vmdk"):
                desc = self.files.descriptors.get(e.rel)
                if desc is not None:
                    attrs["st_size"] = len(desc.view)
                elif st.st_size < DESCRIPTOR_MAX_SIZE and self.folder_of(e).state() is not FolderState.PLAIN:
                    found = read_descriptor(e.real)
                    if found is not None:
                        attrs["st_size"] = len(found.view)
            return attrs

    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """(name, inode number, file type bits) of each visible entry: the inode numbers are the
        backing files' (use_ino; a zero would make readdir(3) skip the entry)."""
        with self.tree.entry(path) as e:
            fd = os.open(e.at, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
            try:
                here = os.fstat(fd).st_ino
                with os.scandir(fd) as it:
                    # .fuse_hidden*: files libfuse keeps for handles still open after an unlink or a
                    # rename over them (gone at their release, which the kernel sends asynchronously)
                    entries = [(d.name, d.inode(), _dtype_mode(d)) for d in it
                               if not is_hidden_name(d.name) and not is_fuse_hidden(d.name)]
                # "..": the parent's number is not ours to know at the root; any non-zero one will do.
                return [(".", here, stat.S_IFDIR), ("..", 1, stat.S_IFDIR)] + entries
            finally:
                os.close(fd)

    def readlink(self, path: str) -> str:
        """The target of an admissible symlink; EIO (and a log line) for one the kernel must not follow (case 5)."""
        with self.tree.entry(path) as e:
            target = os.readlink(e.at, dir_fd=e.dirfd)
            if not self._symlink_ok(e, target):
                log.error("%s: symlink to %r not followed: it leaves the datastore, or the encrypted folder it is in, "
                          "or names a file of another kind (replace it with the file itself)", e.rel, target)
                raise OSError(errno.EIO, "symlink not followed")
            return target

    def _symlink_ok(self, e: Entry, target: str) -> bool:
        """May a symlink at `e` point to `target` (plain folders: inside the datastore; encrypted: FORMAT.md 7.2)?"""
        if self.folder_of(e).state() is FolderState.PLAIN:
            return plain_symlink_allowed(e.rel.count("/"), target)

        def state_of(rel: str, last: bool):
            path = os.path.join(e.parent_real, rel)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    return None  # a name no file can have (pjdfstest symlink/02): nothing there
                raise
            if stat.S_ISDIR(st.st_mode):
                return VmFolder(path).state()
            if last:
                return None  # a file (or the next hop of a chain, checked at its own readlink)
            return FolderState.PLAIN  # not a directory along the way (a symlink: not followed here)
        return symlink_allowed(e.name, target, state_of)

    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self.tree.root_fd)
        return {k: getattr(sv, k) for k in STATFS_FIELDS}

    def _following_extents(self, e: Entry, st: os.stat_result, same_group: bool) -> list[str]:
        """The extents (in its folder) of the descriptor at `e` that follow its owner and mode.

        Issue 9: libvirt's dynamic ownership chowns the descriptor it was given, not the flat
        extent `create` made 0600 root, so QEMU got EACCES on the extent. An extent follows
        when it is a regular file with the descriptor's owner (and group, for chown) before the
        change: a descriptor's owner never reaches a file someone else owns.
        """
        if not stat.S_ISREG(st.st_mode) or st.st_size > DESCRIPTOR_MAX_SIZE:
            return []
        try:
            _, text = self._descriptor_keys_at(e)
        except (OSError, VmfsCryptError):
            return []
        out = []
        for extent in {x.file_name for x in extents(text) if x.file_name}:
            if "/" in extent or extent in (".", "..", e.name) or is_hidden_name(extent):
                continue
            try:
                xs = os.stat(extent, dir_fd=e.dirfd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(xs.st_mode) and xs.st_uid == st.st_uid and (not same_group or xs.st_gid == st.st_gid):
                out.append(extent)
        return sorted(out)

    def chmod(self, path: str, mode: int) -> None:
        with self.tree.entry(path) as e:
            fd = os.open(e.at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
            try:
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.EOPNOTSUPP, "symlinks have no mode of their own")
                followers = self._following_extents(e, st, same_group=False)
                os.chmod(f"/proc/self/fd/{fd}", mode)
            finally:
                os.close(fd)
            for extent in followers:
                self._chmod_at(e.dirfd, extent, mode)

    @staticmethod
    def _chmod_at(dirfd: int, name: str, mode: int) -> None:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.tree.entry(path) as e:
            st = os.stat(e.at, dir_fd=e.dirfd, follow_symlinks=False)
            followers = self._following_extents(e, st, same_group=True)
            os.chown(e.at, uid, gid, dir_fd=e.dirfd, follow_symlinks=False)
            for extent in followers:
                os.chown(extent, uid, gid, dir_fd=e.dirfd, follow_symlinks=False)

    def utimens(self, path: str, times_ns: tuple[int, int] | None) -> None:
        """Set (atime, mtime) in ns; either may be UTIME_NOW or UTIME_OMIT, as utimensat(2) allows."""
        with self.tree.entry(path) as e:
            if times_ns is not None and any(t in (UTIME_NOW, UTIME_OMIT) for t in times_ns):
                st = self._lstat(e)
                now = time.time_ns()
                current = (st.st_atime_ns, st.st_mtime_ns)
                times_ns = tuple(now if t == UTIME_NOW else current[i] if t == UTIME_OMIT else t
                                 for i, t in enumerate(times_ns))
            os.utime(e.at, ns=times_ns, dir_fd=e.dirfd, follow_symlinks=False)

    def access(self, path: str, amode: int) -> None:
        with self.tree.entry(path) as e:
            if not os.access(e.at, amode, dir_fd=e.dirfd, follow_symlinks=False):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    # -- directories and names -----------------------------------------------------------
    def mkdir(self, path: str, mode: int, caller: Caller | None = None) -> None:
        with self.tree.entry(path) as e:
            if is_hidden_name(e.name):
                raise OSError(errno.EACCES, "reserved name")
            parent = self.folder_of(e)
            state = parent.state()
            if state is FolderState.DAMAGED:
                raise self._damaged(parent)
            # Issue 9: the datastore's policy may ask for a new KEK for a folder made in a plaintext one.
            policy_kek = new_folder_kek(self.root, self.keys, e.name) if state is FolderState.PLAIN else None
            with self._meta_lock:
                kek = parent.load_keys().kek if state is FolderState.ENCRYPTED else policy_kek
                os.mkdir(e.at, mode, dir_fd=e.dirfd)
                try:
                    if kek is not None:
                        # A subfolder of an encrypted folder is encrypted too, under the parent's KEK.
                        VmFolder(e.real, e.shown).save_keys(FolderKeys(kek))
                    self._chown_new(e, caller, mode)
                except BaseException:
                    self._remove_new_dir(e)
                    raise

    def _remove_new_dir(self, e: Entry) -> None:
        try:
            os.unlink(os.path.join(e.real, FOLDER_KEYS_NAME))
        except FileNotFoundError:
            pass
        os.rmdir(e.at, dir_fd=e.dirfd)

    def rmdir(self, path: str) -> None:
        """Remove a folder that holds nothing but our metadata; the key file goes last and comes back if rmdir fails."""
        with self.tree.entry(path) as e:
            fd = os.open(e.at, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
            try:
                with self._meta_lock:
                    names = os.listdir(fd)
                    if any(not is_hidden_name(n) for n in names):
                        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
                    keys_raw = None
                    if FOLDER_KEYS_NAME in names:
                        try:
                            keys_raw = read_regular(os.path.join(e.real, FOLDER_KEYS_NAME), FOLDER_KEYS_MAX_SIZE)
                        except NotRegularFile:
                            raise DataError(VmFolder(e.real, e.shown).damage()) from None
                    for name in names:  # stray temporaries, the journal of a failed operation
                        if name != FOLDER_KEYS_NAME:
                            os.unlink(name, dir_fd=fd)
                    if keys_raw is not None:
                        os.unlink(FOLDER_KEYS_NAME, dir_fd=fd)
                    try:
                        os.rmdir(e.at, dir_fd=e.dirfd)
                    except BaseException:
                        if keys_raw is not None:  # a file appeared meanwhile: the folder stays encrypted
                            write_atomic(os.path.join(e.real, FOLDER_KEYS_NAME), keys_raw, 0o600)
                        raise
            finally:
                os.close(fd)

    def symlink(self, target: str, path: str, caller: Caller | None = None) -> None:
        with self.tree.entry(path) as e:
            self._refuse_online(e)
            if is_hidden_name(e.name):
                raise OSError(errno.EACCES, "reserved name")
            if not self._symlink_ok(e, target):
                raise symlink_error(e.name, target)
            os.symlink(target, e.at, dir_fd=e.dirfd)
            self._chown_new(e, caller)

    def mknod(self, path: str, mode: int, dev: int, caller: Caller | None = None) -> None:
        """FIFOs, sockets and device nodes hold no data: nothing to encrypt (README, "What is encrypted")."""
        with self.tree.entry(path) as e:
            self._refuse_online(e)
            if is_hidden_name(e.name):
                raise OSError(errno.EACCES, "reserved name")
            if stat.S_ISREG(mode):
                fh = self.create(path, stat.S_IMODE(mode), os.O_WRONLY, caller)
                self.release(fh)
                return
            os.mknod(e.at, mode, dev, dir_fd=e.dirfd)
            self._chown_new(e, caller, mode)

    def unlink(self, path: str) -> None:
        with self.tree.entry(path) as e:
            self._refuse_online(e)
            kind, folder, state = self._kind(e)
            with self._meta_lock, self._keys_locked(folder):
                keys = None
                if kind is FileKind.ENCRYPTED:
                    if state is FolderState.DAMAGED:
                        raise self._damaged(folder)
                    keys = folder.load_keys()  # read (and checked) before anything changes
                elif kind is FileKind.DESCRIPTOR:
                    # The extent it keys stays readable: its key goes to the folder key file first.
                    self._leave_key_to_extent(folder, e, *self._descriptor_keys_at(e))
                os.unlink(e.at, dir_fd=e.dirfd)
                self.files.unlinked(e.rel)
                if keys is not None and keys.files.pop(e.name, None) is not None:
                    try:
                        folder.save_keys(keys)
                    except OSError as exc:  # the file is gone; its unused key entry is harmless
                        log.warning("%s: removed, but its key entry stays in %s (%s)", e.rel, FOLDER_KEYS_NAME, exc)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """rename(2); RENAME_NOREPLACE is honoured atomically, RENAME_EXCHANGE is not supported (EINVAL)."""
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE and RENAME_WHITEOUT are not supported")
        with self.tree.entries(old, new) as (eo, en):
            self._refuse_online(eo, en)
            if is_hidden_name(en.name):
                raise OSError(errno.EACCES, "reserved name")
            if eo.rel == en.rel:
                self._lstat(eo)
                return  # POSIX: a rename to itself does nothing
            with self._meta_lock:
                kind, src, src_state = self._kind(eo)
                dst = self.folder_of(en)
                dst_state = dst.state()
                if flags & RENAME_NOREPLACE and os.path.lexists(en.real):
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))  # before any key changes
                if stat.S_ISDIR(self._lstat(eo).st_mode):
                    restore = self._empty_replaced_dir(en)
                    try:
                        self._rename_entry(eo, en, flags)
                    except BaseException:
                        restore()
                        raise
                    self.files.renamed(eo.rel, en.rel)
                    return
                check_move(kind, dst_state, en.name)
                self._check_moved_symlink(eo, en)
                if kind is FileKind.DESCRIPTOR:
                    self._check_descriptor_move(eo, en)
                if is_fuse_hidden(en.name):
                    # libfuse hides a file unlinked while open: for its key, that is the unlink
                    if kind is FileKind.DESCRIPTOR:
                        self._leave_key_to_extent(src, eo, *self._descriptor_keys_at(eo))
                        self._forget_open_key_lines(eo.rel)
                    self._rename_entry(eo, en, flags)
                    self.files.renamed(eo.rel, en.rel)
                    return
                self._replacing(en, dst, dst_state)
                if kind is FileKind.ENCRYPTED:
                    self._rename_encrypted(eo, en, src, dst, src_state, dst_state, flags)
                else:
                    self._rename_entry(eo, en, flags)
                self.files.renamed(eo.rel, en.rel)
                for handle in self.files.handles():
                    if isinstance(handle, EncryptedHandle) and handle.rel == en.rel:
                        self.datapath.rename(handle.file.lock, en.rel)  # names in native log records

    def _empty_replaced_dir(self, en: Entry):
        """A folder renamed over an empty folder: our metadata in the replaced one goes first.

        An empty subfolder of an encrypted folder holds its key file; left there, rename(2)
        answered ENOTEMPTY for a folder the mount shows empty (pjdfstest rename/09, rename/10,
        issue 12). Returns what puts the key file back if the rename fails.
        """
        try:
            fd = os.open(en.at, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=en.dirfd)
        except (FileNotFoundError, NotADirectoryError, OSError):
            return lambda: None  # nothing there, or not a folder: rename(2) answers for it
        try:
            names = os.listdir(fd)
            if not names or any(not is_hidden_name(n) for n in names):
                return lambda: None  # empty at rest, or not empty in the mount either (ENOTEMPTY)
            keys_raw = None
            if FOLDER_KEYS_NAME in names:
                try:
                    keys_raw = read_regular(f"/proc/self/fd/{fd}/{FOLDER_KEYS_NAME}", FOLDER_KEYS_MAX_SIZE)
                except NotRegularFile:
                    raise DataError(VmFolder(en.real, en.shown).damage()) from None
            for name in names:
                if name != FOLDER_KEYS_NAME:
                    os.unlink(name, dir_fd=fd)
            if keys_raw is not None:
                os.unlink(FOLDER_KEYS_NAME, dir_fd=fd)
        finally:
            os.close(fd)

        def restore() -> None:
            if keys_raw is not None and os.path.isdir(en.real):
                write_atomic(os.path.join(en.real, FOLDER_KEYS_NAME), keys_raw, 0o600)
        return restore

    def _forget_open_key_lines(self, rel: str) -> None:
        desc = self.files.descriptors.get(rel)
        if desc is not None:
            with desc.lock:
                desc.key_lines = []

    def _replacing(self, en: Entry, dst: VmFolder, dst_state: FolderState) -> None:
        """Before a rename replaces a descriptor that holds a key: the key goes to its extent (as at unlink)."""
        if dst_state is FolderState.PLAIN:
            return
        try:
            st = self._lstat(en)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) and classify(dst, en.name, st, dst_state) is FileKind.DESCRIPTOR:
            self._leave_key_to_extent(dst, en, *self._descriptor_keys_at(en))
            self._forget_open_key_lines(en.rel)

    def _check_descriptor_move(self, eo: Entry, en: Entry) -> None:
        """A descriptor with key lines stays in its folder (rename within it is fine; link never).

        In another folder its lines would key a file of its extent's name there, with a DEK
        that is not that file's (garbage), and leave its own extent without a key; in a plain
        folder they would make that folder damaged. Copying (EXDEV) drops the lines instead.
        """
        if os.path.dirname(eo.rel) != os.path.dirname(en.rel) and self._descriptor_keys_at(eo)[0]:
            raise OSError(errno.EXDEV, "a descriptor that holds its disk's key stays in its folder; copy it instead")

    @staticmethod
    def _rename_entry(eo: Entry, en: Entry, flags: int) -> None:
        if flags:
            renameat2(eo.dirfd, eo.at, en.dirfd, en.at, flags)
        else:
            os.rename(eo.at, en.at, src_dir_fd=eo.dirfd, dst_dir_fd=en.dirfd)

    def _check_moved_symlink(self, eo: Entry, en: Entry) -> None:
        """A symlink renamed or linked elsewhere must be admissible there (its target is relative to it)."""
        if stat.S_ISLNK(self._lstat(eo).st_mode) and not self._symlink_ok(en, os.readlink(eo.at, dir_fd=eo.dirfd)):
            raise symlink_error(en.name, os.readlink(eo.at, dir_fd=eo.dirfd))

    def _rename_encrypted(self, eo: Entry, en: Entry, src: VmFolder, dst: VmFolder,
                          src_state: FolderState, dst_state: FolderState, flags: int) -> None:
        """Move the key entry with the file: the new name's entry first, the old one after the rename.

        A descriptor that keyed the new name (its extent, now replaced) loses its key lines
        first, or they would open the renamed file with the replaced file's DEK.
        """
        if FolderState.DAMAGED in (src_state, dst_state):
            raise self._damaged(src if src_state is FolderState.DAMAGED else dst)
        record = src.key_record_for(eo.name)
        if record is None:
            raise DataError(f"{eo.rel}: no key for this encrypted file")
        # the same folder? (its paths are /proc/self/fd paths of two descriptors: compare the directories)
        same = os.path.samestat(os.fstat(eo.dirfd), os.fstat(en.dirfd))
        with self._keys_locked(dst), (contextlib.nullcontext() if same else self._keys_locked(src)):
            self._move_key(eo, en, src, dst, same, record, flags)

    def _move_key(self, eo: Entry, en: Entry, src: VmFolder, dst: VmFolder, same: bool, record: KeyRecord,
                  flags: int) -> None:
        dst_keys = dst.load_keys()
        src_keys = dst_keys if same else src.load_keys()
        previous = dst_keys.files.get(en.name)
        dst_parent = os.path.dirname(en.rel)
        stripped = self._unkey_name(dst, en.name, dst_parent)
        dst_keys.files[en.name] = record  # bound to the file's id, not its name
        try:
            dst.save_keys(dst_keys)
            self._rename_entry(eo, en, flags)
        except BaseException:
            _put_back(dst, dst_keys, en.name, previous)
            self._restore_descriptors(stripped, dst_parent)
            raise
        if src_keys.files.pop(eo.name, None) is not None:
            (dst if same else src).save_keys(src_keys)

    def link(self, source: str, target: str) -> None:
        """A hard link follows the rename rule: it must not give the file's bytes another kind (issue 7, case 4)."""
        with self.tree.entries(source, target) as (es, et):
            self._refuse_online(es, et)
            if is_hidden_name(et.name):
                raise OSError(errno.EACCES, "reserved name")
            with self._meta_lock:
                kind, src, src_state = self._kind(es)
                dst = self.folder_of(et)
                dst_state = dst.state()
                check_move(kind, dst_state, et.name)
                if kind is FileKind.DESCRIPTOR and (dst_state is not FolderState.PLAIN or self._descriptor_keys_at(es)[0]):
                    # Two names for one descriptor: the mount's write-back replaces one of them; and
                    # its key lines must not key anything else (_check_descriptor_move).
                    raise OSError(errno.EXDEV, "descriptors of encrypted folders are not hard-linked")
                self._check_moved_symlink(es, et)
                if kind is not FileKind.ENCRYPTED:
                    os.link(es.at, et.at, src_dir_fd=es.dirfd, dst_dir_fd=et.dirfd, follow_symlinks=False)
                    return
                if FolderState.DAMAGED in (src_state, dst_state):
                    raise self._damaged(src if src_state is FolderState.DAMAGED else dst)
                record = src.key_record_for(es.name)
                if record is None:
                    raise DataError(f"{es.rel}: no key for this encrypted file")
                with self._keys_locked(dst):
                    keys = dst.load_keys()
                    dst_parent = os.path.dirname(et.rel)
                    stripped = self._unkey_name(dst, et.name, dst_parent)  # (a descriptor of a removed extent)
                    keys.files[et.name] = record
                    try:
                        dst.save_keys(keys)
                        os.link(es.at, et.at, src_dir_fd=es.dirfd, dst_dir_fd=et.dirfd, follow_symlinks=False)
                    except BaseException:
                        keys.files.pop(et.name, None)
                        dst.save_keys(keys)
                        self._restore_descriptors(stripped, dst_parent)
                        raise

    # -- opening -------------------------------------------------------------------------
    @staticmethod
    def _backing_flags(flags: int, kind: FileKind) -> int:
        # O_DIRECT: QEMU cache=none passes it through; the backing file must not get it (field notes).
        # O_APPEND: we write at explicit offsets (pwrite ignores offsets under O_APPEND on Linux).
        flags &= ~(_O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        if kind is FileKind.ENCRYPTED and (flags & os.O_ACCMODE) != os.O_RDONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR  # read-modify-write of partial sectors
        return flags | os.O_NOFOLLOW | os.O_CLOEXEC

    def _open_encrypted(self, e: Entry, fd: int, folder: VmFolder,
                        new_key: tuple[KeyRecord, bytes] | None = None) -> EncryptedHandle:
        """A handle on the shared state of the backing inode (its cipher made at the first open)."""
        st = os.fstat(fd)
        inode = (st.st_dev, st.st_ino)
        with self._meta_lock:
            shared = self.files.encrypted.get(inode)
            if shared is not None and shared.cipher is None:
                # open as a plain file, now of an encrypted kind (its folder changed meanwhile)
                raise DataError(f"{e.rel}: open as a plain file while its folder became encrypted; close it first")
            if shared is None:
                record, dek = new_key or self._key_record(folder, e.name, st.st_size, e.rel)
                cipher = self.deks.acquire(record, e.rel, dek)
                shared = self.files.encrypted[inode] = self._new_encrypted_file(inode, cipher, record, e.rel)
            shared.opens += 1
        return EncryptedHandle(e.rel, fd, shared, self._is_revoked)

    def _open_plain(self, e: Entry, fd: int) -> PlainHandle:
        """A plain data file's handle on the shared state of its inode (its lock; ops/online.py may give it a cipher)."""
        st = os.fstat(fd)
        inode = (st.st_dev, st.st_ino)
        with self._meta_lock:
            shared = self.files.encrypted.get(inode)
            if shared is None:
                shared = self.files.encrypted[inode] = EncryptedFile(inode, None, None,
                                                                     self.datapath.file_lock(None, e.rel))
            shared.opens += 1
        return PlainHandle(e.rel, fd, shared)

    def _new_encrypted_file(self, inode, cipher, record: KeyRecord, rel: str) -> EncryptedFile:
        lock = self.datapath.file_lock(cipher, rel)
        if record.keysafe.kek in self.revoked:
            self.datapath.set_revoked(lock, True)
        return EncryptedFile(inode, cipher, record, lock)

    def _add(self, handle: Handle) -> int:
        """A new file handle (served by the compiled core once its kind is decided: `_attach_if_decided`)."""
        return self.files.add(handle)

    def _attach_if_decided(self, fh: int) -> int:
        """Let the compiled core serve `fh` unless Python must still see its first write.

        An empty encrypted `.vmdk` may turn out to be a descriptor at its first write
        (`_become_descriptor`); descriptors are always Python's.
        """
        handle = self.files.get(fh)
        if isinstance(handle, EncryptedHandle):
            handle.pending = handle.rel.lower().endswith(".vmdk") and os.fstat(handle.fd).st_size == 0
            if not handle.pending:
                self.datapath.attach(fh, handle.fd, handle.file.lock)
        elif isinstance(handle, PlainHandle):
            self.datapath.attach(fh, handle.fd, handle.file.lock)
        return fh

    def _pend(self, shared: EncryptedFile) -> None:
        """Every handle of `shared` goes back to Python until its next write decides (an emptied .vmdk)."""
        for number, handle in self.files.items():
            if isinstance(handle, EncryptedHandle) and handle.file is shared and not handle.pending:
                self.datapath.detach(number)
                handle.pending = True

    def _open_descriptor(self, e: Entry) -> DescriptorHandle:
        with self._meta_lock:
            desc = self.files.descriptors.get(e.rel)
            if desc is None:
                found = read_descriptor(e.real)
                if found is None:
                    raise DataError(f"{e.rel}: the descriptor changed while being opened; try again")
                st = os.lstat(e.at, dir_fd=e.dirfd)
                desc = DescriptorFile(e.rel, bytearray(found.view), encryption_lines(found.raw),
                                      stat.S_IMODE(st.st_mode))
                self.files.descriptors[e.rel] = desc
            desc.opens += 1
        return DescriptorHandle(e.rel, desc, self._flush_descriptor)

    def open(self, path: str, flags: int) -> int:
        with self.tree.entry(path) as e:
            kind, folder, state = self._kind(e)
            if kind is FileKind.DESCRIPTOR:
                fh = self.files.add(self._open_descriptor(e))
            else:
                if kind is FileKind.ENCRYPTED and state is FolderState.DAMAGED:
                    raise self._damaged(folder)
                backing = self._backing_flags(flags, kind)
                if kind is FileKind.ENCRYPTED:
                    backing &= ~os.O_TRUNC  # truncated below, with its key (a fresh file: case 8)
                fd = os.open(e.at, backing, dir_fd=e.dirfd)
                try:
                    if kind is FileKind.ENCRYPTED:
                        fh = self.files.add(self._open_encrypted(e, fd, folder))
                    else:
                        return self._attach_if_decided(self._add(self._open_plain(e, fd)))
                except BaseException:
                    os.close(fd)
                    raise
        if flags & os.O_TRUNC:  # (libfuse 3 passes O_TRUNC; libfuse 2 sends a truncate after the open)
            try:
                self._truncate_handle(self.files.get(fh), 0)
            except BaseException:
                self.release(fh)
                raise
        return self._attach_if_decided(fh)

    def create(self, path: str, mode: int, flags: int = os.O_RDWR, caller: Caller | None = None) -> int:
        """A new file (O_CREAT). A file that exists already at rest is opened instead (O_EXCL: EEXIST).

        The kernel asks the daemon to create only names it believes free; one made at rest
        meanwhile must not get a new key under an open file's old cipher (issue 7, case 12).
        """
        with self.tree.entry(path) as e:
            self._refuse_online(e)
            folder = self.folder_of(e)
            state = folder.state()
            kind = classify_name(state, e.name)
            if kind is FileKind.HIDDEN:
                raise OSError(errno.EACCES, "reserved name")
            new_key = None
            with self._meta_lock:
                exists = os.path.lexists(os.path.join(e.parent_real, e.name))
                if not exists:
                    if kind is FileKind.ENCRYPTED:
                        if state is FolderState.DAMAGED:
                            raise self._damaged(folder)
                        previous = folder.load_keys().files.get(e.name)
                        # The key entry first: a crash leaves at most an unused entry, never a file without a key.
                        new_key = self._allocate_key(folder, e.name, e.rel)
                    try:
                        fd = os.open(e.at, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                     dir_fd=e.dirfd)
                    except FileExistsError:  # made at rest just now: it keeps its key
                        exists = True
                        if new_key is not None:
                            with self._keys_locked(folder):
                                _put_back(folder, folder.load_keys(), e.name, previous)
                if exists and flags & os.O_EXCL:
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            if exists:
                return self.open(path, flags & ~(os.O_CREAT | os.O_EXCL))
            try:
                self._chown_new(e, caller, mode, fd)
                if kind is not FileKind.ENCRYPTED:
                    return self._attach_if_decided(self._add(self._open_plain(e, fd)))
                return self._attach_if_decided(self._add(self._open_encrypted(e, fd, folder, new_key)))
            except BaseException:
                os.close(fd)
                raise

    def release(self, fh: int) -> None:
        self.datapath.detach(fh)
        handle = self.files.pop(fh)
        try:
            handle.flush()
        finally:
            self._close_handle(handle)

    def _close_handle(self, handle: Handle) -> None:
        with self._meta_lock:
            handle.close_fd()
            if isinstance(handle, (EncryptedHandle, PlainHandle)):
                self.drop_shared(handle.file)
            elif isinstance(handle, DescriptorHandle):
                desc = handle.desc
                desc.opens -= 1
                if desc.opens == 0 and self.files.descriptors.get(desc.rel) is desc:
                    del self.files.descriptors[desc.rel]

    def drop_shared(self, shared: EncryptedFile) -> None:
        """One user less of a data file's shared state (a handle, or an online operation); the caller holds _meta_lock."""
        shared.opens -= 1
        if shared.opens == 0:
            if self.files.encrypted.get(shared.inode) is shared:
                del self.files.encrypted[shared.inode]
            if shared.record is not None:
                self.deks.release(shared.record)

    def flush(self, fh: int) -> None:
        self.files.get(fh).flush()

    def fsync(self, fh: int, datasync: bool) -> None:
        self.files.get(fh).fsync(datasync)

    # -- descriptors ---------------------------------------------------------------------
    def _flush_descriptor(self, desc: DescriptorFile) -> None:
        """Store a changed view with its key lines (atomically; the file keeps its owner); errors reach flush/fsync."""
        with desc.lock:
            if not desc.dirty or desc.deleted:
                return
            with self.tree.entry(desc.rel) as e:
                owner = None
                try:
                    st = os.lstat(e.at, dir_fd=e.dirfd)
                    desc.mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
                except FileNotFoundError:
                    pass
                view = bytes(desc.view)
                # The key lines at rest now, not those of the open: a shallow rekey may have replaced
                # them meanwhile, and writing the old ones back would undo it (issue 7, case 2).
                at_rest = read_descriptor(e.real)
                if at_rest is not None and desc.key_lines == desc.key_lines_seen:
                    desc.key_lines = encryption_lines(at_rest.raw)
                if desc.key_lines:
                    view = insert_encryption_lines(view, desc.key_lines)
                write_atomic(e.real, view, desc.mode, owner)
            desc.key_lines_seen = list(desc.key_lines)
            desc.dirty = False

    def _empty_descriptor(self, desc: DescriptorFile) -> None:
        """A descriptor truncated to 0 (O_TRUNC) starts afresh: its key goes to its extent, its first write says its kind.

        (issue 7, case 8: `qemu-img create` over a disk.) The extent keeps its sectors'
        key in the folder key file, so it stays readable until it is replaced too; the
        emptied file holds no key lines any more, and becomes a descriptor again or, if its
        first write is not one, an encrypted file (`_become_encrypted`).
        """
        with self._meta_lock:
            with self.tree.entry(desc.rel) as e, desc.lock:
                if desc.key_lines:
                    found = read_descriptor(e.real)
                    text = found.raw if found is not None else bytes(desc.view)
                    self._leave_key_to_extent(self.folder_of(e), e, desc.key_lines, text)
                    desc.key_lines = []
                del desc.view[:]
                desc.dirty = True

    # -- data ----------------------------------------------------------------------------
    def read(self, fh: int, size: int, offset: int) -> bytes:
        return self.files.get(fh).read(size, offset)

    def write(self, fh: int, data, offset: int) -> int:
        handle = self.files.get(fh)
        starts_descriptor = offset == 0 and bytes(data[:len(DESCRIPTOR_MAGIC)]) == DESCRIPTOR_MAGIC
        if isinstance(handle, EncryptedHandle) and starts_descriptor and handle.rel.lower().endswith(".vmdk"):
            handle = self._become_descriptor(fh, handle)
        elif isinstance(handle, DescriptorHandle) and not handle.desc.view and not starts_descriptor:
            handle = self._become_encrypted(fh, handle)
        if isinstance(handle, EncryptedHandle) and handle.pending:
            with self._meta_lock:
                if handle.pending and self.files.get(fh) is handle:
                    handle.pending = False  # decided: an encrypted file; the compiled core serves it from now on
                    self.datapath.attach(fh, handle.fd, handle.file.lock)
        return handle.write(data, offset)

    def _become_descriptor(self, fh: int, handle: EncryptedHandle) -> Handle:
        """A new, empty .vmdk whose first write is a text descriptor stays plaintext (vSphere's split)."""
        with self._meta_lock:
            current = self.files.get(fh)
            if current is not handle:
                return current
            if os.fstat(handle.fd).st_size != 0 or handle.file.opens != 1:
                return handle
            with self.tree.entry(handle.rel) as e:
                folder = self.folder_of(e)
                with self._keys_locked(folder):
                    keys = folder.load_keys()
                    if keys.files.pop(e.name, None) is not None:
                        folder.save_keys(keys)
                st = os.fstat(handle.fd)
                desc = DescriptorFile(e.rel, bytearray(), [], stat.S_IMODE(st.st_mode))
                desc.opens = 1
                self.files.descriptors[e.rel] = desc
            self._close_handle(handle)
            new = DescriptorHandle(handle.rel, desc, self._flush_descriptor)
            self.files.replace(fh, new)
            return new

    def _become_encrypted(self, fh: int, handle: DescriptorHandle) -> Handle:
        """The mirror of `_become_descriptor`: an emptied descriptor whose first write is not a descriptor is encrypted.

        (`qemu-img convert` or `cp` of a sparse VMDK over a disk's descriptor.) Every open
        handle of it becomes a handle of the encrypted file, with a new key in the folder key
        file; the old descriptor bytes are cut first (an empty file opens under any key).
        """
        with self._meta_lock:
            if self.files.get(fh) is not handle:
                return self.files.get(fh)
            desc = handle.desc
            with self.tree.entry(handle.rel) as e, desc.lock:
                if desc.view or desc.deleted:
                    return handle
                folder = self.folder_of(e)
                state = folder.state()
                if state is FolderState.DAMAGED:
                    raise self._damaged(folder)
                if state is FolderState.PLAIN:  # (not reached: descriptors of plain folders are plain files)
                    raise OSError(errno.EINVAL, "not a descriptor of an encrypted folder")
                numbers = [n for n, h in self.files.items() if isinstance(h, DescriptorHandle) and h.desc is desc]
                fds: list[int] = []
                try:
                    for _ in numbers:
                        fds.append(os.open(e.at, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd))
                    st = os.fstat(fds[0])
                    if not stat.S_ISREG(st.st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    os.ftruncate(fds[0], 0)
                    record, dek = self._allocate_key(folder, e.name, e.rel)
                    inode = (st.st_dev, st.st_ino)
                    shared = self._new_encrypted_file(inode, self.deks.acquire(record, e.rel, dek), record, e.rel)
                except BaseException:
                    for fd in fds:
                        os.close(fd)
                    raise
                self.files.encrypted[inode] = shared
                desc.deleted, desc.dirty, desc.opens = True, False, 0
                if self.files.descriptors.get(desc.rel) is desc:
                    del self.files.descriptors[desc.rel]
                for number, fd in zip(numbers, fds):
                    shared.opens += 1
                    self.files.replace(number, EncryptedHandle(handle.rel, fd, shared, self._is_revoked))
                    self.datapath.attach(number, fd, shared.lock)  # decided: not a descriptor
                log.info("%s: its new content is not a descriptor: stored encrypted under a new key", e.rel)
            return self.files.get(fh)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if length < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if fh is not None:
            self._truncate_handle(self.files.get(fh), length)
            return
        with self.tree.entry(path) as e:
            kind, folder, state = self._kind(e)
        if kind is FileKind.SPECIAL:
            raise OSError(errno.EINVAL, "not a regular file")
        flags = os.O_WRONLY if kind is FileKind.PLAIN else os.O_RDWR
        fh = self.open(path, flags)
        try:
            self._truncate_handle(self.files.get(fh), length)
        finally:
            self.release(fh)

    def _truncate_handle(self, handle: Handle, length: int) -> None:
        if getattr(getattr(handle, "file", None), "online", None) is not None:
            raise OSError(errno.EBUSY, f"{handle.rel}: truncate refused while an online {handle.file.online} "
                                       "rewrites it (issue 10)")
        if isinstance(handle, DescriptorHandle) and length == 0:
            self._empty_descriptor(handle.desc)
        elif isinstance(handle, EncryptedHandle):
            self._truncate_encrypted(handle, length)
            if length == 0 and handle.rel.lower().endswith(".vmdk"):
                with self._meta_lock:
                    self._pend(handle.file)  # its next first write may make it a descriptor
        else:
            handle.truncate(length)

    def _truncate_encrypted(self, handle: EncryptedHandle, length: int) -> None:
        """Truncate an encrypted file so that where its key lives stays true (FORMAT.md 7.4).

        To 0: a fresh file. Its key leaves a descriptor that held it (which loses its key
        lines, at rest and open), and if no other handle or name shares the file it gets a
        new DEK: the old one, which the old contents were under, is dropped (case 8).
        A flat extent keyed by its descriptor: the extent line's size follows (case 9).
        """
        handle._check("truncate")
        with self._meta_lock, self.tree.entry(handle.rel) as e:
            folder = self.folder_of(e)
            found = folder.descriptor_record_for(e.name)
            if length == 0:
                self._truncate_to_empty(handle, e, folder, found)
            elif found is not None and found[2].kind in ("FLAT", "VMFS"):
                self._resize_flat_extent(handle, e, folder, found, length)
            else:
                handle.truncate(length)

    def _truncate_to_empty(self, handle: EncryptedHandle, e: Entry, folder: VmFolder,
                           found: tuple[str, KeyRecord, Extent] | None) -> None:
        shared = handle.file
        parent = os.path.dirname(e.rel)
        if found is not None:
            # Its key goes to the folder key file first, then leaves the descriptor: at every
            # step some place holds the key the sectors are under.
            with self._keys_locked(folder):
                keys = folder.load_keys()
                previous = keys.files.get(e.name)
                keys.files[e.name] = found[1]
                folder.save_keys(keys)
                try:
                    self._unkey_name(folder, e.name, parent)
                except BaseException:
                    _put_back(folder, keys, e.name, previous)
                    raise
        handle.truncate(0)
        if shared.opens != 1 or os.fstat(handle.fd).st_nlink != 1:
            return  # another handle or another name (with its own key entry) shares this key: keep it
        shared.lock.acquire_write()
        try:
            if os.fstat(handle.fd).st_size != 0:
                return
            try:
                record, dek = self._allocate_key(folder, e.name, e.rel)
                cipher = self.deks.acquire(record, e.rel, dek)
            except (OSError, VmfsCryptError) as exc:  # the file is empty: its old key still opens it
                log.warning("%s: truncated, but keeps its old key (no new one: %s)", e.rel, exc)
                return
            old = shared.record
            shared.rekey(cipher, record)
            self.datapath.set_cipher(shared.lock, cipher)
            self.deks.release(old)
        finally:
            shared.lock.release_write()

    def _resize_flat_extent(self, handle: EncryptedHandle, e: Entry, folder: VmFolder,
                            found: tuple[str, KeyRecord, Extent], length: int) -> None:
        """A descriptor-keyed flat extent changes size with its extent line, never shorter than the line says.

        The extent line shrinks before the file and grows after it, so that at every step
        the extent is at least as long as its descriptor says (FORMAT.md 7.4); a size that
        is not whole sectors from the extent's offset on cannot be described: EINVAL.
        """
        desc_name, _, ext = found
        if length % SECTOR_SIZE or length < ext.offset * SECTOR_SIZE:
            log.error("%s: truncate to %d refused: %s describes this extent in 512-byte sectors from sector %d; "
                      "use a multiple of 512", e.rel, length, desc_name, ext.offset)
            raise OSError(errno.EINVAL, "a flat extent keyed by its descriptor holds whole sectors")
        sectors = length // SECTOR_SIZE - ext.offset
        old_size = os.fstat(handle.fd).st_size
        parent = os.path.dirname(e.rel)
        if sectors < ext.sectors:
            self._set_extent_sectors(folder, desc_name, e.name, sectors, parent)
            try:
                handle.truncate(length)
            except BaseException:
                self._set_extent_sectors(folder, desc_name, e.name, ext.sectors, parent)
                raise
            return
        handle.truncate(length)
        if sectors != ext.sectors:
            try:
                self._set_extent_sectors(folder, desc_name, e.name, sectors, parent)
            except BaseException:
                handle.truncate(old_size)
                raise

    def _set_extent_sectors(self, folder: VmFolder, desc_name: str, extent: str, sectors: int, parent: str) -> None:
        """Rewrite the size of `extent`'s line in a descriptor, at rest and in its open view."""
        path = os.path.join(folder.backing_dir, desc_name)
        found = read_descriptor(path)
        if found is None:
            raise DataError(f"{path}: the descriptor changed meanwhile; try again")
        st = os.lstat(path)
        write_atomic(path, set_extent_sectors(found.raw, extent, sectors), stat.S_IMODE(st.st_mode),
                     (st.st_uid, st.st_gid))
        desc = self.files.descriptors.get(posixpath.join(parent, desc_name))
        if desc is not None:
            with desc.lock:
                desc.view[:] = set_extent_sectors(bytes(desc.view), extent, sectors)
        log.info("%s: %s now describes %s as %d sectors", posixpath.join(parent, extent), desc_name, extent, sectors)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE: the backing file's allocation (holes at rest are holes in plaintext)."""
        return self.files.get(fh).seek_data(offset, whence)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self.files.get(fh)
        if getattr(getattr(handle, "file", None), "online", None) is not None:
            raise OSError(errno.EBUSY, f"{handle.rel}: fallocate refused while an online {handle.file.online} "
                                       "rewrites it (issue 10)")
        if (isinstance(handle, EncryptedHandle) and not mode & sectorio.FALLOC_FL_KEEP_SIZE
                and offset + length > os.fstat(handle.fd).st_size):
            with self._meta_lock, self.tree.entry(handle.rel) as e:
                found = self.folder_of(e).descriptor_record_for(e.name)
                if found is not None and found[2].kind in ("FLAT", "VMFS"):
                    # Growing a descriptor-keyed flat extent: its extent line follows (case 9).
                    old_size = os.fstat(handle.fd).st_size
                    self._resize_flat_extent(handle, e, self.folder_of(e), found, offset + length)
                    try:
                        handle.fallocate(mode | sectorio.FALLOC_FL_KEEP_SIZE, offset, length)
                    except BaseException:
                        grown = (found[0], found[1], Extent(found[2].access, (offset + length) // SECTOR_SIZE
                                                            - found[2].offset, found[2].kind, found[2].file_name,
                                                            found[2].offset))
                        self._resize_flat_extent(handle, e, self.folder_of(e), grown, old_size)
                        raise
                    return
        handle.fallocate(mode, offset, length)

    # -- revocation ----------------------------------------------------------------------
    def set_revoked(self, revoked: set[KeyRef]) -> set[KeyRef]:
        """The KEKs the agent reports revoked under on_revoke = "lock"; returns the newly revoked ones."""
        with self._meta_lock:
            new = revoked - self.revoked
            self.revoked = set(revoked)
            for shared in self.files.encrypted.values():
                self.datapath.set_revoked(shared.lock, shared.kek in revoked)
        return new

    def datapath_stats(self) -> dict:
        return self.datapath.stats()

