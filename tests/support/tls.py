"""A throwaway certificate authority that issues server certificates for host names, for TLS tests on
loopback (made with `cryptography`; keys reach the disk only in the test's tmp_path, where
`ssl.SSLContext.load_cert_chain` needs them)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class CertificateAuthority:
    def __init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._valid = {"not_valid_before": now - datetime.timedelta(hours=1),
                       "not_valid_after": now + datetime.timedelta(days=1)}
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vlm-serve test CA")])
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)
        self._cert = (
            x509.CertificateBuilder(subject_name=self._name, issuer_name=self._name, public_key=self._key.public_key(),
                                    serial_number=x509.random_serial_number(), **self._valid)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def client_context(self) -> ssl.SSLContext:
        """Trusts this CA only, and checks host names as a default context does."""
        context = ssl.create_default_context()
        context.load_verify_locations(cadata=self._cert.public_bytes(serialization.Encoding.PEM).decode())
        return context

    def server_context(self, host: str, workdir: Path, seen_names: list[str | None] | None = None) -> ssl.SSLContext:
        """Serves a certificate for `host`; appends each ClientHello's SNI name to `seen_names`."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]),
                                    issuer_name=self._name, public_key=key.public_key(),
                                    serial_number=x509.random_serial_number(), **self._valid)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        cert_path, key_path = workdir / f"{host}.crt", workdir / f"{host}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        if seen_names is not None:
            context.sni_callback = lambda _sock, name, _ctx: seen_names.append(name)
        return context
