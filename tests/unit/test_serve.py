import importlib.util
import shutil

import pytest

from shepherd.cli import main


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
def test_serve_sglang_says_clearly_when_sglang_is_missing(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--backend", "sglang", "--model-path", "m"])
    assert info.value.code == 2
    assert "SGLang is not installed" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("vllm") is not None, reason="vLLM is installed here")
def test_serve_vllm_says_clearly_when_vllm_is_missing(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--backend", "vllm", "--model-path", "m"])
    assert "vLLM is not installed" in capsys.readouterr().err
