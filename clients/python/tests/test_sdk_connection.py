"""A client's connection settings: `ClientTLS`, tokens and token files, and `Connection` read from
arguments, environment variables and the config file, each refused with a clear message when it
cannot work, and never showing a token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from saga_sdk import AsyncSagaClient, ClientTLS, Connection, SagaClient, TokenFile
from saga_sdk.connection import BearerToken, check_token
from tests.support.pki import CertificateAuthority

SECRET = "sk-live-0123456789abcdef"


@dataclass(frozen=True)
class Files:
    directory: Path
    ca: Path
    certificate: Path
    key: Path
    token: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    directory = tmp_path_factory.mktemp("client-pki")
    ca = CertificateAuthority()
    certificate, key = ca.issue("orders-service", server=False).write(directory, "client")
    token = directory / "token"
    token.write_text(SECRET + "\n")
    return Files(directory, ca.write(directory), certificate, key, token)


def load(environ: dict[str, str], **arguments: object) -> Connection:
    """Connection.from_environment with no config file unless one is named."""
    return Connection.from_environment({"HOME": "/nonexistent", **environ}, **arguments)  # type: ignore[arg-type]


# --- ClientTLS ---------------------------------------------------------------------------------


def test_client_tls_reads_its_files_and_names_a_file_that_does_not_fit(files: Files) -> None:
    tls = ClientTLS.from_files(
        ca=files.ca, certificate=files.certificate, key=files.key, server_name="coordinator"
    )
    assert tls.presents_certificate
    assert tls.channel_options() == [("grpc.ssl_target_name_override", "coordinator")]
    assert tls.credentials() is not None

    with pytest.raises(ValueError, match=r"^ca: cannot read .*missing\.pem: No such file"):
        ClientTLS.from_files(ca=files.directory / "missing.pem")
    with pytest.raises(ValueError, match=r"^ca holds no PEM certificate \(.*client\.key\)$"):
        ClientTLS.from_files(ca=files.key)
    with pytest.raises(ValueError, match=r"^key holds no unencrypted PEM private key"):
        ClientTLS.from_files(certificate=files.certificate, key=files.certificate)


def test_a_client_key_needs_its_certificate_and_the_reverse(files: Files) -> None:
    with pytest.raises(ValueError, match="a client key needs its certificate"):
        ClientTLS.from_files(ca=files.ca, key=files.key)
    with pytest.raises(ValueError, match="a client certificate needs its key"):
        ClientTLS.from_files(ca=files.ca, certificate=files.certificate)


def test_client_tls_shows_no_key() -> None:
    key = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n"
    certificate = b"-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END CERTIFICATE-----\n"
    tls = ClientTLS(certificate=certificate, key=key)
    assert repr(tls) == "ClientTLS(ca=system, mtls=True)"
    assert "c2VjcmV0" not in repr(tls)


# --- tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("", "is empty"),
        (f"{SECRET}\n", "whitespace or a line break"),
        (f"{SECRET} {SECRET}", "whitespace or a line break"),
        (f"Bearer {SECRET}", "give the token alone"),
        (f"{SECRET}é", "a character a gRPC header cannot carry"),
    ],
)
def test_a_token_that_cannot_be_sent_is_refused_without_showing_it(token: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as refused:
        check_token(token, "SAGA_TOKEN")
    assert str(refused.value).startswith("SAGA_TOKEN: ")
    assert SECRET not in str(refused.value)
    with pytest.raises(ValueError, match=words):
        SagaClient("127.0.0.1:1", token=token)


def test_a_token_callable_is_asked_before_every_call_and_its_answer_checked() -> None:
    answers = iter(["first", "second", f"{SECRET} oops"])
    bearer = BearerToken(lambda: next(answers))
    assert bearer.header() == ("authorization", "Bearer first")
    assert bearer.header() == ("authorization", "Bearer second")
    with pytest.raises(ValueError, match="the callable's answer: the token holds whitespace") as e:
        bearer.header()
    assert SECRET not in str(e.value)
    assert repr(bearer) == "BearerToken(<hidden>)"


async def test_the_async_client_takes_a_coroutine_function_as_its_token() -> None:
    async def fresh() -> str:
        return "from-a-vault"

    assert await BearerToken(fresh).header_async() == ("authorization", "Bearer from-a-vault")
    with pytest.raises(TypeError, match="use AsyncSagaClient"):
        BearerToken(fresh).header()


def test_a_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    token = TokenFile(path)
    assert token() == "first-token"

    replacement = tmp_path / "token.new"
    replacement.write_text("second-token")
    replacement.replace(path)  # how a rotation replaces it
    assert token() == "second-token"

    path.unlink()  # half-way through another rotation: the previous token stays
    assert token() == "second-token"
    path.write_text("one\ntwo\n")  # a file that does not hold a token: likewise
    assert token() == "second-token"
    assert repr(token) == f"TokenFile({str(path)!r})"


def test_a_token_file_that_does_not_work_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"token file .*missing: cannot read it: No such file"):
        TokenFile(tmp_path / "missing")
    two_lines = tmp_path / "two-lines"
    two_lines.write_text(f"{SECRET}\n{SECRET}\n")
    with pytest.raises(ValueError, match="whitespace or a line break") as refused:
        TokenFile(two_lines)
    assert SECRET not in str(refused.value)


def test_clients_and_connections_never_show_their_token(files: Files) -> None:
    connection = load({"SAGA_TOKEN": SECRET, "SAGA_TLS_CA": str(files.ca)})
    client = SagaClient(connection.target, tls=connection.tls, token=connection.token)
    with client:
        shown = [repr(connection), repr(client), str(vars(client))]
    assert (
        repr(client)
        == "SagaClient('127.0.0.1:50051', tls=ClientTLS(ca=given, mtls=False), token=<hidden>)"
    )
    assert all(SECRET not in text for text in shown), shown


def test_a_token_and_an_authorization_entry_in_metadata_do_not_go_together() -> None:
    with pytest.raises(ValueError, match="token or an authorization entry"):
        SagaClient("127.0.0.1:1", token=SECRET, metadata=[("Authorization", f"Bearer {SECRET}")])
    with pytest.raises(ValueError, match="tls or credentials, not both"):
        SagaClient("127.0.0.1:1", tls=ClientTLS(), credentials=ClientTLS().credentials())


# --- Connection.from_environment ---------------------------------------------------------------


def test_nothing_configured_is_plaintext_to_the_default_target_without_a_token() -> None:
    connection = load({})
    assert (connection.target, connection.tls, connection.token) == ("127.0.0.1:50051", None, None)


def test_the_environment_names_the_target_tls_and_token(files: Files) -> None:
    connection = load(
        {
            "SAGA_TARGET": "coordinator.internal:50051",
            "SAGA_TLS_CA": str(files.ca),
            "SAGA_TLS_CERT": str(files.certificate),
            "SAGA_TLS_KEY": str(files.key),
            "SAGA_TLS_SERVER_NAME": "coordinator",
            "SAGA_TOKEN_FILE": str(files.token),
        }
    )
    assert connection.target == "coordinator.internal:50051"
    assert connection.tls == ClientTLS.from_files(
        ca=files.ca, certificate=files.certificate, key=files.key, server_name="coordinator"
    )
    assert isinstance(connection.token, TokenFile)
    assert connection.token() == SECRET
    assert load({"SAGA_TOKEN": SECRET}).token == SECRET
    assert load({"SAGA_TLS": "true"}).tls == ClientTLS()


def write_config(path: Path, settings: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings))
    return path


def test_the_config_file_gives_what_the_environment_does_not(tmp_path: Path, files: Files) -> None:
    directory = tmp_path / "home" / ".config" / "saga"
    config = write_config(
        directory / "client.yaml",
        {
            "target": "from-file:50051",
            "tls": {"ca": "ca.pem", "certificate": str(files.certificate), "key": "keys/me.key"},
            "token_file": "token",
        },
    )
    (directory / "ca.pem").write_bytes(files.ca.read_bytes())  # relative to the file's directory
    (directory / "keys").mkdir()
    (directory / "keys" / "me.key").write_bytes(files.key.read_bytes())
    (directory / "token").write_text("from-the-file\n")

    found = Connection.from_environment({"HOME": str(tmp_path / "home")})  # the default path
    assert found.target == "from-file:50051"
    assert found.tls is not None
    assert found.tls.presents_certificate
    assert callable(found.token)
    assert found.token() == "from-the-file"

    named = {"SAGA_CLIENT_CONFIG": str(config), "HOME": "/nonexistent"}
    assert Connection.from_environment(named).target == "from-file:50051"
    # The environment wins over the file, and arguments over both, field by field.
    over = Connection.from_environment(
        {**named, "SAGA_TARGET": "from-env:1", "SAGA_TOKEN": "from-env"}, target="from-flag:2"
    )
    assert (over.target, over.token) == ("from-flag:2", "from-env")
    assert over.tls is not None
    assert over.tls.presents_certificate
    flagged = Connection.from_environment(named, token_file=files.token)
    assert callable(flagged.token)
    assert flagged.token() == SECRET


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"token": SECRET}, "token: keep the token out of this file"),
        ({"target": "x:1", "tsl": {}}, r"unknown key\(s\) tsl; expected target, tls, token_file"),
        ({"tls": {"cert": "me.pem"}}, r"tls: unknown key\(s\) cert; expected ca, certificate"),
        ({"tls": "yes"}, "tls: true, or a mapping"),
        ({"tls": {"key": "me.key"}}, r"a client key \(from .*client\.yaml: tls\.key\) needs its"),
        (
            {"tls": {"ca": "missing.pem"}},
            r"tls ca \(from .*: tls\.ca\): cannot read .*missing\.pem",
        ),
        ({"token_file": "missing"}, r"token file .*missing \(.*client\.yaml: token_file\): cannot"),
    ],
)
def test_a_config_file_that_cannot_work_is_refused_naming_the_key(
    tmp_path: Path, settings: dict[str, object], words: str
) -> None:
    config = write_config(tmp_path / "client.yaml", settings)
    with pytest.raises(ValueError, match=words) as refused:
        Connection.from_environment({"HOME": "/nonexistent"}, config_file=config)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"SAGA_TLS_KEY": "{key}"}, r"a client key \(from SAGA_TLS_KEY\) needs its certificate"),
        ({"SAGA_TLS_CERT": "{certificate}"}, r"\(from SAGA_TLS_CERT\) needs its key"),
        ({"SAGA_TLS_CA": "{key}"}, r"tls ca holds no PEM certificate: .*client\.key \(from SAGA"),
        ({"SAGA_TLS_CA": "{missing}"}, r"tls ca \(from SAGA_TLS_CA\): cannot read .*missing"),
        ({"SAGA_TOKEN": SECRET, "SAGA_TOKEN_FILE": "{token}"}, "SAGA_TOKEN or SAGA_TOKEN_FILE"),
        ({"SAGA_TOKEN": f"{SECRET}\n"}, "SAGA_TOKEN: the token holds whitespace"),
        ({"SAGA_TLS": "maybe"}, "SAGA_TLS: expected true or false"),
        ({"SAGA_CLIENT_CONFIG": "{missing}"}, r"client config .*missing: no such file"),
    ],
)
def test_environment_variables_that_cannot_work_are_refused_naming_them(
    files: Files, environ: dict[str, str], words: str
) -> None:
    paths = {
        "key": str(files.key),
        "certificate": str(files.certificate),
        "token": str(files.token),
        "missing": str(files.directory / "missing"),
    }
    with pytest.raises(ValueError, match=words) as refused:
        load({name: value.format(**paths) for name, value in environ.items()})
    assert SECRET not in str(refused.value)


async def test_from_environment_builds_both_clients(files: Files) -> None:
    environ = {"HOME": "/nonexistent", "SAGA_TARGET": "x:1", "SAGA_TOKEN_FILE": str(files.token)}
    with SagaClient.from_environment(environ, timeout=1) as client:
        assert repr(client) == "SagaClient('x:1', token=<hidden>)"
    async with AsyncSagaClient.from_environment(environ) as twin:
        assert repr(twin) == "AsyncSagaClient('x:1', token=<hidden>)"
