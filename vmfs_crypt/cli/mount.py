"""Mount commands: mount (in the background, or --foreground for systemd) and umount; --name for [mounts.NAME].

A configured mount (`--name`) is started and stopped by the agent, as the agent's user
(issue 11): a vm-operator may do that and gets no key; the mount's file permissions decide
what it may then read and write.
"""

import os

import click

from ..agent import protocol as p
from ..daemon import setup_logging
from ..errors import ConfigError, UsageError
from ..ops import mounting
from ..procs import NotifyReady
from .common import note, pass_ctx, running_agent, warn_backup
from .online import resumed_operations


@click.command()
@click.argument("datastore", type=click.Path(file_okay=False), required=False)
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("--name", help="Start the mount configured as [mounts.NAME] in the agent's configuration.")
@click.option("--foreground", "-f", is_flag=True,
              help="Stay in the foreground (logs to stderr or the journal; tells systemd when it is ready).")
@click.option("-o", "options", help="Options, comma-separated: FUSE's (e.g. ro, max_read=131072), and "
              "allow_other, agent=SOCKET; fstab's (noauto, nofail, _netdev...) are ignored.")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount (needs user_allow_other).")
@click.option("--agent", "agent_socket", type=click.Path(), help="Socket of a running key agent to use.")
@pass_ctx
def mount(c, datastore, mountpoint, name, foreground, options, allow_other, agent_socket):
    """Mount DATASTORE at MOUNTPOINT in plaintext (or start the configured mount --name NAME)."""
    if name:
        if datastore or mountpoint or options or allow_other or agent_socket:
            raise UsageError("--name NAME takes no other arguments: the agent's [mounts.NAME] table has them")
        if foreground:  # systemd's vmfs-crypt@NAME.service: this process serves [mounts.NAME]
            table = c.config.mounts.get(name)
            if table is None:
                raise ConfigError(f"no [mounts.{name}] in {c.config.path}")
            datastore, mountpoint = table["datastore"], table["mountpoint"]
            options, allow_other = table.get("options"), bool(table.get("allow_other"))
        else:
            resp = running_agent(c.config).request(p.OP_MOUNT_START, name=name)
            note(f"mounted {name} at {resp['mountpoint']}")
            for line in str(resp.get("message") or "").splitlines():
                if line.startswith(RESUMING):  # what the mount the agent started resumes (issue 10)
                    note(line)
            return
    if not datastore or not mountpoint:
        raise UsageError("mount needs DATASTORE and MOUNTPOINT (or --name NAME)")
    ours, options = mounting.split_mount_options(options)
    if "config" in ours:
        raise UsageError("config= is an option of the mount helper form (vmfs-crypt DATASTORE MOUNTPOINT -o ...); "
                         "here, use --config")
    agent_socket = agent_socket or ours.get("agent")
    allow_other = allow_other or bool(ours.get("allow_other"))
    if foreground:
        from ..fuse.serve import run_mount  # only this path loads FUSE
        from .mountd import online_services
        setup_logging("mount")
        ready = NotifyReady(f"serving {os.path.realpath(datastore)} at {os.path.realpath(mountpoint)}")
        run_mount(c.config, datastore, mountpoint, agent_socket, options or None, allow_other, ready,
                  services=online_services)
        return
    log_path = mounting.mount_background(c.config, datastore, mountpoint, agent_socket, options, allow_other)
    note(f"mounted {datastore} at {mountpoint} (log: {log_path})")
    _name_resumes(datastore)
    warn_backup(c.config)


RESUMING = "resuming the interrupted "  # an in-place operation, or the abort of one


def _name_resumes(datastore: str) -> None:
    """Say which interrupted in-place operations the mount now resumes online (issue 10).

    Every mount (this one, --foreground under systemd, --name through the agent) resumes them
    itself once it is live, while it serves: a long resume delays neither this command nor
    systemd's READY=1. The mount lists them from its start, so none is missed here.
    """
    for op in resumed_operations(datastore):
        name = "deep rekey" if op["op"] == "rekey" else op["op"]
        what = f"abort of the in-place {name}" if op.get("aborting") else f"in-place {name}"
        note(f"{RESUMING}{what} of {op['folder']} online, in the mount; 'vmfs-crypt operations' "
             "shows it ('--wait' waits for it)")


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False), required=False)
@click.option("--name", help="Stop the mount configured as [mounts.NAME] (through the agent).")
@pass_ctx
def umount(c, mountpoint, name):
    """Unmount a vmfs-crypt mount."""
    if name:
        if mountpoint:
            raise UsageError("umount takes MOUNTPOINT or --name NAME, not both")
        resp = running_agent(c.config).request(p.OP_MOUNT_STOP, name=name)
        note(f"unmounted {name} at {resp['mountpoint']}")
        return
    if not mountpoint:
        raise UsageError("umount needs MOUNTPOINT (or --name NAME)")
    mounting.umount(mountpoint)
    note(f"unmounted {mountpoint}")


def helper_argv(argv: list[str], commands) -> list[str] | None:
    """The mount.fuse form `vmfs-crypt DATASTORE MOUNTPOINT [-o OPTS]` (mount -t fuse.vmfs-crypt, fstab)
    as the argv of `vmfs-crypt [--config C] mount ...`; None when argv is not that form.

    mount.fuse3 runs it through /bin/sh (issue 9: it printed the help and exited 0, nothing
    mounted). config=PATH picks the configuration; -n, -s and -v of mount(8) are ignored.
    """
    if not argv or argv[0].startswith("-") or argv[0] in commands:
        return None
    if "/" not in argv[0] and not os.path.isdir(argv[0]):
        return None  # a mistyped command: click says so
    positional, opts, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o":
            if i + 1 == len(argv):
                raise UsageError("-o needs options")
            opts.append(argv[i + 1])
            i += 1
        elif arg.startswith("-o"):
            opts.append(arg[2:])
        elif arg in ("-n", "-s", "-v"):
            pass
        elif arg.startswith("-"):
            raise UsageError(f"vmfs-crypt DATASTORE MOUNTPOINT -o OPTIONS: unknown argument {arg}")
        else:
            positional.append(arg)
        i += 1
    if len(positional) != 2:
        raise UsageError("the mount helper form is: vmfs-crypt DATASTORE MOUNTPOINT [-o OPTIONS]")
    ours, fuse = mounting.split_mount_options(",".join(opts))
    out = ["--config", ours["config"]] if "config" in ours else []
    out += ["mount", *positional]
    if fuse:
        out += ["-o", fuse]
    if ours.get("agent"):
        out += ["--agent", ours["agent"]]
    if ours.get("allow_other"):
        out.append("--allow-other")
    return out


COMMANDS = [mount, umount]
