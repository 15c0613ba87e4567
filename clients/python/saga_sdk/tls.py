"""TLS settings: what participants serve (`ServerTLS`), and what clients dial with (`ClientTLS`).

    tls = ServerTLS.from_files("accounts.pem", "accounts.key", client_ca="coordinator-ca.pem")
    participant.run("0.0.0.0:50051", tls=tls)

    tls = ClientTLS.from_files(ca="ca.pem", certificate="orders.pem", key="orders.key")
    client = SagaClient("coordinator.internal:50051", tls=tls, token=...)

Without `client_ca` any caller may connect over TLS; with it (mTLS) the handshake refuses a
caller that presents no certificate signed by that CA, before any handler runs. A client gives
its certificate and key only to a coordinator that requires them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, repr=False)
class ClientTLS:
    """What a client of the coordinator dials TLS with, in PEM. Built from bytes, or with
    `from_files`; every field is optional (`ClientTLS()`: TLS, trusting the system's CAs)."""

    ca: bytes | None = None
    """CA certificates (PEM) the coordinator's certificate must be signed by. None: the
    system's trusted CAs."""
    certificate: bytes | None = None
    """This client's certificate, then any intermediate CAs' (PEM), for a coordinator that
    requires client certificates (mTLS). Goes with `key`."""
    key: bytes | None = None
    """The certificate's private key (PEM, unencrypted)."""
    server_name: str | None = None
    """The name the coordinator's certificate must carry, when the target names something else
    (an IP address, a load balancer). None: the target's host."""

    def __post_init__(self) -> None:
        if self.key is not None and self.certificate is None:
            raise ValueError("key: a client key needs its certificate: give certificate too")
        if self.certificate is not None and self.key is None:
            raise ValueError("certificate: a client certificate needs its key: give key too")
        if self.ca is not None and not _CERTIFICATE.search(self.ca):
            raise ValueError("ca holds no PEM certificate")
        if self.certificate is not None and not _CERTIFICATE.search(self.certificate):
            raise ValueError("certificate holds no PEM certificate")
        if self.key is not None and not _PRIVATE_KEY.search(self.key):
            raise ValueError("key holds no unencrypted PEM private key")
        if self.server_name is not None and (
            not self.server_name or any(c.isspace() for c in self.server_name)
        ):
            raise ValueError(f"server_name: a host name, got {self.server_name!r}")

    @classmethod
    def from_files(
        cls,
        *,
        ca: str | Path | None = None,
        certificate: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> ClientTLS:
        """Read the PEM files; a file that cannot be read or holds the wrong PEM raises
        ValueError naming it."""
        files = {
            name: path
            for name, path in (("ca", ca), ("certificate", certificate), ("key", key))
            if path is not None
        }
        pems: dict[str, bytes] = {}
        for field, path in files.items():
            try:
                pems[field] = Path(path).expanduser().read_bytes()
            except OSError as error:
                raise ValueError(f"{field}: cannot read {path}: {error.strerror}") from None
        try:
            return cls(**pems, server_name=server_name)
        except ValueError as error:
            field = str(error).split(" ", 1)[0].rstrip(":")
            if field in files:
                raise ValueError(f"{error} ({files[field]})") from None
            raise

    @property
    def presents_certificate(self) -> bool:
        """True when the client presents a certificate (mTLS)."""
        return self.certificate is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials, for `grpc.secure_channel`."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.key,
            certificate_chain=self.certificate,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """The channel options these settings need: the expected server name, when given."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def __repr__(self) -> str:  # never the key
        ca = "given" if self.ca is not None else "system"
        name = f", server_name={self.server_name!r}" if self.server_name else ""
        return f"ClientTLS(ca={ca}, mtls={self.presents_certificate}{name})"
