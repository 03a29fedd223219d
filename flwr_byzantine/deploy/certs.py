"""TLS certificates and SuperNode authentication keys for a loopback (or lab) deployment.

``python -m flwr_byzantine.deploy.certs --out certificates --nodes 20`` writes:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority;
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid
  for ``127.0.0.1``, ``::1`` and ``localhost`` (``--host`` adds names or addresses);
  the SuperLink serves its Fleet, Control and Runtime APIs with it
  (``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``);
  SuperNodes and the ``flwr`` CLI verify it with ``ca.crt``
  (``--root-certificates`` / ``root-certificates``);
* ``keys/supernode-<i>`` / ``keys/supernode-<i>.pub``: one ECDSA P-384 key pair per
  SuperNode in OpenSSH format, the format Flower 1.42's node authentication reads
  (``flower-supernode --auth-supernode-private-key keys/supernode-<i>``;
  ``flwr supernode register keys/supernode-<i>.pub CONNECTION`` authorises it on a
  SuperLink started with ``--enable-supernode-auth``).

It uses the ``cryptography`` package (a dependency of Flower, so always installed
with the App); ``openssl`` is not needed.  Private keys are written with mode 0600
and no passphrase: for testing only, not for production key management.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names the loopback server certificate is valid for.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the CA certificate and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls(out: Path, hosts: tuple[str, ...] = LOOPBACK_HOSTS, days: int = 30) -> TlsFiles:
    """Write a CA and a server certificate for ``hosts`` (signed by the CA) into ``out``."""
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=int(days))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flwr-byzantine test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(_san(tuple(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    _write(files.ca_cert, ca_cert.public_bytes(pem))
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(pem))
    _write(files.server_key, _key_pem(server_key), private=True)
    return files


def make_node_key(path: Path) -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair for SuperNode authentication: ``path`` (private) and ``path.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    _write(path, private, private=True)
    _write(pub, public + b" flwr-byzantine-" + path.name.encode() + b"\n")
    return path, pub


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR --nodes N [--host NAME ...] [--days D]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("certificates"), help="output directory")
    parser.add_argument("--nodes", type=int, default=0, help="number of SuperNode key pairs")
    parser.add_argument("--host", action="append", default=[],
                        help="extra host name or IP for the server certificate (repeatable)")
    parser.add_argument("--days", type=int, default=30, help="validity in days")
    args = parser.parse_args(argv)
    tls = make_tls(args.out, tuple(LOOPBACK_HOSTS) + tuple(args.host), args.days)
    print(f"CA {tls.ca_cert}\nserver certificate {tls.server_cert}\nserver key {tls.server_key}")
    for i in range(args.nodes):
        priv, pub = make_node_key(args.out / "keys" / f"supernode-{i}")
        print(f"SuperNode key {priv} ({pub.name})")


if __name__ == "__main__":
    main()
