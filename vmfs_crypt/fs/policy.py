"""The datastore policy in the mount: a folder made in a plaintext folder gets its own KEK first when the datastore asks (issue 9)."""

import logging

from ..agent.protocol import KeyAccess
from ..format.dspolicy import read_policy
from ..format.keysafe import KeyRef

log = logging.getLogger("vmfs_crypt.fs")


def new_folder_kek(datastore: str, keys: KeyAccess, name: str) -> KeyRef | None:
    """The KEK of a folder about to be made in a plaintext folder: a new one if the datastore's policy says
    encrypt_new_folders, else None (the folder stays plaintext).

    Called before the folder exists, so that nothing is ever written to it in plaintext; a policy file
    that cannot be read, or a KEK the agent cannot make, fails the mkdir (fail closed).
    """
    policy = read_policy(datastore)
    if not policy.encrypt_new_folders:
        return None
    kek = keys.new_kek(policy.provider, name)
    log.info("new folder %s: encrypted under key %s of provider %s (datastore policy)", name, kek.key_id,
             kek.provider_id)
    return kek
