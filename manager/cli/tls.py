"""`titan-plugins tls ...`: the private CA in run/tls/ (manager.core.certs). `make up`
calls `init` when Redis listens beyond this host; `make worker-cert NAME=...` calls
`bundle`; `make tls-check` calls `check`; scripts/tls.sh calls the rotation steps and
reloads the Redis nodes around them. Root's commands: they read the CA's key."""

from __future__ import annotations

import datetime as dt
import io
import sys
import tarfile
from pathlib import Path

import click

from manager.core import certs
from manager.core.certs import Kind
from manager.core.config import Settings
from manager.core.secrets import load_key

LOCAL_CLIENTS = ("manager", "flower", "workers")  # the processes `make up` starts
SERVER = "redis"  # one certificate for this host's data nodes and Sentinels


def tls_dir() -> Path:
    """The run directory's tls/, by the one rule every process uses (Settings.run_dir:
    TITAN_RUN_DIR, else the repository's run/, wherever the command is run from)."""
    return Settings.from_env().run_dir / "tls"


@click.group()
def tls() -> None:
    """The private CA that Redis and its clients use across hosts (run/tls/)."""


@tls.command()
@click.option("--host", "hosts", multiple=True, help="An address Redis is reached at.")
@click.option("--api-host", "api_hosts", multiple=True,
              help="An address the API's HTTPS port is reached at (TITAN_API_TLS=1).")
def init(hosts: tuple[str, ...], api_hosts: tuple[str, ...]) -> None:
    """Make what is missing: the CA, the server certificates of Redis (naming every
    --host) and of the API (every --api-host), each reissued when an address is new, and
    the local processes' client certificates."""
    where = tls_dir()
    if not (where / "ca.crt").exists():
        certs.new_ca(where)
        click.echo(f"made a private CA in {where}")
    for name, names in ((SERVER, hosts), ("api", api_hosts)):
        server = where / "servers" / f"{name}.crt"
        if names and (not server.exists() or not set(names) <= certs.names_in(server)
                      or not certs.signed_by_current(where, server)):
            certs.issue(where, Kind.SERVER, name, list(names))
            click.echo(f"issued the {name} server certificate for {', '.join(names)}")
    for name in LOCAL_CLIENTS:
        cert = where / "clients" / f"{name}.crt"
        if not cert.exists() or not certs.signed_by_current(where, cert):
            certs.issue(where, Kind.CLIENT, name)


@tls.command()
@click.argument("name")
def issue(name: str) -> None:
    """Issue certificate NAME again (a new key), signed by the current CA: a server
    certificate (`redis`) for the same addresses, else a client certificate."""
    where = tls_dir()
    server = where / "servers" / f"{name}.crt"
    if server.exists():
        click.echo(certs.issue(where, Kind.SERVER, name, sorted(certs.names_in(server))))
    else:
        click.echo(certs.issue(where, Kind.CLIENT, name))


@tls.command()
@click.argument("name")
@click.option("--env", "env_file", type=click.Path(exists=True, dir_okay=False),
              required=True, help="The settings a worker host needs (run/redis.remote.env).")
@click.option("--into", default="/etc/titan", show_default=True,
              help="Where the host unpacks the bundle.")
def bundle(name: str, env_file: str, into: str) -> None:
    """A tar for worker host NAME on stdout: a new client certificate and key, the CA
    bundle, and titan.env (the Redis URL and these paths)."""
    if sys.stdout.isatty():
        raise click.UsageError("the bundle is a tar (with a private key): redirect it, "
                               f"e.g. make -s worker-cert NAME={name} > {name}.tar")
    where = tls_dir()
    cert = certs.issue(where, Kind.CLIENT, name)
    env = Path(env_file).read_text() + "".join(
        f"TITAN_REDIS_TLS_{k}={into}/tls/{f}\n"
        for k, f in (("CA", "ca.crt"), ("CERT", "client.crt"), ("KEY", "client.key")))
    env += f"TITAN_SECRETS_KEY={into}/secrets.key\n"  # the plugins' secrets, for its runs
    secrets_key = load_key(Settings.from_env().secrets_key, create=True)
    files = [("tls/ca.crt", (where / "trust.crt").read_bytes(), 0o644),
             ("tls/client.crt", cert.read_bytes(), 0o644),
             ("tls/client.key", cert.with_suffix(".key").read_bytes(), 0o600),
             ("secrets.key", secrets_key + b"\n", 0o600),
             ("titan.env", env.encode(), 0o600)]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path, data, mode in files:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, int(dt.datetime.now().timestamp())
            tar.addfile(info, io.BytesIO(data))
    sys.stdout.buffer.write(out.getvalue())


@tls.command()
def check() -> None:
    """When each certificate expires; exit 1 when one has expired or expires within
    30 days (renew it: docs/architecture.md, Rotation)."""
    now = dt.datetime.now(dt.UTC)
    found = certs.expiries(tls_dir())
    if not found:
        raise click.ClickException(f"no certificates in {tls_dir()} (Redis uses no TLS)")
    soon = False
    for item in found:
        days = item.days_left(now)
        soon |= days < certs.RENEW_BEFORE_DAYS
        state = "EXPIRED" if days < 0 else "renew soon" if days < 30 else "ok"
        click.echo(f"{item.not_after:%Y-%m-%d}  {days:5d} days  {state:10s}  "
                   f"{item.subject}  ({item.path.relative_to(tls_dir())})")
    if soon:
        sys.exit(1)


@tls.command("rotate-ca")
def rotate_ca() -> None:
    """A new signing CA, trusted beside the previous one (trust.crt) until retire-ca.
    Certificates are reissued under it with `issue` (scripts/tls.sh orders the steps)."""
    certs.new_ca(tls_dir())
    click.echo("new CA: trust.crt holds it and the previous one")


@tls.command("retire-ca")
def retire_ca() -> None:
    """Trust the current CA only (every certificate in use was issued under it)."""
    certs.retire_previous(tls_dir())
    click.echo("trust.crt holds the current CA only")
