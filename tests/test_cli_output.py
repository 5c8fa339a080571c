"""The CLI for people and scripts (issue 9): install, the README's quick start, --json, exit codes, help, progress, man page."""

import configparser
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from support import REPO, is_mounted, mounted

CLI_BIN = os.path.join(os.path.dirname(sys.executable), "vmfs-crypt")


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_pykmip_is_an_install_dependency_pinned_like_the_extra():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    install = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    extra = [line.strip() for line in cfg["options.extras_require"]["kmip"].splitlines() if line.strip()]
    assert "pykmip==0.11.0" in install
    assert extra == ["pykmip==0.11.0"]  # the old extra is an alias of the same pin


@pytest.mark.cli
@pytest.mark.kmip
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pip_install_in_a_fresh_venv_gives_a_command_with_both_providers(tmp_path):
    """`pip install .` (issue 9): the installed vmfs-crypt alone, no PYTHONPATH, serves native and KMIP keys."""
    from support import VmfsEnv
    from support.kmip import KmipCluster, add_kmip_provider

    src = tmp_path / "src"  # a copy: pip's in-tree build would leave build/ and egg-info in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "bench-results",
                                                              "posix-results", "__pycache__", "*.so"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)  # on the base interpreter
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src)],
                         capture_output=True, timeout=900)
    assert pip.returncode == 0, pip.stderr.decode(errors="replace")[-3000:]
    env = VmfsEnv(str(tmp_path / "env"))
    env.env.pop("PYTHONPATH")
    env.env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"

    def cli(*args):
        proc = subprocess.run(["vmfs-crypt", *map(str, args)], env=env.env, capture_output=True, timeout=300,
                              cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        return proc

    assert b"data path: native" in cli("--version").stdout  # the compiled core was built by pip
    cluster = KmipCluster(str(tmp_path / "kmip"))
    try:
        cluster.ensure_up()
        cli("provider", "add", "native", "local")
        env.run = lambda *args, check=True, **kw: cli(*args)  # add_kmip_provider runs the installed command
        add_kmip_provider(env, "kms", [s.port for s in cluster.servers], cluster.pki)
        for vm, provider in (("vm1", "local"), ("vm2", "kms")):
            os.makedirs(os.path.join(env.datastore, vm))
            cli("create", os.path.join(env.datastore, vm, "disk.vmdk"), "--size", "1M", "--provider", provider)
            info = json.loads(cli("info", "--json", os.path.join(env.datastore, vm)).stdout)
            assert info["kek"]["provider"] == provider
    finally:
        subprocess.run(["vmfs-crypt", "agent", "stop", "--force"], env=env.env, capture_output=True, timeout=30)
        cluster.stop_all()
        shutil.rmtree(env.runtime, ignore_errors=True)


@pytest.mark.cli
@pytest.mark.fuse
def test_readme_quick_start_runs_as_written(venv_env, tmp_path):
    """The README's block, with /srv and /mnt moved into the test's folder, run by a shell."""
    text = readme()
    block = text.split("The commands a user needs", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert "mkdir -p /srv/ds/vm1 /mnt/ds" in block  # the mount point is made before the mount
    root = str(tmp_path / "root")
    script = block.replace("/srv/", root + "/srv/").replace("/mnt/", root + "/mnt/")
    env = dict(venv_env.env, VMFS_CRYPT_CONFIG=str(tmp_path / "qs" / "config.toml"))
    if os.path.exists(CLI_BIN):  # where `make deps` puts the command
        env["PATH"] = os.path.dirname(CLI_BIN) + os.pathsep + env["PATH"]
    else:
        pytest.skip(f"no console script at {CLI_BIN}")
    mnt = os.path.join(root, "mnt", "ds")
    venv_env.mounts.append(mnt)
    proc = subprocess.run(["bash", "-e", "-x", "-c", script], env=env, capture_output=True, timeout=300,
                          cwd=str(tmp_path))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    out = proc.stdout.decode()
    assert re.search(r"^  vm1 +encrypted +local ", out, re.M), out
    assert not is_mounted(mnt)
    with open(os.path.join(root, "srv", "ds", "vm1", "disk.vmdk"), "rb") as f:
        assert b"encryption.keySafe" in f.read()
    subprocess.run([CLI_BIN, "agent", "stop", "--force"], env=env, capture_output=True, timeout=30)


# -- help, summaries, man page, completion --------------------------------------------------------

def command_paths() -> list[list[str]]:
    import click
    from vmfs_crypt.cli import cli

    def walk(group, prefix):
        for name, cmd in sorted(group.commands.items()):
            yield prefix + [name]
            if isinstance(cmd, click.Group):
                yield from walk(cmd, prefix + [name])
    return list(walk(cli, []))


def summaries(help_text: str) -> dict[str, str]:
    """The Commands section of a help text: name -> summary (wrapped lines joined)."""
    if "Commands:" not in help_text:
        return {}
    out, name = {}, None
    for line in help_text.split("Commands:", 1)[1].splitlines()[1:]:
        m = re.match(r"^  (\S+)\s+(.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif line.startswith("   ") and name:
            out[name] += " " + line.strip()
        elif not line.strip():
            break
    return out


@pytest.mark.cli
def test_h_is_help_everywhere_and_no_summary_is_cut(venv_env):
    paths = [[]] + command_paths()
    assert ["agent", "reload"] in paths and ["policy", "show"] in paths
    for path in paths:
        short = venv_env.run(*path, "-h").stdout.decode()
        assert short == venv_env.run(*path, "--help").stdout.decode(), path
        assert short.startswith("Usage: vmfs-crypt"), short
        for name, text in summaries(short).items():
            # click cuts long first sentences with "..."; ours end where the sentence ends
            assert not text.endswith("...") and text.endswith((".", ")")), (path, name, text)
    top = summaries(venv_env.run("-h").stdout.decode())
    assert set(top) == {p[0] for p in paths if len(p) == 1}
    assert top["cat"].endswith("to standard output."), top["cat"]


def test_man_page_names_every_command(tmp_path):
    target = str(tmp_path / "vmfs-crypt.1")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "manpage.py"), target], check=True,
                   capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    with open(target, encoding="utf-8") as f:
        page = f.read()
    assert page.startswith(".TH VMFS-CRYPT 1")
    for path in command_paths():
        assert f"\n.SS {' '.join(path)}\n" in page, path
    for option in ("--json", "--quiet", "--deep", "--encrypt-new-folders"):
        assert option.replace("-", "\\-") in page or option in page, option
    if shutil.which("man"):
        rendered = subprocess.run(["man", "-l", target], capture_output=True, text=True,
                                  env=dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="0"))
        plain = re.sub(r".\x08", "", rendered.stdout)  # man's bold and underline by overstriking
        assert rendered.returncode == 0 and "agent reload" in plain and "-h, --help" in plain, rendered.stderr


@pytest.mark.cli
def test_shell_completion_as_the_readme_says(venv_env):
    assert '_VMFS_CRYPT_COMPLETE=bash_source vmfs-crypt' in readme()
    script = venv_env.run(env=dict(venv_env.env, _VMFS_CRYPT_COMPLETE="bash_source")).stdout.decode()
    assert "complete -o nosort -F _vmfs_crypt_completion vmfs-crypt" in script
    words = venv_env.run(env=dict(venv_env.env, _VMFS_CRYPT_COMPLETE="bash_complete", COMP_WORDS="vmfs-crypt pro",
                                  COMP_CWORD="1")).stdout.decode()
    assert "plain,provider" in words.splitlines()


# -- --json, the datastore summary, exit codes ----------------------------------------------------

def _make_datastore(env) -> dict[str, str]:
    ds = env.datastore
    for name in ("vm1", "vm2", "plain"):
        os.makedirs(os.path.join(ds, name))
    env.run("create", os.path.join(ds, "vm1", "disk.vmdk"), "--size", "4M")
    with open(os.path.join(ds, "vm1", "vm1.nvram"), "wb") as f:  # created at rest in an encrypted folder
        f.write(b"\0" * 512)
    env.tool("qemu-img", "create", "-f", "vmdk", os.path.join(ds, "vm2", "sparse.vmdk"), "4M")
    with open(os.path.join(ds, "vm2", "vmware.log"), "w") as f:
        f.write("booted\n")
    env.run("encrypt", os.path.join(ds, "vm2"))
    env.tool("qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", os.path.join(ds, "plain", "p.vmdk"), "1M")
    return {"ds": ds}


@pytest.mark.cli
@pytest.mark.qemu
def test_info_json_names_the_kek_one_way_and_plaintext_claims_no_cipher(venv_env):
    _make_datastore(venv_env)
    ds = venv_env.datastore
    desc = json.loads(venv_env.run("info", "--json", os.path.join(ds, "vm1", "disk.vmdk")).stdout)
    sparse = json.loads(venv_env.run("info", "--json", os.path.join(ds, "vm2", "sparse.vmdk")).stdout)
    plain = json.loads(venv_env.run("info", "--json", os.path.join(ds, "plain", "p.vmdk")).stdout)
    # key in a descriptor, key in the folder key file: the same field names
    assert desc["disk"]["key_location"] == "descriptor" and desc["disk"]["kek"] == desc["kek"]
    flat = {f["name"]: f for f in desc["files"]}["disk-flat.vmdk"]
    assert flat["key_location"] == "descriptor" and flat["kek"] == desc["kek"] and flat["cipher"] == "aes-xts-plain64"
    sp = {f["name"]: f for f in sparse["files"]}["sparse.vmdk"]
    assert sp["key_location"] == "folder" and sp["kek"] == sparse["kek"] and set(sp) == set(flat)
    for doc in (desc, sparse, plain):
        assert {"kek", "key_location"} <= set(doc.get("disk", {"kek": 0, "key_location": 0}))
        assert not any(k in json.dumps(doc) for k in ("folder_kek", "descriptor_key"))
    assert plain["cipher"] is None and plain["kek"] is None and plain["state"] == "plain"
    for f in plain["files"] + [f for f in sparse["files"] if f["role"] == "plaintext"]:
        assert f["cipher"] is None and f["kek"] is None and f["key_location"] is None, f
    assert [f["name"] for f in sparse["files"]] == ["sparse.vmdk"]


@pytest.mark.cli
@pytest.mark.qemu
def test_info_of_a_datastore_summarises_every_vm_folder(venv_env):
    _make_datastore(venv_env)
    ds = venv_env.datastore
    doc = json.loads(venv_env.run("info", "--json", ds).stdout)
    assert doc["datastore"] is True
    rows = {f["name"]: f for f in doc["folders"]}
    assert set(rows) == {"vm1", "vm2", "plain"}
    assert (rows["vm1"]["state"], rows["vm1"]["disks"], rows["vm1"]["file_count"]) == ("encrypted", 1, 3)
    assert (rows["vm2"]["state"], rows["vm2"]["disks"], rows["vm2"]["file_count"]) == ("encrypted", 1, 2)
    assert (rows["plain"]["state"], rows["plain"]["disks"], rows["plain"]["file_count"]) == ("plain", 1, 2)
    assert rows["vm1"]["kek"]["provider"] == "local" and rows["plain"]["kek"] is None
    text = venv_env.run("info", ds).stdout.decode()
    assert f"{ds}: datastore, 3 folder(s), 2 encrypted" in text, text
    lines = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    assert lines["FOLDER"] == ["FOLDER", "STATE", "PROVIDER", "KEY", "DISKS", "FILES"]
    assert lines["vm1"] == ["vm1", "encrypted", "local", rows["vm1"]["kek"]["keyId"], "1", "3"]
    assert lines["plain"] == ["plain", "plain", "-", "-", "1", "2"]
    assert "disk-flat.vmdk" not in text  # the summary; -v lists the files too
    assert "disk-flat.vmdk" in venv_env.run("-v", "info", ds).stdout.decode()


def lock_a_folder(env, name="vm3") -> str:
    """An encrypted folder whose KEK id the native provider cannot serve (longer than 128 characters): locked."""
    vm = os.path.join(env.datastore, name)
    os.makedirs(vm)
    with open(os.path.join(vm, f"{name}.nvram"), "wb") as f:
        f.write(b"nvram")
    env.run("encrypt", vm)
    keys = os.path.join(vm, ".vmfs-crypt.json")
    with open(keys) as f:
        text = f.read()
    key_id = json.loads(text)["kek"]["keyId"]
    with open(keys, "w") as f:
        f.write(text.replace(key_id, "a" * 129))
    return vm


@pytest.mark.cli
@pytest.mark.fuse
def test_status_json_and_a_non_zero_exit_while_disks_are_locked(venv_env):
    from vmfs_crypt.errors import ExitCode
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    assert venv_env.run("status", check=False).returncode == ExitCode.AGENT  # no agent
    with mounted(venv_env):
        ok = venv_env.run("status", "--json")
        doc = json.loads(ok.stdout)
        assert doc["locked"] == [] and doc["agent"]["pid"] > 0 and doc["you"]["owner"] is True
        assert [(p["name"], p["type"], p["default"], p["broken"]) for p in doc["providers"]] == \
            [("local", "native", True, False)]
        assert any("mount of" in h["what"] for h in doc["holders"])
        agent_doc = json.loads(venv_env.run("agent", "status", "--json").stdout)
        assert set(agent_doc) == set(doc)
    lock_a_folder(venv_env)
    with mounted(venv_env):
        locked = venv_env.run("status", "--json", check=False)
        assert locked.returncode == ExitCode.LOCKED == 13
        doc = json.loads(locked.stdout)
        assert [(e["provider"], e["disks"]) for e in doc["locked"]] == [("local", ["vm3/vm3.nvram"])]
        text = venv_env.run("status", check=False)
        assert text.returncode == 13 and b"LOCKED key" in text.stdout
        assert venv_env.run("agent", "status", check=False).returncode == 0  # the agent's own state is fine


@pytest.mark.cli
def test_provider_list_and_policy_show_json(venv_env):
    venv_env.run("provider", "add", "native", "second")
    doc = json.loads(venv_env.run("provider", "list", "--json").stdout)
    assert doc["default_provider"] == "local" and doc["config"] == venv_env.config
    assert [(p["name"], p["type"], p["default"], p["backed_up"]) for p in doc["providers"]] == \
        [("local", "native", True, False), ("second", "native", False, False)]
    assert doc["providers"][1]["key_file"].endswith("native-second.key")
    venv_env.run("policy", "default-provider", "second")
    pol = json.loads(venv_env.run("policy", "show", "--json").stdout)
    assert pol == {"config": venv_env.config, "default_provider": "second", "on_revoke": {}}


@pytest.mark.cli
def test_quiet_prints_errors_only_and_verbose_more(venv_env):
    quiet = venv_env.run("-q", "provider", "add", "native", "second")
    assert quiet.stdout == b"" and quiet.stderr == b""
    loud = venv_env.run("provider", "add", "native", "third")
    assert b"added native provider third" in loud.stdout and b"warning: back it up" in loud.stderr
    failed = venv_env.run("-q", "provider", "add", "native", "third", check=False)
    assert failed.returncode == 2 and b"already exists" in failed.stderr  # errors still show
    assert venv_env.run("-q", "provider", "list").stdout.count(b"native") == 3  # asked-for output still shows
    both = venv_env.run("-q", "-v", "provider", "list", check=False)
    assert both.returncode == 2 and b"exclude each other" in both.stderr


# -- progress ----------------------------------------------------------------------------------

@pytest.mark.cli
def test_progress_without_a_terminal_is_plain_lines_with_bytes_and_rate(venv_env):
    vm = os.path.join(venv_env.datastore, "vm1")
    os.makedirs(vm)
    size = 48 << 20  # 12 steps of 4 MiB: every tenth is crossed
    with open(os.path.join(vm, "vm1.vmem"), "wb") as f:
        f.write(os.urandom(size))
    proc = venv_env.run("encrypt", vm)  # stderr is a pipe here, not a terminal
    lines = [l for l in proc.stderr.decode().splitlines() if l.startswith("encrypting:")]
    assert "\r" not in proc.stderr.decode() and "\x1b[" not in proc.stderr.decode()
    pcts = [int(re.match(r"encrypting:\s+(\d+)%", l).group(1)) for l in lines]
    assert pcts == sorted(pcts) and pcts[-1] == 100 and len(set(p // 10 for p in pcts)) >= 9, lines
    assert re.search(r"100% 50\.3 MB of 50\.3 MB, [\d,.]+ MB/s, \d+:\d\d:\d\d elapsed$", lines[-1]), lines[-1]
    assert all(re.search(r"[\d,.]+ MB of 50\.3 MB, [\d,.]+ MB/s, ETA \d+:\d\d:\d\d$", l) for l in lines[:-1]), lines
    assert venv_env.run("-q", "decrypt", vm).stderr == b""  # --quiet: no progress


def test_progress_on_a_terminal_rewrites_one_line_with_rate_and_eta():
    import io
    from vmfs_crypt.cli.common import Progress
    out = io.StringIO()
    Progress.TTY_INTERVAL_S = 0.0  # every update redraws (the test does not depend on time)
    try:
        with Progress(10 << 20, "decrypting", stream=out, tty=True) as bar:
            for _ in range(10):
                bar.update(1 << 20)
    finally:
        Progress.TTY_INTERVAL_S = 0.2
    text = out.getvalue()
    frames = text.split("\r\x1b[K")[1:]
    assert len(frames) >= 10 and text.endswith("\n") and text.count("\n") == 1
    assert re.search(r"decrypting:\s+50% 5\.2 MB of 10\.5 MB, [\d,.]+ MB/s, ETA \d+:\d\d:\d\d", text), frames
