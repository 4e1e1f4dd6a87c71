"""MkDocs hooks: the model cards and their pictures (`model_cards/`, beside `docs/`) are part of the site, and pages
link to them by the path that also works on GitHub (`../model_cards/NAME` from a page in `docs/`)."""

from pathlib import Path

from mkdocs.structure.files import File


REPOSITORY = Path(__file__).resolve().parents[1]
MODEL_CARDS = "model_cards"


def on_files(files, config):
    for path in sorted((REPOSITORY / MODEL_CARDS).iterdir()):
        files.append(File(f"{MODEL_CARDS}/{path.name}", src_dir=str(REPOSITORY), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    """In the site the cards sit inside the docs tree: one `../` fewer than in the repository."""
    depth = page.file.src_uri.count("/")
    return markdown.replace(f"]({'../' * (depth + 1)}{MODEL_CARDS}/", f"]({'../' * depth}{MODEL_CARDS}/")
