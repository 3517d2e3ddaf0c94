"""Loading: the embedded default, a saved checkpoint directory through from_pretrained, refusals."""

import pytest
import torch

from capa_export import CapaError, load_model
from capa_export.models import adapter_for


def test_tiny_has_llava_15_token_geometry():
    model, processor = load_model("tiny-llava-random")
    adapter = adapter_for(model)
    assert adapter.image_token_id == 32000 and adapter.vocab_size == 32064
    assert adapter.num_visual_tokens_per_image() == 576
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 32000


def test_tiny_is_deterministic():
    a, _ = load_model("tiny-llava-random")
    b, _ = load_model("tiny-llava-random")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_from_pretrained_directory_round_trip(tmp_path, tiny, tiny_batch):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path), dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny_batch).logits, model(**tiny_batch).logits, rtol=1e-5, atol=1e-5)
    again = loaded_processor(images=None, text="hello", return_tensors="pt")
    assert again["input_ids"].shape[1] > 1
    half, _ = load_model(str(tmp_path), dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_unsupported_family_lists_supported(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CapaError, match="model type 'llama'.*supported: llava"):
        load_model(str(tmp_path))


def test_missing_path():
    with pytest.raises(CapaError, match="does not exist"):
        load_model("./no/such/model")


def test_prompt_without_image_slot_is_refused(tiny, tiny_batch):
    from capa_export import CapaConfig, apply_capa

    model, _ = tiny
    ids = torch.tensor([[1, 50, 60, 70]])
    vision = {k: tiny_batch[k] for k in adapter_for(model).family.vision_keys}
    with pytest.raises(CapaError, match="0 image-token slots"):
        apply_capa(model, CapaConfig(prune=[]))(input_ids=ids, **vision)


def test_a_processor_of_another_model_is_named_as_the_cause():
    """A LLaVA processor with another model's patch size (28: it expands <image> to about 144
    tokens) for a model whose tower gives 576: the error names the processor, not the prompt."""
    from capa_export import CapaConfig, apply_capa
    from capa_export.inputs import builtin_samples

    model, processor = load_model("tiny-llava-random")
    processor.patch_size = 28
    adapter = adapter_for(model)
    sample = builtin_samples(1)[0]
    batch = adapter.family.encode(processor, [sample.image], [sample.question])
    slots = int((batch["input_ids"] == adapter.image_token_id).sum())  # the processor's own expansion
    assert 0 < slots < 576
    with pytest.raises(CapaError, match=f"expands each image to {slots} image tokens but the model's vision tower "
                                        f"gives 576 per image: the processor does not belong to this model"):
        apply_capa(model, CapaConfig(prune=[]))(**batch)
