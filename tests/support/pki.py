"""The test CA: certificates made at run time (see ``coordinator.devcerts``)."""

from coordinator.devcerts import CertificateAuthority, Issued

__all__ = ["CertificateAuthority", "Issued"]
