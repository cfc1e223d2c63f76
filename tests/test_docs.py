"""The README stays true: every setting is documented, and the tools example is the tested file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    source = (ROOT / "bridge" / "config.py").read_text()
    read = set(re.findall(r'r\.\w+\(\s*"([A-Z][A-Z0-9_]+)"', source))
    read |= {"ASSEMBLYAI_API_KEY", "HOSTNAME", "PUBLIC_HOSTNAME", "STREAM_TOKEN_SECRET", "TWILIO_AUTH_TOKEN"}
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", README, re.MULTILINE))
    assert len(read) > 30
    assert read - documented == set()
    assert documented - read == set()


def test_the_readme_tools_example_is_the_tested_module() -> None:
    block = README.split("<!-- example:begin -->\n```python\n", 1)[1].split("```\n<!-- example:end -->", 1)[0]
    assert block == (ROOT / "examples" / "tools_example.py").read_text()


def test_the_readme_gives_the_two_commands() -> None:
    assert "make run" in README and "make test" in README and "make demo" in README


def test_the_readme_nginx_config_is_the_tested_one() -> None:
    block = README.split("<!-- nginx:begin -->\n```nginx\n", 1)[1].split("```\n<!-- nginx:end -->", 1)[0]
    assert block == (ROOT / "deploy" / "nginx.conf").read_text()
    assert "proxy_set_header Upgrade $http_upgrade;" in block


def test_every_bridge_path_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bbridge/[\w/]*\w(?:\.py)?/?", README))
    assert len(named) > 20
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert missing == [], f"README names paths that do not exist: {missing}"


def _layout() -> dict[str, set[str]]:
    """{package: module file names} from the README's layout block (package "" is ``bridge/``)."""
    block = README.split("```\nbridge/\n", 1)[1].split("```", 1)[0]
    modules: dict[str, set[str]] = {}
    package = ""
    for line in block.splitlines():
        if not line.startswith("  "):
            break  # tools/, tests/: not the package
        if not line.startswith("   "):  # a new entry at the top of bridge/
            first = line.split()[0]
            package = first[:-1] if first.endswith("/") else ""
        modules.setdefault(package, set()).update(re.findall(r"\b(\w+\.py)\b", line))
    return modules


def test_the_readme_layout_is_the_tree() -> None:
    layout = _layout()
    named = {f"{package}/{name}".lstrip("/") for package, names in layout.items() for name in names}
    tree = {str(p.relative_to(ROOT / "bridge")) for p in (ROOT / "bridge").rglob("*.py") if p.name != "__init__.py"}
    assert {"net/front.py", "agent/leg.py", "call/session.py", "__main__.py"} <= named
    assert sorted(named - tree) == [], "the README's layout names modules that do not exist"
    missing = sorted(tree - named)
    assert missing == [], "add them to the README's layout (the bridge/ block under 'How a call flows')"
