"""`maft demo`: the Gradio app of `maft.demo.app` on a model with the bundled example scenes, served locally or
written out as a Hugging Face Space folder."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from . import app as demo_app
from ..cli.model_loading import check_model, default_model_path, resolve_device, resolve_model_dtype


INSTALL_HINT = 'pip install "maft[demo]"'
EXAMPLES_FOLDER = "examples"  # in a written Space, the example scenes


def require_gradio() -> str:
    """The installed Gradio's version; an ImportError saying how to install it when it is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"the demo needs Gradio, which is not installed ({error}): {INSTALL_HINT}") from error
    return gradio.__version__


def bundled_examples() -> list[list[str]]:
    """The bundled model's example scenes as [image path, the classes the scene shows (its labels), comma-separated]."""
    folder = default_model_path().parent / "examples"
    classes = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    examples = []
    for scene in sorted(folder.glob("scene-*[0-9].png")):
        with Image.open(scene.with_name(f"{scene.stem}-labels.png")) as labels:
            present = np.unique(np.asarray(labels))
        names = [classes["class_names"][index] for index in present if index != classes["ignore_index"]]
        examples.append([str(scene), ", ".join(names)])
    return examples


def launch_demo(model: str | None, device: str | None, host: str, port: int, dtype: str = "float32") -> None:
    """Serves the demo on http://host:port until interrupted; `model` None is the bundled model. `dtype` "auto"
    chooses the fastest precision of the device (`maft.utils.precision`) and says which."""
    if model:
        check_model(model)
    require_gradio()
    from maft import MaftModel  # noqa: F401  registers MAFT and its pipeline task with transformers

    torch_device = resolve_device(device)
    dtype, dtype_choice = resolve_model_dtype(model, dtype, torch_device)
    if dtype_choice:
        print(dtype_choice)
    examples = bundled_examples()
    demo = demo_app.build_demo(model or str(default_model_path()), str(torch_device), examples, dtype)
    demo_app.serve(demo, server_name=host, server_port=port, share=False, allowed_paths=[str(Path(examples[0][0]).parent)])


def space_readme(model: str, gradio_version: str) -> str:
    """The Space's README.md: the front matter Hugging Face reads to build it, and a line on what it shows."""
    return f"""---
title: MAFT open-vocabulary segmentation
emoji: 🎨
colorFrom: blue
colorTo: green
sdk: gradio
sdk_version: {gradio_version}
python_version: "3.11"
app_file: app.py
pinned: false
license: apache-2.0
models:
  - {model}
tags:
  - image-segmentation
  - open-vocabulary
  - maft
---

Segment an image into any class names with [{model}](https://huggingface.co/{model}), a MAFT model (Mask-aware
Fine-Tuning of CLIP, NeurIPS 2023). The app is `maft.demo.app` from the maft package, written by
`maft demo --write-space`; the model's code comes from its repository (`trust_remote_code=True`).
"""


def space_requirements() -> str:
    """requirements.txt of the Space (Gradio comes from the front matter's sdk_version): the transformers this maft
    runs with, since the model's remote code is written for it."""
    from importlib.metadata import version

    return f"torch\ntransformers=={version('transformers')}\nnumpy\npillow\n"


def write_space(folder: str | os.PathLike, model: str) -> Path:
    """Writes a Hugging Face Space for `model` into `folder` (new or empty): app.py (this package's `demo/app.py`,
    verbatim), its config (the model and the example scenes), requirements.txt and README.md. All or nothing."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not an empty folder; give a new or empty folder")
    gradio_version = require_gradio()
    folder.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.absolute().parent))
    try:
        shutil.copyfile(demo_app.__file__, staging / "app.py")
        (staging / EXAMPLES_FOLDER).mkdir()
        examples = []
        for image, class_names in bundled_examples():
            shutil.copyfile(image, staging / EXAMPLES_FOLDER / Path(image).name)
            examples.append([f"{EXAMPLES_FOLDER}/{Path(image).name}", class_names])
        config = {"model": model, "examples": examples}
        (staging / demo_app.SPACE_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "requirements.txt").write_text(space_requirements(), encoding="utf-8")
        (staging / "README.md").write_text(space_readme(model, gradio_version), encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private; a Space folder is an ordinary one
        os.replace(staging, folder)  # replaces an empty folder, atomically
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
