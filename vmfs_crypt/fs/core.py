"""The filesystem core: every operation of the mount on a datastore, without FUSE.

Paths are the mount's (e.g. "/vm1/disk.vmdk"). Methods raise OSError (with an errno) or a
`VmfsCryptError`; the FUSE adapter (vmfs_crypt/fuse) maps both to errno in one place and is
otherwise a thin translation. Key material comes through a `KeyAccess` (the agent client in
a mount, an in-process broker in tests); the core only ever holds DEKs, in the DEK cache, and
only while a file under them is open.

Locking: `_meta_lock` serialises changes to folder key files and the open-file table with
namespace operations; each encrypted file's data is guarded by its own readers-writer lock.
Key entries change before the visible change (create, link, rename), or are rolled back.
"""

import errno
import logging
import os
import stat
from dataclasses import dataclass

from ..agent.protocol import KeyAccess
from ..errors import DataError
from ..format.atomicio import write_atomic
from ..format.descriptor import (DESCRIPTOR_MAGIC, DESCRIPTOR_MAX_SIZE, encryption_lines,
                                 insert_encryption_lines, read_descriptor)
from ..format.folder import FOLDER_KEYS_NAME, FolderKeys, FolderState, VmFolder, check_extent_length, is_hidden_name
from ..format.keysafe import KeyRecord, KeyRef
from ..format.kinds import FileKind, classify, classify_name
from .handles import DescriptorHandle, EncryptedHandle, Handle, PlainHandle
from .keycache import DekCache
from .namespace import check_move, is_fuse_hidden, symlink_allowed, symlink_error
from .openfiles import DescriptorFile, EncryptedFile, OpenFileTable
from .tree import Entry, Tree

log = logging.getLogger("vmfs_crypt.fs")
_O_DIRECT = getattr(os, "O_DIRECT", 0)
STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino", "st_rdev")
STATFS_FIELDS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                 "f_frsize", "f_namemax")


@dataclass(frozen=True)
class Caller:
    """Who asked (libfuse's request context): new files get this owner when the daemon runs as root."""

    uid: int
    gid: int
    pid: int = 0


def _enoent() -> OSError:
    return OSError(errno.ENOENT, os.strerror(errno.ENOENT))


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

    def close(self) -> None:
        self.tree.close()

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def folder_of(e: Entry) -> VmFolder:
        return VmFolder(e.parent_real)

    def _lstat(self, e: Entry) -> os.stat_result:
        return os.lstat(e.at, dir_fd=e.dirfd)

    def _kind(self, e: Entry, st: os.stat_result | None = None) -> tuple[FileKind, VmFolder, FolderState]:
        folder = self.folder_of(e)
        state = folder.state()
        kind = classify(folder, e.name, st, state)
        if kind is FileKind.HIDDEN:
            raise _enoent()
        return kind, folder, state

    def _is_revoked(self, kek: KeyRef) -> bool:
        return kek in self.revoked

    def _chown_new(self, e: Entry, caller: Caller | None) -> None:
        """Give a new entry the caller's uid, and its gid unless the directory is setgid (POSIX)."""
        if caller is None or not self._as_root:
            return
        gid = caller.gid
        if os.stat(".", dir_fd=e.dirfd).st_mode & stat.S_ISGID:
            gid = -1  # inherited from the directory already
        os.chown(e.at, caller.uid, gid, dir_fd=e.dirfd, follow_symlinks=False)

    @staticmethod
    def _damaged(folder: VmFolder) -> DataError:
        return DataError(folder.damage())

    # -- keys ----------------------------------------------------------------------------
    def _key_record(self, folder: VmFolder, name: str, size: int, what: str) -> KeyRecord:
        """The key record of an existing encrypted file (allocating one for an empty file without a key)."""
        found = folder.descriptor_record_for(name)
        if found:
            check_extent_length(what, size, found[0], found[2])
            return found[1]
        record = folder.load_keys().files.get(name)
        if record is None:
            if size:
                raise DataError(f"{what}: no key for this encrypted file in {FOLDER_KEYS_NAME} or a descriptor")
            record, dek = self._allocate_key(folder, name)
            self.deks.acquire(record, what, dek)  # keep it for the open that follows
            self.deks.release(record)
        return record

    def _allocate_key(self, folder: VmFolder, name: str) -> tuple[KeyRecord, bytes]:
        keys = folder.load_keys()
        record, dek = self.keys.new_file_key(keys.kek)
        keys.files[name] = record
        folder.save_keys(keys)
        return record, dek

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

    def readdir(self, path: str) -> list[str]:
        with self.tree.entry(path) as e:
            fd = os.open(e.at, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
        return [n for n in names if not is_hidden_name(n)]

    def readlink(self, path: str) -> str:
        with self.tree.entry(path) as e:
            target = os.readlink(e.at, dir_fd=e.dirfd)
            folder = self.folder_of(e)
            if folder.state() is not FolderState.PLAIN and not self._symlink_ok(e, target):
                log.error("%s: symlink to %r in an encrypted folder leaves the folder or changes the kind of "
                          "what it names; not followed (replace it with the file itself)", e.rel, target)
                raise OSError(errno.EIO, "symlink not followed")
            return target

    def _symlink_ok(self, e: Entry, target: str) -> bool:
        def state_of(rel_dir: str):
            path = os.path.join(e.parent_real, rel_dir)
            if not os.path.lexists(path):
                return None
            if os.path.islink(path) or not os.path.isdir(path):
                return FolderState.PLAIN
            return VmFolder(path).state()
        return symlink_allowed(e.name, target, state_of)

    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self.tree.root_fd)
        return {k: getattr(sv, k) for k in STATFS_FIELDS}

    def chmod(self, path: str, mode: int) -> None:
        with self.tree.entry(path) as e:
            fd = os.open(e.at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise OSError(errno.EOPNOTSUPP, "symlinks have no mode of their own")
                os.chmod(f"/proc/self/fd/{fd}", mode)
            finally:
                os.close(fd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.tree.entry(path) as e:
            os.chown(e.at, uid, gid, dir_fd=e.dirfd, follow_symlinks=False)

    def utimens(self, path: str, times_ns: tuple[int, int] | None) -> None:
        with self.tree.entry(path) as e:
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
            with self._meta_lock:
                kek = parent.load_keys().kek if state is FolderState.ENCRYPTED else None
                os.mkdir(e.at, mode, dir_fd=e.dirfd)
                try:
                    if kek is not None:
                        # A subfolder of an encrypted folder is encrypted too, under the parent's KEK.
                        VmFolder(e.real).save_keys(FolderKeys(kek))
                    self._chown_new(e, caller)
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
        with self.tree.entry(path) as e:
            fd = os.open(e.at, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=e.dirfd)
            try:
                names = os.listdir(fd)
                if any(not is_hidden_name(n) for n in names):
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
                with self._meta_lock:
                    for name in names:  # our own metadata (key file, stray temporaries)
                        os.unlink(name, dir_fd=fd)
                    os.rmdir(e.at, dir_fd=e.dirfd)
            finally:
                os.close(fd)

    def symlink(self, target: str, path: str, caller: Caller | None = None) -> None:
        with self.tree.entry(path) as e:
            if is_hidden_name(e.name):
                raise OSError(errno.EACCES, "reserved name")
            if self.folder_of(e).state() is not FolderState.PLAIN and not self._symlink_ok(e, target):
                raise symlink_error(e.name, target)
            os.symlink(target, e.at, dir_fd=e.dirfd)
            self._chown_new(e, caller)

    def mknod(self, path: str, mode: int, dev: int, caller: Caller | None = None) -> None:
        """FIFOs, sockets and device nodes hold no data: nothing to encrypt (README, "What is encrypted")."""
        with self.tree.entry(path) as e:
            if is_hidden_name(e.name):
                raise OSError(errno.EACCES, "reserved name")
            if stat.S_ISREG(mode):
                fh = self.create(path, stat.S_IMODE(mode), os.O_WRONLY, caller)
                self.release(fh)
                return
            os.mknod(e.at, mode, dev, dir_fd=e.dirfd)
            self._chown_new(e, caller)

    def unlink(self, path: str) -> None:
        with self.tree.entry(path) as e:
            kind, folder, state = self._kind(e)
            with self._meta_lock:
                keys = None
                if kind is FileKind.ENCRYPTED:
                    if state is FolderState.DAMAGED:
                        raise self._damaged(folder)
                    keys = folder.load_keys()  # read (and checked) before anything changes
                os.unlink(e.at, dir_fd=e.dirfd)
                self.files.unlinked(e.rel)
                if keys is not None and keys.files.pop(e.name, None) is not None:
                    try:
                        folder.save_keys(keys)
                    except OSError as exc:  # the file is gone; its unused key entry is harmless
                        log.warning("%s: removed, but its key entry stays in %s (%s)", e.rel, FOLDER_KEYS_NAME, exc)

    def rename(self, old: str, new: str) -> None:
        with self.tree.entries(old, new) as (eo, en):
            if is_hidden_name(en.name):
                raise OSError(errno.EACCES, "reserved name")
            with self._meta_lock:
                kind, src, src_state = self._kind(eo)
                dst = self.folder_of(en)
                dst_state = dst.state()
                if stat.S_ISDIR(self._lstat(eo).st_mode):
                    os.rename(eo.at, en.at, src_dir_fd=eo.dirfd, dst_dir_fd=en.dirfd)
                    self.files.renamed(eo.rel, en.rel)
                    return
                check_move(kind, dst_state, en.name)
                if kind is FileKind.SPECIAL and dst_state is not FolderState.PLAIN:
                    self._check_moved_symlink(eo, en)
                if kind is FileKind.ENCRYPTED and not is_fuse_hidden(en.name):
                    self._rename_encrypted(eo, en, src, dst, src_state, dst_state)
                else:
                    os.rename(eo.at, en.at, src_dir_fd=eo.dirfd, dst_dir_fd=en.dirfd)
                self.files.renamed(eo.rel, en.rel)

    def _check_moved_symlink(self, eo: Entry, en: Entry) -> None:
        if stat.S_ISLNK(self._lstat(eo).st_mode) and not self._symlink_ok(en, os.readlink(eo.at, dir_fd=eo.dirfd)):
            raise symlink_error(en.name, os.readlink(eo.at, dir_fd=eo.dirfd))

    def _rename_encrypted(self, eo: Entry, en: Entry, src: VmFolder, dst: VmFolder,
                          src_state: FolderState, dst_state: FolderState) -> None:
        """Move the key entry with the file: the new name's entry first, the old one after the rename."""
        if FolderState.DAMAGED in (src_state, dst_state):
            raise self._damaged(src if src_state is FolderState.DAMAGED else dst)
        record = src.key_record_for(eo.name)
        if record is None:
            raise DataError(f"{eo.rel}: no key for this encrypted file")
        same = src.keys_path == dst.keys_path
        dst_keys = dst.load_keys()
        src_keys = dst_keys if same else src.load_keys()
        previous = dst_keys.files.get(en.name)
        dst_keys.files[en.name] = record  # bound to the file's id, not its name
        dst.save_keys(dst_keys)
        try:
            os.rename(eo.at, en.at, src_dir_fd=eo.dirfd, dst_dir_fd=en.dirfd)
        except BaseException:
            if previous is None:
                dst_keys.files.pop(en.name, None)
            else:
                dst_keys.files[en.name] = previous
            dst.save_keys(dst_keys)
            raise
        if src_keys.files.pop(eo.name, None) is not None:
            (dst if same else src).save_keys(src_keys)

    def link(self, source: str, target: str) -> None:
        """A hard link follows the rename rule: it must not give the file's bytes another kind (issue 7, case 4)."""
        with self.tree.entries(source, target) as (es, et):
            if is_hidden_name(et.name):
                raise OSError(errno.EACCES, "reserved name")
            with self._meta_lock:
                kind, src, src_state = self._kind(es)
                dst = self.folder_of(et)
                dst_state = dst.state()
                check_move(kind, dst_state, et.name)
                if kind is FileKind.DESCRIPTOR and dst_state is not FolderState.PLAIN:
                    # Two names for one descriptor: the mount's write-back replaces one of them.
                    raise OSError(errno.EXDEV, "descriptors of encrypted folders are not hard-linked")
                if kind is FileKind.SPECIAL and dst_state is not FolderState.PLAIN:
                    self._check_moved_symlink(es, et)
                if kind is not FileKind.ENCRYPTED:
                    os.link(es.at, et.at, src_dir_fd=es.dirfd, dst_dir_fd=et.dirfd, follow_symlinks=False)
                    return
                if FolderState.DAMAGED in (src_state, dst_state):
                    raise self._damaged(src if src_state is FolderState.DAMAGED else dst)
                record = src.key_record_for(es.name)
                if record is None:
                    raise DataError(f"{es.rel}: no key for this encrypted file")
                keys = dst.load_keys()
                keys.files[et.name] = record
                dst.save_keys(keys)
                try:
                    os.link(es.at, et.at, src_dir_fd=es.dirfd, dst_dir_fd=et.dirfd, follow_symlinks=False)
                except BaseException:
                    keys.files.pop(et.name, None)
                    dst.save_keys(keys)
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

    def _open_encrypted(self, e: Entry, fd: int, folder: VmFolder) -> EncryptedHandle:
        st = os.fstat(fd)
        inode = (st.st_dev, st.st_ino)
        with self._meta_lock:
            shared = self.files.encrypted.get(inode)
            if shared is None:
                record = self._key_record(folder, e.name, st.st_size, e.rel)
                cipher = self.deks.acquire(record, e.rel)
                shared = self.files.encrypted[inode] = EncryptedFile(inode, cipher, record)
            shared.opens += 1
        return EncryptedHandle(e.rel, fd, shared, self._is_revoked)

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
                handle = self._open_descriptor(e)
                if flags & os.O_TRUNC:
                    handle.truncate(0)
                return self.files.add(handle)
            if kind is FileKind.ENCRYPTED and state is FolderState.DAMAGED:
                raise self._damaged(folder)
            fd = os.open(e.at, self._backing_flags(flags, kind), dir_fd=e.dirfd)
            try:
                if kind is FileKind.ENCRYPTED:
                    return self.files.add(self._open_encrypted(e, fd, folder))
                return self.files.add(PlainHandle(e.rel, fd))
            except BaseException:
                os.close(fd)
                raise

    def create(self, path: str, mode: int, flags: int = os.O_RDWR, caller: Caller | None = None) -> int:
        with self.tree.entry(path) as e:
            folder = self.folder_of(e)
            state = folder.state()
            kind = classify_name(state, e.name)
            if kind is FileKind.HIDDEN:
                raise OSError(errno.EACCES, "reserved name")
            if kind is FileKind.ENCRYPTED:
                if state is FolderState.DAMAGED:
                    raise self._damaged(folder)
                with self._meta_lock:
                    # The key entry first: a crash leaves at most an unused entry, never a file without a key.
                    record, dek = self._allocate_key(folder, e.name)
                    self.deks.acquire(record, e.rel, dek)
            try:
                fd = os.open(e.at, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                             dir_fd=e.dirfd)
            except BaseException:
                if kind is FileKind.ENCRYPTED:
                    self.deks.release(record)
                raise
            try:
                self._chown_new(e, caller)
                if kind is not FileKind.ENCRYPTED:
                    return self.files.add(PlainHandle(e.rel, fd))
                try:
                    return self.files.add(self._open_encrypted(e, fd, folder))
                finally:
                    self.deks.release(record)  # _open_encrypted holds its own reference
            except BaseException:
                os.close(fd)
                raise

    def release(self, fh: int) -> None:
        handle = self.files.pop(fh)
        try:
            handle.flush()
        finally:
            self._close_handle(handle)

    def _close_handle(self, handle: Handle) -> None:
        with self._meta_lock:
            handle.close_fd()
            if isinstance(handle, EncryptedHandle):
                shared = handle.file
                shared.opens -= 1
                if shared.opens == 0:
                    if self.files.encrypted.get(shared.inode) is shared:
                        del self.files.encrypted[shared.inode]
                    self.deks.release(shared.record)
            elif isinstance(handle, DescriptorHandle):
                desc = handle.desc
                desc.opens -= 1
                if desc.opens == 0 and self.files.descriptors.get(desc.rel) is desc:
                    del self.files.descriptors[desc.rel]

    def flush(self, fh: int) -> None:
        self.files.get(fh).flush()

    def fsync(self, fh: int, datasync: bool) -> None:
        self.files.get(fh).fsync(datasync)

    # -- descriptors ---------------------------------------------------------------------
    def _flush_descriptor(self, desc: DescriptorFile) -> None:
        with desc.lock:
            if not desc.dirty or desc.deleted:
                return
            with self.tree.entry(desc.rel) as e:
                try:
                    desc.mode = stat.S_IMODE(os.lstat(e.at, dir_fd=e.dirfd).st_mode)
                except FileNotFoundError:
                    pass
                view = bytes(desc.view)
                # The key lines at rest now, not those of the open: a shallow rekey may have replaced
                # them meanwhile, and writing the old ones back would undo it (issue 7, case 2).
                at_rest = read_descriptor(e.real)
                if at_rest is not None:
                    desc.key_lines = encryption_lines(at_rest.raw)
                if desc.key_lines:
                    view = insert_encryption_lines(view, desc.key_lines)
                write_atomic(e.real, view, desc.mode)
            desc.dirty = False

    # -- data ----------------------------------------------------------------------------
    def read(self, fh: int, size: int, offset: int) -> bytes:
        return self.files.get(fh).read(size, offset)

    def write(self, fh: int, data, offset: int) -> int:
        handle = self.files.get(fh)
        if (isinstance(handle, EncryptedHandle) and offset == 0 and bytes(data[:len(DESCRIPTOR_MAGIC)]) == DESCRIPTOR_MAGIC
                and handle.rel.lower().endswith(".vmdk")):
            handle = self._become_descriptor(fh, handle)
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

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None:
            self.files.get(fh).truncate(length)
            return
        with self.tree.entry(path) as e:
            kind, folder, state = self._kind(e)
        if kind is FileKind.SPECIAL:
            raise OSError(errno.EINVAL, "not a regular file")
        flags = os.O_WRONLY if kind is FileKind.PLAIN else os.O_RDWR
        fh = self.open(path, flags)
        try:
            self.files.get(fh).truncate(length)
        finally:
            self.release(fh)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        self.files.get(fh).fallocate(mode, offset, length)

    # -- revocation ----------------------------------------------------------------------
    def set_revoked(self, revoked: set[KeyRef]) -> set[KeyRef]:
        """The KEKs the agent reports revoked under on_revoke = "lock"; returns the newly revoked ones."""
        new = revoked - self.revoked
        self.revoked = set(revoked)
        return new

