"""Sharing adapters: the model card, and pushing a saved folder to the Hugging Face Hub.

peft's ``PeftModel.push_to_hub`` re-saves and replaces our card with a transformers one, so
we upload the folder that ``save_pretrained`` wrote, card included, with ``HfApi``.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from loraxir import __version__
from loraxir.config import LoraIRConfig
from loraxir.errors import CheckpointError, ConfigError
from loraxir.pretrained import (
    BACKBONE_CONFIG,
    CARD_NAME,
    CONFIG_NAME,
    FOLDER_FILES,
    METRICS_NAME,
    describe_adapter,
    metric_rows,
)
from loraxir.router.config import RouterConfig

_USAGE_HEADING = "## Use it from the Hub"
_LIBRARY_LINE = "library_name: loraxir"  # in a card's front matter: a card of ours


def render_model_card(
    config: LoraIRConfig, backbone: str, metrics: dict[str, Any] | None = None
) -> str:
    """A ``README.md`` for an adapter: base backbone, degradations, metrics, how to load."""
    lines = [
        "---",
        _LIBRARY_LINE,
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
    include_backbone: bool = True,
    **card: Any,
) -> str:
    """Save ``model`` (a :class:`~loraxir.model.LoraIRModel`) and upload the folder to
    ``repo_id`` as :func:`push_folder` does; returns the commit URL. ``card`` goes to
    ``save_pretrained`` (``metrics=``, ``base_model=``).

    With ``include_backbone`` the base network goes too (``backbone.json`` +
    ``backbone.safetensors``, its own weights even when the model is merged), so that the
    repo restores by itself as the card says; a network that
    :func:`~loraxir.backbones.save_backbone` cannot describe (your own module) is pushed
    without it, with a warning, and the card says to pass it. The model is not changed."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **card)
        if include_backbone:
            _save_base_network(model, folder, repo_id)
        return push_folder(folder, repo_id, private=private, token=token, endpoint=endpoint)


def _save_base_network(model: Any, folder: str, repo_id: str) -> None:
    """The backbone pair of ``model``'s plain network, from a copy (unloading consumes)."""
    from loraxir.backbones import save_backbone

    try:
        save_backbone(copy.deepcopy(model).unload(), folder)
    except ConfigError as error:
        warnings.warn(
            f"Pushing {repo_id!r} without its base network: {error} Its users pass the "
            "network themselves (backbone= in Python, --backbone on the command line).",
            stacklevel=3,
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload an adapter folder to ``repo_id`` (created if needed); returns the commit URL.

    Uploads the adapter files and, when present, ``backbone.json``/``backbone.safetensors``
    and ``metrics.json``. The folder's ``README.md`` is the card when its front matter says
    ``library_name: loraxir`` (otherwise, missing or peft's, one is rendered from the config
    and metrics); the uploaded copy gets a "use it" section naming ``repo_id`` (replacing
    one of an earlier push), whose commands pass a network when the folder has none. The
    folder itself is not modified. Its config is checked as loading would check it, card
    or not. A push over an earlier one removes the earlier push's adapter files that this
    folder lacks (a stale backbone pair would load under the new experts). An invalid
    ``repo_id`` raises :class:`ConfigError` before any upload; offline mode, an unreachable
    endpoint and a refused upload raise :class:`CheckpointError` saying which it was.
    ``private`` applies to a repo created here; an existing repo keeps its visibility.
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
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    if _LIBRARY_LINE not in card.split("\n---", 1)[0]:  # none, or peft's (library_name: peft)
        card = render_model_card(config, info.backbone_label, info.metrics or None)
    degradation = info.degradations[0] if info.degradations else "noise"
    card = _without_usage_section(card) + _usage_section(
        repo_id,
        degradation,
        mergeable=config.dam is None,
        self_contained=(folder / BACKBONE_CONFIG).is_file(),
    )
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


def _without_usage_section(card: str) -> str:
    """``card`` without a "use it" section of an earlier push (a card downloaded from
    another repo names that repo; a repo id test would take ``me/a`` for ``me/a-v2``)."""
    head, found, rest = card.partition(f"\n{_USAGE_HEADING}\n")
    if not found:
        return card
    after = rest.find("\n## ")
    return head if after < 0 else head + rest[after:]


def _usage_section(repo_id: str, degradation: str, mergeable: bool, self_contained: bool) -> str:
    """How to use the pushed adapter; ``merge`` only for adapters without DAM blocks (which
    no plain checkpoint can hold); without a backbone pair in the repo, every command
    names the network to pass."""
    backbone = "" if self_contained else " --backbone NETWORK.pth"
    merge = f"loraxir merge {repo_id} --degradation {degradation} -o plain.safetensors{backbone}"
    load = (
        f"model = loraxir.load_adapter({repo_id!r})  # with the network the repo carries"
        if self_contained
        else f"model = loraxir.load_adapter({repo_id!r}, backbone='NETWORK.pth')  # not in the repo"
    )
    return "\n".join(
        [
            "",
            _USAGE_HEADING,
            "",
            "```bash",
            "pip install ./loraxir  # a checkout of loraxir's source (not on PyPI)",
            f"loraxir restore photo.png -o restored/ --adapter {repo_id}{backbone}",
            f"loraxir restore clip.mp4 -o restored/ --adapter {repo_id}{backbone} --smooth 0.5",
            *([merge] if mergeable else []),
            "```",
            "",
            "```python",
            "import loraxir",
            load,
            "```",
            "",
        ]
    )
