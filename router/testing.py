"""Test helpers: a tiny random Llama with a real tokenizer, built offline in about a second.

The model is untrained (its scores are meaningless) but it runs the real transformers code path:
a real byte-level BPE tokenizer (trained here with ``tokenizers``), a ChatML-style chat template,
``save_pretrained``/``from_pretrained``, KV caches, padding. Deterministic: fixed seed, fixed corpus.
"""

from __future__ import annotations

from pathlib import Path

# A ChatML layout like Qwen's, so tests exercise the same template code path as the default model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Enough English for BPE merges; "yes"/"no", the answer keys and the digits must be in it.
_CORPUS = [
    "complexity: 1 2 3 4 5 6 7 8 9 text: yes no faces: yes no charts: yes no",
    "You rate how visually complex an image is, judging only from its caption.",
    "a plain blue sky, a white wall, a red apple on a table, a portrait of a smiling woman",
    "a detailed bar chart with twelve labelled categories and a dense legend",
    "a page of printed text with small letters, a street market crowded with people",
    "Answer in exactly this format: yes if the image contains readable text, otherwise no.",
    "a photo of a human face, a line chart, a diagram with fine lines, clip art of a cat",
]


def build_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Build and save a 2-layer, hidden-32 random Llama plus tokenizer; return the directory.

    Args:
        directory: where ``save_pretrained`` writes config, weights and tokenizer files.
        seed: torch seed for the random weights (same seed -> same weights -> same scores).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init with std 0.02 gives nearly uniform next-token probabilities; scale the output
    # head up so distributions differ clearly between captions (tests compare them).
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    model.save_pretrained(directory)
    return directory
