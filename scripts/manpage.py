"""Write the vmfs-crypt(1) man page from the click commands themselves (`make man`; issue 9).

Usage: python scripts/manpage.py [OUTPUT]   (default: build/vmfs-crypt.1; "-" for stdout)
Read it with `man -l build/vmfs-crypt.1`.
"""

import datetime
import os
import sys

import click

from vmfs_crypt import __version__
from vmfs_crypt.cli import cli
from vmfs_crypt.errors import ExitCode


def roff(text: str) -> str:
    """Text escaped for roff: backslashes, and a leading dot or quote that would start a request."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def walk(group: click.Group, ctx: click.Context, prefix: list[str]):
    """(path, command, context) of every command below `group`, depth first, in name order."""
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        yield prefix + [name], cmd, sub
        if isinstance(cmd, click.Group):
            yield from walk(cmd, sub, prefix + [name])


def options(cmd: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record:
            out += [".TP", f"\\fB{roff(record[0])}\\fR", roff(record[1] or "")]
    return out


def manpage() -> str:
    root = click.Context(cli, info_name="vmfs-crypt", **cli.context_settings)
    date = datetime.date.today().isoformat()
    lines = [f'.TH VMFS-CRYPT 1 "{date}" "vmfs-crypt {__version__}" "User Commands"',
             ".SH NAME", "vmfs-crypt \\- " + roff(cli.get_short_help_str(limit=200)),
             ".SH SYNOPSIS", "\\fBvmfs-crypt\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
             ".SH DESCRIPTION", roff(cli.help or ""), ".SH OPTIONS", *options(cli, root), ".SH COMMANDS"]
    for path, cmd, ctx in walk(cli, root, []):
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        lines += [".SS " + roff(" ".join(path)), f"\\fBvmfs-crypt {roff(' '.join(path))}\\fR {roff(usage)}", ".PP",
                  roff(click.unstyle(cmd.help or cmd.short_help or ""))]
        opts = options(cmd, ctx)
        if opts:
            lines += [".PP", "Options:", ".RS", *opts, ".RE"]
    lines += [".SH EXIT STATUS"]
    for code in ExitCode:
        lines += [".TP", f"\\fB{int(code)}\\fR", code.name.lower().replace("_", " ")]
    lines += [".SH ENVIRONMENT", ".TP", "\\fBVMFS_CRYPT_CONFIG\\fR", "The configuration file (as --config).",
              ".TP", "\\fB_VMFS_CRYPT_COMPLETE\\fR",
              "Shell completion: eval \"$(_VMFS_CRYPT_COMPLETE=bash_source vmfs-crypt)\" (also zsh_source, fish_source).",
              ".SH FILES", "~/.config/vmfs-crypt/config.toml", ".SH SEE ALSO",
              "The README and docs/FORMAT.md of the vmfs-crypt sources."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else os.path.join("build", "vmfs-crypt.1")
    text = manpage()
    if target == "-":
        sys.stdout.write(text)
        return 0
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
