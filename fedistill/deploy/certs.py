"""TLS certificates and SuperNode authentication keys for a Flower deployment.

:func:`make_certs` writes, with the ``cryptography`` package (a Flower dependency):

``ca.crt`` / ``ca.key``
    A self-signed certificate authority. Give ``ca.crt`` to every SuperNode
    (``--root-certificates``) and to ``flwr`` (``root-certificates`` in
    ``$FLWR_HOME/config.toml``); keep ``ca.key`` offline.
``server.pem`` / ``server.key``
    The SuperLink's certificate, signed by the CA, with a subjectAltName for every
    host name and IP address the SuperLink is reached at
    (``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``).
``supernode-<i>`` / ``supernode-<i>.pub``
    One EC SECP384R1 key pair per SuperNode in OpenSSH format: register the public key
    with ``flwr supernode register supernode-<i>.pub CONNECTION``, start the node with
    ``--auth-supernode-private-key supernode-<i>``.

Private keys are written with mode ``0600``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_HOSTS", "make_certs", "make_node_key"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
"""SANs of the SuperLink certificate when none are given: loopback only."""


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _san(hosts: Sequence[str]) -> list:
    from cryptography import x509

    names: list = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """Write one SuperNode key pair: ``path`` (private, OpenSSH) and ``path.pub``.

    Returns
    -------
    private, public
        The two paths.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub_path = path.with_name(path.name + ".pub")
    return _write(path, private, private=True), _write(pub_path, public + f" {path.name}\n".encode())


def make_certs(
    out_dir: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    nodes: int = 3,
    days: int = 365,
    common_name: str = "fedistill SuperLink",
) -> dict[str, Path]:
    """Write a CA, the SuperLink's certificate and ``nodes`` SuperNode key pairs into ``out_dir``.

    Parameters
    ----------
    out_dir
        Created if missing; existing files of the same names are overwritten.
    hosts
        Host names and IP addresses the SuperLink is reached at (subjectAltNames).
    nodes
        Number of SuperNode key pairs (``supernode-1`` ... ``supernode-<nodes>``).
    days
        Validity of the certificates.
    common_name
        Subject CN of the server certificate.

    Returns
    -------
    dict
        ``{"ca": ..., "ca_key": ..., "server_cert": ..., "server_key": ..., "node_keys": [...]}``;
        ``node_keys`` lists the private-key paths (the public key is ``<path>.pub``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("give at least one host name or IP address for the SuperLink certificate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedistill CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
        "ca_key": _write(out / "ca.key", pem_key(ca_key), private=True),
        "server_cert": _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
        "server_key": _write(out / "server.key", pem_key(server_key), private=True),
    }
    keys = [make_node_key(out / f"supernode-{i}")[0] for i in range(1, nodes + 1)]
    return {**paths, "node_keys": keys}  # type: ignore[dict-item]
