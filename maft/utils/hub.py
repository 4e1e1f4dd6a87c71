"""The Hugging Face Hub as MAFT uses it: telling a Hub id from a local path, and publishing a folder."""

import os
from pathlib import Path


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` could be a Hub repository id ('name' or 'org/name'); paths such as './model', '/data/model' or
    'a/b/c' cannot be."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


def hub_is_offline() -> bool:
    """Whether Hub access is switched off (`HF_HUB_OFFLINE`), so only what is in the local cache can be loaded."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, commit_message: str | None = None) -> tuple[str, str]:
    """Uploads every file of `folder` to the Hub model repository `repo_id` in one commit, creating the repository
    (private if `private`) when it does not exist. Returns (repository URL, commit URL)."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_url.repo_id, commit_message=commit_message or f"Upload {Path(folder).name}"
    )
    return str(repo_url), commit.commit_url
