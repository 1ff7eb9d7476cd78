"""A tiny local causal-LM checkpoint and tokenizer, made here (no download): what ``finetune`` tests use."""

from __future__ import annotations

import os
from importlib import resources


def sonnets() -> str:
    return resources.files("lycoris_cli").joinpath("data/sonnets.txt").read_text(encoding="utf-8")


def make_checkpoint(directory: str, *, vocab: int = 320, flax: bool = False, seed: int = 0) -> str:
    """``directory`` with ``config.json``, ``model.safetensors`` (or ``flax_model.msgpack`` with
    ``flax=True``) of a 2-layer Llama, and a byte-level BPE ``tokenizer.json`` trained on the sonnets."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([sonnets()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=bpe.token_to_id("<eos>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if flax:
        from transformers import FlaxLlamaForCausalLM
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        flax_model = FlaxLlamaForCausalLM(config, seed=seed)
        flax_model.params = convert_pytorch_state_dict_to_flax(model.state_dict(), flax_model)
        flax_model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    return directory
