"""Sharing adapters: the model card, and pushing a saved folder to the Hugging Face Hub.

peft's ``PeftModel.push_to_hub`` re-saves and replaces our card with a transformers one, so
we upload the folder that ``save_pretrained`` wrote, card included, with ``HfApi``.
"""

from __future__ import annotations

import tempfile
from typing import Any

from loraxir import __version__
from loraxir.config import LoraIRConfig


def render_model_card(
    config: LoraIRConfig, backbone: str, metrics: dict[str, float] | None = None
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
        f"| top-k / temperature | {config.top_k} / {config.temperature:g} |",
        f"| targets | {config.target_modules or config.preset or 'the detected preset'} |",
        f"| router | {_router_label(config.router)} |",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4g} |" for name, value in metrics.items()]
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


def _router_label(spec: dict[str, Any] | None) -> str:
    if spec is None:
        return "none (route with gates= or degradation=)"
    encoder = spec.get("encoder", {})
    if isinstance(encoder, dict):
        encoder = encoder.get("name") or encoder.get("type", "custom")
    return f"{encoder}, top-{spec.get('top_k', 1)}"


def push_to_hub(
    model: Any, repo_id: str, private: bool = True, token: str | None = None, **card: Any
) -> str:
    """Save ``model`` (a :class:`~loraxir.model.LoraIRModel`) and upload the folder to
    ``repo_id``; returns the commit URL. ``card`` goes to ``save_pretrained``
    (``metrics=``, ``base_model=``)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **card)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message="Upload loraxir adapter"
        )
    return str(info)
