"""Encryption policy commands (issue 11, privilege "policy"): the default provider and on_revoke, set by the agent; `policy show`."""

import os

import click

from ..agent import protocol as p
from ..agent.launcher import agent_session
from ..errors import UsageError
from ..format.dspolicy import POLICY_NAME, DatastorePolicy, read_policy, write_policy
from ..format.folder import VmFolder
from ..fs.mounts import backing_path
from .common import Group, emit_json, note, pass_ctx


class PolicyGroup(Group):
    """`policy DATASTORE ...` is `policy datastore DATASTORE ...`: a first argument that names no subcommand is a datastore."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["datastore", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=PolicyGroup)
def policy():
    """Show or change the encryption policy: the provider of new disks, what a revoked KEK does, new folders.

    `vmfs-crypt policy DATASTORE --encrypt-new-folders` is short for `vmfs-crypt policy datastore ...`.
    """


def policy_json(config) -> dict:
    """`policy show --json` (README, "Output for scripts"): from the configuration file."""
    return {"config": config.path, "default_provider": config.default_provider,
            "on_revoke": {name: s.get("on_revoke", "keep") for name, s in sorted(config.providers.items())
                          if s["type"] == "kmip"}}


@policy.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (README, \"Output for scripts\").")
@pass_ctx
def policy_show(c, as_json):
    """Show the policy: the default provider, and on_revoke of each KMIP provider."""
    doc = policy_json(c.config)
    if as_json:
        emit_json(doc)
        return
    click.echo(f"default provider: {doc['default_provider'] or '(none: add one with vmfs-crypt provider add)'}")
    for name, action in doc["on_revoke"].items():
        click.echo(f"on_revoke of {name}: {action}")


@policy.command("default-provider")
@click.argument("name")
@pass_ctx
def policy_default_provider(c, name):
    """New disks and folders are encrypted under provider NAME's keys."""
    with agent_session(c.config, privilege="policy", action=f"make {name} the default provider") as agent:
        resp = agent.request(p.OP_SET_POLICY, default_provider=name)
    note(f"the default provider is now {resp['value']}")


@policy.command("on-revoke")
@click.argument("provider")
@click.argument("action", type=click.Choice(["keep", "lock"]))
@pass_ctx
def policy_on_revoke(c, provider, action):
    """When a KEK of KMIP PROVIDER is revoked: keep serving open disks, or lock them."""
    with agent_session(c.config, privilege="policy", action=f"set on_revoke of {provider}") as agent:
        resp = agent.request(p.OP_SET_POLICY, provider=provider, on_revoke=action)
    note(f"{resp['setting']} = {resp['value']}")


COMMANDS = [policy]


def _datastore_json(root: str, policy: DatastorePolicy) -> dict:
    return {"datastore": root, "file": os.path.join(root, POLICY_NAME), "encrypt_new_folders": policy.encrypt_new_folders,
            "provider": policy.provider}


@policy.command("datastore")
@click.argument("datastore", type=click.Path(exists=True, file_okay=False))
@click.option("--encrypt-new-folders/--no-encrypt-new-folders", "encrypt_new", default=None,
              help="Every folder made in a plaintext folder of DATASTORE (through a mount) is encrypted before its "
                   "first byte, or not (the default).")
@click.option("--provider", help="The provider of the new folders' KEKs (default: the agent's default provider).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (README, \"Output for scripts\").")
@pass_ctx
def policy_datastore(c, datastore, encrypt_new, provider, as_json):
    """Show or set DATASTORE's policy for new VM folders (kept in DATASTORE/.vmfs-crypt-policy.json)."""
    root = os.path.abspath(backing_path(os.path.abspath(datastore)))  # a mount point names its datastore
    if VmFolder(root).encrypted:
        raise UsageError(f"{root} is an encrypted VM folder, not a datastore: its subfolders are encrypted anyway")
    current = read_policy(root)
    if encrypt_new is None and provider is None:
        doc = _datastore_json(root, current)
    else:
        wanted = DatastorePolicy(current.encrypt_new_folders if encrypt_new is None else encrypt_new,
                                 provider if provider is not None else current.provider)
        with agent_session(c.config, privilege="policy", action=f"set the policy of datastore {root}",
                           target=root) as agent:
            if wanted.provider is not None:
                known = [prov["name"] for prov in agent.request(p.OP_STATUS)["providers"]]
                if wanted.provider not in known:
                    raise UsageError(f"provider {wanted.provider!r} is not configured in the agent "
                                     f"(known: {', '.join(sorted(known)) or 'none'})")
        write_policy(root, wanted)
        doc = _datastore_json(root, wanted)
    if as_json:
        emit_json(doc)
        return
    if doc["encrypt_new_folders"]:
        click.echo(f"{root}: new folders are encrypted, under provider "
                   f"{doc['provider'] or '(the default provider)'}")
    else:
        click.echo(f"{root}: new folders are not encrypted (vmfs-crypt policy {root} --encrypt-new-folders)")
