"""The `maft` command line."""

import argparse
import sys

import torch


def ipclip_example(arguments: argparse.Namespace) -> int:
    """Classifies the four quadrants of an image as mask proposals with IP-CLIP, in one forward pass."""
    from maft import MaftClipVisionConfig, MaftClipVisionModel

    if arguments.model:
        model = MaftClipVisionModel.from_pretrained(arguments.model)
    else:
        torch.manual_seed(0)
        config = MaftClipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            image_size=64, patch_size=16, projection_dim=32, initializer_range=0.2,
        )
        model = MaftClipVisionModel(config)
    model.eval()
    size, half = model.config.image_size, model.config.image_size // 2
    names = ["top-left", "top-right", "bottom-left", "bottom-right"]
    colours = [(2.0, -1.0, -1.0), (-1.0, 2.0, -1.0), (-1.0, -1.0, 2.0), (0.5, 0.5, 0.5)]  # red, green, blue, grey
    corners = [(slice(0, half), slice(0, half)), (slice(0, half), slice(half, None)),
               (slice(half, None), slice(0, half)), (slice(half, None), slice(half, None))]
    pixel_values = torch.zeros(1, 3, size, size)
    quadrants = torch.zeros(1, 4, size, size)
    for index, ((rows, columns), colour) in enumerate(zip(corners, colours)):
        pixel_values[0, :, rows, columns] = torch.tensor(colour)[:, None, None]
        quadrants[0, index, rows, columns] = 1.0
    with torch.inference_mode():
        embeds = model(pixel_values, mask_proposals=quadrants).proposal_embeds[0]
    embeds = embeds / embeds.norm(dim=-1, keepdim=True)
    similarity = embeds @ embeds.T
    print(f"IP-CLIP ({'random tiny model' if not arguments.model else arguments.model}): "
          f"{len(names)} quadrant proposals -> embeddings {tuple(embeds.shape)} in one forward pass")
    print("image: red, green, blue and grey quadrants; cosine similarity between the quadrants' embeddings:")
    print(" " * 13 + "".join(f"{name:>13}" for name in names))
    for name, row in zip(names, similarity.tolist()):
        print(f"{name:>13}" + "".join(f"{value:13.3f}" for value in row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maft", description="MAFT open-vocabulary semantic segmentation.")
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser("ipclip-example", help="run IP-CLIP on four quadrant masks of an image")
    example.add_argument("--model", help="a CLIP checkpoint (directory or Hub id); default: a random tiny model")
    example.set_defaults(handler=ipclip_example)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
