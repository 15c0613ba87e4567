"""TLS for participants: the certificate they serve, and the CA their callers must come from.

    tls = ServerTLS.from_files("accounts.pem", "accounts.key", client_ca="coordinator-ca.pem")
    participant.run("0.0.0.0:50051", tls=tls)

Without `client_ca` any caller may connect over TLS; with it (mTLS) the handshake refuses a
caller that presents no certificate signed by that CA, before any handler runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc

_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----")
# gRPC reads unencrypted keys only: PKCS#8, or the traditional EC and RSA forms.
_PRIVATE_KEY = re.compile(rb"-----BEGIN (RSA |EC )?PRIVATE KEY-----")


@dataclass(frozen=True, repr=False)
class ServerTLS:
    """What a participant needs to serve TLS, in PEM. Built from bytes, or with `from_files`."""

    certificate_chain: bytes
    """The participant's certificate, then any intermediate CAs' (PEM)."""
    private_key: bytes
    """The certificate's private key (PEM, unencrypted)."""
    client_ca: bytes | None = None
    """CA certificates (PEM) that callers' certificates must be signed by; set, every caller
    must present one (mTLS). None: callers need no certificate."""

    def __post_init__(self) -> None:
        if not _CERTIFICATE.search(self.certificate_chain):
            raise ValueError("certificate_chain holds no PEM certificate")
        if not _PRIVATE_KEY.search(self.private_key):
            raise ValueError("private_key holds no unencrypted PEM private key")
        if self.client_ca is not None and not _CERTIFICATE.search(self.client_ca):
            raise ValueError("client_ca holds no PEM certificate")

    @classmethod
    def from_files(
        cls,
        certificate_chain: str | Path,
        private_key: str | Path,
        *,
        client_ca: str | Path | None = None,
    ) -> ServerTLS:
        """Read the PEM files; a file that cannot be read or holds the wrong PEM raises
        ValueError naming it."""
        files = {"certificate_chain": certificate_chain, "private_key": private_key}
        if client_ca is not None:
            files["client_ca"] = client_ca
        pems: dict[str, bytes] = {}
        for field, path in files.items():
            try:
                pems[field] = Path(path).read_bytes()
            except OSError as error:
                raise ValueError(f"{field}: cannot read {path}: {error}") from None
        try:
            return cls(**pems)
        except ValueError as error:
            field = str(error).split(" ", 1)[0]
            raise ValueError(f"{error} ({files[field]})") from None

    @property
    def requires_client_certificate(self) -> bool:
        """True when callers must present a certificate signed by `client_ca` (mTLS)."""
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """The gRPC server credentials, for `grpc.aio.Server.add_secure_port`."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def __repr__(self) -> str:  # never the key
        return f"ServerTLS(mtls={self.requires_client_certificate})"
