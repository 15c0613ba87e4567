"""TLS on both hops of a torture run, with certificates from a CA made for the run.

Every process of the run finds its material in one directory, under fixed names:

- ``ca.pem``: the run's CA, which every side trusts;
- ``coordinator.pem``/``.key``: the coordinators' server certificate (127.0.0.1), also what
  they present to the participants, which require a client certificate from the run's CA
  (mTLS; the CA is checked, not the name: the harness's health checks use the client's);
- ``participant.pem``/``.key``: the participants' server certificate (127.0.0.1), reached
  through the fault-injecting proxies, which forward the encrypted bytes unchanged;
- ``client.pem``/``.key``: what the client, the feed consumer and the health checks present
  to the coordinators, which admit only this identity (``CN=torture client``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.devcerts import CertificateAuthority

CLIENT_IDENTITY = "torture client"
COORDINATOR_IDENTITY = "torture coordinator"


@dataclass(frozen=True)
class TortureTls:
    """The run's TLS material, in ``directory``."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> TortureTls:
        """Make the CA and every certificate of the run, and write them to ``directory``."""
        ca = CertificateAuthority("torture CA")
        ca.write(directory)
        dns, ips = ("localhost",), ("127.0.0.1",)
        ca.issue(COORDINATOR_IDENTITY, dns=dns, ips=ips).write(directory, "coordinator")
        participant = ca.issue("torture participant", dns=dns, ips=ips, client=False)
        participant.write(directory, "participant")
        ca.issue(CLIENT_IDENTITY, server=False).write(directory, "client")
        return cls(directory)

    def path(self, name: str) -> str:
        """The path of one of the files, as a string for a config or a command line."""
        return str(self.directory / name)

    def _read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def client_credentials(self) -> grpc.ChannelCredentials:
        """What a client of the coordinators dials with: the CA, and the client certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._read("ca.pem"),
            private_key=self._read("client.key"),
            certificate_chain=self._read("client.pem"),
        )

    def participant_credentials(self) -> grpc.ServerCredentials:
        """What a participant serves with: its certificate, and it requires the caller's
        certificate, signed by the run's CA."""
        return grpc.ssl_server_credentials(
            [(self._read("participant.key"), self._read("participant.pem"))],
            root_certificates=self._read("ca.pem"),
            require_client_auth=True,
        )

    def coordinator_config(self) -> dict[str, object]:
        """The ``tls`` section of a coordinator's config: mTLS, the client's identity only."""
        return {
            "certificate": self.path("coordinator.pem"),
            "key": self.path("coordinator.key"),
            "client_ca": self.path("ca.pem"),
            "allowed_clients": [f"CN={CLIENT_IDENTITY}"],
        }

    def participant_endpoint(self, address: str) -> dict[str, object]:
        """A participant's entry in a coordinator's config: TLS, the run's CA, and the
        coordinator's certificate for the participant's mTLS."""
        return {
            "address": address,
            "tls": True,
            "root_certificates": self.path("ca.pem"),
            "client_certificate": self.path("coordinator.pem"),
            "client_key": self.path("coordinator.key"),
        }


def channel(target: str, tls: TortureTls | None, options: list[tuple[str, int]]) -> grpc.Channel:
    """A blocking channel to a coordinator: TLS when the run has it."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.client_credentials(), options=options)
