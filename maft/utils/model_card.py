"""Model cards (`huggingface_hub.ModelCard`) for the models the package writes: converted and trained ones."""

from huggingface_hub import ModelCard, ModelCardData


TAGS = ["open-vocabulary-segmentation", "semantic-segmentation", "zero-shot", "clip", "maft", "custom_code"]

# The Hub has no "zero-shot-image-segmentation" task (huggingface.js' PIPELINE_DATA): "image-segmentation" is the
# nearest, and the pipeline's output has its format.
PIPELINE_TAG = "image-segmentation"

USAGE = """## Use

With transformers alone (the model's code comes with it: `trust_remote_code=True`), or with `pip install maft`:

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

model_id = "{name}"  # {location}
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
model = AutoModel.from_pretrained(model_id, trust_remote_code=True)
image = Image.new("RGB", (640, 480), "gray")  # your image
inputs = processor(images=image, text=["sky", "tree", "road"], return_tensors="pt")
outputs = model(**inputs)
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]

segmenter = pipeline("zero-shot-image-segmentation", model=model_id, trust_remote_code=True)
segments = segmenter(image, candidate_labels=["sky", "tree", "road"])  # [{{"label", "score", "mask"}}, ...]
```
"""


def maft_model_card(name: str, text: str, **metadata) -> ModelCard:
    """A card with the package's Hub metadata (library, pipeline tag, tags; `metadata` adds or overrides), a title,
    `text`, and the usage snippet (transformers with the model's remote code)."""
    data = ModelCardData(library_name="transformers", pipeline_tag=PIPELINE_TAG, tags=TAGS, model_name=name, **metadata)
    usage = USAGE.format(name=name, location="this folder, or its Hub id")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {name}\n\n{text.strip()}\n\n{usage}")
