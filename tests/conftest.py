import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on a shared 2-core machine run faster and steadier on one thread.

    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
