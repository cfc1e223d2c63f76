"""The container image: `make image` builds it (tools/build_image.sh) and it serves.

Slow (a debootstrap base the first time, then pip inside the build: minutes), so it runs only
with ``BRIDGE_IMAGE_TEST=1`` (``.ci/run`` sets it in its own step after ``make test``). It builds
the image with the shipped script (which smoke-tests ``python -m bridge check`` itself), then
checks the image against the code and against deploy/k8s: the user is the pod's runAsUser and not
root, the port is the default PORT, no compiler or pip; and it serves from the image's own root
filesystem, mounted read-only with tmpfs on /tmp and /app/data only (what the pod gets), as that
user, under chroot (this sandbox refuses `podman run`): ``/healthz`` answers 200 and SIGTERM exits
0. Needs root, podman and debootstrap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bridge.config import from_env

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/voice-agent-bridge:test"
BUILD_TIMEOUT_S = 1800  # debootstrap on a slow mirror plus pip; a rerun reuses the base (~30 s)

pytestmark = pytest.mark.skipif(
    os.environ.get("BRIDGE_IMAGE_TEST") != "1", reason="slow: set BRIDGE_IMAGE_TEST=1 (.ci/run does)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def built() -> Iterator[dict[str, object]]:
    """Build IMAGE with tools/build_image.sh; yields its `podman image inspect` and removes it."""
    missing = [tool for tool in ("podman", "debootstrap", "unshare", "chroot") if shutil.which(tool) is None]
    assert not missing, f"BRIDGE_IMAGE_TEST=1 but {missing} missing (.ci/run installs podman and debootstrap)"
    assert os.geteuid() == 0, "the image build needs root (debootstrap, podman image mount, chroot)"
    started = time.monotonic()
    out = subprocess.run(
        [str(REPO / "tools" / "build_image.sh")],
        env={**os.environ, "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert out.returncode == 0, f"tools/build_image.sh failed:\n{out.stderr[-4000:]}"
    print(f"{out.stdout.strip()} (wall {time.monotonic() - started:.0f} s)")
    inspect = subprocess.run(["podman", "image", "inspect", IMAGE], capture_output=True, text=True, check=True)
    try:
        yield dict(json.loads(inspect.stdout)[0])
    finally:
        subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, check=False)


@pytest.fixture
def rootfs(built: dict[str, object]) -> Iterator[Path]:
    mount = subprocess.run(["podman", "image", "mount", IMAGE], capture_output=True, text=True, check=True)
    try:
        yield Path(mount.stdout.strip())
    finally:
        subprocess.run(["podman", "image", "unmount", IMAGE], capture_output=True, check=False)


def _pod_user() -> int:
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    return int(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])


def test_the_image_config_matches_the_code_and_the_manifests(built: dict[str, object]) -> None:
    config = built["Config"]
    assert isinstance(config, dict)
    uid = _pod_user()
    assert uid != 0
    assert config["User"] == f"{uid}:{uid}"
    default_port = from_env({"ASSEMBLYAI_API_KEY": "k", "PUBLIC_HOSTNAME": "https://example.com"}).port
    assert f"{default_port}/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["/opt/venv/bin/python", "-m", "bridge"]
    assert config["Cmd"] == ["serve"]
    assert config["WorkingDir"] == "/app"


def test_the_final_image_has_the_virtualenv_and_no_build_tools(rootfs: Path) -> None:
    uid = _pod_user()
    passwd = (rootfs / "etc" / "passwd").read_text()
    assert f"bridge:x:{uid}:{uid}:" in passwd
    assert (rootfs / "app" / "data").stat().st_uid == uid
    for tool in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/c++", "usr/bin/make", "opt/venv/bin/pip", "usr/bin/pip3"):
        assert not (rootfs / tool).exists(), f"the final image has /{tool}"
    assert not list((rootfs / "usr" / "bin").glob("gcc*"))
    site = next((rootfs / "opt" / "venv" / "lib").glob("python3*/site-packages"))
    assert (site / "bridge" / "__main__.py").is_file()
    assert not (site / "pip").exists() and not (site / "setuptools").exists()
    # Package data ships in the wheel: the console's static files, as in the source tree.
    shipped = {p.relative_to(REPO / "bridge") for p in (REPO / "bridge" / "console" / "static").rglob("*")}
    installed = {p.relative_to(site / "bridge") for p in (site / "bridge" / "console" / "static").rglob("*")}
    assert shipped <= installed


def test_the_image_serves_from_a_read_only_root_as_its_user(rootfs: Path, tmp_path: Path) -> None:
    uid, port = _pod_user(), _free_port()
    env = {
        "PATH": "/opt/venv/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        "ASSEMBLYAI_API_KEY": "image-test-key",
        "PUBLIC_HOSTNAME": "https://bridge.example.com",
        "TWILIO_AUTH_TOKEN": "0123456789abcdef0123456789abcdef",
        "STREAM_TOKEN_SECRET": "image-test-stream-token-secret-0123",
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "DRAIN_SECONDS": "5",
    }
    # A private mount namespace: the image's root bound read-only, tmpfs on the two writable
    # paths (the pod's emptyDirs), then chroot as the image's user. `exec` keeps one PID, so
    # SIGTERM reaches the bridge.
    root = tmp_path / "root"
    root.mkdir()
    script = (
        f"set -e; mount --bind {rootfs} {root}; mount -o remount,bind,ro {root}; "
        f"mount -t tmpfs -o mode=1777 tmpfs {root}/tmp; "
        f"mount -t tmpfs -o mode=0700,uid={uid},gid={uid} tmpfs {root}/app/data; "
        f"exec {shutil.which('chroot')} --userspec={uid}:{uid} {root} "
        "/bin/sh -c 'cd /app && exec /opt/venv/bin/python -m bridge serve'"
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--fork", "/bin/sh", "-c", script],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    status = response.status
                    break
            except OSError:
                time.sleep(0.1)
        assert status == 200, f"no /healthz 200 from the image (exit {proc.poll()}):\n{log.read_text()}"
        # unshare forwards no signal: SIGTERM the bridge (its child); unshare exits with its code.
        (bridge,) = _children(proc.pid)
        os.kill(bridge, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
