"""Development tooling for the KMIP provider: a throw-away PKI and a PyKMIP server runner.

Used by `make kms` (scripts/kms.py), the KMIP tests and the KMIP benchmark; not by the agent.
"""

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# What PyKMIP 0.11's server offers with auth_suite TLS1.2 and a modern OpenSSL (field notes).
SERVER_CIPHER_SUITES = "TLS_RSA_WITH_AES_256_CBC_SHA256 TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384"


def _write(path: str, data: bytes, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class CertificateAuthority:
    name: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "vmfs-crypt test CA") -> "CertificateAuthority":
        key = _rsa_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(name, key, cert)

    def issue(self, common_name: str, sans: list[str] = (), client: bool = False):
        """(key, cert) for a TLS server (SANs: DNS names or IP addresses) or a TLS client (clientAuth)."""
        key = _rsa_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                         else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        names = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())

    def write(self, directory: str, stem: str = "ca") -> str:
        return _write(os.path.join(directory, f"{stem}.pem"), self.cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_pair(directory: str, stem: str, key, cert) -> tuple[str, str]:
    """Write STEM.pem and STEM.key (0600); return their paths."""
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return (_write(os.path.join(directory, f"{stem}.pem"), cert.public_bytes(serialization.Encoding.PEM), 0o644),
            _write(os.path.join(directory, f"{stem}.key"), key_pem))


@dataclass
class Pki:
    """A CA with one server and one client certificate, as files in `directory`."""

    directory: str
    ca: CertificateAuthority
    ca_path: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def create(cls, directory: str, server_names: list[str] = ("127.0.0.1", "localhost"),
               client_name: str = "vmfs-crypt-agent") -> "Pki":
        os.makedirs(directory, mode=0o700, exist_ok=True)
        ca = CertificateAuthority.create()
        ca_path = ca.write(directory)
        s_cert, s_key = write_pair(directory, "server", *ca.issue(server_names[0], list(server_names)))
        c_cert, c_key = write_pair(directory, "client", *ca.issue(client_name, client=True))
        return cls(directory, ca, ca_path, s_cert, s_key, c_cert, c_key)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, deadline_s: float, proc: subprocess.Popen | None = None) -> None:
    """Return once (host, port) accepts a TCP connection; bounded by a deadline (and by `proc` dying)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the KMIP server on {host}:{port} exited with status {proc.returncode}")
        if time.monotonic() > end:
            raise TimeoutError(f"nothing listens on {host}:{port} after {deadline_s} s")
        # Back off a little between connect attempts (this is a bounded poll, not a synchronisation sleep).
        time.sleep(0.05)


class PyKmipServer:
    """One pykmip-server process on loopback; several sharing `database` form a replicated cluster."""

    def __init__(self, workdir: str, pki: Pki, port: int | None = None, host: str = "127.0.0.1",
                 database: str | None = None, server_cert: tuple[str, str] | None = None, name: str = "kms") -> None:
        self.workdir, self.pki, self.host = workdir, pki, host
        self.port = port or free_port(host)
        self.name = name
        self.database = database or os.path.join(workdir, "kms.sqlite")
        self.cert, self.key = server_cert or (pki.server_cert, pki.server_key)
        self.proc: subprocess.Popen | None = None
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        self.policy_dir = os.path.join(workdir, "policies")
        os.makedirs(self.policy_dir, exist_ok=True)
        self.conf_path = os.path.join(workdir, f"{name}-{self.port}.conf")
        self.log_path = os.path.join(workdir, f"{name}-{self.port}.log")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _write_conf(self) -> None:
        conf = "\n".join([
            "[server]", f"hostname={self.host}", f"port={self.port}", f"certificate_path={self.cert}",
            f"key_path={self.key}", f"ca_path={self.pki.ca_path}", "auth_suite=TLS1.2",
            f"policy_path={self.policy_dir}", "enable_tls_client_auth=True",
            f"tls_cipher_suites={SERVER_CIPHER_SUITES}", "logging_level=INFO",
            f"database_path={self.database}", ""])
        _write(self.conf_path, conf.encode())

    def start(self, deadline_s: float = 20.0) -> "PyKmipServer":
        self._write_conf()
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, "-m", "kmip.services.server.server", "-f", self.conf_path,
                                      "-l", self.log_path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, env=env,
                                     # it stops on SIGINT, even when we were started with SIGINT ignored
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for_port(self.host, self.port, deadline_s, self.proc)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, deadline_s: float = 10.0) -> None:
        """SIGINT (PyKMIP stops in about 2 s); the whole process group is killed if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its multiprocessing manager child, if any
        except ProcessLookupError:
            pass
        proc.wait(timeout=deadline_s)

    def kill(self) -> None:
        """Crash it (SIGKILL to its process group): an outage without a goodbye to connected clients."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def __enter__(self) -> "PyKmipServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
