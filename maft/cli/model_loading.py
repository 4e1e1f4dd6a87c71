"""Finding and loading a MAFT model for inference (the model bundled with the package, a saved folder or a Hub id),
checked first so that a missing, damaged or foreign model is named in the error; and the torch device it runs on."""

import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.hub import hub_is_offline, is_hub_id


if TYPE_CHECKING:
    import torch

    from ..modeling_maft import MaftModel
    from ..processing_maft import MaftProcessor

BUNDLED_MODEL = "pretrained/maft-mini"


def default_model_path() -> Path:
    """The model bundled with the package, used when no model is given."""
    path = Path(str(resources.files("maft").joinpath(BUNDLED_MODEL)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"this installation has no bundled default model at {path}: give a model folder or Hub id")
    return path


def check_model_folder(folder: str | os.PathLike) -> None:
    """Raises an error naming the problem when `folder` is not a loadable MAFT model: missing, a file, without or with
    an unreadable config.json, a config of another model, no weights, or a damaged (e.g. truncated) weights file."""
    from ..configuration_maft import check_is_maft_config
    from ..modeling_maft import check_safetensors_file

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"the model folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a model folder (one written by save_pretrained)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved model: it has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is corrupt (not valid JSON: {error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is corrupt: it holds a {type(config).__name__}, not a JSON object")
    check_is_maft_config(config, folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} has no weights: model.safetensors is missing")
    for path in weights:
        check_safetensors_file(path)


def check_hub_model(repo_id: str) -> None:
    """Reads the config of a Hub model (or its cached copy when offline) and refuses one that is not MAFT's."""
    from transformers import PreTrainedConfig

    from ..configuration_maft import check_is_maft_config

    try:
        config, _ = PreTrainedConfig.get_config_dict(repo_id)
    except OSError as error:
        reason = (
            "the Hub is offline (HF_HUB_OFFLINE is set) and the model is not in the local cache"
            if hub_is_offline()
            else str(error).strip().splitlines()[0]
        )
        raise OSError(f"cannot load the model {repo_id!r}: there is no such folder, and from the Hub: {reason}") from error
    check_is_maft_config(config, repo_id)


def check_model(name_or_path: str | os.PathLike) -> None:
    """Raises an error naming the problem when `name_or_path` (a folder, else a Hub id) is not a loadable MAFT model."""
    if Path(name_or_path).exists() or not is_hub_id(name_or_path):
        check_model_folder(name_or_path)
    else:
        check_hub_model(str(name_or_path))


MODEL_DTYPES = ("float32", "bfloat16", "float16")


def count_parameters(name_or_path: str | os.PathLike | None = None) -> int | None:
    """The number of parameters a model's safetensors weights hold, read from their headers (a folder's files, or a
    Hub model's metadata), without loading them; None is the bundled model. For a Hub model whose metadata cannot be
    read (offline), None: not known."""
    from safetensors import safe_open

    location = default_model_path() if name_or_path is None else Path(name_or_path)
    if not location.exists() and is_hub_id(name_or_path):
        from huggingface_hub import get_safetensors_metadata

        try:
            return sum(get_safetensors_metadata(str(name_or_path)).parameter_count.values())
        except Exception:  # offline, or no metadata: the size is not known, and auto decides without it
            return None
    total = 0
    for path in sorted(location.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                total += math.prod(weights.get_slice(name).get_shape())
    return total


def resolve_model_dtype(name_or_path: str | os.PathLike | None, dtype: str, device: "str | torch.device") -> tuple[str, str | None]:
    """(`dtype`, or for "auto" what `maft.utils.precision.choose_dtype` chooses for the model on `device`; the line
    saying what auto chose and why, else None). The model is checked first (`check_model`)."""
    from ..utils.precision import choose_dtype

    if dtype != "auto":
        return dtype, None
    check_model(default_model_path() if name_or_path is None else name_or_path)
    choice = choose_dtype(device, count_parameters(name_or_path))
    return choice.name, f"dtype auto: {choice.name} on {device}, as {choice.reason}"


def load_model_and_processor(
    name_or_path: str | os.PathLike | None = None, device: "str | torch.device | None" = None, dtype: str = "float32"
) -> "tuple[MaftModel, MaftProcessor]":
    """(MaftModel in eval mode on `device` in `dtype`, MaftProcessor) from a folder, a Hub id, or (None) the bundled
    model; the model is checked first (see `check_model_folder`), so a wrong one fails with an error that names the
    problem. In float16 the pixel decoder stays float32."""
    import torch

    from .. import MaftModel, MaftProcessor  # through the package: registers the Auto classes the processor loads with

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"the dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    torch_device = resolve_device(device)
    location = default_model_path() if name_or_path is None else name_or_path
    check_model(location)
    processor = MaftProcessor.from_pretrained(location)
    model = MaftModel.from_pretrained(location, dtype=getattr(torch, dtype)).to(torch_device).eval()
    return model, processor


def resolve_device(name: "str | torch.device | None" = None) -> "torch.device":
    """The `torch.device` for a device string (any torch accepts: 'cpu', 'cuda', 'cuda:1', 'mps', 'xpu'...), checked to
    be usable here; None: CUDA if available, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{name!r} is not a torch device: give one such as cpu, cuda, cuda:1, mps or xpu ({error})") from error
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu...
    if hasattr(backend, "is_available") and not backend.is_available():
        raise ValueError(f"the device {name!r} is not available here: this machine or this torch ({torch.__version__}) has no {device.type}")
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise ValueError(f"the device {name!r} is not available here: there are {backend.device_count()} {device.type} devices")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"the device {name!r} is not usable here: {str(error).strip().split('. ')[0]}") from error
    return device
