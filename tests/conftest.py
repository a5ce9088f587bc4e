import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama model folder with a byte-level tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Tiny Llama, Qwen2 and Gemma 3 folders, keyed by architecture."""
    return {a: save_tiny(tmp_path_factory.mktemp(f"tiny-{a}"), a) for a in ("llama", "qwen2", "gemma3")}
