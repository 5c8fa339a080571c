"""`vmfs-crypt audit [--since TIME] [--json]`: read the agent's audit log (issue 11)."""

import json

import click

from ..agent.audit import log_files, parse_since, read_records
from ..errors import ConfigError
from .common import pass_ctx


def _who(rec: dict) -> str:
    who = rec.get("principal") or {}
    return f"{who.get('user', '?')}({who.get('uid', '?')}) pid {who.get('pid', '?')}"


def format_record(rec: dict) -> str:
    """One line for people: time, who, what, result, and the key and file it concerned."""
    what = rec.get("event", "?")
    if rec.get("purpose"):
        what += f" for {rec['purpose']}"
    result = rec.get("result", "?").upper()
    if rec.get("result") != "ok" and rec.get("privilege"):
        result += f" (privilege {rec['privilege']})"
    parts = [rec.get("time", "?"), _who(rec), what, result]
    if rec.get("key_id"):
        parts.append(f"key {rec.get('provider')}/{rec['key_id']}")
    elif rec.get("provider"):
        parts.append(f"provider {rec['provider']}")
    if rec.get("to_key_id"):
        parts.append(f"-> key {rec.get('to_provider')}/{rec['to_key_id']}")
    for field in ("file", "target", "name", "setting", "count"):
        if rec.get(field) not in (None, ""):
            parts.append(f"{field} {rec[field]}")
    if rec.get("error") and rec.get("result") != "ok":
        parts.append(f"- {rec['error']}")
    return "  ".join(str(x) for x in parts)


@click.command()
@click.option("--since", "since_text", metavar="TIME", help="Only records since TIME: ISO 8601 or relative (1h, 30m, 2d).")
@click.option("--json", "as_json", is_flag=True, help="The records as they are stored: one JSON object per line.")
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="The audit log to read (default: [audit] path of the configuration).")
@pass_ctx
def audit(c, since_text, as_json, path):
    """Show the agent's audit log: every key operation and every refused request, with who asked."""
    path = path or c.config.audit_path
    if not log_files(path):
        raise ConfigError(f"no audit log at {path}; the agent writes it ([audit] path in {c.config.path})")
    since = parse_since(since_text) if since_text else None
    try:
        records, bad = read_records(path, since)
    except PermissionError:
        raise ConfigError(f"{path}: only the agent's user may read the audit log (mode 0600)") from None
    for rec in records:
        click.echo(json.dumps(rec, separators=(",", ":")) if as_json else format_record(rec))
    if bad:
        click.echo(f"warning: {bad} line(s) of {path} are not audit records", err=True)


COMMANDS = [audit]
