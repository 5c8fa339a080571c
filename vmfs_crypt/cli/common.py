"""What every CLI module shares: the context with the lazily loaded configuration, output levels, progress, JSON."""

import json
import sys
import time

import click

from ..agent.client import AgentClient
from ..agent.launcher import agent_socket
from ..config import Config, load_config
from ..errors import AgentError
from ..ops.reencrypt import OFFLINE_HEAP_TOP_PAD
from ..providers.native import NativeKeyProvider
from ..sysutil import keep_heap_top


class Ctx:
    def __init__(self, config_path: str | None, quiet: bool = False, verbose: int = 0) -> None:
        self.config_path = config_path
        self.quiet = quiet  # --quiet: errors only (data a command was asked for still goes to stdout)
        self.verbose = verbose  # --verbose: more detail, log records of INFO (-vv: DEBUG) on stderr
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config


pass_ctx = click.make_pass_decorator(Ctx)


def running_agent(config: Config) -> AgentClient:
    """The configuration's running agent, or a clear error saying how to get one."""
    client = AgentClient(agent_socket(config))
    if not client.alive():
        raise AgentError(f"no key agent runs for {config.path} (socket {config.agent_socket}); "
                         "it runs while a datastore is mounted, or after 'vmfs-crypt agent start'")
    return client


def _ctx() -> Ctx | None:
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(Ctx) if ctx is not None else None


def quiet() -> bool:
    c = _ctx()
    return bool(c and c.quiet)


def verbose() -> int:
    c = _ctx()
    return c.verbose if c else 0


def note(message: str, err: bool = False) -> None:
    """A confirmation or a progress message: not shown under --quiet."""
    if not quiet():
        click.echo(message, err=err)


def warn(message: str) -> None:
    """A warning on stderr: not shown under --quiet (errors always are)."""
    if not quiet():
        click.echo(f"warning: {message}", err=True)


def emit_json(obj) -> None:
    """--json output: one document, field names documented in the README ("Output for scripts")."""
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of a long operation (encrypt, decrypt, rekey --deep) on stderr (issue 9).

    On a terminal: one line rewritten in place with bytes done, MB/s and ETA. Otherwise (a log,
    a pipe, systemd): a plain line at each further 10 % or every PLAIN_INTERVAL_S seconds,
    whichever comes first, and one at the end. `units` counts items instead of bytes
    (a shallow rekey counts files).
    """

    PLAIN_INTERVAL_S = 5.0
    TTY_INTERVAL_S = 0.2

    def __init__(self, total: int, label: str, stream=None, tty: bool | None = None, units: str = "bytes") -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.units = units
        self.done = 0
        self.start = time.monotonic()
        self._last_time = self.start
        self._last_tenth = 0
        self._shown = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self._show(final=True)
        elif self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._last_time >= self.TTY_INTERVAL_S:
                self._show()
            return
        tenth = self.done * 10 // self.total if self.total else 10
        if tenth > self._last_tenth and self.done < self.total or now - self._last_time >= self.PLAIN_INTERVAL_S:
            self._last_tenth = max(self._last_tenth, tenth)
            self._show()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        pct = 100 * self.done // self.total if self.total else 100
        if self.units != "bytes":
            text = f"{self.label}: {pct:3d}% {self.done} of {self.total} {self.units}"
        else:
            rate = self.done / elapsed
            text = f"{self.label}: {pct:3d}% {_mb(self.done)} of {_mb(self.total)}, {rate / 1e6:,.1f} MB/s"
            if self.done < self.total:
                text += f", ETA {_eta((self.total - self.done) / rate) if rate > 0 else '?'}"
        return text + (f", {_eta(elapsed)} elapsed" if self.done >= self.total else "")

    def _show(self, final: bool = False) -> None:
        self._last_time = time.monotonic()
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *_):
        return None

    def update(self, n: int) -> None:
        pass


def offline_heap() -> None:
    """This process is about to rewrite folders region by region (ops/reencrypt.py)."""
    keep_heap_top(OFFLINE_HEAP_TOP_PAD)  # a refusal only costs speed


def progress(total: int, label: str):
    if quiet():
        return _NoProgress()
    return Progress(total, label, units="files" if label == "rekey" else "bytes")


def warn_backup(config: Config) -> None:
    for name, settings in config.providers.items():
        if settings.get("type") == "native":
            provider = NativeKeyProvider(name, config.native_key_file(name, settings))
            for w in provider.warnings():
                warn(w)


class Group(click.Group):
    """A click group whose command list shows each command's whole first sentence (wrapped), never cut.

    click's default cuts a summary at about 45 characters with "..." (issue 9).
    """

    def format_commands(self, ctx, formatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            rows.append((name, cmd.short_help or cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
