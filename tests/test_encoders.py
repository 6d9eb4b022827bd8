"""Degradation encoders: resizing and normalisation, loading paths, freezing, clear errors.

Every tower here is tiny and random: nothing is downloaded. Real loading paths (a local
weights file, a hub tag, a ``local-dir:`` folder, a 🤗 CLIP folder) are exercised with
weights the tests write themselves.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraxir.errors import CheckpointError, ConfigError, RoutingError, UnknownNameError
from loraxir.router.encoders import (
    ENCODER_KINDS,
    HFCLIPEncoder,
    ModuleEncoder,
    OpenCLIPEncoder,
    TinyCNNEncoder,
    create_encoder,
    encoder_from_spec,
)
from tests.conftest import TINY_OPEN_CLIP, save_open_clip_weights, tiny_open_clip_name


def test_tiny_cnn_any_size_grayscale_and_rgba() -> None:
    encoder = TinyCNNEncoder(image_size=32, width=8, embed_dim=24).eval()
    rgb = torch.rand(2, 3, 20, 75)
    assert encoder(rgb).shape == (2, 24)
    assert encoder(torch.rand(1, 3, 300, 40)).shape == (1, 24)
    gray = torch.rand(2, 1, 33, 33)
    torch.testing.assert_close(encoder(gray), encoder(gray.expand(-1, 3, -1, -1)))
    rgba = torch.cat([rgb, torch.rand(2, 1, 20, 75)], dim=1)
    torch.testing.assert_close(encoder(rgba), encoder(rgb))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "float"),
        (torch.rand(1, 2, 32, 32), "channels"),
        (torch.rand(3, 32, 32), "batch"),
    ],
)
def test_bad_images_raise_routing_error(images: torch.Tensor, message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        TinyCNNEncoder(image_size=16, width=4)(images)


def test_open_clip_tower_resizes_and_applies_its_normalisation(tmp_path: Path) -> None:
    name = tiny_open_clip_name()
    weights = tmp_path / "tiny.safetensors"
    save_open_clip_weights(weights, seed=1)
    encoder = create_encoder(name, pretrained=str(weights)).eval()
    assert isinstance(encoder, OpenCLIPEncoder) and encoder.image_size == 32

    reference = open_clip.create_model(name, pretrained=str(weights)).eval()
    images = torch.rand(3, 3, 50, 41)
    pixels = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    expected = reference.encode_image((pixels - mean) / std)
    torch.testing.assert_close(encoder(images), expected)


def test_open_clip_loads_local_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = tiny_open_clip_name()
    weights = tmp_path / "tiny.safetensors"
    state = save_open_clip_weights(weights, seed=2)
    encoder = create_encoder(name, pretrained=str(weights))
    for key, value in encoder.visual.state_dict().items():
        torch.testing.assert_close(value, state[f"visual.{key}"], rtol=0, atol=0)
    random = create_encoder(name)
    first = "visual.conv1.weight"
    assert not torch.equal(random.visual.conv1.weight, state[first])
    assert encoder.has_reference_weights and not random.has_reference_weights
    assert encoder.spec()["pretrained"] == str(weights.resolve())
    monkeypatch.chdir(tmp_path)  # a relative path is saved absolute: it loads from anywhere
    assert create_encoder(name, pretrained="tiny.safetensors").spec()["pretrained"] == str(
        weights.resolve()
    )


def test_hub_tag_and_local_file_share_one_loading_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag resolves to a file in the 🤗 cache, then loads exactly like a local file."""
    name = tiny_open_clip_name()
    weights = tmp_path / "open_clip_model.safetensors"
    save_open_clip_weights(weights, seed=3)
    tags = {"loraxir_test": open_clip.pretrained._pcfg(hf_hub="loraxir/tiny-clip/")}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, tags)
    requested = []

    def fake_download(model_id: str, filename: str | None = None, **kwargs: object) -> str:
        requested.append(model_id)
        return str(weights)

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", fake_download)
    from_tag = create_encoder(name, pretrained="loraxir_test").eval()
    from_file = create_encoder(name, pretrained=str(weights)).eval()
    assert requested == ["loraxir/tiny-clip"]
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(from_tag(images), from_file(images), rtol=0, atol=0)
    assert from_tag.spec()["pretrained"] == "loraxir_test"


def test_pretrained_tag_offline_explains_how_to_pass_a_local_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as error:
        create_encoder("ViT-B-32", pretrained="openai")
    message = str(error.value)
    assert "could not be downloaded" in message
    assert "pretrained='/path/to/" in message and "local-dir:" in message


def test_unknown_open_clip_name_lists_close_names() -> None:
    with pytest.raises(UnknownNameError, match="ViT-B-32"):
        create_encoder("ViT-B-33")


def test_unknown_pretrained_value_lists_tags() -> None:
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):
        create_encoder("ViT-B-32", pretrained="no-such-tag")


def test_weights_of_another_model_raise_checkpoint_error(tmp_path: Path) -> None:
    name = tiny_open_clip_name()
    other = json.loads(json.dumps(TINY_OPEN_CLIP))
    other["vision_cfg"]["width"] = 96
    weights = tmp_path / "other.safetensors"
    save_open_clip_weights(weights, seed=0, cfg=other)
    with pytest.raises(CheckpointError, match=f"do not fit open_clip model '{name}'"):
        create_encoder(name, pretrained=str(weights))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_for_another_image_size_are_refused_unless_asked_for(
    tmp_path: Path, suffix: str
) -> None:
    """open_clip interpolates the positional embedding to the model's size without a word:
    a 224 px file would pass for the paper's 336 px tower."""
    name = tiny_open_clip_name()
    larger = json.loads(json.dumps(TINY_OPEN_CLIP))
    larger["vision_cfg"]["image_size"] = 48
    weights = tmp_path / f"larger{suffix}"
    state = save_open_clip_weights(tmp_path / "larger.safetensors", seed=0, cfg=larger)
    if suffix == ".pt":
        torch.save({"state_dict": state}, weights)
    with pytest.raises(CheckpointError, match=r"another image size.*\(37, 64\).*\(17, 64\)"):
        create_encoder(name, pretrained=str(weights))
    resized = create_encoder(name, pretrained=str(weights), image_size=32)  # on purpose
    assert resized.image_size == 32
    assert encoder_from_spec(json.loads(json.dumps(resized.spec()))).image_size == 32


def test_an_encoder_path_that_is_no_folder_says_so(tmp_path: Path) -> None:
    """It was read as an open_clip model name and answered with every name open_clip has."""
    with pytest.raises(ConfigError, match="looks like a folder, but there is none"):
        create_encoder(str(tmp_path / "no_such_clip"))
    weights = tmp_path / "tiny.safetensors"
    save_open_clip_weights(weights, seed=0)
    with pytest.raises(ConfigError, match="is a file; pass the open_clip model name"):
        create_encoder(str(weights))


def test_local_dir_folder_loads_config_and_weights(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    state = save_open_clip_weights(folder / "open_clip_model.safetensors", seed=4)
    config = {"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    by_prefix = create_encoder(f"local-dir:{folder}")
    by_path = create_encoder(folder)
    assert by_prefix.spec()["name"] == by_path.spec()["name"] == f"local-dir:{folder.resolve()}"
    torch.testing.assert_close(by_path.visual.conv1.weight, state["visual.conv1.weight"])
    assert by_path.std.flatten().tolist() == [0.25] * 3


def _save_hf_clip(folder: Path) -> nn.Module:
    """A tiny 🤗 CLIPModel folder, with a letters-only CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    special = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(
        text_config={**tower, **special, "num_hidden_layers": 1, "vocab_size": len(vocab)},
        vision_config={**tower, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(5)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]})
    )
    return model


def test_hf_clip_folder_loads_the_vision_tower_with_projection(tmp_path: Path) -> None:
    model = _save_hf_clip(tmp_path)
    encoder = create_encoder(tmp_path)
    assert isinstance(encoder, HFCLIPEncoder)
    assert (encoder.image_size, encoder.embed_dim, encoder.text_dim) == (32, 16, 16)
    images = torch.rand(2, 3, 45, 45)
    pixels = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=(pixels - mean) / std)
    features = getattr(features, "pooler_output", features)
    torch.testing.assert_close(encoder(images), features)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert encoder_from_spec(encoder.spec()).spec() == encoder.spec()


def test_hf_clip_text_prototypes_match_the_clip_model(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = _save_hf_clip(tmp_path)
    prompts = ["a photo degraded by haze", "a photo degraded by rain streaks"]
    tokens = AutoTokenizer.from_pretrained(tmp_path)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.get_text_features(**tokens)
    expected = getattr(expected, "pooler_output", expected)
    torch.testing.assert_close(create_encoder(tmp_path).encode_text(prompts), expected)


def test_hf_folder_with_other_weights_raises_checkpoint_error(tmp_path: Path) -> None:
    _save_hf_clip(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision tower"):
        create_encoder(tmp_path)


def test_hf_folder_with_weights_missing_from_its_file_is_refused(tmp_path: Path) -> None:
    """transformers fills them with random values (its report is silenced here): a
    CLIPVisionModel folder lacks the projection, a config may describe more layers."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
        image_size=32, patch_size=8, projection_dim=16,
    )  # fmt: skip
    CLIPVisionModel(vision).save_pretrained(tmp_path / "no_projection")
    with pytest.raises(CheckpointError, match=r"visual_projection\.weight.*has no projection"):
        create_encoder(tmp_path / "no_projection")
    _save_hf_clip(tmp_path / "deeper")
    config = json.loads((tmp_path / "deeper" / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 2
    (tmp_path / "deeper" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lack \d+ tensors .*layers\.1\."):
        create_encoder(tmp_path / "deeper")


def test_a_damaged_hf_folder_raises_checkpoint_error(tmp_path: Path) -> None:
    _save_hf_clip(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="Could not load the CLIP vision tower"):
        create_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"Could not read the 🤗 config\.json"):
        create_encoder(tmp_path)


def test_text_prototypes_need_the_folders_tokenizer(tmp_path: Path) -> None:
    """Without its files transformers may build an empty tokenizer: every prompt embedded
    the same, every class got the same prototype."""
    _save_hf_clip(tmp_path)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"No tokenizer in .*tokenizer\.save_pretrained"):
        create_encoder(tmp_path).encode_text(["a photo degraded by haze", "rain"])


def test_frozen_tower_stays_in_eval_mode_without_gradients() -> None:
    encoder = create_encoder(tiny_open_clip_name())
    encoder.train()
    assert not encoder.visual.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.trained
    encoder.set_trainable(True).train()
    assert encoder.visual.training and encoder.trained
    assert all(p.requires_grad for p in encoder.parameters())
    encoder.set_trainable(False)
    assert encoder.trained, "a tower that was trained keeps being saved"


def test_cnn_is_trainable_by_default_and_towers_are_not() -> None:
    assert create_encoder("cnn-tiny", image_size=16).trainable
    assert not create_encoder(tiny_open_clip_name()).trainable
    assert create_encoder(tiny_open_clip_name(), trainable=True).trainable
    with pytest.raises(ConfigError, match="True, False or None, got 'no'"):
        create_encoder(tiny_open_clip_name(), trainable="no")  # bool("no") unfroze it


def test_random_open_clip_tower_is_the_same_on_every_build() -> None:
    first = create_encoder(tiny_open_clip_name())
    torch.manual_seed(123)
    second = create_encoder(tiny_open_clip_name())
    torch.testing.assert_close(first.visual.conv1.weight, second.visual.conv1.weight)


def test_registered_config_travels_in_the_spec() -> None:
    spec = create_encoder(tiny_open_clip_name()).spec()
    assert spec["model_cfg"] == TINY_OPEN_CLIP
    rebuilt = encoder_from_spec(json.loads(json.dumps(spec)))
    assert rebuilt.embed_dim == TINY_OPEN_CLIP["embed_dim"]


def test_registering_a_config_leaves_no_file_behind(tmp_path: Path) -> None:
    """Each process that registered a config used to leave a folder in /tmp forever."""
    script = (
        "import open_clip\n"
        "from loraxir.router.encoders import create_encoder, register_open_clip_config\n"
        f"config = {TINY_OPEN_CLIP!r}\n"
        "register_open_clip_config('leak-check', config)\n"
        "register_open_clip_config('leak-check-2', {**config, 'embed_dim': 8})\n"
        "assert {'leak-check', 'leak-check-2'} <= set(open_clip.list_models())\n"
        "assert create_encoder('leak-check').embed_dim == config['embed_dim']\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    assert list(tmp_path.iterdir()) == []


def test_custom_module_is_wrapped_and_cannot_be_rebuilt_from_its_spec() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.LazyLinear(10))
    encoder = create_encoder(module, image_size=24)
    assert isinstance(encoder, ModuleEncoder) and encoder.embed_dim == 10
    assert encoder(torch.rand(2, 3, 50, 50)).shape == (2, 10)
    spec = json.loads(json.dumps(encoder.spec()))
    with pytest.raises(ConfigError, match="Pass it explicitly"):
        encoder_from_spec(spec)
    assert encoder_from_spec(spec, module=module).module is module


def test_pretrained_with_a_non_open_clip_encoder_is_refused() -> None:
    with pytest.raises(ConfigError, match="only applies to open_clip"):
        create_encoder("cnn-tiny", pretrained="openai")


def test_text_embeddings_come_from_the_same_reference() -> None:
    encoder = create_encoder(tiny_open_clip_name())
    text = encoder.encode_text(["a photo degraded by haze", "a photo degraded by rain streaks"])
    assert text.shape == (2, encoder.text_dim)
    again = create_encoder(tiny_open_clip_name()).encode_text(["a photo degraded by haze"])
    torch.testing.assert_close(text[:1], again)
    with pytest.raises(ConfigError, match="no text tower"):
        create_encoder("cnn-tiny").encode_text(["x"])


@pytest.mark.parametrize("image_size", [1, 4, 8, 9])
def test_tiny_cnn_is_finite_at_tiny_sizes_and_on_flat_images(image_size: int) -> None:
    """The last stage sees 1×1 at image_size <= 8; its pooled std must stay finite."""
    encoder = TinyCNNEncoder(image_size=image_size, width=4, embed_dim=8)
    for images in (torch.rand(2, 3, 40, 40), torch.full((2, 3, 40, 40), 0.3)):
        out = encoder(images)
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())
        encoder.zero_grad()


def test_encoder_kinds_rebuild_through_the_registry() -> None:
    assert set(ENCODER_KINDS) >= {"cnn", "open_clip", "hf_clip", "custom"}
    encoder = create_encoder("cnn-tiny", image_size=16)
    spec = json.loads(json.dumps(encoder.spec()))
    assert spec["type"] == "cnn" and encoder_from_spec(spec).spec() == spec
    with pytest.raises(UnknownNameError, match="'cnn'"):
        encoder_from_spec({**spec, "type": "cnnn"})


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_an_encoder_input_size_that_is_no_size_is_refused(size: object) -> None:
    """0 once became the CNN's default 64 silently, and -3 failed inside torch."""
    with pytest.raises(ConfigError, match="image_size must be a whole number"):
        create_encoder("cnn-tiny", image_size=size)
