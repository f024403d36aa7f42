"""Registry models as plain HF safetensors directories, for engines that load checkpoints
themselves (transformers' TP, vLLM).

Our registry models ship as GGUF. :func:`export_hf` dequantizes one to fp32 (the same
weights the simulator and the native runtime use) and writes it once to the cache, with a
sidecar file ``lowbit_tp_export.json`` that records the GGUF's sha256, so a calibration
made from the GGUF (``lowbit-tp calibrate --model smollm2-135m``) is recognised as
belonging to the export.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lowbit_tp.models.registry import load_model, resolve_source, sha256_of_files

__all__ = ["SIDECAR", "cache_root", "export_hf"]

SIDECAR = "lowbit_tp_export.json"


def cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_TP_CACHE", Path.home() / ".cache" / "lowbit_tp"))


def _save_plain(model, directory: Path) -> None:
    """Weights as one fp32 safetensors file plus config.json, without the GGUF quantizer
    record (transformers refuses ``save_pretrained`` on a GGUF-loaded model)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    cfg["architectures"] = [type(model).__name__]  # a GGUF load leaves it empty; vLLM needs it
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings") or (cfg.get("text_config") or {}).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def export_hf(name_or_path: str, *, out_dir: str | Path | None = None) -> Path:
    """An HF safetensors directory for ``name_or_path``; GGUF models are exported (fp32) once.

    A checkpoint directory is returned as it is. The export goes to
    ``$LOWBIT_TP_CACHE/hf-export/<name>-<sha12>`` unless ``out_dir`` is given.
    """
    src = resolve_source(name_or_path)
    if src.gguf_file is None:
        return src.directory
    sha = sha256_of_files(src.weight_files())
    out = Path(out_dir) if out_dir else cache_root() / "hf-export" / f"{Path(name_or_path).stem}-{sha[:12]}"
    if (out / SIDECAR).is_file():
        return out
    model, tokenizer, info = load_model(name_or_path, dtype=torch.float32, progress=False)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_plain(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SIDECAR).write_text(json.dumps({"name": name_or_path, "source": info.source,
                                           "source_weights_sha256": sha, "dtype": "float32"}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process exported it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out
