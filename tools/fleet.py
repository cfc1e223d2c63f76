"""A local fleet: redis-server, two bridge instances and nginx in front, until Ctrl-C.

Starts on loopback, everything in a temporary folder: a throw-away ``redis-server`` (no
persistence), the fake Voice Agent, two ``python -m bridge serve`` instances sharing Redis
(``REDIS_URL``, ``CLUSTER_MAX_CALLS``), and nginx with the repository's ``deploy/nginx.conf``
(its TLS, limits and retries; only the ports, the certificate and the upstream lines are changed)
on a self-signed certificate. Prints how to place calls through nginx with ``make demo``'s
simulator (``tools/simulate_call.py``), the console's address and token, and where the logs are.
``make fleet`` runs it. To watch a Redis outage, stop the printed redis-server's pid and start it
again with the same arguments: the instances go degraded and come back by themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
AUTH_TOKEN = "fleet000000000000000000000000000"  # a stand-in Twilio auth token: signatures are checked
API_KEY = "fleet-demo-key-0123456789"
START_S = 30.0


def _free_port(preferred: int = 0) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _which(name: str, *fallbacks: str) -> str:
    found = shutil.which(name) or next((p for p in fallbacks if Path(p).exists()), None)
    if found is None:
        raise SystemExit(f"fleet: {name} is needed (apt-get install {name})")
    return found


def render_site(shipped: str, *, listen_port: int, cert: Path, key: Path, upstreams: list[int]) -> str:
    """deploy/nginx.conf with loopback ports, a test certificate and our upstream servers."""

    def sub(pattern: str, repl: str, text: str, flags: int = 0) -> str:
        new, n = re.subn(pattern, lambda _: repl, text, count=1, flags=flags)
        if n != 1:
            raise SystemExit(f"fleet: deploy/nginx.conf no longer has {pattern!r}; update tools/fleet.py")
        return new

    site = sub(r"^\s*listen\s+\[::\]:443\s+ssl;\s*$\n", "", shipped, flags=re.M)
    site = sub(r"listen\s+443\s+ssl;", f"listen 127.0.0.1:{listen_port} ssl;", site)
    site = sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", site)
    site = sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", site)
    servers = "".join(f"\n    server 127.0.0.1:{port};" for port in upstreams)
    site = re.sub(r"^\s*server\s+127\.0\.0\.1:\d+;\s*$\n", "", site, flags=re.M)
    return sub(r"upstream bridge \{", "upstream bridge {" + servers, site)


def _main_conf(prefix: Path, site: Path) -> str:
    temp = "\n".join(
        f"    {d}_temp_path {prefix / (d + '_temp')};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nmaster_process off;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
        f"events {{ worker_connections 1024; }}\nhttp {{\n    access_log {prefix / 'access.log'};\n{temp}\n"
        f"    include {site};\n}}\n"
    )


class Fleet:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}.log"
        with log.open("wb") as out:
            # Its own process group: Ctrl-C reaches only this script, which stops them in order.
            proc = subprocess.Popen(args, cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, process_group=0)  # fmt: skip
        self.procs.append((name, proc))
        return proc

    def wait_http(self, name: str, url: str, proc: subprocess.Popen[bytes], **kwargs: object) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"fleet: {name} exited:\n{(self.work / f'{name}.log').read_text(errors='replace')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1, **kwargs).status_code < 500:  # type: ignore[arg-type]
                    return
            time.sleep(0.1)
        raise SystemExit(f"fleet: {name} did not come up within {START_S:g} s (see {self.work / f'{name}.log'})")

    def wait_tcp(self, name: str, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"fleet: {name} exited (see {self.work / f'{name}.log'})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.05)
        raise SystemExit(f"fleet: {name} did not come up within {START_S:g} s")

    def stop(self, name: str) -> None:
        for proc_name, proc in self.procs:
            if proc_name == name and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def stop_all(self) -> None:
        for name, _ in reversed(self.procs):  # nginx, then the bridges (they drain), then the rest
            self.stop(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8443, help="nginx's TLS port (default 8443, or a free one)")
    parser.add_argument("--instances", type=int, default=2, help="bridge instances (default 2)")
    parser.add_argument("--cluster-max-calls", type=int, default=4, help="CLUSTER_MAX_CALLS (default 4)")
    parser.add_argument("--lease-s", type=float, default=15.0, help="LEASE_S (default 15)")
    args = parser.parse_args(argv)

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the fleet as Ctrl-C does

    signal.signal(signal.SIGTERM, terminated)
    redis_bin = _which("redis-server", "/usr/bin/redis-server")
    nginx_bin = _which("nginx", "/usr/sbin/nginx")
    openssl = _which("openssl")
    work = Path(tempfile.mkdtemp(prefix="bridge-fleet-"))
    fleet = Fleet(work)
    interrupted = False
    try:
        redis_port = _free_port()
        redis = fleet.start("redis", [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(work)])  # fmt: skip
        fleet.wait_tcp("redis", redis_port, redis)
        agent_port = _free_port()
        agent = fleet.start("fake-agent", [sys.executable, "-m", "tools.fake_agent", "--port", str(agent_port),
                                           "--api-key", API_KEY], env=_base_env())  # fmt: skip
        fleet.wait_tcp("fake-agent", agent_port, agent)

        nginx_port = _free_port(args.port)
        public = f"https://127.0.0.1:{nginx_port}"
        console_token = secrets.token_urlsafe(18)
        ports = [_free_port() for _ in range(args.instances)]
        env = _base_env() | {
            "ASSEMBLYAI_API_KEY": API_KEY,
            "VOICE_AGENT_URL": f"ws://127.0.0.1:{agent_port}/v1/ws",
            "PUBLIC_HOSTNAME": public,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "STREAM_TOKEN_SECRET": secrets.token_hex(32),  # every instance accepts every other's tokens
            "CONSOLE_TOKEN": console_token,
            "CONSOLE_SESSION_SECRET": secrets.token_hex(32),  # a console session is valid on every instance
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "CLUSTER_MAX_CALLS": str(args.cluster_max_calls),
            "LEASE_S": str(args.lease_s),
            "BIND_HOST": "127.0.0.1",
        }
        for number, port in enumerate(ports, 1):
            name = f"bridge-{number}"
            proc = fleet.start(name, [sys.executable, "-m", "bridge", "serve"], env=env | {
                "PORT": str(port), "RECORDS_URL": f"sqlite:///{work}/calls-{number}.sqlite3"})  # fmt: skip
            fleet.wait_http(name, f"http://127.0.0.1:{port}/readyz", proc)

        prefix = work / "nginx"
        prefix.mkdir()
        cert, key = prefix / "cert.pem", prefix / "key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        site = prefix / "bridge-site.conf"
        shipped = NGINX_CONF.read_text()
        site.write_text(render_site(shipped, listen_port=nginx_port, cert=cert, key=key, upstreams=ports))
        main_conf = prefix / "nginx.conf"
        main_conf.write_text(_main_conf(prefix, site))
        nginx_args = [nginx_bin, "-p", f"{prefix}/", "-c", str(main_conf), "-e", str(prefix / "error.log")]
        nginx = fleet.start("nginx", nginx_args)
        fleet.wait_http("nginx", f"{public}/readyz", nginx, verify=str(cert))

        pids = {name: proc.pid for name, proc in fleet.procs}
        instances = "\n".join(
            f"    bridge-{n}  http://127.0.0.1:{p}  pid {pids[f'bridge-{n}']} (log {work}/bridge-{n}.log)"
            for n, p in enumerate(ports, 1)
        )
        print(f"""\
Fleet up (Ctrl-C stops it):
    redis     127.0.0.1:{redis_port}  pid {redis.pid} (no persistence)
    shared    CLUSTER_MAX_CALLS={args.cluster_max_calls}, LEASE_S={args.lease_s:g}
{instances}
    nginx     {public}  (deploy/nginx.conf, self-signed certificate {cert})
    console   {public}/console  token {console_token}

Place a call through nginx (make demo's simulator; run it several times: nginx spreads them):
    SSL_CERT_FILE={cert} {sys.executable} -m tools.simulate_call \\
        --url {public} --auth-token {AUTH_TOKEN} --audio tools/audio/caller.ulaw --duration 10

Watch the fleet:
    curl -s --cacert {cert} {public}/readyz         # ok, or degraded while Redis is down
    curl -s http://127.0.0.1:{ports[0]}/metrics | grep -E 'bridge_(active_calls|shared_state_up)'
    redis-cli -p {redis_port} zrange vab:slots 0 -1 withscores   # the cluster's leased slots
    kill -9 <a bridge's pid>: its slots are free within LEASE_S
""", flush=True)
        while all(proc.poll() is None for _, proc in fleet.procs):
            time.sleep(0.5)
        dead = [name for name, proc in fleet.procs if proc.poll() is not None]
        print(f"fleet: {', '.join(dead)} exited; stopping the rest (logs in {work})", flush=True)
        return 1
    except KeyboardInterrupt:
        interrupted = True
        print("\nfleet: stopping (the bridges drain first) ...", flush=True)
        return 0
    finally:
        fleet.stop_all()
        if interrupted:
            shutil.rmtree(work, ignore_errors=True)


def _base_env() -> dict[str, str]:
    import os

    keep = ("PATH", "LANG", "HOME", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


if __name__ == "__main__":
    raise SystemExit(main())
