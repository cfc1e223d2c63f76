"""The pure modules never import the async/web stack (STYLE.md: pure codecs, state, TwiML, settings).

Checked in a fresh interpreter: in this one pytest-trio has already imported trio.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PURE_MODULES = [
    "bridge.phone.media",
    "bridge.agent.events",
    "bridge.call.state",
    "bridge.call.playback",
    "bridge.call.ports",
    "bridge.call.upstream",
    "bridge.call.lifecycle",
    "bridge.config",
    "bridge.phone.security",
    "bridge.phone.twiml",
    "bridge.call.registry",
    "bridge.fleet.ledger",
    "bridge.call.context",
    "bridge.call.actions",
    "bridge.call.policy",
    "bridge.agent.schema",
    "bridge.wire",
    "bridge.net.framing",
    "bridge.net.preauth",
    "bridge.records.facts",
    "bridge.records.record",
    "bridge.records.report",
    "bridge.records.audio",
    "bridge.console.session",
    "bridge.call.amd",
    "bridge.call.keypad",
    "bridge.call.idle",
    "bridge.call.recovery",
    "bridge.call.conversation",
    "bridge.call.toolgate",
    "bridge.call.budget",
]
FORBIDDEN = ["trio", "quart", "quart_trio", "hypercorn", "trio_websocket"]
ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib, sys
importlib.import_module({module!r})
forbidden = {forbidden!r}
loaded = sorted(name for name in sys.modules if name.split(".")[0] in forbidden)
print(",".join(loaded))
"""


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_async_or_web_stack(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(module=module, forbidden=FORBIDDEN)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} pulls in {done.stdout.strip()}"


def test_the_check_would_catch_an_impure_module() -> None:
    """Guard the guard: the same check flags a module that does import trio."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(module="bridge.call.session", forbidden=FORBIDDEN)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "trio" in done.stdout.split(",")
