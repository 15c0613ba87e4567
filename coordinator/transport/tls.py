"""TLS on the coordinator's port: the server's certificate (reloaded when its files change),
optionally client certificates (mTLS) from a CA, and an allowlist of client identities.

A client certificate's identities are its subject's common name (``CN=orders-service``) and its
subject alternative names (``DNS:orders.internal``, ``URI:spiffe://prod/orders``,
``IP:10.0.0.7``); an allowlist names the ones admitted.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from coordinator.config import ServerTls, check_private_key_file

log = logging.getLogger("coordinator.tls")


def load_server_tls(tls: ServerTls) -> tuple[bytes, bytes, bytes | None]:
    """The certificate chain, key and client CA, read and checked; ValueError naming the file
    for anything wrong (unreadable, not PEM, a key that is not the certificate's)."""
    chain = _read(tls.certificate, "certificate")
    key = _read(tls.key, "key")
    try:
        certificate = x509.load_pem_x509_certificate(chain)
    except ValueError:
        raise ValueError(f"tls: certificate: {tls.certificate} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"tls: key: {tls.key} is not an unencrypted PEM private key") from None
    public = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != mine:
        raise ValueError(f"tls: key: {tls.key} is not the key of {tls.certificate}")
    client_ca = None
    if tls.client_ca is not None:
        client_ca = _read(tls.client_ca, "client_ca")
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError:
            raise ValueError(f"tls: client_ca: {tls.client_ca} is not a PEM certificate") from None
    return chain, key, client_ca


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"tls: {name}: cannot read {path}: {error.strerror}") from None


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials that serve ``tls``, re-reading its files when they change: a renewed
    certificate is used from the next handshake on, without a restart. A change that does not
    load (a half-written file, a key that does not match) keeps the previous certificate."""
    check_private_key_file(tls.key)
    chain, key, client_ca = load_server_tls(tls)
    seen = _stamp(tls)

    def configuration(
        chain: bytes, key: bytes, client_ca: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, chain)], client_ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal seen
        stamp = _stamp(tls)
        if stamp == seen:
            return None
        try:
            loaded = load_server_tls(tls)
        except ValueError as error:
            log.error("the changed TLS files do not load, the previous ones stay: %s", error)
            return None
        seen = stamp
        log.info("TLS certificate reloaded from %s", tls.certificate)
        return configuration(*loaded)

    return grpc.dynamic_ssl_server_credentials(
        configuration(chain, key, client_ca),
        fetch,  # type: ignore[arg-type]  # None means "unchanged", as gRPC documents
        require_client_authentication=client_ca is not None,
    )


def _stamp(tls: ServerTls) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in (tls.certificate, tls.key, tls.client_ca):
        if path is None:
            continue
        try:
            info = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
            continue
        stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
    return tuple(stamps)


@functools.lru_cache(maxsize=256)
def certificate_identities(pem: bytes) -> frozenset[str]:
    """A certificate's identities: ``CN=...`` and its ``DNS:``, ``URI:`` and ``IP:`` names.

    Read once per certificate: every call of an mTLS connection brings the same one, and
    parsing it at every call would cost more than the call's own work."""
    certificate = x509.load_pem_x509_certificate(pem)
    found = {
        f"CN={attribute.value!s}"
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    }
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset(found)
    found |= {f"DNS:{name}" for name in names.get_values_for_type(x509.DNSName)}
    found |= {f"URI:{uri}" for uri in names.get_values_for_type(x509.UniformResourceIdentifier)}
    found |= {f"IP:{ip}" for ip in names.get_values_for_type(x509.IPAddress)}
    return frozenset(found)


def peer_identities(auth_context: dict[str, Sequence[bytes]]) -> frozenset[str]:
    """The identities of the client certificate a call came with (none without mTLS)."""
    pems: Iterable[bytes] = auth_context.get("x509_pem_cert", ())
    for pem in pems:
        return certificate_identities(pem)
    return frozenset()
