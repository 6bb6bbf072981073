"""llava_to_deco: a tiny random-init Hugging Face LLaVA (CLIP tower, Llama LM) and its processor,
built locally, become the DeCo variant; the projector keeps its weights and pools, the processor
writes the pooled token count, generate runs end to end. HF activation names match ACT2FN."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the tiny models the examples build

import deco_ops  # noqa: E402
from deco_ops.integrations.transformers import DeCoLlavaProcessor, llava_to_deco  # noqa: E402
from deco_ops.modules import HF_ACTIVATIONS  # noqa: E402
from harness import DEVICE, assert_close  # noqa: E402
from tiny_models import PROMPT, WORDS, image, tiny_llava  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402


# tiny random HF models compared on CPU tensors on the default backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_tensors", "auto_backend")


@pytest.mark.parametrize("strategy,prefix,side,out_side", [
    ("default", 0, 8, 4), ("full", 1, 8, 4),
    ("default", 0, 9, 5)])  # an odd grid (SigLIP's 27x27 -> 14x14): half, rounded up
def test_projector_keeps_weights_and_pools(strategy, prefix, side, out_side):
    model, processor = tiny_llava(vision_feature_select_strategy=strategy, image_size=4 * side)
    hf_projector = copy.deepcopy(model.model.multi_modal_projector).double()
    _, deco_processor = llava_to_deco(model, processor)
    # The forced Triton backend runs on the suite's device (a GPU has no interpreter for CPU tensors).
    model.to(DEVICE)
    inputs = deco_processor(images=image(), text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == out_side ** 2
    pixels = inputs["pixel_values"].to(DEVICE)
    with torch.no_grad():  # the patch grid, CLS dropped
        tokens = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:].cpu()
    deco = model.model.multi_modal_projector
    assert isinstance(deco, deco_ops.DeCoProjector) and deco.num_prefix_tokens == prefix
    assert (deco.grid, deco.out_grid, model.config.image_seq_length) == ((side, side), (out_side, out_side), out_side ** 2)
    pooled = _pooled64(tokens, side, out_side)
    with torch.no_grad(), deco_ops.use_backend("triton"):
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert_close(features.cpu(), hf_projector(pooled)[0], torch.float32)


def _pooled64(tokens, side, out_side):
    """(1, side * side, 32) tokens pooled to out_side x out_side by PyTorch's own pooling, in float64."""
    image = tokens.double().transpose(1, 2).reshape(1, 32, side, side)
    return F.adaptive_avg_pool2d(image, (out_side, out_side)).flatten(2).transpose(1, 2)


def test_tower_without_cls_token_has_no_prefix():
    """A SigLIP tower emits no CLS token: with ``vision_feature_select_strategy="full"`` the
    projector sees the patch grid alone (num_prefix_tokens 0), and pools it."""
    model, _ = tiny_llava(vision_feature_select_strategy="full", tower="siglip_vision_model")
    hf_projector = copy.deepcopy(model.model.multi_modal_projector).double()
    llava_to_deco(model)
    deco = model.model.multi_modal_projector
    assert (deco.num_prefix_tokens, deco.grid, deco.out_grid) == (0, (8, 8), (4, 4))
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]  # 64 patches, no CLS
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    assert tokens.shape[1] == 64
    pooled = _pooled64(tokens, 8, 4)
    assert_close(features, hf_projector(pooled)[0], torch.float32)


def test_tower_without_cls_token_under_default_strategy_is_refused():
    """``vision_feature_select_strategy="default"`` drops each image's first token; a SigLIP tower
    has no CLS token, so LLaVA hands the projector 63 of its 8x8 patches. Before, the conversion
    took it and every forward raised "x has 63 tokens but DeCoProjector expects ... 0 + 64"."""
    model, _ = tiny_llava(vision_feature_select_strategy="default", tower="siglip_vision_model")
    projector = model.model.multi_modal_projector
    with pytest.raises(ValueError, match="'default' drops the first token .* SiglipVisionModel emits no CLS token .* 63 of the 64"):
        llava_to_deco(model)
    assert model.model.multi_modal_projector is projector


def test_projector_of_other_widths_bias_and_dtype_keeps_them():
    """A vision tower narrower than the language model (LLaVA-1.5: 1024 -> 4096; here 32 -> 48), a
    projector without biases (``multimodal_projector_bias=False``), a bfloat16 model: the
    DeCoProjector takes the tower's width and gives the LM's, without biases, in bfloat16, with
    the same weights."""
    model, _ = tiny_llava(text_hidden_size=48, projector_bias=False)
    model.to(torch.bfloat16)
    hf_projector = copy.deepcopy(model.model.multi_modal_projector).double()
    llava_to_deco(model)
    deco = model.model.multi_modal_projector
    assert (deco.fc1.weight.shape, deco.fc2.weight.shape) == ((48, 32), (48, 48))
    assert deco.fc1.bias is None and deco.fc2.bias is None and {p.dtype for p in deco.parameters()} == {torch.bfloat16}
    tokens = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.no_grad():
        assert_close(deco(tokens), hf_projector(_pooled64(tokens, 8, 4)), torch.bfloat16)


def test_conversion_takes_its_arguments_and_the_models_activation():
    """order, mode and num_prefix_tokens as given (not the defaults, nor the prefix the tower
    implies), and config.projector_hidden_act: the projector computes the float64
    pool(Linear2(act(Linear1(x)))) of its patch tokens (bilinear resampling), the prefix dropped."""
    model, _ = tiny_llava()  # "default": the tower implies no prefix token
    model.config.projector_hidden_act = "silu"
    model.model.multi_modal_projector.act = ACT2FN["silu"]
    hf_projector = copy.deepcopy(model.model.multi_modal_projector).double()
    llava_to_deco(model, out_grid=(3, 3), num_prefix_tokens=1, order="mlp_pool", mode="bilinear")
    deco = model.model.multi_modal_projector
    tokens = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = deco(torch.cat([torch.full((1, 1, 32), float("nan")), tokens], 1))
        projected = hf_projector(tokens.double()).transpose(1, 2).reshape(1, 32, 8, 8)
    want = F.interpolate(projected, size=(3, 3), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    assert_close(y, want, torch.float32)


def test_processor_keeps_an_image_token_the_tokenizer_does_not_name():
    """A tokenizer without an ``image_token`` attribute and a processor given ``image_token="<img>"``
    (the model's image token id): the DeCoLlavaProcessor writes that token, not the default
    ``<image>``, which this vocabulary does not hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    model, processor = tiny_llava()
    words = Tokenizer(models.WordLevel({("<img>" if w == "<image>" else w): i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=["<img>"])
    processor = LlavaProcessor(image_processor=processor.image_processor, tokenizer=tokenizer, patch_size=processor.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<img>")
    _, deco_processor = llava_to_deco(model, processor)
    ids = deco_processor(images=image(), text=PROMPT.replace("<image>", "<img>"), return_tensors="pt")["input_ids"]
    assert deco_processor.image_token == "<img>" and int((ids == model.config.image_token_id).sum()) == 16


@pytest.mark.parametrize("count", [0, -1, True, 2.0])
def test_processor_token_count_must_be_a_positive_int(count):
    _, processor = tiny_llava()
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        DeCoLlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, num_image_tokens=count)


def test_processor_and_generate_end_to_end():
    model, processor = tiny_llava()
    processor.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    model, deco_processor = llava_to_deco(model, processor)
    assert isinstance(deco_processor, DeCoLlavaProcessor) and deco_processor.chat_template == processor.chat_template
    inputs = deco_processor(images=image(), text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    assert deco_processor._get_num_multimodal_tokens(image_sizes=[[40, 48]]).num_image_tokens == [16]
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_processor_saves_and_reloads_every_setting(tmp_path):
    """``save_pretrained`` keeps LlavaProcessor's settings beside the token count (transformers saves
    the attributes ``__init__`` names): reloaded, the processor writes the pooled count and its
    parent class still processes an image. Before, only ``num_image_tokens`` was saved; reloaded,
    the patch size was None and LlavaProcessor raised inside its token count."""
    from transformers import LlavaProcessor

    model, processor = tiny_llava()
    _, deco_processor = llava_to_deco(model, processor)
    deco_processor.save_pretrained(tmp_path)
    again = DeCoLlavaProcessor.from_pretrained(tmp_path)
    for name in ("num_image_tokens", "patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token"):
        assert getattr(again, name) == getattr(deco_processor, name), name
    ids = again(images=image(), text=PROMPT, return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 16
    LlavaProcessor.from_pretrained(tmp_path)(images=image(), text=PROMPT, return_tensors="pt")
    # the token count stays the third positional argument, as before LlavaProcessor's settings were named
    assert DeCoLlavaProcessor(processor.image_processor, processor.tokenizer, 9).num_image_tokens == 9


def test_frozen_projector_stays_frozen_and_bad_models_are_refused():
    model, _ = tiny_llava()
    model.model.multi_modal_projector.requires_grad_(False)
    model.eval()
    llava_to_deco(model, out_grid=(3, 3))
    assert not any(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert not any(m.training for m in model.modules())
    assert model.config.image_seq_length == 9
    model, _ = tiny_llava()  # each parameter keeps its own flag, the projector its own mode
    model.model.multi_modal_projector.linear_1.requires_grad_(False)
    model.train().model.multi_modal_projector.eval()
    llava_to_deco(model)
    deco = model.model.multi_modal_projector
    assert {name: p.requires_grad for name, p in deco.named_parameters()} == {
        "linear_1.weight": False, "linear_1.bias": False, "linear_2.weight": True, "linear_2.bias": True}
    assert not deco.training and model.training
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        llava_to_deco(torch.nn.Linear(2, 2))


def test_other_llava_families_are_refused_before_any_change():
    """LLaVA-NeXT shares LLaVA's projector layout but tiles each image into a variable number of
    crops, which one fixed out_grid cannot pool: refused by name, the model left as it was."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    plain, _ = tiny_llava()
    config = LlavaNextConfig(vision_config=plain.config.vision_config.to_dict(), text_config=plain.config.text_config.to_dict(),
                             image_token_index=plain.config.image_token_id)
    model = LlavaNextForConditionalGeneration(config)
    projector = model.model.multi_modal_projector
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration or LlavaModel .* got LlavaNextForConditionalGeneration"):
        llava_to_deco(model)
    assert model.model.multi_modal_projector is projector


@pytest.mark.parametrize("num_prefix_tokens", [None, 0])
def test_pixtral_tower_is_refused_before_any_change(num_prefix_tokens):
    """A LLaVA with a Pixtral tower (model_type "llava": Pixtral / Mistral checkpoints) takes each image
    at its own size and splits the projector's output by each image's patch count. Before, the
    conversion asked for num_prefix_tokens, then converted, and the forward failed inside
    ``torch.split`` ("split_with_sizes expects split_sizes to sum exactly to 16")."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    plain, _ = tiny_llava()
    config = LlavaConfig(vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=32, patch_size=4, head_dim=8),
                         text_config=plain.config.text_config.to_dict(), image_token_index=plain.config.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config)
    projector = model.model.multi_modal_projector
    with pytest.raises(ValueError, match="does not support a Pixtral vision tower"):
        llava_to_deco(model, num_prefix_tokens=num_prefix_tokens)
    assert model.model.multi_modal_projector is projector


@pytest.mark.parametrize("out_grid,error,match", [
    (12, TypeError, "out_grid must be a tuple of 2 or 3 ints, got 12"),
    ((0, 2), ValueError, r"out_grid entries must be >= 1, got \(0, 2\)")])
def test_bad_out_grid_is_named(out_grid, error, match):
    model, _ = tiny_llava()
    with pytest.raises(error, match=match):
        llava_to_deco(model, out_grid=out_grid)
    assert not isinstance(model.model.multi_modal_projector, deco_ops.DeCoProjector)


def test_converted_model_names_its_parameters_as_its_state_dict():
    """The projector holds Hugging Face's ``linear_1``/``linear_2`` as its layers: the state_dict
    keys are the parameters' names (distributed checkpointing, ``get_model_state_dict`` for FSDP2,
    resolves every key to a parameter), and the plain LLaVA's keys."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, _ = tiny_llava()
    plain_keys = set(model.state_dict())
    llava_to_deco(model)
    projector = model.model.multi_modal_projector
    assert set(projector.state_dict()) == {name for name, _ in projector.named_parameters()} == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert set(model.state_dict()) == set(get_model_state_dict(model)) == plain_keys


@pytest.mark.parametrize("hf_name", sorted(HF_ACTIVATIONS))
def test_hf_activation_names_match_act2fn(hf_name):
    torch.manual_seed(5)
    fc1, fc2 = torch.nn.Linear(8, 12).double(), torch.nn.Linear(12, 10).double()
    proj = deco_ops.DeCoProjector(8, 10, hidden_features=12, grid=(2, 2), out_grid=(2, 2), activation=hf_name)
    proj.load_state_dict({"linear_1.weight": fc1.weight, "linear_1.bias": fc1.bias, "linear_2.weight": fc2.weight, "linear_2.bias": fc2.bias})
    x = torch.randn(2, 4, 8, dtype=torch.float64) * 3
    with torch.no_grad():
        assert_close(proj(x.float()), fc2(ACT2FN[hf_name](fc1(x))), torch.float32)


def test_save_pretrained_round_trip(tmp_path):
    """A converted model saves its projector under Hugging Face's names: from_pretrained loads the
    trained weights (no random projector), and llava_to_deco restores the DeCo variant; the
    processor reloads with its token count."""
    model, processor = tiny_llava()
    model, processor = llava_to_deco(model, processor)
    with torch.no_grad():
        model.model.multi_modal_projector.fc1.weight.add_(1.0)  # "trained": differs from any init
    trained = model.model.multi_modal_projector.fc1.weight.clone()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(reloaded.model.multi_modal_projector.linear_1.weight, trained)
    reloaded, _ = llava_to_deco(reloaded)
    assert torch.equal(reloaded.model.multi_modal_projector.fc1.weight, trained)
    assert DeCoLlavaProcessor.from_pretrained(tmp_path).num_image_tokens == 16


def test_projector_keeps_its_parameter_objects_so_an_existing_optimizer_trains_it():
    """The converted projector holds the LLaVA's own Linear modules, not copies: an optimizer built
    before the conversion (or anything else holding the parameters: tied references, param groups)
    still updates the parameters the model runs. With copies, its steps went to orphaned tensors and
    the projector never trained, silently."""
    model, _ = tiny_llava()
    old = model.model.multi_modal_projector
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    llava_to_deco(model)
    deco = model.model.multi_modal_projector
    assert deco.fc1 is old.linear_1 and deco.fc2 is old.linear_2
    before = deco.fc1.weight.detach().clone()
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(4))
    deco(x).square().sum().backward()
    optimizer.step()
    assert not torch.equal(deco.fc1.weight, before)


def test_projector_with_lora_adapters_converts_and_keeps_them():
    """peft's LoRA on the projector's Linears before the conversion (the PeftModel's LLaVA passed):
    the DeCo projector runs the adapters, as the LoRA'd LLaVA projector does on the pooled grid
    (float64 reference); the conversion raised on the adapters' state_dict keys before."""
    peft = pytest.importorskip("peft")
    model, _ = tiny_llava()
    model.double()
    torch.manual_seed(2)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["linear_1", "linear_2"], init_lora_weights=False))
    llava = wrapped.base_model.model
    reference = copy.deepcopy(llava.model.multi_modal_projector)
    llava_to_deco(llava)
    deco = llava.model.multi_modal_projector
    assert isinstance(deco, deco_ops.DeCoProjector)
    x = torch.randn(2, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = deco(x)
    assert_close(out, reference(torch.cat([_pooled64(x[i:i + 1], 8, 4) for i in range(2)])), torch.float32)
    out.sum().backward()
    assert all(p.grad is not None for n, p in deco.named_parameters() if "lora_" in n)


def test_projector_offloaded_by_accelerate_converts(tmp_path):
    """``from_pretrained(device_map=...)`` that offloads the projector (its weights on the meta device,
    loaded by accelerate's hooks on each Linear per call): the converted model gives the logits of
    the same checkpoint converted in memory. Its weights were copied from meta before: the forward
    raised 'w1 is on meta'."""
    pytest.importorskip("accelerate")
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny_llava()
    model, processor = llava_to_deco(model, processor)
    model.save_pretrained(tmp_path / "model")
    placement = {"model.vision_tower": "cpu", "model.language_model": "cpu", "lm_head": "cpu", "model.multi_modal_projector": "disk"}
    offloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model", device_map=placement,
                                                              offload_folder=tmp_path / "offload")
    assert offloaded.model.multi_modal_projector.linear_1.weight.is_meta
    llava_to_deco(offloaded)
    assert hasattr(offloaded.model.multi_modal_projector, "_hf_hook")  # the dispatch's hook on the projector, carried
    inputs = processor(images=image(), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, model(**inputs).logits)
