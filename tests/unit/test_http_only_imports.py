"""An HTTP-only gateway does not import the tokenizer stack (src/shepherd/tokenizer/__init__.py's promise)."""

import subprocess
import sys

PROBE = """
import sys
import shepherd.cli, shepherd.gateway, shepherd.routing.pd, shepherd.routing.router
print(sorted(name for name in ("tokenizers", "jinja2", "shepherd.tokenizer.loader") if name in sys.modules))
"""


def test_the_gateway_and_its_routers_load_without_tokenizers_or_jinja2():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout
