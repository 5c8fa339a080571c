"""Namespace rules of the mount: which renames, links and symlinks keep every file's bytes meaning what they did.

A file's kind (format/kinds.py) says how its bytes at rest are read. A rename or hard link
that would give the same bytes another kind (an encrypted file named like a log, a plaintext
file moved into an encrypted folder, anything across the encryption boundary) fails with
EXDEV, so tools fall back to copy-and-delete, which re-encodes the bytes. Symlinks in an
encrypted folder must stay inside it and point at a name of their own kind, or they would
let writes through an encrypted-looking name land in clear; symlinks anywhere must stay
inside the datastore (issue 7, case 5).
"""

import errno
import os

from ..format.folder import FolderState, is_plaintext_name
from ..format.kinds import FileKind

# libfuse hides a file unlinked while open by renaming it to .fuse_hiddenXXXX and unlinks
# that at release: such a rename keeps the file's kind whatever the name.
FUSE_HIDDEN_PREFIX = ".fuse_hidden"


def is_fuse_hidden(name: str) -> bool:
    return name.startswith(FUSE_HIDDEN_PREFIX)


def _exdev() -> OSError:
    return OSError(errno.EXDEV, "the file's bytes would change meaning (encryption boundary); copy it instead")


def check_move(kind: FileKind, dst_state: FolderState, new_name: str) -> None:
    """Raise EXDEV unless a file of `kind` may be renamed or hard-linked to `new_name` in a folder of `dst_state`.

    The source folder's state is part of `kind` (a file of a plain folder is PLAIN).
    """
    if is_fuse_hidden(new_name) or kind is FileKind.SPECIAL:
        return
    dst_encrypted = dst_state is not FolderState.PLAIN
    if kind is FileKind.ENCRYPTED:
        if not dst_encrypted or is_plaintext_name(new_name):
            raise _exdev()
    elif kind is FileKind.DESCRIPTOR:
        # Plaintext at rest only because it is a .vmdk descriptor (FORMAT.md 7.2).
        if dst_encrypted and not new_name.lower().endswith(".vmdk"):
            raise _exdev()
    elif kind is FileKind.PLAIN:
        if dst_encrypted and not is_plaintext_name(new_name):
            raise _exdev()


def symlink_allowed(name: str, target: str, folder_state_of) -> bool:
    """May a symlink `name` -> `target` exist in an encrypted folder (FORMAT.md 7.2)?

    Only a relative target without '..' (it stays beneath the folder), every directory of
    which that exists is an encrypted folder (`folder_state_of(relative path, last)` gives
    None for what does not exist, for the last component when it is not a directory, and
    a state otherwise: PLAIN for anything that is not a directory along the way), and whose
    last component is of the link's own kind by name (both plaintext kinds, or both
    encrypted). A link to a directory needs that directory to be an encrypted folder too,
    or writes through it would land in clear.
    """
    if not target or target.startswith("/"):
        return False
    parts = [p for p in target.split("/") if p and p != "."]
    if not parts or ".." in parts:
        return False
    for i in range(1, len(parts) + 1):
        state = folder_state_of("/".join(parts[:i]), i == len(parts))
        if state is not None and state is not FolderState.ENCRYPTED:
            return False
    return is_plaintext_name(parts[-1]) == is_plaintext_name(name)


def plain_symlink_allowed(depth: int, target: str) -> bool:
    """May a symlink with `target` exist in a plain folder `depth` levels below the datastore root?

    Only one the kernel resolves inside the mount: a relative target whose '..' components
    all lead (each hop of a chain is checked again at its own readlink) and do not climb
    above the root. An absolute target would be resolved on the host, outside the mount,
    e.g. straight into the backing datastore's ciphertext.
    """
    if not target or target.startswith("/"):
        return False
    ups, down = 0, False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if down:
                return False
            ups += 1
        else:
            down = True
    return ups <= depth


def symlink_error(name: str, target: str) -> OSError:
    return OSError(errno.EPERM, f"a symlink {name} -> {target} must stay inside the datastore (relative) and, in "
                                "an encrypted folder, point to a file of its own kind inside the folder (no '..')")


def parent_of(path: str) -> str:
    return os.path.dirname(path.rstrip("/")) or "/"
