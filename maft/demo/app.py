"""A Gradio app that segments an image into any class names with a MAFT model, through the
`zero-shot-image-segmentation` pipeline, semantic, instance or panoptic: the image tinted by class (each instance or
panoptic segment outlined), and a legend of each class's colour, segments and area.

This file is self-contained on purpose: `maft demo --write-space` copies it verbatim as a Hugging Face Space's
`app.py`, where maft is not installed (the model repository brings its own code, loaded with
`trust_remote_code=True`). It imports only the standard library, numpy and PIL at module level, and gradio and
transformers when the app is built. The overlay colours live here for the same reason; `maft.utils.visualization` imports
them, so `maft segment` and the demo colour a class alike.
"""

import colorsys
import html
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


TASK = "zero-shot-image-segmentation"
# Beside app.py in a Space: {"model": repo id, "examples": [[image file relative to app.py, class names], ...]}
SPACE_CONFIG = "demo_config.json"
OVERLAY_ALPHA = 0.5
OUTLINE_COLOUR = (255, 255, 255)
# small images (the bundled scenes are 96 pixels) fill their boxes, pixels kept sharp
STYLE = "#image img, #overlay img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"


def class_palette(num_classes: int) -> np.ndarray:
    """Distinct, deterministic RGB colours (num_classes, 3) uint8: hues spaced by the golden angle."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colours = [colorsys.hsv_to_rgb(hue, 0.75 if index % 2 else 0.95, 0.95 if index % 3 else 0.8) for index, hue in enumerate(hues)]
    return (np.array(colours).reshape(num_classes, 3) * 255).round().astype(np.uint8)


def tint(
    image: Image.Image, label_map: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA, outlines: np.ndarray | None = None
) -> Image.Image:
    """The image with each pixel blended with its class's colour (`palette[label_map]`), `alpha` of the colour; pixels
    labelled -1 (no class) are left as they are, and `outlines` (H, W bool, optional) are drawn in white."""
    if label_map.shape != (image.height, image.width):
        raise ValueError(f"label map {label_map.shape} does not match the image size {(image.height, image.width)}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * rgb + alpha * palette[label_map.clip(0)].astype(np.float32)
    blended = np.where(label_map[..., None] >= 0, blended, rgb)
    if outlines is not None:
        blended[outlines] = OUTLINE_COLOUR
    return Image.fromarray(blended.round().astype(np.uint8))


def segment_outlines(segment_map: np.ndarray, nothing: int) -> np.ndarray:
    """(H, W) bool: the pixels of each segment of `segment_map` (segment ids; `nothing` where no segment is) that
    touch (4-neighbourhood) a pixel of another segment or of none; adjacent instances of one class stay apart."""
    edges = np.zeros(segment_map.shape, dtype=bool)
    vertical = segment_map[1:] != segment_map[:-1]
    horizontal = segment_map[:, 1:] != segment_map[:, :-1]
    edges[1:] |= vertical
    edges[:-1] |= vertical
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    return edges & (segment_map != nothing)


def parse_class_names(text: str) -> list[str]:
    """'cat, sofa , wall' -> ['cat', 'sofa', 'wall']; refuses empty names (the processor refuses repeated ones)."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"must be a comma-separated list of non-empty class names, got {text!r}")
    return names


def segment_with_legend(
    segmenter, image: Image.Image, class_names: list[str], task: str = "semantic", stuff_labels: list[str] = ()
) -> tuple[Image.Image, list[dict]]:
    """The image tinted by class (instance and panoptic: each segment outlined), and per class present (largest first)
    its name, colour ("#rrggbb"), area (% of the pixels) and number of segments, from the pipeline `segmenter`'s
    masks for `task` ("semantic", "instance" or "panoptic"; `stuff_labels` for the last two)."""
    options = {} if task == "semantic" else {"subtask": task, "stuff_labels": list(stuff_labels)}
    palette = class_palette(len(class_names))
    label_map = np.full((image.height, image.width), -1, dtype=np.int64)
    segment_map = np.full((image.height, image.width), -1, dtype=np.int64)
    areas, counts = {}, {}
    for number, segment in enumerate(segmenter(image, candidate_labels=class_names, **options)):
        pixels = np.asarray(segment["mask"]) > 0
        label_map[pixels] = class_names.index(segment["label"])
        segment_map[pixels] = number
        areas[segment["label"]] = areas.get(segment["label"], 0.0) + 100 * float(pixels.mean())
        counts[segment["label"]] = counts.get(segment["label"], 0) + 1
    legend = [{"label": label, "colour": "#" + bytes(palette[class_names.index(label)]).hex(), "area": area,
               "segments": counts[label]} for label, area in areas.items()]
    outlines = None if task == "semantic" else segment_outlines(segment_map, nothing=-1)
    return tint(image, label_map, palette, outlines=outlines), sorted(legend, key=lambda entry: -entry["area"])


def legend_html(legend: list[dict]) -> str:
    """The legend as an HTML table: a colour swatch, the class name, its number of segments and its area per row."""
    rows = "".join(
        f'<tr class="maft-legend-entry" data-label="{html.escape(entry["label"])}" data-colour="{entry["colour"]}" '
        f'data-area="{entry["area"]:.2f}" data-segments="{entry["segments"]}"><td><span style="display:inline-block;'
        f'width:1.2em;height:1.2em;border-radius:3px;background:{entry["colour"]}"></span></td>'
        f'<td>{html.escape(entry["label"])}</td><td style="text-align:right">{entry["segments"]}</td>'
        f'<td style="text-align:right">{entry["area"]:.1f}%</td></tr>'
        for entry in legend
    )
    return f'<table class="maft-legend"><tr><th></th><th>class</th><th>segments</th><th>area</th></tr>{rows}</table>'


def build_demo(model: str, device: str | None = None, examples: list[list[str]] = (),
               dtype: str = "float32") -> "gradio.Blocks":  # noqa: F821
    """The Gradio Blocks of the demo for `model` (a Hub id or a folder) in `dtype` (a torch dtype's name): an image
    (uploaded, or one of `examples`, each [image path, class names]), class names, and the result. The model is loaded
    once, here."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import torch
    from transformers import pipeline

    segmenter = pipeline(TASK, model=model, trust_remote_code=True, device=device, dtype=getattr(torch, dtype))

    def run(image: Image.Image | None, text: str, task: str, stuff_text: str) -> tuple[Image.Image, str]:
        if image is None:
            raise gr.Error("Upload an image or pick one of the examples first.")
        try:
            class_names = parse_class_names(text)
        except ValueError as error:
            raise gr.Error(f"The class names {error}.") from error
        try:  # stuff classes only matter to instance and panoptic segmentation
            stuff_labels = parse_class_names(stuff_text) if stuff_text.strip() and task != "semantic" else []
        except ValueError as error:
            raise gr.Error(f"The stuff classes {error}.") from error
        try:
            overlay, legend = segment_with_legend(segmenter, image, class_names, task, stuff_labels)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return overlay, legend_html(legend)

    with gr.Blocks(title="MAFT open-vocabulary segmentation") as demo:
        name = Path(model).name if Path(model).is_dir() else model
        gr.Markdown(f"# Segment an image into any classes\nModel: `{name}`. Upload an image or pick an example, "
                    "type class names separated by commas, choose the task, and press Segment.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="pil", image_mode="RGB", sources=["upload"], height=320, elem_id="image")
                class_names = gr.Textbox(label="Class names", placeholder="cat, sofa, wall", elem_id="class-names")
                task = gr.Radio(["semantic", "instance", "panoptic"], value="semantic", label="Task", elem_id="task",
                                info="semantic: a class per pixel; instance: separate objects; panoptic: objects and stuff")
                stuff = gr.Textbox(label="Stuff classes (instance and panoptic)", placeholder="sky, road", elem_id="stuff",
                                   info="classes that are regions, not objects: one segment each in panoptic, none in instance")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column():
                overlay = gr.Image(label="Segmentation", type="pil", format="png", interactive=False, height=320,
                                   elem_id="overlay")
                legend = gr.HTML(elem_id="legend")
        if examples:
            gr.Examples(examples=list(examples), inputs=[image, class_names])
        inputs = [image, class_names, task, stuff]
        button.click(run, inputs=inputs, outputs=[overlay, legend])
        class_names.submit(run, inputs=inputs, outputs=[overlay, legend])
        stuff.submit(run, inputs=inputs, outputs=[overlay, legend])
    return demo


def space_demo(folder: str | os.PathLike) -> "gradio.Blocks":  # noqa: F821
    """The demo a Space folder describes in its `SPACE_CONFIG` file (its examples' paths relative to the folder)."""
    folder = Path(folder)
    config = json.loads((folder / SPACE_CONFIG).read_text(encoding="utf-8"))
    examples = [[str(folder / image), class_names] for image, class_names in config["examples"]]
    return build_demo(config["model"], examples=examples)


def serve(demo, **launch_options) -> None:
    """Serves `demo` (from `build_demo`) with its style until interrupted; `launch_options` go to `Blocks.launch`."""
    demo.launch(css=STYLE, **launch_options)


if __name__ == "__main__":
    serve(space_demo(Path(__file__).parent))
