"""Encryption policy commands (issue 11, privilege "policy"): the default provider and on_revoke, set by the agent."""

import click

from ..agent import protocol as p
from ..agent.launcher import agent_session
from .common import pass_ctx


@click.group()
def policy():
    """Change the encryption policy: which provider new disks use, what a revoked KEK does."""


@policy.command("default-provider")
@click.argument("name")
@pass_ctx
def policy_default_provider(c, name):
    """New disks and folders are encrypted under provider NAME's keys."""
    with agent_session(c.config, privilege="policy", action=f"make {name} the default provider") as agent:
        resp = agent.request(p.OP_SET_POLICY, default_provider=name)
    click.echo(f"the default provider is now {resp['value']}")


@policy.command("on-revoke")
@click.argument("provider")
@click.argument("action", type=click.Choice(["keep", "lock"]))
@pass_ctx
def policy_on_revoke(c, provider, action):
    """When a KEK of KMIP PROVIDER is revoked: keep serving open disks, or lock them."""
    with agent_session(c.config, privilege="policy", action=f"set on_revoke of {provider}") as agent:
        resp = agent.request(p.OP_SET_POLICY, provider=provider, on_revoke=action)
    click.echo(f"{resp['setting']} = {resp['value']}")


COMMANDS = [policy]
