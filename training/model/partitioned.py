"""A ZeRO-3 model built as partitions from the start, and a base checkpoint read into them.

``build`` constructs the model under ``deepspeed.zero.Init`` with the engine's own DeepSpeed config,
so no rank ever holds the whole model (each parameter is whole only while zero.Init partitions
it, as its module is built). ``load_base`` then fills each rank's partition of every parameter
from the base's safetensors, reading only the rows that hold it: every rank reads about 1/world
of the base, no rank reads all of it, and nothing crosses ranks. transformers' own ZeRO-3 path
(an ``HfDeepSpeedConfig`` around ``from_pretrained``) reads the whole base on rank 0 into memory
and gathers every module to copy it in: a second whole copy on rank 0, and the model sent across
ranks twice more (an all-gather, then rank 0's broadcast).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from norallm.errors import NorallmError


def build(config, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module:
    """The model for ``config`` with every parameter a ZeRO-3 partition, uninitialised (a warm
    start writes every weight). RoPE's ``inv_freq`` and other non-persistent buffers are computed
    as the model is built, on every rank, in fp32 (``arange`` keeps its dtype under zero.Init)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    model_class(config)  # imported before zero.Init, never under it (model_class says why)
    with no_init_weights(), arange_keeps_its_dtype(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def model_class(config) -> type:
    """The causal-LM class for ``config``, its modeling module imported now. A module first
    imported under ``zero.Init`` loses what its decorators did to its classes: zero.Init wraps each
    new class's ``__init__`` as the class is created and, on exit, puts back the ``__init__`` it
    saw then, the one from before transformers' kernel decorators (≥ 5.25: Qwen2's attention)
    wrapped it. Every later instance of that class then lacks ``_kernel_funcs`` and its first
    forward fails (seen on the second build of a Qwen2 model in one process)."""
    from transformers import AutoModelForCausalLM

    # the mapping from_config itself reads (the same name since transformers 4; its import name is
    # the one tests/transformers_api.json has checked in every allowed release)
    return AutoModelForCausalLM._model_mapping[type(config)]


@contextlib.contextmanager
def arange_keeps_its_dtype():
    """Entered before ``zero.Init``: its ``torch.arange`` places the tensor on the device but keeps
    the dtype asked for. zero.Init otherwise casts every floating tensor a constructor returns to
    the model's dtype, and transformers versions that build RoPE's ``inv_freq`` from a float
    arange (5.17's Mistral: ``torch.arange(0, dim, 2, dtype=torch.float)``) then get bf16
    frequencies, rotating positions past a few hundred visibly wrong. transformers ≥ 5.2x ships
    the same as ``integrations.deepspeed.prevent_arange_dtype_change``; 5.0–5.17 do not, so it
    is done here for the whole range pyproject.toml allows."""
    from deepspeed.runtime.zero import partition_parameters as pp

    wrap = pp.zero_wrapper_for_fp_tensor_constructor

    def wrap_keeping_arange_dtype(fn, *args, **kwargs):
        if fn is pp._orig_torch_arange:
            if "target_fp_dtype" in kwargs:
                kwargs["target_fp_dtype"] = None
            elif args:  # DeepSpeed releases that pass it positionally
                args = (None, *args[1:])
        return wrap(fn, *args, **kwargs)

    pp.zero_wrapper_for_fp_tensor_constructor = wrap_keeping_arange_dtype
    try:
        yield
    finally:
        pp.zero_wrapper_for_fp_tensor_constructor = wrap


def _checkpoint_files(base: Path) -> dict[str, Path]:
    """Each tensor name of the base's safetensors checkpoint → the file that holds it."""
    if not base.is_dir():
        raise NorallmError(f"model.base '{base}' is not a local dir: a ZeRO-3 warm start reads each rank's part "
                           "of the base's files. Download it once (huggingface-cli download NAME --local-dir DIR) "
                           "and point model.base at the dir.")
    index = base / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = {key: base / name for key, name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NorallmError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); download the base "
                               "again.") from None
        absent = sorted({p.name for p in files.values() if not p.is_file()})
        if absent:
            raise NorallmError(f"model.base '{base}': {index.name} names {len(absent)} file(s) that are not there "
                               f"(e.g. {absent[:3]}): the download is incomplete; download the base again.")
        return files
    single = base / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise NorallmError(f"model.base '{base}' has no model.safetensors (or its index): a ZeRO-3 warm start reads "
                       "each rank's partition from safetensors. Convert the base once: load it with transformers "
                       "and save_pretrained it to a new dir (safetensors is the default), then point model.base there.")


def _source_key(name: str, keys: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint's name for parameter ``name`` (older checkpoints leave out the base-model prefix)."""
    if name in keys:
        return name
    bare = name.removeprefix(f"{prefix}.")
    return bare if bare in keys else None


def load_base(model: torch.nn.Module, base: str | Path) -> None:
    """Copy this rank's partition of every parameter (and every persistent buffer, whole) from
    the safetensors checkpoint in ``base``, cast to the model's dtype as ``from_pretrained``
    casts. A parameter the checkpoint lacks is an error naming it; tied weights load once."""
    from safetensors import SafetensorError, safe_open

    base = Path(base)
    keys = _checkpoint_files(base)
    prefix = getattr(model, "base_model_prefix", "")
    wanted: list[tuple[str, torch.Tensor, bool]] = []
    missing = []
    for name, param in model.named_parameters():
        key = _source_key(name, keys, prefix)
        if key is None:
            missing.append(name)
        else:
            wanted.append((key, param, True))
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():
        key = _source_key(name, keys, prefix)
        if key is not None and name in persistent:
            wanted.append((key, buf, False))
    if missing:
        raise NorallmError(f"model.base '{base}' lacks {len(missing)} of the model's weights (e.g. {missing[:3]}); "
                           "is it a checkpoint of this architecture?")
    with torch.no_grad():
        for key, target, is_param in wanted:
            # opened per tensor: the file is mapped, and the pages a rank has read stay in its
            # resident set while the mapping lives (a whole base's worth by the end)
            try:
                with safe_open(str(keys[key]), framework="pt") as f:
                    if is_param:
                        _copy_partition(f.get_slice(key), target, key)
                    else:
                        target.copy_(f.get_tensor(key))
            except (OSError, SafetensorError) as e:  # every rank reads every file: all fail alike
                raise NorallmError(f"cannot read '{key}' from {keys[key]} ({e}): the file is cut or damaged; "
                                   "download the base again.") from None


def _bounds(param: torch.nn.Parameter) -> tuple[int, int]:
    """The flat elements [start, end) of ``param`` that this rank's partition holds (the last
    partition is padded past the end, and a tensor smaller than the world leaves some empty)."""
    size = param.ds_tensor.ds_numel
    start = size * param.ds_zero_partition_rank
    return start, max(start, min(start + size, param.ds_numel))


def assign(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """``param = value`` (a whole tensor, cast to the parameter's dtype): for a ZeRO-3 parameter,
    this rank's partition of it — every rank holds ``value``, so nothing crosses ranks."""
    if not hasattr(param, "ds_id"):
        param.copy_(value)
        return
    start, end = _bounds(param)
    param.ds_tensor.narrow(0, 0, end - start).copy_(value.reshape(-1)[start:end])


def _copy_partition(source, param: torch.nn.Parameter, key: str) -> None:
    """``param``'s partition from a safetensors slice, reading only the rows that hold it."""
    shape = tuple(source.get_shape())
    if shape != tuple(param.ds_shape):
        raise NorallmError(f"the base's '{key}' has shape {list(shape)}, the model's {list(param.ds_shape)}; "
                           "choose the flavor that matches the base model.")
    start, end = _bounds(param)
    if start == end:
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = start // row, -(-end // row)
    rows = source[first:last].reshape(-1)
    param.ds_tensor.narrow(0, 0, end - start).copy_(rows[start - first * row:end - first * row])
