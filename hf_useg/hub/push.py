"""Hub uploads: [`push_model_folder`] uploads a model folder (weights, config, image processor, card) in one
commit and [`push_space_folder`] uploads the Gradio Space (``spaces/``, with the `hf_useg` source so that it runs
without a released package). ``hf-useg push`` is their command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

from .cards import model_card_from_folder, validate_model_card

__all__ = ["push_model_folder", "push_space_folder"]

# never uploaded from a model or Space folder
_SKIPPED_NAMES = {"__pycache__", ".git", ".ipynb_checkpoints", "checkpoints", ".gradio", "flagged"}


def _folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(path in repo, local path) of the files to upload: hidden files, caches and checkpoints are left out."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part in _SKIPPED_NAMES for part in relative.parts):
            continue
        if path.is_file() and path.suffix not in (".pyc", ".pyo"):
            yield relative.as_posix(), path


def _check_model_folder(folder: Path) -> str:
    """Refuse what is not a complete hf_useg model folder; return its pipeline task (``image-segmentation`` or, for
    a fine-tuned detector, ``object-detection``)."""
    from transformers import AutoConfig

    import hf_useg  # noqa: F401  (registers the configs with AutoConfig)

    from ..registry import methods

    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder: it has no config.json (save it with save_pretrained)")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json"))
    if not weights:
        raise ValueError(f"{folder} has no *.safetensors weights: save the model with save_pretrained first")
    tasks = {spec.model_type: spec.pipeline_task for spec in methods().values() if spec.pipeline_task}
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in tasks:
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, not an hf_useg segmentation model or fine-tuned "
            f"detector ({sorted(tasks)})"
        )
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(
            f"{folder} has no preprocessor_config.json: save the image processor too (the pipeline and the Space "
            "need it), e.g. whole_image_processor(resolution, patch_size).save_pretrained(folder)"
        )
    return tasks[config.model_type]


def push_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    card: str = "regenerate",
    dataset_id: str | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Upload a saved model folder to the Hub in one commit: ``create_repo`` (``exist_ok``) then ``create_commit``
    with every file of the folder (weights, config, image processor, evaluation files) and the card as
    ``README.md``.

    Args:
        card: ``"regenerate"`` (default: [`model_card_from_folder`] with ``repo_id`` in the usage snippets) or
            ``"keep"`` (upload the folder's own ``README.md``). Either way the card is checked with
            [`validate_model_card`] before anything is sent, and the Hub validates it again on commit.
        private: create the repository private (an existing repository keeps its visibility).
        token: a Hub token; default: the logged-in user's (``hf auth login`` / ``HF_TOKEN``).
        endpoint: the Hub URL (default ``HF_ENDPOINT`` / huggingface.co).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit (``.commit_url``, ``.repo_url``).

    Example:

    ```python
    >>> info = push_model_folder("outputs/stego-camvid/model", "me/stego-camvid")    # doctest: +SKIP
    >>> info.repo_url                                                                  # doctest: +SKIP
    RepoUrl('https://huggingface.co/me/stego-camvid', endpoint='https://huggingface.co', repo_type='model', ...)
    ```
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    pipeline_tag = _check_model_folder(folder)
    if card == "regenerate":
        readme = str(model_card_from_folder(folder, repo_id=repo_id, dataset_id=dataset_id, base_model=base_model))
    elif card == "keep":
        if not (folder / "README.md").is_file():
            raise ValueError(f"card='keep' but {folder} has no README.md: use card='regenerate'")
        readme = (folder / "README.md").read_text()
    else:
        raise ValueError(f"card must be 'regenerate' or 'keep', got {card!r}")
    validate_model_card(ModelCard(readme), pipeline_tag=pipeline_tag)

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        for name, path in _folder_files(folder)
        if name != "README.md"
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload hf_useg model",
        revision=revision,
        repo_type="model",
    )


def _space_front_matter(readme: Path) -> dict[str, Any]:
    import yaml

    text = readme.read_text()
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if not match:
        raise ValueError(f"{readme} has no YAML front matter (--- ... ---) with the Space settings")
    data = yaml.safe_load(match.group(1)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{readme}: the front matter must be a mapping")
    return data


def push_space_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    include_package: bool = True,
    model_dirs: Sequence[str | os.PathLike] = (),
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Upload the Gradio Space folder (``spaces/``: ``app.py``, ``README.md`` with the Space front matter,
    ``requirements.txt``) as a Space (``repo_type="space"``, ``space_sdk="gradio"``).

    Args:
        include_package: also upload the `hf_useg` package source as ``hf_useg/`` beside ``app.py`` (default), so
            the Space runs this exact code without a released package.
        model_dirs: saved model folders to bundle as ``models/<folder name>/`` (the app lists them); Hub models
            are better named in the Space's ``HF_USEG_MODELS`` variable instead.

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.

    Example:

    ```python
    >>> push_space_folder("spaces", "me/hf-useg-demo", model_dirs=["outputs/stego/model"])   # doctest: +SKIP
    ```
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no README.md: a Space needs one with its front matter (sdk, app_file)")
    settings = _space_front_matter(folder / "README.md")
    sdk = settings.get("sdk")
    if sdk != "gradio":
        raise ValueError(f"{folder}/README.md declares sdk {sdk!r}; this helper uploads Gradio Spaces (sdk: gradio)")
    app_file = settings.get("app_file", "app.py")
    if not (folder / app_file).is_file():
        raise ValueError(f"{folder}/README.md names app_file {app_file!r}, which does not exist")

    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in _folder_files(folder)
    ]
    if include_package:
        package = Path(__file__).resolve().parents[1]  # hf_useg/
        operations += [
            CommitOperationAdd(path_in_repo=f"hf_useg/{name}", path_or_fileobj=str(path))
            for name, path in _folder_files(package)
        ]
    for model_dir in model_dirs:
        model_dir = Path(model_dir)
        _check_model_folder(model_dir)
        name = model_dir.resolve().name
        operations += [
            CommitOperationAdd(path_in_repo=f"models/{name}/{relative}", path_or_fileobj=str(path))
            for relative, path in _folder_files(model_dir)
        ]
    paths = [operation.path_in_repo for operation in operations]
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    if duplicates:
        raise ValueError(f"two files would land on the same path in the Space: {duplicates}")

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    return api.create_commit(
        repo_id, operations, commit_message=commit_message or "Upload hf_useg Space", repo_type="space"
    )
