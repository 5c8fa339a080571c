"""Encryption policy commands (issue 11, privilege "policy"): the default provider and on_revoke, set by the agent; `policy show`."""

import click

from ..agent import protocol as p
from ..agent.launcher import agent_session
from .common import Group, emit_json, note, pass_ctx


@click.group(cls=Group)
def policy():
    """Show or change the encryption policy: the provider of new disks, what a revoked KEK does."""


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
