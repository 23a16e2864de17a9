"""Redis across hosts speaks TLS only, and trust is exactly "signed by the project's CA":
a client without a certificate, or with one from another CA, is refused by Redis; a
server that is not ours (another CA, a worker's stolen client certificate, our CA but
another name) is refused by the client before it sends anything, so a listener on the
port records nothing secret; a plain redis:// connection to a TLS port fails with a
message that names the fix; a worker host's bundle connects as it is."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from harness import RedisServer
from manager.api.app import create_app
from manager.cli.main import cli
from manager.core import certs
from manager.core.certs import Kind
from manager.core.clients import describe, redis_client
from manager.core.config import Settings
from manager.core.secrets import SecretStore
from manager.core.wiring import Wiring
from manager.plugins.registry import Registry
from redis_nodes import Impostor, project_ca, tls_settings


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    where = tmp_path / "tls"
    certs.new_ca(where)
    certs.issue(where, Kind.SERVER, "redis", ["127.0.0.1", "localhost"])
    certs.issue(where, Kind.CLIENT, "client")
    return where


def over_tls(url: str, **changes: str) -> Settings:
    return Settings.from_env(redis_url=url, **{**tls_settings(), **changes})


@pytest.fixture
def impostor_cert(request: pytest.FixtureRequest, other_ca: Path) -> Path:
    """The certificates an impostor could hold."""
    if request.param == "another CA's":
        return other_ca / "servers/redis.crt"
    if request.param == "a worker's (client) certificate":
        return project_ca() / "clients/client.crt"
    return certs.issue(project_ca(), Kind.SERVER, "elsewhere", ["redis-b.internal"])


@pytest.mark.parametrize("impostor_cert", ["another CA's", "a worker's (client) certificate",
                                           "ours, for another name"], indirect=True)
def test_a_client_sends_nothing_to_a_server_that_is_not_ours(impostor_cert: Path) -> None:
    impostor = Impostor(impostor_cert)
    password = "the-redis-password-0123456789"
    try:
        settings = over_tls(f"rediss://default:{password}@127.0.0.1:{impostor.port}/0")
        with pytest.raises(redis.ConnectionError) as caught:
            redis_client(settings.redis).ping()
    finally:
        impostor.close()
    assert impostor.handshakes == 0 and impostor.received == b"", impostor.received
    assert "the password was not sent" in describe(caught.value, settings.redis)


@pytest.mark.parametrize("client", ["none", "another CA's"])
def test_redis_refuses_a_client_without_a_certificate_of_ours(redis_server: RedisServer,
                                                              other_ca: Path,
                                                              client: str) -> None:
    cert = {"none": "", "another CA's": str(other_ca / "clients/client.crt")}[client]
    settings = over_tls(redis_server.tls_url, redis_tls_cert=cert,
                        redis_tls_key=cert.replace(".crt", ".key"))
    with pytest.raises(redis.ConnectionError) as caught:
        redis_client(settings.redis).ping()
    if client == "none":
        assert "TITAN_REDIS_TLS_CERT" in describe(caught.value, settings.redis)
    assert redis_client(over_tls(redis_server.tls_url).redis).ping()  # ours is let in


def test_a_plain_connection_to_a_tls_port_names_the_fix(redis_server: RedisServer,
                                                       plugins_dir: Path) -> None:
    plain = Settings.from_env(redis_url=redis_server.tls_url.replace("rediss://", "redis://"),
                              plugins_dir=plugins_dir)
    with pytest.raises(redis.ConnectionError) as caught:
        redis_client(plain.redis).ping()
    message = describe(caught.value, plain.redis)
    assert "accepts TLS only" in message and "rediss://" in message, message
    assert "TITAN_REDIS_TLS_CA" in message and "make worker-cert" in message, message
    wiring = Wiring.connect(plain)  # and where an operator looks: /health
    health = create_app(wiring, Registry(wiring), dispatcher=None).test_client().get("/health")
    assert health.status_code == 503
    assert "accepts TLS only" in health.json["redis"]["error"], health.json


@pytest.mark.parametrize("url", ["redis://default:pw@10.0.0.5:6379/0",
                                 "redis://default:pw@redis.internal:6379/0"])
def test_a_password_is_never_configured_to_cross_a_network_in_clear(url: str) -> None:
    with pytest.raises(ValueError, match="in clear: use rediss://"):
        Settings.from_env(redis_url=url)
    with pytest.raises(ValueError, match="in clear"):
        Settings.from_env(redis_url="redis://default:pw@127.0.0.1:6379/0",
                          redis_sentinels="10.0.0.5:26379")
    with pytest.raises(ValueError, match="TITAN_REDIS_TLS_CA"):
        Settings.from_env(redis_url=url.replace("redis://", "rediss://"))


@pytest.fixture
def bundle(redis_server: RedisServer, tmp_path: Path) -> Iterator[Path]:
    """`make worker-cert NAME=worker-b`'s tar, unpacked where the worker host would."""
    env = tmp_path / "remote.env"
    env.write_text(f"TITAN_REDIS_URL={redis_server.tls_url}\n")
    into = tmp_path / "etc-titan"
    result = CliRunner().invoke(cli, ["tls", "bundle", "worker-b", "--env", str(env),
                                      "--into", str(into)],
                                env={"TITAN_RUN_DIR": str(project_ca().parent)})
    assert result.exit_code == 0, result.output
    with tarfile.open(fileobj=io.BytesIO(result.stdout_bytes)) as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
        tar.extractall(into, filter="data")
    assert modes == {"tls/ca.crt": 0o644, "tls/client.crt": 0o644, "tls/client.key": 0o600,
                     "secrets.key": 0o600, "titan.env": 0o600}, modes
    yield into


def test_a_worker_hosts_bundle_connects_as_it_is(bundle: Path) -> None:
    env = dict(line.split("=", 1) for line in (bundle / "titan.env").read_text().splitlines())
    assert set(env) == {"TITAN_REDIS_URL", "TITAN_REDIS_TLS_CA", "TITAN_REDIS_TLS_CERT",
                        "TITAN_REDIS_TLS_KEY", "TITAN_SECRETS_KEY"}, env
    settings = Settings.from_env(**{k.removeprefix("TITAN_").lower(): v for k, v in env.items()})
    conn = redis_client(settings.redis)
    assert conn.ping()
    # a secret the manager set (with its key) is what a run on the worker host reads
    keys = settings.keys.__class__(f"bundle{uuid.uuid4().hex[:6]}")
    manager_key = Settings.from_env(run_dir=project_ca().parent).secrets_key
    SecretStore(conn, keys, manager_key).set("token", b"v4lue", ("p",))
    assert SecretStore(conn, keys, settings.secrets_key).values_for("p", ("token",)) == [
        ("token", b"v4lue")]
    conn.delete(keys.secrets)


def test_tls_check_says_when_each_certificate_expires(tmp_path: Path) -> None:
    runner = CliRunner()
    where = {"TITAN_RUN_DIR": str(project_ca().parent)}
    result = runner.invoke(cli, ["tls", "check"], env=where)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("redis" in line and "servers/redis.crt" in line and " ok " in line
               for line in lines), lines
    assert any("Titan Plugin Manager CA" in line for line in lines), lines
    empty = runner.invoke(cli, ["tls", "check"], env={"TITAN_RUN_DIR": str(tmp_path)})
    assert empty.exit_code == 1 and "no certificates" in empty.output
