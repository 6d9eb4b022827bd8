"""Adapters by name, folder and Hub repo id; pushing; the Hub cache (a real local endpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_server import LocalHub
from inference_helpers import CLASSES, write_adapter

import loraxir
from loraxir.backbones import load_backbone
from loraxir.errors import CheckpointError, ConfigError, UnknownNameError
from loraxir.hub import push_folder, push_to_hub
from loraxir.pretrained import ADAPTER_PATH_ENV, FOLDER_FILES, find_adapter


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "tiny-three")
    return root


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub talk to the local endpoint (the suite runs with HF_HUB_OFFLINE=1)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _restore(model, x, name="noise"):
    with torch.no_grad():
        return model(x, degradation=name), model(x)


def test_dropped_folder_is_listed_and_loads_by_name(adapter_root, monkeypatch):
    monkeypatch.setenv(ADAPTER_PATH_ENV, str(adapter_root))
    assert "tiny-three" in loraxir.list_adapters()
    by_name = loraxir.load_adapter("tiny-three")
    by_folder = loraxir.load_adapter(adapter_root / "tiny-three")
    assert by_name.degradations == CLASSES
    x = torch.rand(1, 3, 24, 40)
    for a, b in zip(_restore(by_name, x), _restore(by_folder, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", r"device='cuda' is not available on this machine \(available: cpu\)"),
        ("gpu", "device='gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
        (torch.device("cuda", 1), r"device='cuda:1' is not available"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_loading(
    adapter_root, monkeypatch, device, message
):
    """torch would fail deep inside (a missing driver, a name it cannot parse) after the
    whole adapter had loaded; ``auto`` takes what the machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        loraxir.load_adapter(adapter_root / "tiny-three", device=device)
    model = loraxir.load_adapter(adapter_root / "tiny-three", device="auto")
    assert next(model.parameters()).device == torch.device("cpu")


def test_unknown_name_lists_the_installed_adapters(adapter_root, monkeypatch):
    monkeypatch.setenv(ADAPTER_PATH_ENV, str(adapter_root))
    with pytest.raises(UnknownNameError, match="tiny-three"):
        find_adapter("tiny-thre")
    monkeypatch.setenv("HOME", str(adapter_root))
    assert find_adapter("~/tiny-three") == adapter_root / "tiny-three"
    monkeypatch.chdir(adapter_root.parent)  # a relative folder with one slash is not a repo id
    assert find_adapter(f"{adapter_root.name}/tiny-three") == Path(adapter_root.name, "tiny-three")
    for path in ("./nodir/", str(adapter_root / "nodir")):  # written as a path: not a name
        with pytest.raises(CheckpointError, match="There is no adapter folder"):
            find_adapter(path)
    with pytest.raises(CheckpointError, match="There is no folder"):
        push_folder(adapter_root / "nodir", "me/tiny", endpoint="http://127.0.0.1:9")


def test_push_uploads_the_promised_files_and_card(adapter_root, online):
    folder = adapter_root / "tiny-three"
    with LocalHub() as hub:
        url = push_folder(folder, "me/tiny", endpoint=hub.url, token="test-token")
    files = hub.repos["me/tiny"]
    assert set(files) == set(FOLDER_FILES) and "/me/tiny/commit/" in url
    for name in FOLDER_FILES:
        if name != "README.md":
            assert files[name] == (folder / name).read_bytes(), name
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: loraxir")
    assert ", ".join(CLASSES) in card and "psnr_noise" in card
    assert "loraxir restore photo.png -o restored/ --adapter me/tiny" in card
    assert "loraxir merge me/tiny --degradation" in card  # no DAM blocks: it merges
    assert (folder / "README.md").read_text() != card  # the local folder is left as it was


def test_push_to_hub_uploads_what_save_pretrained_writes(adapter_root, online, tmp_path):
    """With the base network: the card said ``load_adapter('me/mem')`` and ``restore
    --adapter me/mem`` work alone, and a push over a self-contained repo deleted its pair."""
    model = loraxir.load_adapter(adapter_root / "tiny-three")
    model.save_pretrained(tmp_path / "saved", metrics={"psnr_noise": 30.0})
    model.merge(degradation=CLASSES[1])  # the pair holds the network's own weights all the same
    cache = tmp_path / "hub-cache"
    with LocalHub() as hub:
        url = push_to_hub(
            model, "me/mem", endpoint=hub.url, token="test-token", metrics={"psnr_noise": 30.0}
        )
        pushed = loraxir.load_adapter("me/mem", endpoint=hub.url, cache_dir=cache)
        push_to_hub(model, "me/lean", endpoint=hub.url, token="test-token", include_backbone=False)
    assert model.merged  # pushing left the model as it was
    for name in ("backbone.json", "backbone.safetensors"):
        assert hub.repos["me/mem"][name] == (adapter_root / "tiny-three" / name).read_bytes()
        assert name not in hub.repos["me/lean"]
    x = torch.rand(1, 3, 24, 32)
    local = loraxir.load_adapter(adapter_root / "tiny-three")
    for a, b in zip(_restore(pushed, x), _restore(local, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    lean_card = hub.repos["me/lean"]["README.md"].decode()
    assert "--adapter me/lean --backbone NETWORK.pth\n" in lean_card
    assert "load_adapter('me/lean', backbone='NETWORK.pth')" in lean_card
    files = hub.repos["me/mem"]
    assert "/me/mem/commit/" in url
    assert (
        files["adapter_model.safetensors"]
        == (tmp_path / "saved" / "adapter_model.safetensors").read_bytes()
    )
    assert json.loads(files["adapter_config.json"]) == json.loads(
        (tmp_path / "saved" / "adapter_config.json").read_text()
    )
    assert "psnr_noise" in files["README.md"].decode()


def test_a_card_naming_another_repo_gets_this_repos_usage(adapter_root, online, tmp_path):
    """A folder downloaded from me/tiny-v2 kept its card's commands for me/tiny-v2 when
    pushed to me/tiny (a substring of it)."""
    import shutil

    folder = tmp_path / "from-v2"
    shutil.copytree(adapter_root / "tiny-three", folder)
    with LocalHub() as hub:
        push_folder(folder, "me/tiny-v2", endpoint=hub.url, token="test-token")
        (folder / "README.md").write_bytes(hub.repos["me/tiny-v2"]["README.md"])
        push_folder(folder, "me/tiny", endpoint=hub.url, token="test-token")
    card = hub.repos["me/tiny"]["README.md"].decode()
    assert "me/tiny-v2" not in card and card.count("## Use it from the Hub") == 1
    assert "loraxir restore photo.png -o restored/ --adapter me/tiny\n" in card
    assert card.startswith((folder / "README.md").read_text().split("\n## Use it")[0])


def test_a_folder_saved_by_peft_is_pushed_with_a_loraxir_card(adapter_root, online, tmp_path):
    """peft's save_pretrained writes its own card (library_name: peft), which went up as is."""
    import peft

    model = peft.get_peft_model(
        load_backbone(adapter_root / "tiny-three"), loraxir.LoraIRConfig(degradations=CLASSES)
    )
    model.save_pretrained(tmp_path / "by-peft")
    assert "library_name: peft" in (tmp_path / "by-peft" / "README.md").read_text()
    with LocalHub() as hub:
        push_folder(tmp_path / "by-peft", "me/p", endpoint=hub.url, token="test-token")
    card = hub.repos["me/p"]["README.md"].decode()
    assert card.startswith("---\nlibrary_name: loraxir") and ", ".join(CLASSES) in card


def test_hub_arguments_subfolders_and_local_folders(adapter_root, online, tmp_path):
    """subfolder= (peft's name) picks a folder of the repo or folder; a misspelt argument
    was a bare TypeError from huggingface_hub, and revision= beside a local folder of the
    repo's name was dropped in silence."""
    by_subfolder = loraxir.load_adapter(adapter_root, subfolder="tiny-three")
    direct = loraxir.load_adapter(adapter_root / "tiny-three")
    x = torch.rand(1, 3, 16, 16)
    for a, b in zip(_restore(by_subfolder, x), _restore(direct, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"local folder.*\['revision'\] are ignored"):
        loraxir.load_adapter(adapter_root / "tiny-three", revision="v2")
    with pytest.raises(ConfigError, match=r"Unknown Hub argument\(s\) \['revison'\].*revision"):
        loraxir.load_adapter("me/tiny", revison="v2")
    with pytest.raises(ConfigError, match="must be a relative folder"):
        loraxir.load_adapter(adapter_root, subfolder="../tiny-three")
    with pytest.raises(CheckpointError, match="has no folder 'nope'"):
        loraxir.load_adapter(adapter_root, subfolder="nope")
    with LocalHub() as hub:
        push_folder(adapter_root / "tiny-three", "me/tiny", endpoint=hub.url, token="test-token")
        with pytest.raises(CheckpointError, match="has no adapter in its folder 'nope'"):
            loraxir.LoraIRModel.from_pretrained(
                load_backbone(adapter_root / "tiny-three"), "me/tiny", subfolder="nope",
                endpoint=hub.url, cache_dir=tmp_path / "cache",
            )  # fmt: skip


def test_a_second_push_leaves_no_stale_file_and_checks_the_config(adapter_root, online, tmp_path):
    """A backbone pair left from an earlier push would load under the new experts; a
    folder with a card was pushed unchecked."""
    import shutil

    folder = adapter_root / "tiny-three"
    lean = tmp_path / "lean"
    lean.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        shutil.copy(folder / name, lean / name)
    (lean / "metrics.json").write_text('{"held_out": {"noise": {"psnr": 27.5}}}')
    broken = tmp_path / "broken"
    shutil.copytree(lean, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "rank": 4}))
    with LocalHub() as hub:
        push_folder(folder, "me/tiny", endpoint=hub.url, token="test-token")
        push_folder(lean, "me/tiny", endpoint=hub.url, token="test-token")
        with pytest.raises(ConfigError, match="rank"):
            push_folder(broken, "me/other", endpoint=hub.url, token="test-token")
    assert set(hub.repos["me/tiny"]) == {
        "adapter_config.json", "adapter_model.safetensors", "README.md", "metrics.json"
    }  # fmt: skip
    assert "me/other" not in hub.commits


def test_from_pretrained_through_the_hub_cache_equals_the_folder(
    adapter_root, online, tmp_path, monkeypatch
):
    folder = adapter_root / "tiny-three"
    cache = tmp_path / "hub-cache"
    with LocalHub() as hub:
        push_folder(folder, "me/tiny", endpoint=hub.url, token="test-token")
        loraxir.LoraIRModel.from_pretrained(
            load_backbone(folder), "me/tiny", endpoint=hub.url, cache_dir=cache
        )
        loraxir.load_adapter("me/tiny", endpoint=hub.url, cache_dir=cache)
    # The endpoint is gone and the Hub is off: everything now comes from the cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached = loraxir.LoraIRModel.from_pretrained(load_backbone(folder), "me/tiny", cache_dir=cache)
    self_contained = loraxir.load_adapter("me/tiny", cache_dir=cache)  # backbone files too
    local = loraxir.LoraIRModel.from_pretrained(load_backbone(folder), str(folder))
    x = torch.rand(2, 3, 32, 24)
    for model in (cached, self_contained):
        for a, b in zip(_restore(model, x, "blur"), _restore(local, x, "blur"), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not in the Hub cache"):
        loraxir.load_adapter("me/never-pushed", cache_dir=cache)
    with pytest.raises(CheckpointError, match=r"offline mode \(HF_HUB_OFFLINE is set\)"):
        push_folder(folder, "me/tiny", endpoint="http://127.0.0.1:9", token="test-token")


def test_merge_refuses_a_network_spandrel_would_read_as_another(tmp_path):
    """spandrel guesses the hyperparameters weights do not show: a SwinIR with 7-pixel
    windows reloads with img_range 255 (outputs off by 1.3) and the file said nothing."""
    from loraxir.pretrained import save_merged

    config = loraxir.LoraIRConfig(degradations=["a", "b"], r=2)
    odd = loraxir.create_backbone("swinir-tiny", window_size=7, img_size=28)
    refused = loraxir.get_loraxir_model(odd, config).eval()
    with pytest.raises(CheckpointError, match="spandrel would load the merged SwinIR as another"):
        save_merged(refused, "a", tmp_path / "odd.safetensors")
    assert not any(tmp_path.iterdir())
    refused.merge_and_unload(degradation="a")  # the advice: the model was left as it was
    half = loraxir.create_backbone("swinir-tiny").to(torch.bfloat16)  # probed in float32
    save_merged(loraxir.get_loraxir_model(half, config).eval(), "a", tmp_path / "h.safetensors")
    usual = loraxir.get_loraxir_model(loraxir.create_backbone("swinir-tiny"), config).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        routed = usual(x, degradation="a")
    save_merged(usual, "a", tmp_path / "usual.safetensors")
    with torch.no_grad():
        reloaded = load_backbone(tmp_path / "usual.safetensors").eval()(x)
    torch.testing.assert_close(reloaded, routed, rtol=1e-4, atol=1e-5)
