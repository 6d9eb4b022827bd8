"""DAM blocks: identity at insertion, the formula, insertion checks, training, save/load."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import loraxir
from loraxir import ConfigError, LoraIRConfig, RoutingError, TargetModulesError
from loraxir.config import DAMConfig
from loraxir.guidance import (
    DAMBlock,
    GuidedBackbone,
    dam_config,
    dam_points,
    dam_state_dict,
    insert_dam,
    load_dam,
    remove_dam,
    runs_dam_block,
    save_dam,
)
from loraxir.router import DegradationRouter
from loraxir.routing import RoutingState
from tests.conftest import randomize_experts, rel_err

DEGRADATIONS = ["noise", "rain", "haze"]
EMBED_DIM = 16

# (backbone, the family's default points, input size)
FAMILY_CASES = [
    ("nafnet-tiny", ["encoders.0", "encoders.1", "middle_blks"], 32),
    ("restormer-tiny", ["encoder_level1", "encoder_level2", "encoder_level3", "latent"], 32),
    ("swinir-tiny", ["layers.0", "layers.1"], 32),
]


def _router(seed: int = 8) -> DegradationRouter:
    torch.manual_seed(seed)
    return DegradationRouter.from_encoder(
        "cnn-tiny", degradations=DEGRADATIONS, embed_dim=EMBED_DIM
    ).eval()


def _perturb_dam(backbone: torch.nn.Module, scale: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "loraxir_dam." in name:
                param.normal_(0.0, scale)


def _reference_dam(block: DAMBlock, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The formula written out independently, for (B, C, H, W) inputs."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    normed = (x - mean) / torch.sqrt(var + 1e-5)
    hidden = torch.nn.functional.gelu(embedding @ block.mlp[0].weight.T + block.mlp[0].bias)
    gate = torch.sigmoid(hidden @ block.mlp[2].weight.T + block.mlp[2].bias)
    return x + block.beta.view(1, -1, 1, 1) * normed * gate[:, :, None, None]


@pytest.mark.parametrize(("name", "points", "size"), FAMILY_CASES)
def test_insertion_at_family_points_is_bit_identical_and_trained_blocks_change_output(
    name, points, size
):
    backbone = loraxir.create_backbone(name).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = backbone(x)
    routing = RoutingState()
    assert insert_dam(backbone, None, EMBED_DIM, routing) == points
    assert [n for n, m in backbone.named_modules() if runs_dam_block(m)] == points
    embedding = torch.randn(2, EMBED_DIM)
    with torch.no_grad(), routing.activate(None, embedding):
        assert torch.equal(backbone(x), expected)
        _perturb_dam(backbone)
        assert rel_err(backbone(x), expected) > 1e-3
    remove_dam(backbone)  # trained blocks and all: the backbone is as before insertion
    assert not any(runs_dam_block(m) for m in backbone.modules()) and dam_config(backbone) is None
    with torch.no_grad():
        assert torch.equal(backbone(x), expected)


def test_guided_backbone_refuses_what_its_network_cannot_take_by_name():
    backbone = loraxir.create_backbone("nafnet-tiny")
    with pytest.raises(ConfigError, match=r"needs a router .* got NoneType"):
        GuidedBackbone(backbone, None)
    with pytest.raises(ConfigError, match="routing must be the RoutingState"):
        insert_dam(backbone, None, EMBED_DIM, None)
    assert dam_config(backbone) is None
    guided = GuidedBackbone(backbone, _router())
    for images, message in [
        (torch.rand(1, 1, 32, 32), r"3-channel images, got 1"),
        (torch.rand(1, 3, 32, 32).numpy(), "torch.Tensor"),
        (torch.rand(3, 32, 32), r"x\[None\]"),
    ]:
        with pytest.raises(loraxir.DataError, match=message):
            guided(images)


def test_scunet_points_get_the_width_of_their_whole_input():
    backbone = loraxir.create_backbone("scunet-tiny")
    insert_dam(backbone, None, EMBED_DIM, RoutingState())
    assert {block.point: block.channels for block in backbone.loraxir_dam.values()} == {
        "m_down1": 64,
        "m_down2": 128,
        "m_down3": 256,
        "m_body": 512,
    }


def test_block_matches_the_formula_for_images_tokens_and_window_major_tokens():
    torch.manual_seed(1)
    block = DAMBlock(6, EMBED_DIM)
    with torch.no_grad():
        block.beta.normal_()
    x = torch.randn(2, 6, 5, 4)
    embedding = torch.randn(2, EMBED_DIM)
    expected = _reference_dam(block, x, embedding)
    assert rel_err(block(x, embedding), expected) < 1e-6
    with pytest.raises(ConfigError, match=r"has 6 channels but its input has shape \(2, 7, 5, 4\)"):
        block(torch.randn(2, 7, 5, 4), embedding)
    with pytest.raises(ConfigError, match=r"channels last .* after inputs with channels first"):
        block(x.permute(0, 2, 3, 1), embedding)  # a point's input keeps its layout
    with pytest.raises(RoutingError, match=r"embeddings of 16 dimensions.*got shape \(2, 7\)"):
        block(x, torch.randn(2, 7))
    tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
    token_block = DAMBlock(6, EMBED_DIM)  # the same weights, at a point that takes tokens
    token_block.load_state_dict(block.state_dict())
    assert rel_err(token_block(tokens, embedding), expected.flatten(2).transpose(1, 2)) < 1e-6
    # Window-major: image 0's four windows of five tokens first, then image 1's.
    windows = tokens.reshape(2 * 4, 5, 6)
    assert (
        rel_err(
            token_block(windows, embedding), expected.flatten(2).transpose(1, 2).reshape(8, 5, 6)
        )
        < 1e-6
    )
    with pytest.raises(ConfigError, match="whole number per image"):
        token_block(torch.randn(3, 5, 6), embedding)


def test_a_channels_last_point_keeps_its_layout_on_maps_as_tall_as_their_channels():
    """(B, 6, 6, 6) reads either way: after channels-last inputs it is channels last."""
    torch.manual_seed(2)
    block = DAMBlock(6, EMBED_DIM)
    with torch.no_grad():
        block.beta.normal_()
    embedding = torch.randn(2, EMBED_DIM)
    block(torch.randn(2, 4, 5, 6), embedding)  # channels last, unambiguous
    square = torch.randn(2, 6, 6, 6)
    expected = _reference_dam(block, square.permute(0, 3, 1, 2), embedding).permute(0, 2, 3, 1)
    assert rel_err(block(square, embedding), expected) < 1e-6


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (["encoders.0", "encoderz.1"], r"\['encoderz.1'\] name no module.*encoders.1"),
        (r"encoder\.\d+", r"name no module"),
        ({"middle_blks": 32, "middle": 4}, r"\['middle'\] name no module"),
        # NAFNet iterates its ModuleList of levels: a block in front of it never ran.
        (["encoders"], r"iterates and never calls.*'encoders'\.0"),
        ("encoders(", "not a valid regular expression"),
    ],
)
def test_bad_points_are_refused_before_the_backbone_is_touched(points, message):
    backbone = loraxir.create_backbone("nafnet-tiny")
    before = set(backbone.state_dict())
    with pytest.raises((TargetModulesError, ConfigError), match=message):
        insert_dam(backbone, points, EMBED_DIM, RoutingState())
    assert set(backbone.state_dict()) == before
    assert not hasattr(backbone, "loraxir_dam")
    assert not any(module._forward_pre_hooks for module in backbone.modules())


def test_points_without_defaults_or_twice_are_refused():
    with pytest.raises(TargetModulesError, match="no backbone family names defaults"):
        dam_points(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(TargetModulesError, match="bare Sequential"):
        dam_points(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), ["0"])
    backbone = loraxir.create_backbone("nafnet-tiny")
    insert_dam(backbone, ["middle_blks"], EMBED_DIM, RoutingState())
    with pytest.raises(TargetModulesError, match="'middle_blks' already has a DAM block"):
        insert_dam(backbone, ["encoders.0", "middle_blks"], EMBED_DIM, RoutingState())
    assert list(dam_config(backbone).points) == ["middle_blks"]


def test_guided_backbone_trains_backbone_and_dam_not_the_router_and_survives_checkpointing():
    backbone = loraxir.create_backbone("nafnet-tiny")
    guided = GuidedBackbone(backbone, _router()).train()
    _perturb_dam(backbone)
    x = torch.rand(2, 3, 32, 32)

    def gradients(run) -> dict[str, torch.Tensor]:
        guided.zero_grad(set_to_none=True)
        run(x).square().mean().backward()  # backward after the call has returned
        return {n: p.grad.clone() for n, p in guided.named_parameters() if p.grad is not None}

    plain = gradients(guided)
    dam = {n for n in plain if "loraxir_dam" in n}
    assert len(dam) == 3 * 5 and all(plain[n].abs().sum() > 0 for n in dam)
    assert not any(n.startswith("router.") for n in plain)
    assert {id(p) for p in guided.trainable_parameters()} == {
        id(p) for n, p in guided.named_parameters() if not n.startswith("router.")
    }

    def checkpointed(images):
        embedding = guided.router.route(images).embedding.detach()
        with guided.routing.activate(None, embedding):
            return checkpoint(backbone, images, use_reentrant=False)

    recomputed = gradients(checkpointed)
    assert recomputed.keys() == plain.keys()
    assert max(rel_err(recomputed[n], plain[n]) for n in plain) < 1e-6


def test_guided_backbone_folder_round_trip_keeps_backbone_keys_native(tmp_path):
    from safetensors.torch import load_file

    plain_keys = set(loraxir.create_backbone("nafnet-tiny").state_dict())
    guided = GuidedBackbone(loraxir.create_backbone("nafnet-tiny"), _router()).eval()
    _perturb_dam(guided.backbone)
    x = torch.rand(2, 3, 32, 32)
    guided.save_pretrained(tmp_path / "pre")
    assert set(load_file(tmp_path / "pre" / "backbone.safetensors")) == plain_keys
    restored = GuidedBackbone.from_pretrained(tmp_path / "pre").eval()
    with torch.no_grad():
        assert torch.equal(restored(x), guided(x))


def test_dam_file_loads_onto_a_plain_backbone_and_refuses_another_width(tmp_path):
    source = loraxir.create_backbone("nafnet-tiny")
    insert_dam(source, None, EMBED_DIM, RoutingState())
    _perturb_dam(source)
    save_dam(source, tmp_path / "dam.safetensors")
    target = loraxir.create_backbone("nafnet-tiny")
    assert load_dam(target, tmp_path / "dam.safetensors") == [
        "encoders.0",
        "encoders.1",
        "middle_blks",
    ]
    saved, loaded = dam_state_dict(source), dam_state_dict(target)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())
    from safetensors import safe_open

    with safe_open(tmp_path / "dam.safetensors", "pt") as handle:  # one entry: its order
        assert list(handle.metadata()) == ["loraxir_dam"]  # cannot vary between processes
    wider = loraxir.create_backbone("nafnet-tiny", width=16)
    with pytest.raises(loraxir.CheckpointError, match="do not fit this backbone"):
        load_dam(wider, tmp_path / "dam.safetensors")
    assert not hasattr(wider, "loraxir_dam")
    # Onto blocks already there (a GuidedBackbone's): they keep reading its routing state.
    guided = GuidedBackbone(loraxir.create_backbone("nafnet-tiny"), _router()).eval()
    load_dam(guided.backbone, tmp_path / "dam.safetensors")
    with torch.no_grad():
        guided(torch.rand(1, 3, 32, 32))  # raised: a DAM block ran without an embedding


def _backbone() -> torch.nn.Module:
    """The same random base network every time: adapters do not hold base weights."""
    torch.manual_seed(7)
    return loraxir.create_backbone("nafnet-tiny")


def _dam_model(**config) -> loraxir.LoraIRModel:
    model = loraxir.get_loraxir_model(
        _backbone(),
        LoraIRConfig(degradations=DEGRADATIONS, dam=DAMConfig(embed_dim=EMBED_DIM), **config),
        router=_router(),
    ).eval()
    randomize_experts(model)
    _perturb_dam(model.model)
    return model


def test_a_router_whose_embedding_the_dam_blocks_cannot_read_is_refused_up_front():
    backbone = _backbone()
    before = set(backbone.state_dict())
    config = LoraIRConfig(degradations=DEGRADATIONS, dam=DAMConfig(embed_dim=EMBED_DIM + 1))
    with pytest.raises(ConfigError, match=f"embedding has {EMBED_DIM} values.*{EMBED_DIM + 1}"):
        loraxir.get_loraxir_model(backbone, config, router=_router())
    assert set(backbone.state_dict()) == before


def test_trainable_policy_freezes_dam_for_experts_and_trains_it_for_all():
    frozen = _dam_model()
    dam = [p for n, p in frozen.named_parameters() if "loraxir_dam" in n]
    assert len(dam) == 15 and not any(p.requires_grad for p in dam)
    everything = _dam_model(trainable="all")
    assert all(p.requires_grad for n, p in everything.named_parameters() if "loraxir_dam" in n)


def test_adapter_with_dam_restores_outputs_through_loraxir_and_peft(tmp_path):
    from peft import PeftModel

    model = _dam_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "ours")
    loaded = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "ours")
    by_peft = PeftModel.from_pretrained(_backbone(), tmp_path / "ours")
    by_peft.save_pretrained(tmp_path / "peft")
    reloaded = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(by_peft(x), expected)
        assert torch.equal(reloaded(x), expected)


def test_a_failed_peft_load_keeps_the_networks_pretrained_dam_blocks(tmp_path):
    """The undo of a refused load took out every DAM block, also those a GuidedBackbone
    had pre-trained before: it then ran without them, silently."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _dam_model().save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
    del tensors[next(key for key in tensors if ".loraxir_experts." in key)]
    save_file(tensors, weights, metadata=metadata)
    guided = GuidedBackbone(_backbone(), _router()).eval()
    _perturb_dam(guided.backbone)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = guided(x)
    with pytest.raises(loraxir.CheckpointError, match="missing"):
        PeftModel.from_pretrained(guided.backbone, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(guided(x), before)


def test_dam_blocks_inserted_after_wrapping_are_refused_at_save(tmp_path):
    """The folder held DAM tensors under a config without DAM, which no loader takes."""
    model = loraxir.get_loraxir_model(
        _backbone(), LoraIRConfig(degradations=DEGRADATIONS), router=_router()
    )
    insert_dam(model.model, None, EMBED_DIM, model.routing)
    with pytest.raises(ConfigError, match=r"inserted after wrapping.*dam=DAMConfig\(points="):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_old_classes_given_by_name_keep_their_outputs_when_a_class_is_added():
    """Their DAM embeddings are the router's fitted rows; dropping them changed the outputs
    (by 0.56 on the shipped adapter)."""
    model = _dam_model()
    labels = torch.arange(len(DEGRADATIONS)).repeat(2)
    model.loraxir_router.fit_class_embeddings([(torch.rand(len(labels), 3, 32, 32), labels)])
    x = torch.rand(len(DEGRADATIONS), 3, 32, 32)
    with torch.no_grad():
        before = model(x, degradation=DEGRADATIONS)
        model.add_degradation("snow")
        assert torch.equal(model(x, degradation=DEGRADATIONS), before)
        assert model(x[:1], degradation="snow").shape == (1, 3, 32, 32)


def test_a_dam_point_on_a_layer_that_gets_experts_is_refused_before_anything_changes():
    """The experts would compute the layer themselves and skip the DAM block's hook."""
    backbone = _backbone()
    before = set(backbone.state_dict())
    dam = DAMConfig(embed_dim=EMBED_DIM, points=["intro"])
    config = LoraIRConfig(degradations=DEGRADATIONS, dam=dam)
    with pytest.raises(TargetModulesError, match="'intro' is also a DAM point"):
        loraxir.get_loraxir_model(backbone, config, router=_router())
    assert set(backbone.state_dict()) == before


def test_dam_config_must_match_blocks_already_on_the_backbone():
    backbone = loraxir.create_backbone("nafnet-tiny")
    GuidedBackbone(backbone, _router())
    with pytest.raises(ConfigError, match="config has dam=None"):
        loraxir.get_loraxir_model(backbone, LoraIRConfig(degradations=DEGRADATIONS))
    with pytest.raises(ConfigError, match="the config asks for"):
        loraxir.get_loraxir_model(
            backbone,
            LoraIRConfig(degradations=DEGRADATIONS, dam=DAMConfig(embed_dim=EMBED_DIM + 1)),
        )
    assert not any(".loraxir_experts." in key for key in backbone.state_dict())


def test_merge_and_unload_keeps_dam_blocks_in_the_plain_backbone():
    model = _dam_model()
    router = model.loraxir_router
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, degradation="haze")
    plain = model.merge_and_unload(degradation="haze")
    assert list(dam_config(plain).points) == ["encoders.0", "encoders.1", "middle_blks"]
    assert not any(".loraxir_experts." in key for key in plain.state_dict())
    with torch.no_grad():
        assert rel_err(GuidedBackbone(plain, router)(x), expected) < 1e-5


def test_pretrained_blocks_are_kept_when_experts_attach():
    guided = GuidedBackbone(_backbone(), _router()).eval()
    _perturb_dam(guided.backbone)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = guided(x)
    config = LoraIRConfig(degradations=DEGRADATIONS, dam=guided.dam)
    model = loraxir.get_loraxir_model(guided.backbone, config, router=guided.router).eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # fresh experts: the pre-trained function
    assert not any(p.requires_grad for n, p in model.named_parameters() if "loraxir_dam" in n)


def test_dam_embeddings_follow_their_images_when_a_batch_runs_by_gate_row():
    model = _dam_model()
    x = torch.rand(3, 3, 32, 32)
    gates = torch.eye(len(DEGRADATIONS))[[1, 0, 1]]
    with torch.no_grad():
        out = model(x, gates=gates)
        one_by_one = torch.cat([model(x[i : i + 1], gates=gates[i : i + 1]) for i in range(3)])
        # The same images with images 0 and 2 given each other's DAM embedding.
        swapped_embedding = model.loraxir_router.route(x.flip(0)).embedding
        with loraxir.route(model, gates=gates, embedding=swapped_embedding):
            swapped = model.model(x)
    assert rel_err(out, one_by_one) < 1e-5
    assert rel_err(out, swapped) > 1e-3


@pytest.mark.parametrize("compute", ["activation", "auto"])
def test_chunked_cpu_inference_gives_each_image_its_own_dam_embedding(compute):
    """Split into chunks (``inference_chunk_pixels``), every image keeps the router's gates
    and degradation embedding: the output equals one call's."""
    model = _dam_model(compute=compute)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        model.inference_chunk_pixels = None
        whole = model(x)
        model.inference_chunk_pixels = 2 * 32 * 32
        chunked = model(x)
    assert rel_err(chunked, whole) < 1e-6


def _fit_class_embeddings(router: DegradationRouter) -> list[torch.Tensor]:
    """Fit on two random batches; returns the images of each class, in class order."""
    torch.manual_seed(3)
    images = torch.rand(9, 3, 24, 24)
    labels = [DEGRADATIONS[i % 3] for i in range(9)]
    router.fit_class_embeddings([(images[:5], labels[:5]), (images[5:], labels[5:])])
    return [images[i::3] for i in range(3)]


def test_fitted_class_embeddings_are_each_class_mean_embedding_and_round_trip(tmp_path):
    model = _dam_model()
    router = model.loraxir_router
    per_class = _fit_class_embeddings(router)
    with torch.no_grad():
        means = torch.stack([router.embed(images).mean(0) for images in per_class])
    torch.testing.assert_close(router.class_embeddings, means)
    model.save_pretrained(tmp_path / "adapter")
    loaded = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "adapter")
    assert torch.equal(loaded.loraxir_router.class_embeddings, router.class_embeddings)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, degradation="rain"), model(x, degradation="rain"))
    unfitted = {k: v for k, v in router.adapter_state_dict().items() if k != "class_embeddings"}
    loaded.loraxir_router.load_adapter_state_dict(unfitted)
    assert loaded.loraxir_router.class_embeddings is None


def test_class_embeddings_survive_peft_load_and_save(tmp_path):
    """peft's PeftModel loads the fitted class embeddings of our adapter (a given class
    restores as with our loader) and writes them back when it saves."""
    from peft import PeftModel

    model = _dam_model()
    _fit_class_embeddings(model.loraxir_router)
    model.save_pretrained(tmp_path / "ours")
    by_peft = PeftModel.from_pretrained(_backbone(), tmp_path / "ours")
    by_peft.save_pretrained(tmp_path / "peft")
    reloaded = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "peft")
    fitted = model.loraxir_router.class_embeddings
    assert torch.equal(by_peft.base_model.loraxir_router.class_embeddings, fitted)
    assert torch.equal(reloaded.loraxir_router.class_embeddings, fitted)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, degradation="rain")
        assert torch.equal(by_peft.base_model(x, degradation="rain"), expected)
        assert torch.equal(reloaded(x, degradation="rain"), expected)


def test_a_given_class_drives_dam_with_its_class_embedding_and_skips_the_router():
    model = _dam_model()
    router = model.loraxir_router
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        routed_before = model(x)
        given_before = model(x, degradation="haze")
    _fit_class_embeddings(router)
    calls = []
    router.mlp.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        given = model(x, degradation="haze")
        assert not calls  # the class embedding replaces the router's pass
        with loraxir.route(model, degradation="haze", embedding=router.class_embeddings[2:3]):
            by_hand = model.model(x)
        with loraxir.route(model, degradation="haze"):
            pinned = model.model(x)
        mixed = model(x, gates=torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
        by_hand_mixed = torch.cat(
            [
                model(x[:1], gates=torch.tensor([[0.0, 0.5, 0.5]])),
                model(x[1:], degradation="noise"),
            ]
        )
        routed = model(x)
        model.merge(degradation="haze")
        merged = model(x)
    assert rel_err(given, by_hand) < 1e-6 and torch.equal(pinned, by_hand)
    assert rel_err(given, given_before) > 1e-3
    assert rel_err(merged, given) < 1e-5
    assert rel_err(mixed, by_hand_mixed) < 1e-5
    assert torch.equal(routed, routed_before)  # routed calls keep the image's embedding


def test_a_pinned_embedding_of_another_width_or_row_count_is_refused():
    """One of another width failed inside the block's MLP; two rows for four images were
    spread as images [0, 0, 1, 1] without a word."""
    model = _dam_model()
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(RoutingError, match=rf"\(1 or B, {EMBED_DIM}\) tensor.*got \(1, 7\)"):
        with loraxir.route(model, degradation="rain", embedding=torch.randn(1, 7)):
            pass
    with torch.no_grad(), pytest.raises(RoutingError, match=r"embedding for 2 images.*has 4"):
        with loraxir.route(model, degradation="rain", embedding=torch.randn(2, EMBED_DIM)):
            model(x)


def test_blocks_of_another_embedding_width_are_not_added_beside_existing_ones():
    """save_dam then wrote a file load_dam refused."""
    backbone = _backbone()
    insert_dam(backbone, ["encoders.0"], EMBED_DIM, RoutingState())
    with pytest.raises(ConfigError, match=rf"embeddings of \[{EMBED_DIM}\] dimensions, not 8"):
        insert_dam(backbone, ["middle_blks"], 8, RoutingState())
    assert len(backbone.loraxir_dam) == 1, "nothing added"


def test_a_block_compiles_after_eager_calls_at_several_sizes():
    """The layout it remembers from eager calls is read, not recorded, in a compiled graph
    (a recompile for a new size failed on symbolic shapes)."""
    torch.manual_seed(0)
    block = DAMBlock(8, EMBED_DIM).eval()
    with torch.no_grad():
        block.beta.normal_()
    embedding = torch.randn(1, EMBED_DIM)
    with torch.no_grad():
        block(torch.rand(1, 8, 32, 32), embedding)  # e.g. a validation pass first
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="eager")
        for side in (32, 24, 8):
            x = torch.rand(1, 8, side, side)
            assert torch.equal(compiled(x, embedding), block(x, embedding)), side


def test_a_compiled_direct_call_reads_no_finished_calls_routing():
    """Compiled, a direct backbone call ran with the last routed call's embedding and gates
    (eager raises): reading was allowed whenever torch was compiling."""
    model = _dam_model()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model(x, degradation="rain")
        torch._dynamo.reset()
        compiled = torch.compile(model.model, backend="eager")
        with pytest.raises(RoutingError, match="gates of a finished call are not reused"):
            compiled(x)
        gates = torch.tensor([[0.0, 1.0, 0.0]])
        embedding = model.loraxir_router.route(x).embedding
        with loraxir.route(model, gates=gates, embedding=embedding):  # how to run it compiled
            out = compiled(x)
        torch.testing.assert_close(out, model(x, gates=gates))


@pytest.mark.parametrize(
    "route",
    [
        {},
        {"degradation": "rain"},
        {"gates": torch.tensor([0.0, 1.0, 0.0])},
        {"gates": torch.zeros(0, 3)},
    ],
)
def test_an_empty_batch_gives_an_empty_output_with_dam_blocks(route):
    """Routers refuse an empty batch and a DAM block cannot spread zero embeddings: the
    call still answers with no images, as it does without DAM."""
    model = _dam_model()
    with torch.no_grad():
        assert model(torch.rand(0, 3, 32, 48), **route).shape == (0, 3, 32, 48)


def test_threads_sharing_one_model_get_their_own_routing():
    """Gates and embedding live in the model's routing state: without the lock, one
    thread's call read the other's (a different expert and DAM embedding) mid-call."""
    model = _dam_model()
    images = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        alone = [
            model(x, gates=gate[None]) for x, gate in zip(images, torch.eye(3)[:2], strict=True)
        ]
    found: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(index: int) -> None:
        with torch.no_grad():
            for _ in range(12):
                found[index].append(model(images[index], gates=torch.eye(3)[index][None]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert len(found[index]) == 12
        assert all(torch.equal(out, alone[index]) for out in found[index])


def test_a_model_copies_after_a_call_whose_gates_train():
    """A training call with a router that trains keeps its gates and embedding (autograd
    graph tensors) for activation checkpointing; deepcopy refuses those, and a copy (EMA,
    ``copy.deepcopy(model).unload()`` as the docs advise) must not need them."""
    model = _dam_model(trainable="experts+router").train()
    model(torch.rand(2, 3, 32, 32)).mean().backward()
    twin = copy.deepcopy(model).eval()
    assert twin.routing.gates is None and twin.routing.lock is not model.routing.lock
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin(x), model.eval()(x))


def test_a_guided_backbone_takes_whole_images_of_any_size():
    """Validation on whole images called the bare Restormer, which cannot halve odd sides:
    the guided network pads them (by reflection, as LoraIRModel does) and crops back."""
    guided = GuidedBackbone(loraxir.create_backbone("restormer-tiny"), _router()).eval()
    with torch.no_grad():
        out = guided(torch.rand(1, 3, 37, 45))
    assert out.shape == (1, 3, 37, 45) and torch.isfinite(out).all()


def test_worker_threads_inside_a_route_block_find_its_gates():
    """A thread pool running tiles inside loraxir.route (as tiled code may): the block must
    not hold the model's lock, or every worker's call waits for the block to end."""
    from concurrent.futures import ThreadPoolExecutor

    model = _dam_model()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, degradation="rain")
        with loraxir.route(model, degradation="rain"), ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(model, x) for _ in range(4)]
            outputs = [future.result(timeout=60) for future in futures]
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_direct_backbone_call_never_reads_another_threads_call():
    """Direct calls take no lock: one made in a route block, or outside any, while another
    thread's call ran read that call's gates (its experts, silently)."""
    model = _dam_model()
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    embedding = model.loraxir_router.route(x).embedding
    with torch.no_grad(), loraxir.route(model, degradation="rain", embedding=embedding):
        pinned = model.model(x)
        alone = model(y, degradation="haze")
    started, inside, release = threading.Event(), threading.Event(), threading.Event()
    found = {}

    def pause(module, args):
        if threading.current_thread().name == "other":
            inside.set()
            assert release.wait(30)

    def other() -> None:
        started.set()
        with torch.no_grad():
            found["other"] = model(y, degradation="haze")

    hook = model.model.register_forward_pre_hook(pause)
    try:
        with torch.no_grad(), loraxir.route(model, degradation="rain", embedding=embedding):
            thread = threading.Thread(target=other, name="other")
            thread.start()
            assert started.wait(30)
            assert not inside.wait(0.5), "it waits for this block to end"
            assert torch.equal(model.model(x), pinned)
            release.set()
        thread.join(60)
        torch.testing.assert_close(found["other"], alone)
        inside.clear()
        release.clear()
        thread = threading.Thread(target=other, name="other")
        thread.start()
        assert inside.wait(30)  # its call is running, with its gates live
        with torch.no_grad(), pytest.raises(RoutingError, match="not reused"):
            model.model(x)
        release.set()
        thread.join(60)
    finally:
        release.set()
        hook.remove()


def test_a_merge_from_another_thread_waits_for_a_running_call():
    """merge() took no lock: a call's later layers ran weights merged for another class."""
    model = _dam_model()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        alone = model(x, degradation="rain")
    inside, release, merged = threading.Event(), threading.Event(), threading.Event()
    found = {}

    def pause(module, args):
        if threading.current_thread().name == "caller":
            inside.set()
            assert release.wait(30)

    def caller() -> None:
        with torch.no_grad():
            found["out"] = model(x, degradation="rain")

    def merger() -> None:
        model.merge(degradation="haze")
        merged.set()

    hook = model.model.encoders[1].register_forward_pre_hook(pause)  # mid-network
    threads = [threading.Thread(target=caller, name="caller"), threading.Thread(target=merger)]
    try:
        threads[0].start()
        assert inside.wait(30)
        threads[1].start()
        assert not merged.wait(0.5), "the merge waits for the call"
        release.set()
        for thread in threads:
            thread.join(60)
    finally:
        release.set()
        hook.remove()
    assert merged.is_set() and model.merged
    torch.testing.assert_close(found["out"], alone)


def test_route_blocks_in_two_threads_take_turns():
    """Each block restored the state it found: blocks that ended out of order crossed each
    other's gates and left the model pinned after both had ended."""
    model = _dam_model()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        rain, haze = model(x, degradation="rain"), model(x, degradation="haze")
    entered, second_pinned, first_called = threading.Event(), threading.Event(), threading.Event()
    found = {}

    def first() -> None:
        with torch.no_grad(), loraxir.route(model, degradation="rain"):
            entered.set()
            second_pinned.wait(0.5)  # it cannot, while this block holds the model
            found["first"] = model(x)
            first_called.set()

    def second() -> None:
        entered.wait(30)
        with torch.no_grad(), loraxir.route(model, degradation="haze"):
            second_pinned.set()
            first_called.wait(30)
            found["second"] = model(x)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    torch.testing.assert_close(found["first"], rain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found["second"], haze, rtol=1e-5, atol=1e-6)
    assert not model.routing.pinned
