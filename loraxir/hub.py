"""Sharing adapters: the model card, and pushing a saved folder to the Hugging Face Hub.

peft's ``PeftModel.push_to_hub`` re-saves and replaces our card with a transformers one, so
we upload the folder that ``save_pretrained`` wrote, card included, with ``HfApi``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraxir import __version__
from loraxir.config import LoraIRConfig
from loraxir.errors import CheckpointError, ConfigError
from loraxir.pretrained import (
    CARD_NAME,
    CONFIG_NAME,
    FOLDER_FILES,
    METRICS_NAME,
    describe_adapter,
    metric_rows,
)
from loraxir.router.config import RouterConfig


def render_model_card(
    config: LoraIRConfig, backbone: str, metrics: dict[str, Any] | None = None
) -> str:
    """A ``README.md`` for an adapter: base backbone, degradations, metrics, how to load."""
    lines = [
        "---",
        "library_name: loraxir",
        "tags: [image-restoration, all-in-one, lora, mixture-of-experts, loraxir]",
        "---",
        "",
        f"# LoRA-IR adapter for {backbone}",
        "",
        f"Degradation-routed low-rank experts (loraxir {__version__}) for a `{backbone}` backbone.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| degradations (one expert each) | {', '.join(config.degradations)} |",
        f"| rank r / alpha | {config.r} / {config.lora_alpha:g} |",
        f"| top-k | {config.top_k} |",
        f"| targets | {config.target_modules or config.preset or 'the detected preset'} |",
        f"| router | {_router_label(config.router)} |",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in metric_rows(metrics)]
        lines.append("")
    lines += [
        "## How to load",
        "",
        "```python",
        "import loraxir",
        f"backbone = ...  # the {backbone} these experts were trained on",
        "model = loraxir.LoraIRModel.from_pretrained(backbone, 'path/or/repo-id')",
        "restored = model(image)  # routed by the saved router, or pass degradation='...'",
        "```",
        "",
    ]
    return "\n".join(lines)


def _router_label(router: RouterConfig | None) -> str:
    """The router row of the card: encoder, views, top-k and the gate temperature in use."""
    if router is None:
        return "none (route with gates= or degradation=)"
    encoder = router.encoder or {}
    name = encoder.get("name") or encoder.get("path") or encoder.get("type", "custom")
    return (
        f"{name}, {router.views} views (grid {router.grid}), top-{router.top_k}, "
        f"temperature {router.temperature:g}"
    )


def push_to_hub(
    model: Any,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    **card: Any,
) -> str:
    """Save ``model`` (a :class:`~loraxir.model.LoraIRModel`) and upload the folder to
    ``repo_id`` as :func:`push_folder` does; returns the commit URL. ``card`` goes to
    ``save_pretrained`` (``metrics=``, ``base_model=``)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **card)
        return push_folder(folder, repo_id, private=private, token=token, endpoint=endpoint)


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload an adapter folder to ``repo_id`` (created if needed); returns the commit URL.

    Uploads the adapter files and, when present, ``backbone.json``/``backbone.safetensors``
    and ``metrics.json``. The folder's ``README.md`` is the card (rendered from the config
    when missing); a "use it" section naming ``repo_id`` is added to the uploaded copy when
    the card does not mention the repo yet. The folder itself is not modified. Its config
    is checked as loading would check it, card or not. A push over an earlier one removes
    the earlier push's adapter files that this folder lacks (a stale backbone pair would
    load under the new experts). An invalid ``repo_id`` raises :class:`ConfigError` before
    any upload; offline mode, an unreachable endpoint and a refused upload raise
    :class:`CheckpointError` saying which it was. ``private`` applies to a repo created here;
    an existing repo keeps its visibility.
    """
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    _check_repo_id(repo_id)
    folder = Path(folder)
    if folder.is_file():
        raise ConfigError(f"{str(folder)!r} is a file; pass the adapter folder that holds it.")
    info = describe_adapter(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{folder} has no adapter_model.safetensors; nothing to push.")
    config = LoraIRConfig.from_file(folder / CONFIG_NAME)  # what loading it would check
    card_path = folder / CARD_NAME
    if card_path.is_file():
        card = card_path.read_text(encoding="utf-8")
    else:
        card = render_model_card(config, info.backbone_label, info.metrics or None)
    if repo_id not in card:
        degradation = info.degradations[0] if info.degradations else "noise"
        card += _usage_section(repo_id, degradation, mergeable=config.dam is None)
    api = HfApi(token=token, endpoint=endpoint)
    files = (*FOLDER_FILES, METRICS_NAME)
    with tempfile.TemporaryDirectory() as staging:
        for name in files:
            if name != CARD_NAME and (folder / name).is_file():
                shutil.copy2(folder / name, Path(staging) / name)
        (Path(staging) / CARD_NAME).write_text(card, encoding="utf-8")
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            # An earlier push's files that this folder lacks (say its backbone pair) go.
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                commit_message="Upload loraxir adapter",
                delete_patterns=list(files),
            )
        except OfflineModeIsEnabled:
            raise CheckpointError(
                f"Cannot push {folder} to {repo_id!r}: the Hub is in offline mode "
                "(HF_HUB_OFFLINE is set). Unset HF_HUB_OFFLINE to upload."
            ) from None
        except HfHubHTTPError as error:
            raise CheckpointError(
                f"The Hub at {api.endpoint} refused to push {folder} to {repo_id!r}: {error}. "
                "Log in (`hf auth login` or HF_TOKEN) with a token that may write to that repo."
            ) from None
        except (httpx2.HTTPError, OSError) as error:
            raise CheckpointError(
                f"Cannot reach the Hub at {api.endpoint} to push {repo_id!r}: {error}. Check "
                "the network, and --endpoint / HF_ENDPOINT."
            ) from None
    return str(commit)


def _check_repo_id(repo_id: str) -> None:
    """Refuse an id the Hub would reject, or one without an owner (the upload would go to
    the token's own namespace, a surprise), before anything goes over the network."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise ConfigError(
            f"Invalid Hub repo id {repo_id!r}: {error} Use owner/name, e.g. me/my-adapter."
        ) from None
    if "/" not in repo_id:
        raise ConfigError(
            f"Hub repo id {repo_id!r} has no owner; use owner/name, e.g. me/{repo_id}."
        )


def _usage_section(repo_id: str, degradation: str, mergeable: bool) -> str:
    """How to use the pushed adapter; ``merge`` only for adapters without DAM blocks (which
    no plain checkpoint can hold)."""
    merge = f"loraxir merge {repo_id} --degradation {degradation} -o plain.safetensors"
    return "\n".join(
        [
            "",
            "## Use it from the Hub",
            "",
            "```bash",
            "pip install ./loraxir  # a checkout of loraxir's source (not on PyPI)",
            f"loraxir restore photo.png -o restored/ --adapter {repo_id}",
            f"loraxir restore clip.mp4 -o restored/ --adapter {repo_id} --smooth 0.5",
            *([merge] if mergeable else []),
            "```",
            "",
            "```python",
            "import loraxir",
            f"model = loraxir.load_adapter({repo_id!r})  # backbone from the repo when it has one",
            "```",
            "",
        ]
    )
