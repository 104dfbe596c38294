"""open_clip <-> HF CLIPVisionModel conversion: exact round trip, forward equivalence, refusals."""

import pickle

import pytest
import torch
import torch.nn.functional as F

from adpo.openclip import (
    UnsafeCheckpointError,
    clip_vision_model_to_openclip,
    load_state_dict_file,
    openclip_to_clip_vision_model,
    save_state_dict_file,
)

HIDDEN, LAYERS, HEADS, PATCH, GRID, MLP, EMBED = 32, 2, 4, 4, 3, 48, 16


def random_openclip_state(seed=0, layers=LAYERS, grid=GRID, hidden=HIDDEN):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "conv1.weight": rand(hidden, 3, PATCH, PATCH),
        "class_embedding": rand(hidden),
        "positional_embedding": rand(grid * grid + 1, hidden),
        "ln_pre.weight": 1 + rand(hidden),
        "ln_pre.bias": rand(hidden),
        "ln_post.weight": 1 + rand(hidden),
        "ln_post.bias": rand(hidden),
        "proj": rand(hidden, EMBED),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        state |= {
            block + "ln_1.weight": 1 + rand(hidden),
            block + "ln_1.bias": rand(hidden),
            block + "attn.in_proj_weight": rand(3 * hidden, hidden),
            block + "attn.in_proj_bias": rand(3 * hidden),
            block + "attn.out_proj.weight": rand(hidden, hidden),
            block + "attn.out_proj.bias": rand(hidden),
            block + "ln_2.weight": 1 + rand(hidden),
            block + "ln_2.bias": rand(hidden),
            block + "mlp.c_fc.weight": rand(MLP, hidden),
            block + "mlp.c_fc.bias": rand(MLP),
            block + "mlp.c_proj.weight": rand(hidden, MLP),
            block + "mlp.c_proj.bias": rand(hidden),
        }
    return state


def reference_openclip_forward(state, pixels, heads, activation):
    """open_clip VisionTransformer forward written from the state dict with plain torch ops.

    Returns (all token states after the last block, projected pooled embedding)."""
    act = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}[activation]
    hidden = state["conv1.weight"].shape[0]
    patch = state["conv1.weight"].shape[-1]
    x = F.conv2d(pixels, state["conv1.weight"], stride=patch)  # [B, D, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, D]
    cls = state["class_embedding"].expand(x.shape[0], 1, hidden)
    x = torch.cat([cls, x], dim=1) + state["positional_embedding"]
    ln = lambda t, name: F.layer_norm(t, (hidden,), state[name + ".weight"], state[name + ".bias"], eps=1e-5)
    x = ln(x, "ln_pre")
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        qkv = F.linear(h, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"])
        q, k, v = qkv.chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (heads, hidden // heads)).transpose(1, 2)  # [B, H, T, d]
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).flatten(2)
        x = x + F.linear(attended, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"])
        h = ln(x, p + "ln_2")
        h = F.linear(act(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])),
                     state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        x = x + h
    pooled = ln(x[:, 0], "ln_post")
    return x, pooled @ state["proj"]


def test_round_trip_gives_identical_tensors():
    state = random_openclip_state()
    conversion = openclip_to_clip_vision_model(
        state, hidden_act="quick_gelu", num_attention_heads=HEADS, with_projection=True
    )
    back = clip_vision_model_to_openclip(conversion.model)
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    # every key accounted for, each mapped to at least one HF key
    assert set(conversion.key_map) == set(state) and not conversion.unused
    assert conversion.config.image_size == GRID * PATCH and conversion.config.num_hidden_layers == LAYERS


def test_head_count_inferred_from_conventional_width_is_recorded():
    with pytest.raises(ValueError, match="pass num_attention_heads"):
        openclip_to_clip_vision_model(random_openclip_state(), hidden_act="quick_gelu")  # 32 is not a multiple of 64
    conversion = openclip_to_clip_vision_model(random_openclip_state(hidden=128), hidden_act="quick_gelu")
    assert conversion.config.num_attention_heads == 2
    assert any("inferred" in note for note in conversion.assumptions)


def test_without_projection_proj_is_reported_unused():
    state = random_openclip_state()
    conversion = openclip_to_clip_vision_model(state, hidden_act="quick_gelu", num_attention_heads=HEADS)
    assert "proj" in conversion.unused and "proj" not in conversion.key_map
    assert set(conversion.key_map) | set(conversion.unused) == set(state)
    back = clip_vision_model_to_openclip(conversion.model)
    assert set(back) == set(state) - {"proj"}


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_reference_forward_matches_hf(activation):
    state = random_openclip_state(seed=1)
    model = openclip_to_clip_vision_model(
        state, hidden_act=activation, num_attention_heads=HEADS, with_projection=True
    ).model
    pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(2))
    tokens, embeds = reference_openclip_forward(state, pixels, HEADS, activation)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    torch.testing.assert_close(out.last_hidden_state, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_embeds, embeds, atol=1e-5, rtol=1e-5)


def test_wrong_activation_changes_output():
    # The reason the activation must be given: the weights alone do not reveal it.
    state = random_openclip_state(seed=1)
    model = openclip_to_clip_vision_model(state, hidden_act="gelu", num_attention_heads=HEADS, with_projection=True).model
    pixels = torch.randn(1, 3, GRID * PATCH, GRID * PATCH)
    _, embeds = reference_openclip_forward(state, pixels, HEADS, "quick_gelu")
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=pixels).image_embeds, embeds, atol=1e-4)


def test_full_clip_state_dict_keeps_visual_and_reports_text_keys():
    state = {f"visual.{k}": v for k, v in random_openclip_state().items()}
    state["logit_scale"] = torch.tensor(4.6)
    state["token_embedding.weight"] = torch.zeros(10, 8)
    conversion = openclip_to_clip_vision_model(state, hidden_act="quick_gelu", num_attention_heads=HEADS)
    assert {"logit_scale", "token_embedding.weight", "proj"} <= set(conversion.unused)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="hidden_act"):
        openclip_to_clip_vision_model(random_openclip_state(), hidden_act="relu")
    state = random_openclip_state()
    del state["ln_pre.weight"], state["ln_pre.bias"]
    with pytest.raises(ValueError, match="no ln_pre"):
        openclip_to_clip_vision_model(state, hidden_act="quick_gelu", num_attention_heads=HEADS)
    state = random_openclip_state()
    state["transformer.resblocks.0.ls_1.gamma"] = torch.ones(HIDDEN)
    with pytest.raises(ValueError, match="unrecognised keys.*ls_1"):
        openclip_to_clip_vision_model(state, hidden_act="quick_gelu", num_attention_heads=HEADS)
    state = random_openclip_state()
    state["transformer.resblocks.1.mlp.c_fc.bias"] = torch.zeros(MLP + 1)
    with pytest.raises(ValueError, match=r"resblocks\.1\.mlp\.c_fc\.bias: shape \(49,\), expected \(48,\)"):
        openclip_to_clip_vision_model(state, hidden_act="quick_gelu", num_attention_heads=HEADS)
    state = random_openclip_state()
    state["positional_embedding"] = state["positional_embedding"][:-1]
    with pytest.raises(ValueError, match="square patch grid"):
        openclip_to_clip_vision_model(state, hidden_act="quick_gelu", num_attention_heads=HEADS)
    with pytest.raises(ValueError, match="num_attention_heads"):
        openclip_to_clip_vision_model(random_openclip_state(), hidden_act="quick_gelu", num_attention_heads=5)


def test_files_safetensors_and_weights_only_torch(tmp_path):
    state = random_openclip_state()
    save_state_dict_file(state, tmp_path / "enc.safetensors")
    loaded = load_state_dict_file(tmp_path / "enc.safetensors")
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "enc.pt")
    loaded = load_state_dict_file(tmp_path / "enc.pt")
    assert set(loaded) == set(state)


class NotATensor:
    pass


def test_pickles_are_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_state_dict_file(tmp_path / "evil.pt")
    with open(tmp_path / "enc.pkl", "wb") as handle:
        pickle.dump({"conv1.weight": torch.zeros(1)}, handle)
    with pytest.raises(UnsafeCheckpointError, match="unsupported checkpoint format '.pkl'"):
        load_state_dict_file(tmp_path / "enc.pkl")
