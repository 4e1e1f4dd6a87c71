"""`maft demo`: the Gradio app served by the command and driven in a real browser (Debian's headless chromium through
Playwright), the Hugging Face Space that `--write-space` writes, and the errors of both."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import run_without_maft
from maft.demo import bundled_examples, write_space
from maft.demo.app import (
    SPACE_CONFIG, TASK, class_palette, legend_html, parse_class_names, segment_outlines, segment_with_legend, tint,
)
from maft.cli.model_loading import default_model_path


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser download cannot work here
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPOSITORY = Path(__file__).resolve().parents[1]
SERVER_START_SECONDS = 180
# the first segmentation may build the deformable-attention kernel
RESULT_SECONDS = 300


def subprocess_environment() -> dict[str, str]:
    """The test's environment for a child process, with this checkout importable and no network or analytics."""
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "OMP_NUM_THREADS": "1"}


def test_parse_class_names():
    assert parse_class_names(" cat, sofa ,wall ") == ["cat", "sofa", "wall"]
    for text in ("", " ", "cat,,sofa", "cat,"):
        with pytest.raises(ValueError, match="comma-separated list of non-empty class names"):
            parse_class_names(text)


def test_bundled_examples_name_the_classes_each_scene_shows():
    classes = json.loads((default_model_path().parent / "examples" / "classes.json").read_text())["class_names"]
    examples = bundled_examples()
    assert [Path(image).name for image, _ in examples] == [f"scene-{index}.png" for index in range(8)]
    for image, class_names in examples:
        names = parse_class_names(class_names)
        assert 2 <= len(names) and set(names) <= set(classes)


def test_demo_without_gradio_says_how_to_install_it():
    refuse_gradio = (
        "import sys\n"
        "class RefuseGradio:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gradio':\n"
        "            raise ModuleNotFoundError(\"No module named 'gradio'\")\n"
        "sys.meta_path.insert(0, RefuseGradio())\n"
        "from maft.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for arguments in (["demo"], ["demo", "--model", "org/model", "--write-space", "space"]):
        result = subprocess.run([sys.executable, "-c", refuse_gradio, *arguments], capture_output=True, text=True,
                                env=subprocess_environment(), timeout=120)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("maft demo: the demo needs Gradio") and 'pip install "maft[demo]"' in result.stderr


def test_demo_errors_on_the_command_line(tmp_path, capsys):
    from maft.cli import main

    assert main(["demo", "--model", str(tmp_path / "no_such_model")]) == 1
    assert capsys.readouterr().err == f"maft demo: the model folder {tmp_path / 'no_such_model'} does not exist\n"

    assert main(["demo", "--write-space", str(tmp_path / "space")]) == 1
    assert "--write-space needs --model" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    assert main(["demo", "--model", "org/model", "--write-space", str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err == f"maft demo: {tmp_path / 'taken'} already exists and is not an empty folder; give a new or empty folder\n"
    assert [path.name for path in (tmp_path / "taken").iterdir()] == ["file"]


EXAMPLES = default_model_path().parent / "examples"
SHAPES = ["red circle", "green circle", "yellow triangle", "yellow square"]
STUFF = ["checkered wall", "checkered grass", "striped floor"]


def panoptic_legend() -> list[dict]:
    from transformers import pipeline

    segmenter = pipeline(TASK, model=str(default_model_path()), device="cpu")
    with Image.open(EXAMPLES / "scene-3.png") as image:
        return segment_with_legend(segmenter, image.convert("RGB"), SHAPES + STUFF, "panoptic", STUFF)[1]


def test_segment_outlines_keep_adjacent_segments_of_a_class_apart_and_tint_leaves_unlabelled_pixels():
    segment_map = np.array([[0, 0, 1, 1, -1],
                            [0, 0, 1, 1, -1]])
    np.testing.assert_array_equal(segment_outlines(segment_map, nothing=-1), [[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]])
    image = Image.fromarray(np.full((2, 5, 3), 100, dtype=np.uint8))
    label_map = np.where(segment_map >= 0, 0, -1)  # both segments of class 0
    tinted = np.asarray(tint(image, label_map, np.array([[200, 0, 0]], dtype=np.uint8), 0.5, segment_outlines(segment_map, -1)))
    assert tinted[0, 0].tolist() == [150, 50, 50] and tinted[0, 1].tolist() == [255, 255, 255] and tinted[0, 4].tolist() == [100] * 3


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_the_demo_segments_for_each_task(task):
    from transformers import pipeline

    segmenter = pipeline(TASK, model=str(default_model_path()), device="cpu")
    with Image.open(EXAMPLES / "scene-3.png") as image:
        image = image.convert("RGB")
    stuff = STUFF if task != "semantic" else ()
    overlay, legend = segment_with_legend(segmenter, image, SHAPES + STUFF, task, stuff)
    segments = segmenter(image, candidate_labels=SHAPES + STUFF, **({"subtask": task, "stuff_labels": STUFF} if stuff else {}))
    assert overlay.size == image.size
    assert {entry["label"]: entry["segments"] for entry in legend} == {
        label: [segment["label"] for segment in segments].count(label) for label in {segment["label"] for segment in segments}
    }
    outlined = (np.asarray(overlay) == 255).all(axis=-1)
    assert outlined.any() == (task != "semantic")
    if task == "panoptic":
        assert {"red circle", "checkered grass"} <= {entry["label"] for entry in legend}
        assert all(entry["segments"] == 1 for entry in legend if entry["label"] in STUFF)
    assert 'data-segments="' in legend_html(legend)


def test_write_space(tmp_path):
    gradio = pytest.importorskip("gradio")
    model = str(default_model_path())
    (tmp_path / "space").mkdir()  # an empty folder is taken
    space = write_space(tmp_path / "space", model)

    assert sorted(path.name for path in space.iterdir()) == ["README.md", "app.py", SPACE_CONFIG, "examples", "requirements.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["space"], "no staging folder is left behind"
    assert (space / "app.py").read_bytes() == (REPOSITORY / "maft" / "demo" / "app.py").read_bytes()
    front_matter = yaml.safe_load((space / "README.md").read_text().split("---\n")[1])
    pinned_gradio = next(line.split("==")[1] for line in (REPOSITORY / "constraints.txt").read_text().splitlines()
                         if line.startswith("gradio=="))
    assert front_matter["sdk"] == "gradio" and front_matter["sdk_version"] == gradio.__version__ == pinned_gradio
    assert front_matter["app_file"] == "app.py" and front_matter["models"] == [model]
    requirements = (space / "requirements.txt").read_text().split()
    assert "torch" in requirements and any(line.startswith("transformers==5.") for line in requirements)
    config = json.loads((space / SPACE_CONFIG).read_text())
    assert config["model"] == model
    for (image, class_names), (bundled_image, bundled_class_names) in zip(config["examples"], bundled_examples(), strict=True):
        assert (space / image).read_bytes() == Path(bundled_image).read_bytes() and class_names == bundled_class_names

    # The Space's app runs from its folder alone, in a Python where maft cannot be imported: the bundled model's remote
    # code serves its pipeline.
    build = (
        "import sys\n"
        f"sys.path.insert(0, {str(space)!r})\n"
        "import app, gradio, json\n"
        "from PIL import Image\n"
        f"demo = app.space_demo({str(space)!r})\n"
        "print(type(demo).__name__, sorted({type(block).__name__ for block in demo.blocks.values()}))\n"
        "from transformers import pipeline\n"
        f"segmenter = pipeline(app.TASK, model={model!r}, trust_remote_code=True)\n"
        f"image, text = {config['examples'][0]!r}\n"
        "class_names = app.parse_class_names(text)\n"
        f"overlay, legend = app.segment_with_legend(segmenter, Image.open({str(space)!r} + '/' + image), class_names)\n"
        "print(overlay.size, round(sum(entry['area'] for entry in legend), 1))\n"
        "overlay, legend = app.segment_with_legend(segmenter, Image.open(" + repr(str(EXAMPLES / "scene-3.png")) + "), "
        "SHAPES + STUFF, 'panoptic', STUFF)\n".replace("SHAPES", repr(SHAPES)).replace("STUFF", repr(STUFF))
        + "print(json.dumps(legend))\n"
    )
    lines = run_without_maft(build, tmp_path, timeout=600).strip().splitlines()
    kind, components = lines[-3].split(" ", 1)
    assert kind == "Blocks"
    for component in ("Image", "Textbox", "Radio", "Button", "HTML", "Dataset"):  # Radio: the task; Dataset: the examples
        assert component in components
    with Image.open(space / config["examples"][0][0]) as example:
        assert lines[-2] == f"{example.size} 100.0"
    assert json.loads(lines[-1]) == panoptic_legend(), "the Space's panoptic segments are maft's"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url():
    """`maft demo` on the bundled model, served by a real subprocess on a free port."""
    pytest.importorskip("gradio")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "maft", "demo", "--device", "cpu", "--port", str(port)],
                              env=subprocess_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_SECONDS
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"maft demo exited with {server.returncode}: {server.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"maft demo did not answer on {url} in {SERVER_START_SECONDS} s")
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def page(request):
    """A headless chromium page showing the demo; the browser is checked for before the server is started."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives chromium with Playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package (apt-get install chromium)")
    demo_url = request.getfixturevalue("demo_url")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(demo_url)
        yield page
        browser.close()


def fetch_image(page, source: str) -> Image.Image:
    """The image the page shows at `source` (relative or absolute), downloaded anew."""
    with urllib.request.urlopen(urllib.parse.urljoin(page.url, source), timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_demo_in_the_browser(page, tmp_path):
    image_path, class_names = bundled_examples()[0]
    labels = parse_class_names(class_names)
    segment = page.locator("#segment")

    page.locator("#image input[type=file]").set_input_files(image_path)
    page.get_by_label("Class names").fill(class_names)
    segment.click()
    entries = page.locator("#legend tr.maft-legend-entry")
    entries.first.wait_for(timeout=RESULT_SECONDS * 1000)
    overlay = fetch_image(page, page.locator("#overlay img").get_attribute("src"))
    legend = [{"label": entry.get_attribute("data-label"), "colour": entry.get_attribute("data-colour"),
               "area": float(entry.get_attribute("data-area")), "text": entry.inner_text()} for entry in entries.all()]
    page.screenshot(path=tmp_path / "maft-demo.png")

    page.get_by_label("Class names").fill(f"{labels[0]}, {labels[0]}")
    segment.click()
    page.get_by_text(f"Class names must be unique; repeated: {[labels[0]]}.").wait_for()
    page.reload()
    page.get_by_label("Class names").fill(class_names)
    segment.click()
    page.get_by_text("Upload an image or pick one of the examples first.").wait_for()

    scene = Image.open(image_path).convert("RGB")
    assert overlay.size == scene.size
    assert np.asarray(overlay).std() > 10, "the result is not blank"
    shown = [entry["label"] for entry in legend]
    assert len(shown) == len(set(shown)) and set(shown) <= set(labels)
    areas = [entry["area"] for entry in legend]
    assert areas == sorted(areas, reverse=True) and sum(areas) == pytest.approx(100, abs=0.05)
    palette = class_palette(len(labels))  # the colours `maft segment` gives these classes too
    for entry in legend:
        assert entry["label"] in entry["text"] and f"{entry['area']:.1f}%" in entry["text"]
        assert entry["colour"] == "#" + bytes(palette[labels.index(entry["label"])]).hex()

    # Each pixel is half the scene and half its class's colour: the colour recovered from the two is a legend colour,
    # over the area the legend gives it; and the bundled model, given its own scene's true classes, gets most pixels
    # right.
    recovered = 2 * np.asarray(overlay, dtype=np.int32) - np.asarray(scene, dtype=np.int32)
    truth = np.asarray(Image.open(image_path.replace(".png", "-labels.png")))
    classes = json.loads((Path(image_path).parent / "classes.json").read_text())["class_names"]
    predicted = np.full(truth.shape, -1)
    for entry in legend:
        painted = np.abs(recovered - palette[labels.index(entry["label"])]).max(axis=-1) <= 2
        assert 100 * painted.mean() == pytest.approx(entry["area"], abs=0.5), entry
        predicted[painted] = classes.index(entry["label"])
    assert (predicted >= 0).all(), "every pixel shows a legend colour"
    assert (predicted == truth).mean() > 0.9  # 0.964 measured

    screenshot = Image.open(tmp_path / "maft-demo.png")
    assert screenshot.format == "PNG" and screenshot.size == (1100, 760)
