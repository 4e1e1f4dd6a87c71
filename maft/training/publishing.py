"""Publishing checkpoints to the Hub while training, without ever holding up a training step."""

import logging
import shlex
import threading
from pathlib import Path

from huggingface_hub import HfApi, get_session, get_token
from huggingface_hub.errors import HfHubHTTPError

from ..utils.hub import push_folder_to_hub


logger = logging.getLogger("maft.training")

# What the Hub's status codes mean for a run that is about to publish, with a token and without one.
ACCESS_PROBLEMS = {401: "the token was rejected (401)", 403: "the token may not write to it (403)",
                   404: "it does not exist and cannot be created with this token (404)"}
NO_TOKEN = "no token was found (neither HF_TOKEN nor a saved login), and writing needs one"


def commit_message(step: int) -> str:
    return f"Training step {step}"


class FinalModelNotPublishedError(RuntimeError):
    """
    Training finished and everything is saved locally, but the model of its last checkpoint (`folder`, the model,
    processor and model card of step `step`) did not reach the Hub repo `repo_id`, for `reason`. `upload_command`
    (huggingface_hub's command line) publishes that folder later, as the upload during training would have.
    """

    def __init__(self, repo_id: str, step: int, folder: Path, reason: str):
        self.repo_id, self.step, self.folder, self.reason = repo_id, step, folder, reason
        self.upload_command = shlex.join(["hf", "upload", repo_id, str(folder), ".", "--commit-message", commit_message(step)])
        super().__init__(f"training finished and is saved, but the final model (step {step}) did not reach the Hub repo "
                         f"{repo_id}: {reason}. To publish it later, run: {self.upload_command}")


class HubPublisher:
    """
    Uploads checkpoints' model folders to `repo_id` from one background thread. `publish` only queues: at most one
    upload is in flight, and a checkpoint that arrives while one is queued replaces it (the newest is what matters,
    also after an outage). A failed upload is tried `retries` times unless a newer checkpoint is waiting. Every Hub
    request times out after `timeout` seconds: huggingface_hub's shared HTTP client is given that timeout (it has
    none by default). Failures are logged, never raised: local checkpoints stay the source of truth, and after
    `finish`, `final_model_error` says whether the newest one got there.
    """

    def __init__(self, repo_id: str, retries: int, timeout: float):
        self.api, self.repo_id, self.retries, self.timeout = HfApi(), repo_id, retries, timeout
        self.published: list[int] = []
        self.unpublished: dict[int, str] = {}
        self._condition = threading.Condition()
        self._queued: tuple[int, Path] | None = None
        self._in_flight: tuple[int, Path] | None = None
        self._newest: tuple[int, Path] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="maft-hub-publisher", daemon=True)

    def check_access(self) -> None:
        """Creates the repo or finds it; raises one clear error when that is impossible (token, network)."""
        get_session().timeout = self.timeout
        try:
            self.api.create_repo(self.repo_id, exist_ok=True)
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in ACCESS_PROBLEMS and get_token() is None:  # no token was sent, so none was rejected
                reason = f"{NO_TOKEN} ({status})"
            else:
                reason = ACCESS_PROBLEMS.get(status, str(error).splitlines()[0])
            raise PermissionError(f"Cannot publish to the Hub repo {self.repo_id!r}: {reason}. Log in with `hf auth login` "
                                  "or set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens), "
                                  "or train without push_to_hub.") from error
        except Exception as error:  # connection refused, timeouts, proxies: the Hub is unreachable
            raise ConnectionError(f"Cannot reach the Hub to publish to {self.repo_id!r} ({type(error).__name__}: {error}); "
                                  "check the network or train without push_to_hub.") from error
        self._thread.start()

    def publish(self, step: int, folder: Path) -> None:
        """Queues `folder` (the checkpoint of `step`) for upload and returns at once."""
        with self._condition:
            if self._queued is not None:
                self.unpublished[self._queued[0]] = f"superseded by step {step}"
            self._queued = self._newest = (step, folder)
            self._condition.notify()

    def folders_in_use(self) -> set[Path]:
        """The checkpoints being or waiting to be uploaded (not to be deleted yet)."""
        with self._condition:
            return {entry[1].parent for entry in (self._queued, self._in_flight) if entry is not None}

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._queued is not None or self._closing)
                if self._queued is None:
                    return
                self._in_flight, self._queued = self._queued, None
            step, folder = self._in_flight
            self._upload(step, folder)
            with self._condition:
                self._in_flight = None

    def _upload(self, step: int, folder: Path) -> None:
        for attempt in range(1, self.retries + 1):
            try:
                get_session().timeout = self.timeout
                push_folder_to_hub(folder, self.repo_id, commit_message=commit_message(step))
                self.published.append(step)
                return
            except Exception as error:  # any failure of the network or the Hub must not stop training
                logger.warning("maft: upload of %s to %s failed (attempt %d/%d): %s", folder, self.repo_id, attempt,
                               self.retries, error)
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                with self._condition:
                    if self._condition.wait_for(lambda: self._queued is not None, timeout=min(2**attempt, 10) * 0.1):
                        self.unpublished[step] = f"superseded by step {self._queued[0]} after a failed upload ({reason})"
                        return
        self.unpublished[step] = f"failed {self.retries} times ({reason})"

    def finish(self, wait: float) -> str:
        """Lets the queued upload go, waits at most `wait` seconds for it, and says what was published and what not."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(wait)
        with self._condition:
            for step, _ in filter(None, (self._in_flight, self._queued)):
                self.unpublished[step] = f"still uploading after waiting {wait:.0f} s at the end of training"
        published = ", ".join(f"step {step}" for step in self.published) or "nothing"
        missing = "; ".join(f"step {step} ({why})" for step, why in sorted(self.unpublished.items()))
        return f"maft: published to {self.repo_id}: {published}" + (f"; not published: {missing}" if missing else "")

    def final_model_error(self) -> FinalModelNotPublishedError | None:
        """After `finish`: the error to raise when the newest checkpoint given to `publish` did not reach the Hub."""
        if self._newest is None or self._newest[0] not in self.unpublished:
            return None
        step, folder = self._newest
        return FinalModelNotPublishedError(self.repo_id, step, folder, self.unpublished[step])
