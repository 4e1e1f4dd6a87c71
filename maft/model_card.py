"""Model cards (`huggingface_hub.ModelCard`) for the models the package writes: converted and trained ones."""

from huggingface_hub import ModelCard, ModelCardData


TAGS = ["open-vocabulary-segmentation", "semantic-segmentation", "zero-shot", "clip", "maft"]

USAGE = """## Use

```python
from PIL import Image
from maft import MaftModel, MaftProcessor

model_id = "{name}"  # this folder, or its Hub id
processor = MaftProcessor.from_pretrained(model_id)
model = MaftModel.from_pretrained(model_id)
image = Image.new("RGB", (640, 480), "gray")  # your image
inputs = processor(images=image, text=["sky", "tree", "road"], return_tensors="pt")
outputs = model(**inputs)
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
```
"""


def maft_model_card(name: str, text: str, **metadata) -> ModelCard:
    """A card with the package's Hub metadata (library, pipeline tag, tags; `metadata` adds or overrides), a title,
    `text`, and the usage snippet."""
    data = ModelCardData(library_name="maft", pipeline_tag="image-segmentation", tags=TAGS, model_name=name, **metadata)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {name}\n\n{text.strip()}\n\n{USAGE.format(name=name)}")
