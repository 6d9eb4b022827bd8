"""Tiled inference: plans, blending weights, equality with untiled runs, pinned gates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_helpers import CLASSES, local_conv_model, photo, tiny_model

import loraxir
from loraxir.errors import ConfigError, DataError, RoutingError
from loraxir.inference.restorer import Restorer, Routing
from loraxir.inference.tiling import _axis_weights, plan_tiles, run_tiled


@pytest.mark.parametrize("extent", [8, 40, 136, 264, 1000])
@pytest.mark.parametrize(("tile", "overlap"), [(32, 8), (48, 16), (64, 0)])
def test_blend_weights_sum_to_one_everywhere(extent, tile, overlap):
    plan = plan_tiles(extent, 1, tile, overlap, 8)
    total = np.zeros(plan.padded_height)
    for start, weights in zip(
        plan.rows, _axis_weights(plan.rows, plan.tile_height, overlap), strict=True
    ):
        total[start : start + plan.tile_height] += weights
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_plan_covers_a_20000_pixel_image():
    """The 20000x20000 case, planned without allocating it: tiles cover the padded image and
    neighbours overlap by at least `overlap`."""
    plan = plan_tiles(20000, 20000, 512, 32, 16)
    assert (plan.padded_height, plan.padded_width) == (20000, 20000)
    assert plan.rows[0] == 0 and plan.rows[-1] + plan.tile_height == 20000
    assert min(np.diff(plan.rows)) <= plan.tile_height - 32
    assert len(plan) == len(plan.rows) ** 2 == 42**2


def test_tile_must_hold_three_overlaps():
    with pytest.raises(ConfigError, match="tile=64 must be at least 3 x overlap=32 = 96"):
        plan_tiles(100, 100, tile=64, overlap=32)


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [
        (8, 0, r"tile=8 is under this network's size unit of 16 pixels.*Use tile=16 \(--tile 16\)"),
        (100, 33, r"tile=100 \(rounded down to 96\) must be at least 3 x overlap=33 = 99"),
        (64, -8, r"overlap \(--overlap\) must be >= 0, got -8"),
        (
            64.5,
            8,
            r"tile \(--tile on the command line\) must be a whole number of pixels, got 64.5",
        ),
        (64, 8.5, r"overlap \(--overlap .*\) must be a whole number of pixels, got 8.5"),
        (True, 0, "must be a whole number of pixels, got True"),
    ],
)
def test_tiling_errors_quote_the_values_given(tile, overlap, message):
    """Not the rounded tile alone ("got 0") or the size unit ("got 16, -8")."""
    with pytest.raises(ConfigError, match=message):
        plan_tiles(500, 500, tile=tile, overlap=overlap, multiple=16)


def _dam_model() -> loraxir.LoraIRModel:
    """nafnet-tiny with DAM blocks and a router without fitted class embeddings."""
    from loraxir.router import DegradationRouter

    torch.manual_seed(0)
    router = DegradationRouter.from_encoder(
        "cnn-tiny", CLASSES, image_size=16, grid=1, hidden_dim=16, embed_dim=8
    )
    config = loraxir.LoraIRConfig(
        degradations=list(CLASSES), r=2, dam=loraxir.DAMConfig(embed_dim=8)
    )
    return loraxir.get_loraxir_model(loraxir.create_backbone("nafnet-tiny"), config, router=router)


@pytest.mark.parametrize("dam", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_restores_on_the_cpu(dtype, dam):
    """The router's views (anti-aliased resizing) have no half-precision CPU kernel: they are
    made in float32. A forced class whose DAM blocks need the router's embedding (no fitted
    class embeddings) gets it the same way, from the whole image, pinned for every tile."""
    image = photo(40, 56)
    make, forced = (_dam_model, "noise") if dam else (tiny_model, None)
    full, _ = Restorer(make(), forced, tile=None).restore(image)
    half, routing = Restorer(make(), forced, tile=None, dtype=dtype).restore(image)
    assert half.dtype == np.uint8 and routing.embedding is not None
    assert np.abs(full.astype(int) - half).mean() < 2


@pytest.mark.parametrize(("height", "width"), [(75, 133), (61, 47), (1, 1), (9, 200)])
def test_tiled_equals_untiled_for_a_local_network(height, width):
    """Sizes that are multiples of neither the tile nor 8; the reference pads by reflection
    to a multiple of 8, runs once and crops."""
    model = local_conv_model()
    image = np.random.default_rng(0).random((height, width, 3), dtype=np.float32)
    gates = torch.tensor([[0.2, 0.7, 0.1]])
    pad_h, pad_w = -height % 8, -width % 8
    padded = np.pad(
        image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect" if height > 1 else "edge"
    )
    with torch.no_grad():
        reference = model(torch.from_numpy(padded).permute(2, 0, 1)[None], gates=gates)
    reference = reference[0].permute(1, 2, 0).numpy()[:height, :width]
    plan = plan_tiles(height, width, tile=48, overlap=16, multiple=8)
    tiled = run_tiled(lambda t: model(t, gates=gates), image, plan, np.empty_like(image))
    np.testing.assert_allclose(tiled, reference, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_integer_outputs_are_rounded_to_the_nearest_level(dtype):
    """A network that brightens by 0.6 of a level gives one level more, not the input again
    (truncation would darken every restored file by half a level on average)."""
    top = np.iinfo(dtype).max
    image = (photo(20, 30).astype(np.float64) / 255 * (top - 1)).astype(dtype)
    plan = plan_tiles(20, 30, tile=None, multiple=8)
    out = run_tiled(lambda t: t + 0.6 / top, image, plan, np.empty_like(image))
    np.testing.assert_array_equal(out, image.astype(np.int64) + 1)


def test_single_tile_equals_direct_call_for_nafnet():
    model = tiny_model()
    image = photo(37, 50).astype(np.float32) / 255
    restorer = Restorer(model, tile=None)
    restored, routing = restorer.restore(image)
    padded = np.pad(image, ((0, 3), (0, 6), (0, 0)), mode="reflect")
    with torch.no_grad():
        direct = model(torch.from_numpy(padded).permute(2, 0, 1)[None], gates=routing.gates[None])
    np.testing.assert_allclose(restored, direct[0].permute(1, 2, 0).numpy()[:37, :50], atol=1e-4)


def test_a_given_routing_is_the_one_restored_with():
    """Video smoothing hands the restorer its own gates: they, not the router's, are used."""
    model = tiny_model()
    image = photo(32, 40).astype(np.float32) / 255
    restorer = Restorer(model, tile=None)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    for index in range(len(CLASSES)):
        gates = torch.eye(len(CLASSES))[index]
        restored, used = restorer.restore(image, Routing(list(CLASSES), gates))
        assert torch.equal(used.gates, gates)
        with torch.no_grad():
            direct = model(x, gates=gates[None])[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(restored, direct, atol=1e-5)


def test_a_routing_or_router_of_other_classes_is_refused_not_applied_by_index():
    """Gate i drives expert i: a Routing of another adapter's class order, or a router of
    other classes (grown after attaching), restored with the wrong experts, silently."""
    model = tiny_model()
    image = photo(32, 40).astype(np.float32) / 255
    restorer = Restorer(model, tile=None)
    reordered = Routing([*CLASSES[1:], CLASSES[0]], torch.eye(len(CLASSES))[0])
    with pytest.raises(RoutingError, match=r"routing is for the classes \['blur'.*restorer.route"):
        restorer.restore(image, reordered)
    model.loraxir_router.add_degradation("snow")
    for call in (restorer.route, restorer.restore):
        with pytest.raises(ConfigError, match=r"Router classes \[.*'snow'\] differ from the"):
            call(image)


@pytest.mark.parametrize(("height", "width"), [(37, 50), (1, 1), (16, 33)])
def test_model_call_reflect_pads_like_the_restorer(height, width):
    """``model(x)`` at sides NAFNet would pad with zeros inside itself: the model pads by
    reflection (as the restorer does) and crops back, instead of the backbone's zeros."""
    model = tiny_model()
    image = photo(height, width).astype(np.float32) / 255
    restored, routing = Restorer(model, tile=None).restore(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = model(x, gates=routing.gates[None])
        with loraxir.route(model, gates=routing.gates[None]):
            zero_padded = model.model(x)
    assert direct.shape == x.shape
    np.testing.assert_allclose(direct[0].permute(1, 2, 0).numpy(), restored, atol=1e-4)
    assert not torch.allclose(direct, zero_padded, atol=1e-3)


@pytest.mark.parametrize("dam", [False, True])
def test_every_tile_gets_the_whole_image_gates(dam):
    """The router runs once on the whole image; each tile's forward sees those gates (and,
    with DAM blocks, that image's embedding)."""
    model = _dam_model().eval() if dam else tiny_model()
    router = model.loraxir_router
    route_calls, seen = [], []
    original_views = router.make_views

    def counting_views(images):
        route_calls.append(tuple(images.shape))
        return original_views(images)

    router.make_views = counting_views
    model.model.register_forward_pre_hook(
        lambda *_: seen.append((model.routing.gates.clone(), model.routing.embedding))
    )
    restorer = Restorer(model, tile=32, overlap=8)
    image = photo(70, 90)
    _, routing = restorer.restore(image)
    assert route_calls == [(1, 3, 70, 90)]
    assert len(seen) == len(restorer.plan(70, 90)) > 4
    for gates, embedding in seen:
        torch.testing.assert_close(gates, routing.gates[None].expand_as(gates), rtol=0, atol=0)
        if dam:
            torch.testing.assert_close(embedding, routing.embedding[None], rtol=0, atol=0)


class _GatesOnlyRouter(torch.nn.Module):
    """A router as ``attach_router`` documents it: ``router(x) -> gates``, nothing else."""

    degradations, top_k = list(CLASSES), 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.eye(len(CLASSES))[[2] * images.shape[0]]


def test_a_routing_budget_under_one_pixel_is_refused():
    with pytest.raises(ConfigError, match="route_pixels must be a whole number >= 1, got 0"):
        Restorer(tiny_model(), route_pixels=0)


def test_a_router_that_only_gives_gates_restores_through_the_restorer():
    model = tiny_model()
    model.attach_router(_GatesOnlyRouter())
    image = photo(40, 56)
    restored, routing = Restorer(model, tile=None).restore(image)
    assert (routing.label, routing.confidence) == (CLASSES[2], 1.0)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        direct = (model(x)[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(restored.astype(int) - direct.astype(int)).max() <= 1


def test_a_second_forced_restorer_on_the_same_model_stops_the_first():
    """Restorers merge the model for their class: the first, run after a second merged its
    model for another class, would restore as that class and report its own."""
    model = tiny_model()
    image = photo(24, 40)
    first = Restorer(model, CLASSES[0], tile=None)
    before, _ = first.restore(image)
    Restorer(model, CLASSES[1], tile=None)
    with pytest.raises(RoutingError, match=f"merged for the fixed gate '{CLASSES[1]}'"):
        first.restore(image)
    model.merge(degradation=CLASSES[0])
    assert np.array_equal(first.restore(image)[0], before)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.zeros(8, 8, 3), "NumPy array .* got Tensor"),
        (np.zeros((8, 8), np.uint8), r"RGB image \(H, W, 3\), got shape \(8, 8\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"got shape \(1, 8, 8, 3\)"),
        (np.zeros((8, 8, 4), np.uint8), "drop alpha"),
        (np.zeros((8, 8, 3), np.int32), "uint8, uint16 or float pixels .* got int32"),
        (np.full((8, 8, 3), 200.0, np.float32), r"in \[0, 1\], got values in \[200, 200\].*by 255"),
        (np.full((8, 8, 3), np.nan), "NaN or infinite"),
    ],
)
def test_the_restorer_refuses_what_is_not_one_rgb_image(pixels, message):
    restorer = Restorer(tiny_model(), tile=None)
    for call in (restorer.route, restorer.restore):
        with pytest.raises(DataError, match=message):
            call(pixels)


@pytest.mark.parametrize("route_pixels", [16_000_000, 300])
def test_16_bit_images_route_as_their_8_bit_version(route_pixels):
    """The router sees 16-bit pixels scaled by 65535, whole or area-downscaled."""
    model = tiny_model()
    eight = photo(40, 56)
    sixteen = eight.astype(np.uint16) * 257
    restorer = Restorer(model, tile=None, route_pixels=route_pixels)
    a, b = restorer.route(eight), restorer.route(sixteen)
    torch.testing.assert_close(b.probabilities, a.probabilities, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.gates, a.gates, atol=1e-5, rtol=1e-4)


def test_the_restorers_own_float_output_restores_again():
    """Float outputs are not clipped (a network's overshoot), and they are valid inputs."""
    restorer = Restorer(tiny_model(), tile=None)
    once, _ = restorer.restore(photo(24, 40).astype(np.float32) / 255)
    assert once.min() < 0 or once.max() > 1  # the random tiny network overshoots
    twice, _ = restorer.restore(once)
    assert twice.shape == once.shape


def test_restorer_settings_of_the_wrong_kind_are_refused_before_the_model_changes():
    model = tiny_model()
    for dtype in ("float16", torch.int8):
        with pytest.raises(ConfigError, match="dtype must be a float torch dtype"):
            Restorer(model, CLASSES[0], tile=None, dtype=dtype)
        assert not model.merged
    with pytest.raises(ConfigError, match="routing must be a Routing"):
        Restorer(model, tile=None).restore(photo(8, 8), routing=CLASSES[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"upscale": 2, "upsampler": "pixelshuffle"}, r"to \(3, 48, 96\).*super-resolution"),
        ({"in_chans": 1}, "takes 1-channel images, but the restorer .* feeds RGB"),
    ],
)
def test_networks_that_change_size_or_take_other_channels_are_refused_by_name(options, message):
    """A x2 SwinIR crashed in NumPy broadcasting, and a grayscale one was told to convert
    images the CLI had itself made RGB."""
    backbone = loraxir.create_backbone("swinir-tiny", **options)
    model = loraxir.get_loraxir_model(backbone, loraxir.LoraIRConfig(degradations=["a", "b"]))
    with pytest.raises(ConfigError, match=message):
        Restorer(model.eval(), "a", tile=None).restore(photo(24, 48))
