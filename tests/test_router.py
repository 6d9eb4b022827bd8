"""DegradationRouter: multi-view features, gating, explain, save/load, config round trips."""

from __future__ import annotations

import importlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import loraxir
import loraxir.checkpoint
from loraxir.data.sources import skimage_image
from loraxir.degradations import apply
from loraxir.errors import CheckpointError, ConfigError, RoutingError, UnknownNameError
from loraxir.router import (
    DegradationRouter,
    RouterConfig,
    check_degradations,
    degradation_prompt,
    load_balancing_loss,
    multi_view,
    top_k_gates,
)
from loraxir.router.statistics import (
    HISTOGRAM_BINS,
    cepstrum_statistics,
    global_statistics,
    sharpness_statistics,
    view_statistics,
)
from tests.conftest import save_open_clip_weights, tiny_open_clip_name

ROOT = Path(__file__).resolve().parents[1]

CLASSES = ["noise", "rain", "haze", "blur", "low_light"]


def cnn_router(**options: object) -> DegradationRouter:
    defaults = {"image_size": 16, "hidden_dim": 32, "embed_dim": 24}
    return DegradationRouter.from_encoder("cnn-tiny", CLASSES, **{**defaults, **options})


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def _local_views_by_hand(images: torch.Tensor, s: int, grid: int, kind: str) -> list:
    """The local views, cut by hand: tiles of a grid·s resize, or native crops."""
    if kind == "resize":
        big = _resize(images, grid * s)
        return [
            big[:, :, i * s : (i + 1) * s, j * s : (j + 1) * s]
            for i in range(grid)
            for j in range(grid)
        ]
    height, width = images.shape[-2:]
    crop = min(s, height, width)
    tops = [round(i * (height - crop) / max(grid - 1, 1)) for i in range(grid)]
    lefts = [round(j * (width - crop) / max(grid - 1, 1)) for j in range(grid)]
    if grid == 1:
        tops, lefts = [(height - crop) // 2], [(width - crop) // 2]
    crops = [images[:, :, t : t + crop, x : x + crop] for t in tops for x in lefts]
    return [c if crop == s else _resize(c, s) for c in crops]


@pytest.mark.parametrize("encoder", ["cnn-tiny", "open_clip"])
@pytest.mark.parametrize("grid", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", ["native", "resize"])
def test_multi_view_features_equal_views_cropped_and_encoded_by_hand(
    encoder: str, grid: int, kind: str
) -> None:
    name = tiny_open_clip_name() if encoder == "open_clip" else "cnn-tiny"
    size = None if encoder == "open_clip" else 16
    router = DegradationRouter.from_encoder(
        name, CLASSES, image_size=size, grid=grid, views=kind
    ).eval()
    tower, s = router.encoder, router.encoder.image_size
    images = torch.rand(2, 3, 37, 53)

    if kind == "native":  # the global view keeps layout only: a quarter-resolution copy
        coarse = _resize(images, s // 4)
        expected = tower(F.interpolate(coarse, size=(s, s), mode="bilinear"))
    else:
        expected = tower(_resize(images, s))
    if grid:
        tiles = [tower(view) for view in _local_views_by_hand(images, s, grid, kind)]
        expected = torch.cat([expected, torch.stack(tiles).mean(dim=0)], dim=-1)

    calls = []
    tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    torch.testing.assert_close(router.features(images), expected, atol=1e-5, rtol=1e-4)
    assert calls == [2 * (1 + grid * grid)], "all views of all images in one encoder call"


@pytest.mark.parametrize("kind", ["native", "resize"])
def test_multi_view_tiles_are_row_major_crops(kind: str) -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) / 383
    views = multi_view(images, size=4, grid=2, kind=kind)
    assert views.shape == (2, 5, 3, 4, 4)
    torch.testing.assert_close(views[:, 2], images[:, :, 0:4, 4:8])
    torch.testing.assert_close(views[:, 3], images[:, :, 4:8, 0:4])


@pytest.mark.parametrize("side", [64, 333, 1500])
def test_native_local_views_are_exact_pixels_at_any_size(side: int) -> None:
    """Native crops copy the image's own pixels: noise keeps its level at any image size."""
    generator = torch.Generator().manual_seed(side)
    clean = torch.full((1, 3, side, side + 17), 0.5)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=generator)
    views = multi_view(noisy, size=32, grid=2, kind="native")
    assert views.shape == (1, 5, 3, 32, 32), "a fixed number of views at any size"
    height, width = noisy.shape[-2:]
    torch.testing.assert_close(views[0, 1], noisy[0, :, :32, :32])
    torch.testing.assert_close(views[0, 4], noisy[0, :, height - 32 :, width - 32 :])
    assert abs(views[:, 1:].std().item() - 0.1) < 0.01
    assert views[:, 0].std().item() < 0.03, "the global view carries layout, not pixel noise"
    paper = multi_view(noisy, size=32, grid=2, kind="resize")
    if side >= 333:
        assert paper[:, 1:].std().item() < 0.06, "the paper's views average the noise away"


def test_native_views_of_a_small_image_upsample_its_largest_square() -> None:
    images = torch.rand(1, 3, 12, 20)
    views = multi_view(images, size=16, grid=2, kind="native")
    torch.testing.assert_close(views[:, 1], _resize(images[:, :, :, :12], 16))
    torch.testing.assert_close(views[:, 4], _resize(images[:, :, :, 8:], 16))


def test_unknown_view_kind_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="native"):
        multi_view(torch.rand(1, 3, 8, 8), 4, 2, kind="natve")
    with pytest.raises(ConfigError, match="views"):
        cnn_router(views="tiles")


def _reference_gates(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Top-k softmax gates computed with plain Python, independently of top_k_gates."""
    rows = []
    for row in logits.tolist():
        kept = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        peak = max(row[i] for i in kept)
        weights = {i: math.exp((row[i] - peak) / temperature) for i in kept}
        total = sum(weights.values())
        rows.append([weights[i] / total if i in weights else 0.0 for i in range(len(row))])
    return torch.tensor(rows)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_gates_equal_an_independent_reference(k: int, temperature: float) -> None:
    logits = torch.randn(16, 5) * 3
    gates = top_k_gates(logits, k, temperature)
    torch.testing.assert_close(gates, _reference_gates(logits, k, temperature))
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(16))
    assert ((gates > 0).sum(dim=1) == k).all()


def test_lower_temperature_sharpens_the_mixture() -> None:
    logits = torch.randn(32, 5)
    sharp, soft = top_k_gates(logits, 3, temperature=0.3), top_k_gates(logits, 3, temperature=3.0)
    assert (sharp.max(dim=1).values > soft.max(dim=1).values).all()
    assert ((sharp > 0) == (soft > 0)).all(), "temperature changes weights, not the choice"


def test_extreme_temperature_keeps_k_experts() -> None:
    logits = torch.tensor([[0.0, 50.0, 100.0, -3.0]])
    gates = top_k_gates(logits, 2, temperature=1e-3)
    assert (gates > 0).sum() == 2 and abs(gates.sum().item() - 1) < 1e-6


@pytest.mark.parametrize(
    ("dtype", "k", "temperature"),
    [(torch.float16, 1, 1e-5), (torch.float16, 2, 1e-4), (torch.float32, 2, 1e-40)],
)
def test_a_temperature_that_overflows_the_logits_still_gives_finite_gates(dtype, k, temperature):
    """logits / temperature is inf here; the gates were NaN."""
    logits = torch.tensor([[3.0, 1.0, -2.0]], dtype=dtype, requires_grad=True)
    gates = top_k_gates(logits, k, temperature)
    assert torch.isfinite(gates).all() and gates[0, 0] == gates.max()
    assert (gates > 0).sum() == k and abs(gates.float().sum().item() - 1) < 1e-3
    gates.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_top1_is_one_hot_and_still_passes_gradient() -> None:
    logits = torch.randn(8, 5, requires_grad=True)
    gates = top_k_gates(logits, 1)
    assert torch.equal(gates.detach(), F.one_hot(logits.argmax(1), 5).float())
    (gates * torch.arange(5.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_noisy_gating_is_seeded() -> None:
    logits = torch.zeros(64, 5)
    first = top_k_gates(logits, 1, noise_std=1.0, generator=torch.Generator().manual_seed(3))
    again = top_k_gates(logits, 1, noise_std=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert len(set(first.argmax(1).tolist())) > 1, "noise spreads equal logits over experts"


def test_router_noise_applies_in_training_mode_only() -> None:
    router = cnn_router(noise_std=5.0)
    images = torch.rand(16, 3, 16, 16)
    router.eval()
    torch.testing.assert_close(router(images), router(images))
    router.train()
    picks = {tuple(router(images).argmax(1).tolist()) for _ in range(4)}
    assert len(picks) > 1


def test_load_balancing_loss_is_minimal_for_uniform_usage() -> None:
    uniform = torch.eye(5).repeat(4, 1)
    assert load_balancing_loss(uniform).item() == pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(20, dtype=torch.long), 5).float()
    assert load_balancing_loss(collapsed).item() == pytest.approx(5.0)
    for _ in range(20):
        gates = top_k_gates(torch.randn(20, 5) * 4, k=2)
        assert load_balancing_loss(gates).item() >= 1.0 - 1e-6


def test_load_balancing_loss_gradient_spreads_usage() -> None:
    logits = (torch.randn(64, 4) + torch.tensor([3.0, 0, 0, 0])).requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=1.0)
    before = load_balancing_loss(top_k_gates(logits, 1)).item()
    for _ in range(50):
        optimizer.zero_grad()
        load_balancing_loss(top_k_gates(logits, 1)).backward()
        optimizer.step()
    assert load_balancing_loss(top_k_gates(logits, 1)).item() < before - 0.5


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 3, 9, 70), (2, 1, 40, 40), (2, 4, 33, 20)])
def test_router_gates_contract_for_any_size_and_channels(shape: tuple[int, ...]) -> None:
    router = cnn_router(top_k=2)
    gates = router(torch.rand(shape))
    assert gates.shape == (shape[0], len(CLASSES))
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(shape[0]))
    assert ((gates > 0).sum(dim=1) == 2).all()
    (gates * torch.randn_like(gates)).sum().backward()
    assert router.mlp[1].weight.grad.abs().sum() > 0
    assert router.head.weight.grad.abs().sum() > 0


def test_route_returns_embedding_logits_and_gates_consistently() -> None:
    router = cnn_router(top_k=2, temperature=0.5).eval()
    images = torch.rand(4, 3, 16, 16)
    out = router.route(images)
    assert out.embedding.shape == (4, 24)
    torch.testing.assert_close(out.logits, router.logits(images))
    torch.testing.assert_close(out.gates, _reference_gates(out.logits, 2, 0.5))
    torch.testing.assert_close(router.embed(images), out.embedding)
    torch.testing.assert_close(router.route_views(router.make_views(images)).gates, out.gates)


def test_explain_reports_probabilities_and_chosen_experts(tmp_path: Path) -> None:
    router = cnn_router(top_k=2).eval()
    images = torch.rand(3, 3, 16, 16)
    explanation = router.explain(images)
    probs = torch.softmax(router.logits(images), dim=-1).detach()
    torch.testing.assert_close(explanation.probabilities, probs)
    for row, chosen in zip(probs, explanation.chosen, strict=True):
        assert chosen == [CLASSES[i] for i in row.topk(2).indices.tolist()]
    records = explanation.to_records()
    assert json.loads(json.dumps(records)) == records
    assert set(records[0]["gates"]) == set(explanation.chosen[0])
    assert (
        str(explanation).splitlines()[0].startswith(f"image 0: experts {explanation.chosen[0][0]}")
    )
    explanation.plot(tmp_path / "choices.png", labels=["a", "b", "c"])
    assert (tmp_path / "choices.png").stat().st_size > 1000
    for path, labels, message in [
        (tmp_path / "c.png", ["a"], r"names the 3 image\(s\), one each"),
        (tmp_path / "c.png", "abc", "one each"),
        (tmp_path, None, "is a folder; name an image file"),
        (tmp_path / "c.txt", None, r"\.txt is not a format matplotlib writes"),
        (tmp_path / "choices.png" / "c.png", None, "is a file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            explanation.plot(path, labels=labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.png"]
    buffer = io.BytesIO()
    explanation.plot(buffer, labels=[0, 1, 2])  # a file-like object, class indices as labels
    assert buffer.getvalue().startswith(b"\x89PNG")


def test_figures_leave_the_callers_plotting_backend_alone(tmp_path: Path) -> None:
    """explain().plot switched every later figure of a notebook or GUI session to Agg."""
    import matplotlib

    from loraxir.training import save_confusion_matrix

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figure = cnn_router().eval().explain(torch.rand(2, 3, 16, 16)).plot(tmp_path / "a.png")
        save_confusion_matrix(torch.eye(2, dtype=torch.long), ["a", "b"], tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert figure.axes and (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_saved_router_loads_with_identical_gates(tmp_path: Path) -> None:
    router = cnn_router(top_k=2, temperature=0.7)
    with torch.no_grad():
        for parameter in router.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    images = torch.rand(4, 3, 30, 30)
    assert torch.equal(router.eval()(images), loaded.eval()(images))
    assert loaded.to_config() == router.to_config()
    saved = json.loads((tmp_path / "router" / "router_config.json").read_text())
    assert saved == router.to_config().to_dict() and saved["temperature"] == 0.7


def test_frozen_pretrained_tower_is_referenced_not_saved(tmp_path: Path) -> None:
    name = tiny_open_clip_name()
    weights = tmp_path / "clip.safetensors"
    save_open_clip_weights(weights, seed=7)
    router = DegradationRouter.from_encoder(name, CLASSES, pretrained=str(weights), grid=1)
    saved = router.adapter_state_dict()
    assert saved and not any(key.startswith("encoder.") for key in saved)
    assert router.to_config().encoder["pretrained"] == str(weights.resolve())
    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    images = torch.rand(2, 3, 40, 40)
    assert torch.equal(router.eval()(images), loaded.eval()(images))

    router.encoder.set_trainable(True)
    assert any(key.startswith("encoder.visual.") for key in router.adapter_state_dict())

    weights.rename(tmp_path / "moved.safetensors")  # the router was copied without its tower
    with pytest.raises(ConfigError, match=r"router's encoder references .*clip\.safetensors.*Copy"):
        DegradationRouter.from_pretrained(tmp_path / "router")


def test_random_or_custom_towers_are_saved_with_the_router() -> None:
    random_tower = DegradationRouter.from_encoder(tiny_open_clip_name(), CLASSES, grid=0)
    assert any(key.startswith("encoder.") for key in random_tower.adapter_state_dict())
    assert any(key.startswith("encoder.") for key in cnn_router().adapter_state_dict())


def test_load_adapter_state_dict_is_strict_and_leaves_router_unchanged_on_error() -> None:
    router = cnn_router()
    before = {k: v.clone() for k, v in router.state_dict().items()}
    good = {k: torch.randn_like(v) for k, v in router.adapter_state_dict().items()}
    missing = dict(good)
    missing.pop("head.bias")
    extra = {**good, "head.extra": torch.zeros(1)}
    reshaped = {**good, "head.weight": torch.zeros(3, 24)}
    for broken, message in ((missing, "missing"), (extra, "unexpected"), (reshaped, "shape")):
        with pytest.raises(CheckpointError, match=message):
            router.load_adapter_state_dict(broken)
        for key, value in router.state_dict().items():
            assert torch.equal(value, before[key]), key
    router.load_adapter_state_dict(good)
    assert torch.equal(router.head.weight, good["head.weight"])


def test_pickle_router_checkpoints_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = cnn_router()
    router.save_pretrained(tmp_path / "router")
    pickled = tmp_path / "router" / "router.bin"
    torch.save(router.adapter_state_dict(), pickled)
    (tmp_path / "router" / "router.safetensors").unlink()

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=r"pickle weights \['router\.bin'\]"):
        DegradationRouter.from_pretrained(tmp_path / "router")
    with pytest.raises(CheckpointError, match="is a pickle file"):
        DegradationRouter.from_pretrained(pickled)


def test_interrupted_save_keeps_the_previous_router(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = cnn_router()
    target = tmp_path / "router"
    router.save_pretrained(target)
    (target / "README.md").write_text("model card")
    images = torch.rand(2, 3, 16, 16)
    expected = router.eval().logits(images)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    with torch.no_grad():
        router.head.bias.add_(torch.arange(5.0))
    monkeypatch.setattr(loraxir.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        router.save_pretrained(target)
    assert torch.equal(DegradationRouter.from_pretrained(target).eval().logits(images), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"], "no staging left behind"

    monkeypatch.undo()
    router.save_pretrained(target)
    assert (target / "README.md").read_text() == "model card", "unrelated files are kept"
    reloaded = DegradationRouter.from_pretrained(target).eval().logits(images)
    torch.testing.assert_close(reloaded, expected + torch.arange(5.0))


def test_custom_encoder_router_needs_the_module_to_load(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    router = DegradationRouter.from_encoder(module, CLASSES, image_size=16, grid=1)
    config = router.to_config().to_dict()
    assert config["encoder"]["type"] == "custom"
    with pytest.raises(ConfigError, match="Pass it explicitly"):
        DegradationRouter.from_config(config)
    router.save_pretrained(tmp_path / "router")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    loaded = DegradationRouter.from_pretrained(tmp_path / "router", encoder=fresh)
    images = torch.rand(3, 3, 20, 20)
    assert torch.equal(router.eval()(images), loaded.eval()(images))


def test_to_config_is_json_and_round_trips() -> None:
    router = cnn_router(grid=3, top_k=2, temperature=0.5, noise_std=0.1, views="resize")
    config = router.to_config()
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert RouterConfig.from_dict(data) == config
    for rebuilt in (DegradationRouter.from_config(config), DegradationRouter.from_config(data)):
        assert rebuilt.to_config() == config
    assert (rebuilt.top_k, rebuilt.temperature, rebuilt.noise_std, rebuilt.grid) == (2, 0.5, 0.1, 3)
    assert rebuilt.views == "resize"
    with pytest.raises(ConfigError, match="Unknown keys"):
        DegradationRouter.from_config({**data, "surprise": 1})


def test_version_1_router_configs_load_with_the_paper_views() -> None:
    data = cnn_router().to_config().to_dict()
    del data["views"], data["unsure_below"]
    data["version"] = 1
    assert RouterConfig.from_dict(data).views == "resize"
    with pytest.raises(ConfigError, match="newer"):
        RouterConfig.from_dict({**data, "version": 99})


def test_version_2_router_configs_load_with_mean_pooling_and_no_statistics() -> None:
    data = cnn_router().to_config().to_dict()
    del data["pooling"], data["image_stats"]
    data["version"] = 2
    config = RouterConfig.from_dict(data)
    assert (config.pooling, config.image_stats) == ("mean", False)
    assert DegradationRouter.from_config(config).mlp[1].in_features == 2 * 128


@pytest.mark.parametrize("grid", [0, 2])
def test_mean_max_pooling_and_statistics_extend_the_features_by_hand(grid: int) -> None:
    torch.manual_seed(0)
    router = cnn_router(grid=grid, pooling="mean_max", image_stats=True).eval()
    images = torch.rand(2, 3, 40, 56)
    views = router.make_views(images)
    embeddings = router.encoder(views.flatten(0, 1)).view(2, views.shape[1], -1)
    parts = [embeddings[:, 0]]
    if grid:
        parts += [embeddings[:, 1:].mean(1), embeddings[:, 1:].max(1).values]
    parts.append(view_statistics(views))
    with torch.no_grad():
        torch.testing.assert_close(router.features(images), torch.cat(parts, -1))
    assert router.mlp[1].in_features == torch.cat(parts, -1).shape[-1]


def test_global_statistics_see_haze_and_under_exposure() -> None:
    torch.manual_seed(0)
    scene = torch.rand(1, 3, 32, 32)
    stats = {
        "clean": global_statistics(scene)[0],
        "haze": global_statistics(0.4 * scene + 0.6)[0],
        "dark": global_statistics(0.1 * scene)[0],
    }
    dark_channel, saturation, histogram = 6, 8, slice(9, 9 + HISTOGRAM_BINS)
    assert stats["haze"][dark_channel] > stats["clean"][dark_channel] + 0.3
    assert stats["haze"][saturation] < stats["clean"][saturation]
    assert stats["dark"][histogram][0] == 1.0
    assert stats["clean"][histogram].sum().item() == pytest.approx(1.0)
    for value, expected_bin in ((0.8, int(0.8 * HISTOGRAM_BINS)), (1.0, HISTOGRAM_BINS - 1)):
        flat = global_statistics(torch.full((1, 3, 8, 8), value))[0][histogram]
        assert flat[expected_bin] == 1.0, (value, flat)


def test_sharpness_statistics_tell_motion_blur_from_haze_and_noise() -> None:
    torch.manual_seed(0)
    scene = F.avg_pool2d(torch.rand(1, 3, 66, 66), 3, 1)
    blurred = F.avg_pool2d(scene, (1, 9), 1)[..., :64, :]
    hazy = 0.5 * scene[..., :64, :56] + 0.5
    noisy = (scene[..., :64, :56] + 0.1 * torch.randn(1, 3, 64, 56)).clamp(0, 1)
    stats = {
        n: sharpness_statistics(x)[0]
        for n, x in [("blur", blurred), ("haze", hazy), ("noise", noisy)]
    }
    energy, drop, coherence = 0, 1, 2
    assert stats["blur"][coherence] > stats["haze"][coherence] + 0.3
    streak = torch.eye(9).div(9).expand(3, 1, 9, 9)  # a 45° motion blur
    diagonal = sharpness_statistics(F.conv2d(scene, streak, groups=3))[0][coherence]
    assert diagonal > stats["haze"][coherence] + 0.15, "direction counts, not the axes"
    assert stats["noise"][drop] > stats["haze"][drop] > stats["blur"][drop]
    assert stats["noise"][energy] > stats["haze"][energy]


def test_cepstrum_statistics_find_motion_blur_and_ignore_haze() -> None:
    """A streak leaves a deep cepstral trough; haze (affine in intensity) changes nothing."""
    photos = [skimage_image("grass"), skimage_image("chelsea").flip(-1)]
    scene = torch.stack([photo[:, 20:276, 30:250] for photo in photos]).float() / 255
    clean = cepstrum_statistics(scene, 128)
    hazy = cepstrum_statistics(0.4 * scene + 0.55, 128)
    torch.testing.assert_close(hazy, clean, atol=1e-3, rtol=1e-4)
    for length in (7, 15, 31):
        blurred = apply("motion_blur", scene, length=length, angle=30.0)[0]
        assert (cepstrum_statistics(blurred, 128) < clean - 3).all(), length
    assert clean.shape == (2, 2) and (clean < 0).all()
    assert torch.equal(cepstrum_statistics(scene[..., :15, :], 128), torch.zeros(2, 2))


def test_a_router_with_cepstrum_reads_it_beside_its_views() -> None:
    torch.manual_seed(0)
    router = cnn_router(grid=2, image_stats=True, cepstrum=32).eval()
    images = torch.rand(2, 3, 40, 56)
    views = router.make_views(images)
    parts = [router.encode_views(views, torch.zeros(2, 2))[:, :-2], cepstrum_statistics(images, 32)]
    with torch.no_grad():
        torch.testing.assert_close(router.features(images), torch.cat(parts, -1))
        torch.testing.assert_close(
            router.route(images).logits,
            router.route_views(views, router.read_cepstrum(images)).logits,
        )
    assert router.mlp[1].in_features == parts[0].shape[-1] + 2
    assert DegradationRouter.from_config(router.to_config().to_dict()).cepstrum == 32
    assert cnn_router().read_cepstrum(images) is None
    with pytest.raises(RoutingError, match=r"read_cepstrum\(images\)"):
        router.route_views(views)
    with pytest.raises(RoutingError, match=r"got \(1, 2\)"):
        router.route_views(views, torch.zeros(1, 2))
    with pytest.raises(ConfigError, match="at least 16"):
        cnn_router(cepstrum=8)
    for bad, quoted in [
        (torch.rand(3, 200, 200), r"got shape \(3, 200, 200\)\. Add a batch"),
        (torch.rand(1, 2, 200, 200), r"got 2 \(shape \(1, 2, 200, 200\)\)"),
    ]:
        with pytest.raises(RoutingError, match=quoted):
            router.route(bad)


def test_unknown_router_settings_name_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"\['gird'\].*'grid'"):
        cnn_router(gird=2)


def test_old_encoders_module_names_its_new_path() -> None:
    with pytest.raises(ImportError, match=r"loraxir\.router\.encoders"):
        importlib.import_module("loraxir.encoders")


def test_checkpoint_format_doc_names_router_keys_that_exist(tmp_path: Path) -> None:
    """Every `router.<key>` path the format doc mentions is in a saved adapter config."""
    backbone = loraxir.create_backbone("nafnet-tiny")
    config = loraxir.LoraIRConfig(degradations=CLASSES)
    model = loraxir.get_loraxir_model(backbone, config, router=cnn_router())
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    doc = (ROOT / "docs" / "checkpoint-format.md").read_text()
    paths = set(re.findall(r"`router\.([a-z_.]+)`", doc)) - {"safetensors"}  # a file name
    assert paths, "the doc names the router's keys"
    for path in paths:
        node = saved["router"]
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"router.{path} is not in the config"
            node = node[key]


def test_check_degradations_names_both_lists() -> None:
    check_degradations(CLASSES, list(CLASSES))
    with pytest.raises(ConfigError) as error:
        cnn_router().check_degradations(["noise", "rain", "snow"])
    message = str(error.value)
    assert str(CLASSES) in message and "['noise', 'rain', 'snow']" in message
    assert "'snow'" in message.split("missing from the router:")[1]
    with pytest.raises(ConfigError, match="another order"):
        check_degradations(["a", "b"], ["b", "a"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 6}, "top_k"),
        ({"temperature": 0.0}, "temperature"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"head": "mlp"}, "head"),
        ({"grid": -1}, "grid"),
        ({"pooling": "median"}, "pooling"),
        ({"image_stats": "yes"}, "image_stats"),
    ],
)
def test_invalid_router_options_raise_config_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cnn_router(**options)


def test_duplicate_classes_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        DegradationRouter.from_encoder("cnn-tiny", ["noise", "noise"], image_size=16)


def test_gating_errors_are_routing_errors() -> None:
    with pytest.raises(RoutingError, match="top_k"):
        top_k_gates(torch.zeros(2, 3), 4)
    with pytest.raises(RoutingError, match="float"):
        cnn_router()(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(RoutingError, match="NaN or infinite"):
        cnn_router()(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(RoutingError, match=r"in \[0, 1\], got values in \[0, 255\]"):
        cnn_router()(torch.linspace(0, 255, 768).view(1, 3, 16, 16))
    with pytest.raises(RoutingError, match=r"torch\.Tensor batch .* got ndarray"):
        cnn_router()(torch.rand(1, 3, 16, 16).numpy())
    with pytest.raises(RoutingError, match=r"got tuple; stack images of one size"):
        cnn_router()((torch.rand(3, 16, 16),))
    with pytest.raises(RoutingError, match="empty batch"):
        cnn_router()(torch.rand(0, 3, 16, 16))
    with pytest.raises(RoutingError, match=r"size 64×0: an image needs at least one pixel"):
        cnn_router()(torch.rand(1, 3, 64, 0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_images_of_any_float_dtype_route_as_float32_does(dtype: torch.dtype) -> None:
    """Half-precision resampling has no CPU kernel, and float64 met float32 weights."""
    router = cnn_router().eval()
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(router(images.to(dtype)), router(images.to(dtype).float()))
        # embed (and so fit_class_embeddings) once raised on these dtypes
        assert torch.equal(router.embed(images.to(dtype)), router.embed(images.to(dtype).float()))


def test_explain_flags_images_whose_top_probability_is_low() -> None:
    router = cnn_router(unsure_below=0.5).eval()
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0]))
    flat = router.explain(torch.rand(2, 3, 16, 16))
    assert flat.unsure == [True, True] and "UNSURE" in str(flat)
    assert flat.to_records()[0]["unsure"] is True
    with torch.no_grad():
        router.head.bias.copy_(torch.tensor([9.0, 0.0, 0.0, 0.0, 0.0]))
    sure = router.explain(torch.rand(2, 3, 16, 16))
    assert sure.unsure == [False, False] and "UNSURE" not in str(sure)
    router.unsure_below = 1.0
    assert router.explain(torch.rand(1, 3, 16, 16)).unsure == [True]
    noisy = cnn_router(noise_std=5.0).train()  # gate noise is a training-time device
    image = torch.rand(1, 3, 16, 16)
    assert len({tuple(noisy.explain(image).gates[0].tolist()) for _ in range(8)}) == 1
    assert noisy.training
    with pytest.raises(ConfigError, match="unsure_below"):
        router.unsure_below = 1.5


def test_text_head_recognises_a_class_added_by_name(tmp_path: Path) -> None:
    name = tiny_open_clip_name()
    router = DegradationRouter.from_encoder(name, ["noise", "rain"], head="text", grid=0)
    router.add_degradation("haze")
    assert router.degradations == ["noise", "rain", "haze"]
    prototype = router.encoder.encode_text([degradation_prompt("haze")])[0]
    torch.testing.assert_close(router.head.prototypes[2], F.normalize(prototype, dim=0))

    # An image whose projected embedding is the new prototype is routed to it, zero-shot.
    with torch.no_grad():
        router.head.proj.weight.zero_()
        router.head.proj.bias.copy_(prototype)
    images = torch.rand(2, 3, 32, 32)
    assert router.explain(images).chosen == [["haze"], ["haze"]]

    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    assert loaded.prompts == {n: degradation_prompt(n) for n in ["noise", "rain", "haze"]}
    assert torch.equal(router.eval()(images), loaded.eval()(images))


def test_linear_head_grows_with_a_new_class_keeping_old_rows() -> None:
    router = cnn_router().eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.nn.init.normal_(router.head.bias)  # a trained head's bias is not zero
        before = router.logits(x)
    old = router.head.weight.detach().clone()
    router.add_degradation("snow")
    assert router.head.weight.shape[0] == len(CLASSES) + 1
    assert torch.equal(router.head.weight[:-1], old)
    with torch.no_grad():
        assert torch.equal(router.logits(x)[:, :-1], before), "old classes' logits unchanged"
    assert router(x).shape == (2, len(CLASSES) + 1)


def test_safetensors_file_path_loads_its_folder(tmp_path: Path) -> None:
    router = cnn_router()
    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router" / "router.safetensors")
    assert loaded.degradations == CLASSES
    config_path = tmp_path / "router" / "router_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "version": "3"}))  # edited by hand
    with pytest.raises(ConfigError, match="version must be a whole number, got '3'"):
        DegradationRouter.from_pretrained(tmp_path / "router")
    config_path.write_text(json.dumps({**config, "version": float(config["version"])}))
    assert DegradationRouter.from_pretrained(tmp_path / "router").degradations == CLASSES
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="folder path"):
        DegradationRouter.from_pretrained(None)
    with pytest.raises(CheckpointError, match="folder path"):
        router.save_pretrained(None)
    save_file({"x": torch.zeros(1)}, tmp_path / "router" / "router.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        DegradationRouter.from_pretrained(tmp_path / "router")


def test_class_embeddings_need_every_class_and_known_names_and_follow_the_router(tmp_path):
    router = cnn_router().eval()
    images = torch.rand(4, 3, 24, 24)
    with pytest.raises(RoutingError, match=r"No images of class\(es\) \['rain'"):
        router.fit_class_embeddings([(images, ["noise", "noise", "haze", "haze"])])
    with pytest.raises(RoutingError, match="Unknown class name"):
        router.fit_class_embeddings([(images, ["noise", "fog", "haze", "rain"])])
    with pytest.raises(RoutingError, match="3 labels for 4 images"):
        router.fit_class_embeddings([(images, ["noise", "rain", "haze"])])
    with pytest.raises(RoutingError, match="Class indices"):
        router.fit_class_embeddings([(images, torch.tensor([0, 1, 2, 9]))])
    for batches, message in [
        ([(images, torch.tensor([0.7, 1.2, 2.9, 0.0]))], "whole numbers"),  # not truncated
        ([(images, torch.tensor([True, False, True, False]))], "not booleans"),  # a mask
        ([(images, "noise")], r"one per image: pass \['noise'\] \* batch_size"),
        ((images, torch.arange(4)), r"\(images, labels\) pairs"),  # one pair, not a list
        ([(images.numpy(), [0, 1, 2, 0])], r"\(B, C, H, W\) torch\.Tensor"),
    ]:
        with pytest.raises(RoutingError, match=message):
            router.fit_class_embeddings(batches)
    assert router.class_embedding(torch.eye(len(CLASSES))) is None
    labels = torch.arange(len(CLASSES)).repeat(2)
    x = torch.rand(len(labels), 3, 24, 24)
    from_numpy = router.fit_class_embeddings([(x, labels.numpy())]).clone()  # indices too
    names = np.array([CLASSES[i] for i in labels.tolist()])  # and names (a table's column)
    torch.testing.assert_close(router.fit_class_embeddings([(x, names)]), from_numpy)
    fitted = router.fit_class_embeddings([(x, labels)])
    assert torch.equal(from_numpy, fitted)
    assert fitted.shape == (len(CLASSES), 24)
    torch.testing.assert_close(router.class_embedding(torch.eye(len(CLASSES))[1]), fitted[1:2])
    router.save_pretrained(tmp_path / "router")
    loaded = DegradationRouter.from_pretrained(tmp_path / "router")
    assert torch.equal(loaded.class_embeddings, fitted)
    # torch's state dict (Accelerate checkpoints, peft) carries them into an unfitted router.
    assert torch.equal(router.state_dict()["class_embeddings"], fitted)
    unfitted = cnn_router()
    unfitted.load_state_dict(router.state_dict())
    assert torch.equal(unfitted.class_embeddings, fitted)
    with pytest.raises(RuntimeError, match="size mismatch for class_embeddings"):
        cnn_router().load_state_dict({**router.state_dict(), "class_embeddings": fitted[:2]})
    loaded.add_degradation("snow")
    assert torch.equal(loaded.class_embeddings[:-1], fitted), "old classes keep their rows"
    torch.testing.assert_close(loaded.class_embeddings[-1], fitted.mean(0))
    indices = list(range(len(CLASSES))) * 2  # a plain list of indices, as documented
    by_index = router.fit_class_embeddings([(torch.rand(len(indices), 3, 24, 24), indices)])
    assert by_index.shape == fitted.shape
    with pytest.raises(CheckpointError, match="class_embeddings"):
        cnn_router().load_adapter_state_dict(
            {**router.adapter_state_dict(), "class_embeddings": torch.zeros(2, 24)}
        )
