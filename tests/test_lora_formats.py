"""LoRA key styles: header checks, classification, refusals, and the exact kohya/ComfyUI -> diffusers conversion."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from pipelines.lora.formats import (
    convert_to_diffusers,
    inspect_lora_keys,
    lora_shape,
    read_safetensors_header,
)
from pipelines.lora.library import LoraLibrary, count_adapter_modules
from pipelines.lora.sources import resolve_lora_source
from pipelines.runtime import choose_runtime
from pipelines.sd3.loading import load_sd3_pipeline
from pipelines.tiny import tiny_base_names

WIDTH = 32  # the tiny Large: 2 heads x 16


@pytest.fixture(scope="module")
def large_pipeline(tiny_root):
    """A tiny Large pipeline of this module's own (the shared manager's pipelines stay untouched)."""
    return load_sd3_pipeline(str(tiny_root / "sd35-large"), choose_runtime("cpu"), "bf16")


def _random_kohya() -> dict[str, torch.Tensor]:
    """Random kohya factors for several kinds of layer of the tiny Large (2 blocks, width 32, rank 4)."""
    generator = torch.Generator().manual_seed(7)

    def pair(name: str, fan_in: int, fan_out: int, alpha: float | None):
        factors = {
            f"{name}.lora_down.weight": torch.randn(4, fan_in, generator=generator) * 0.3,
            f"{name}.lora_up.weight": torch.randn(fan_out, 4, generator=generator) * 0.3,
        }
        if alpha is not None:
            factors[f"{name}.alpha"] = torch.tensor(alpha)
        return factors

    tensors = {}
    tensors |= pair("lora_unet_joint_blocks_0_x_block_attn_qkv", WIDTH, 3 * WIDTH, 2.0)
    tensors |= pair("lora_unet_joint_blocks_0_context_block_attn_qkv", WIDTH, 3 * WIDTH, 8.0)
    tensors |= pair("lora_unet_joint_blocks_0_context_block_attn_proj", WIDTH, WIDTH, 1.0)
    tensors |= pair("lora_unet_joint_blocks_1_x_block_attn_proj", WIDTH, WIDTH, None)  # no alpha: scale 1
    tensors |= pair("lora_unet_joint_blocks_0_x_block_mlp_fc1", WIDTH, 4 * WIDTH, 4.0)
    tensors |= pair("lora_unet_joint_blocks_1_x_block_mlp_fc2", 4 * WIDTH, WIDTH, 4.0)
    tensors |= pair("lora_unet_joint_blocks_0_context_block_mlp_fc2", 4 * WIDTH, WIDTH, 2.0)
    tensors |= pair("lora_unet_joint_blocks_0_x_block_adaLN_modulation_1", WIDTH, 6 * WIDTH, 4.0)
    tensors |= pair("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1", WIDTH, 2 * WIDTH, 4.0)  # pre-only
    tensors |= pair("lora_unet_final_layer_adaLN_modulation_1", WIDTH, 2 * WIDTH, 4.0)
    tensors |= pair("lora_unet_final_layer_linear", WIDTH, 2 * 2 * 16, 4.0)
    tensors |= pair("lora_unet_context_embedder", 64, WIDTH, 4.0)
    return tensors


def _expected_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each diffusers weight's change, by hand: alpha / rank * up @ down, qkv rows split in three,
    and the (shift, scale) halves swapped where diffusers' AdaLayerNormContinuous reads (scale, shift)."""

    def delta(name: str) -> torch.Tensor:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = tensors.get(f"{name}.alpha")
        scale = 1.0 if alpha is None else alpha.item() / down.shape[0]
        return scale * (up.double() @ down.double())

    qkv_x = delta("lora_unet_joint_blocks_0_x_block_attn_qkv")
    qkv_c = delta("lora_unet_joint_blocks_0_context_block_attn_qkv")
    last_context = delta("lora_unet_joint_blocks_1_context_block_adaLN_modulation_1")
    final = delta("lora_unet_final_layer_adaLN_modulation_1")
    return {
        "transformer_blocks.0.attn.to_q": qkv_x[0:WIDTH],
        "transformer_blocks.0.attn.to_k": qkv_x[WIDTH : 2 * WIDTH],
        "transformer_blocks.0.attn.to_v": qkv_x[2 * WIDTH : 3 * WIDTH],
        "transformer_blocks.0.attn.add_q_proj": qkv_c[0:WIDTH],
        "transformer_blocks.0.attn.add_k_proj": qkv_c[WIDTH : 2 * WIDTH],
        "transformer_blocks.0.attn.add_v_proj": qkv_c[2 * WIDTH : 3 * WIDTH],
        "transformer_blocks.0.attn.to_add_out": delta("lora_unet_joint_blocks_0_context_block_attn_proj"),
        "transformer_blocks.1.attn.to_out.0": delta("lora_unet_joint_blocks_1_x_block_attn_proj"),
        "transformer_blocks.0.ff.net.0.proj": delta("lora_unet_joint_blocks_0_x_block_mlp_fc1"),
        "transformer_blocks.1.ff.net.2": delta("lora_unet_joint_blocks_1_x_block_mlp_fc2"),
        "transformer_blocks.0.ff_context.net.2": delta("lora_unet_joint_blocks_0_context_block_mlp_fc2"),
        "transformer_blocks.0.norm1.linear": delta("lora_unet_joint_blocks_0_x_block_adaLN_modulation_1"),
        "transformer_blocks.1.norm1_context.linear": torch.cat([last_context[WIDTH:], last_context[:WIDTH]]),
        "norm_out.linear": torch.cat([final[WIDTH:], final[:WIDTH]]),
        "proj_out": delta("lora_unet_final_layer_linear"),
        "context_embedder": delta("lora_unet_context_embedder"),
    }


def _linear_weights(transformer) -> dict[str, torch.Tensor]:
    """Every linear layer's weight by module name (through peft's wrappers, without the LoRA factors)."""
    from peft.tuners.lora import LoraLayer

    weights = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            weights[name] = module.get_base_layer().weight.detach().clone()
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in name and not name.endswith("base_layer"):
            weights[name] = module.weight.detach().clone()
    return weights


def test_kohya_lora_fuses_to_the_hand_computed_weight_change(large_pipeline, tmp_path):
    tensors = _random_kohya()
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    before = _linear_weights(large_pipeline.transformer)
    library = LoraLibrary("sd35-large", known_bases=tiny_base_names())
    loaded = library.load(large_pipeline, resolve_lora_source(file="kohya.safetensors", lora_dir=tmp_path))
    expected = _expected_deltas(tensors)
    assert loaded.style == "kohya" and loaded.modules_changed == len(expected) == 16
    try:
        library.fuse(large_pipeline, [(loaded.name, 1.0)])
        after = _linear_weights(large_pipeline.transformer)
        assert after.keys() == before.keys()
        for module, weight in after.items():
            change = (weight - before[module]).double()
            if module in expected:
                assert change.shape == expected[module].shape, module
                torch.testing.assert_close(change, expected[module], atol=1e-6, rtol=1e-5, msg=module)
                assert expected[module].abs().max() > 1e-2  # a real change, not two zeros compared
            else:
                assert torch.equal(weight, before[module]), f"{module} changed but the LoRA has nothing for it"
    finally:
        library.unload(large_pipeline)
    restored = _linear_weights(large_pipeline.transformer)
    assert all(torch.equal(restored[name], weight) for name, weight in before.items())


def test_diffusers_alone_applies_nothing_from_a_kohya_file(large_pipeline, tmp_path):
    """Why the conversion exists: diffusers 0.42 has no SD3 kohya converter and loads zero layers."""
    save_file(_random_kohya(), str(tmp_path / "kohya.safetensors"))
    large_pipeline.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="raw")
    try:
        assert count_adapter_modules(large_pipeline.transformer, "raw") == 0
    finally:
        large_pipeline.unload_lora_weights()


def _comfy_key(kohya_key: str, peft_names: bool) -> str:
    module, _, param = kohya_key.partition(".")
    rest = module.removeprefix("lora_unet_")
    if rest.startswith("joint_blocks_"):
        _, _, block, stream_a, stream_b, *part = rest.split("_")
        part = "_".join(part)
        dotted = {
            "attn_qkv": "attn.qkv",
            "attn_proj": "attn.proj",
            "mlp_fc1": "mlp.fc1",
            "mlp_fc2": "mlp.fc2",
            "adaLN_modulation_1": "adaLN_modulation.1",
        }[part]
        module = f"diffusion_model.joint_blocks.{block}.{stream_a}_{stream_b}.{dotted}"
    else:
        dotted = {
            "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
            "final_layer_linear": "final_layer.linear",
            "context_embedder": "context_embedder",
        }[rest]
        module = f"diffusion_model.{dotted}"
    if peft_names:
        param = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(param, param)
    return f"{module}.{param}"


@pytest.mark.parametrize("peft_names", [False, True])
def test_comfyui_dotted_keys_convert_exactly_like_kohya(peft_names):
    tensors = _random_kohya()
    comfy = {_comfy_key(key, peft_names): value for key, value in tensors.items()}
    assert any(key.startswith("diffusion_model.joint_blocks.0.x_block.attn.qkv") for key in comfy)
    from_kohya = convert_to_diffusers(tensors).state_dict
    from_comfy = convert_to_diffusers(comfy)
    assert from_comfy.style == "comfyui"
    assert from_comfy.state_dict.keys() == from_kohya.keys()
    assert all(torch.equal(from_comfy.state_dict[key], value) for key, value in from_kohya.items())


def test_peft_styles_and_alphas_become_the_same_canonical_factors():
    generator = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, WIDTH, generator=generator), torch.randn(WIDTH, 4, generator=generator)
    module = "transformer_blocks.0.attn.to_q"
    canonical = {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up}
    styles = {
        "diffusers": canonical,
        "peft-bare": {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up},
        "base_model": {
            f"base_model.model.{module}.lora_A.weight": down,
            f"base_model.model.{module}.lora_B.weight": up,
        },
        "old diffusers": {f"transformer.{module}.lora.down.weight": down, f"transformer.{module}.lora.up.weight": up},
        "onetrainer": {
            "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight": down,
            "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight": up,
        },
    }
    for style, tensors in styles.items():
        converted = convert_to_diffusers(tensors).state_dict
        assert converted.keys() == canonical.keys(), style
        assert all(torch.equal(converted[key], value) for key, value in canonical.items()), style
    # An alpha (a key, or peft's lora_alpha in the header) is folded into lora_B: alpha / rank.
    with_alpha = convert_to_diffusers(
        {**styles["onetrainer"], "lora_transformer_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0)}
    )
    torch.testing.assert_close(with_alpha.state_dict[f"transformer.{module}.lora_B.weight"], up * 0.5)
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 12})}
    from_header = convert_to_diffusers(canonical, metadata)
    torch.testing.assert_close(from_header.state_dict[f"transformer.{module}.lora_B.weight"], up * 3.0)
    rslora = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 8, "transformer.use_rslora": True})}
    torch.testing.assert_close(
        convert_to_diffusers(canonical, rslora).state_dict[f"transformer.{module}.lora_B.weight"], up * 4.0
    )


def test_text_encoder_keys_are_dropped_with_a_warning():
    tensors = {
        **{key: value for key, value in _random_kohya().items() if "x_block_attn_qkv" in key},
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 4),
    }
    converted = convert_to_diffusers(tensors, label="style.safetensors")
    assert len(converted.modules) == 3 and not any("te1" in key for key in converted.state_dict)
    assert len(converted.warnings) == 1 and "text encoders (2 keys" in converted.warnings[0]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "holds no tensors"),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "holds no LoRA weights"),
        (["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"], "DoRA"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv.hada_w1_a"], "LoHa"),
        (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "layout the Studio does not know"),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "only holds text-encoder"),
        (
            ["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "transformer.proj_out.lora_A.weight"],
            "mixes key styles",
        ),
        (
            ["transformer.proj_out.lora_A.weight", "transformer.proj_out.weight"],
            "not a LoRA weight ('transformer.proj_out.weight')",
        ),
    ],
)
def test_inspection_refuses_what_it_cannot_load_exactly(keys, message):
    with pytest.raises(ValueError, match="^x.safetensors") as error:
        inspect_lora_keys(keys, label="x.safetensors")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("module", "down_shape", "up_shape", "message"),
    [
        ("lora_unet_joint_blocks_0_context_block_attn2_qkv", (4, WIDTH), (3 * WIDTH, 4), "cannot map"),
        ("lora_unet_x_embedder_proj", (4, 16, 2, 2), (WIDTH, 4, 1, 1), "not for a linear layer"),
        ("lora_unet_joint_blocks_0_x_block_adaLN_modulation_1", (4, WIDTH), (5 * WIDTH, 4), "matches no SD3 layer"),
    ],
)
def test_kohya_layers_without_an_exact_mapping_are_refused_by_name(module, down_shape, up_shape, message):
    tensors = {f"{module}.lora_down.weight": torch.ones(down_shape), f"{module}.lora_up.weight": torch.ones(up_shape)}
    with pytest.raises(ValueError, match=message) as error:
        convert_to_diffusers(tensors, label="x.safetensors")
    assert module in str(error.value)


def test_lora_shape_reads_width_depth_and_dual_attention():
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "transformer.transformer_blocks.3.ff.net.2.lora_A.weight": torch.randn(4, 4 * 48, generator=generator),
        "transformer.transformer_blocks.3.ff.net.2.lora_B.weight": torch.randn(48, 4, generator=generator),
        "transformer.transformer_blocks.1.attn2.to_q.lora_A.weight": torch.randn(4, 48, generator=generator),
        "transformer.transformer_blocks.1.attn2.to_q.lora_B.weight": torch.randn(48, 4, generator=generator),
    }
    shape = lora_shape(convert_to_diffusers(tensors))
    assert (shape.width, shape.min_blocks, shape.dual_attention_blocks) == (48, 4, (1,))


def test_header_check_refuses_renamed_pickles_and_broken_files(tmp_path):
    pickled = tmp_path / "renamed.safetensors"
    torch.save({"lora_A": torch.ones(2)}, pickled)
    with pytest.raises(ValueError, match="looks like a PyTorch pickle.*pickled files can run code when loaded"):
        read_safetensors_header(pickled)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        read_safetensors_header(short)
    not_json = tmp_path / "garbled.safetensors"
    not_json.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\x00" * 16)
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors_header(not_json)
    good = tmp_path / "good.safetensors"
    save_file({"a.lora_A.weight": torch.zeros(2, 3)}, str(good), metadata={"ss_network_dim": "2"})
    header = read_safetensors_header(good)
    assert header.shapes == {"a.lora_A.weight": (2, 3)} and header.metadata == {"ss_network_dim": "2"}
    assert header.header_bytes + 2 * 3 * 4 == header.file_bytes == good.stat().st_size
