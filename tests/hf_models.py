"""Tiny random Hugging Face models built locally from configs (no downloads), for tests."""

from __future__ import annotations

ARCHS = ("llama", "qwen2", "mistral")


def tiny_hf_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    if arch == "llama":
        common["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        common["rope_theta"] = 500000.0
        cls = LlamaConfig
    elif arch == "qwen2":
        common["tie_word_embeddings"] = True
        common["rope_theta"] = 1000000.0
        cls = Qwen2Config
    elif arch == "mistral":
        common["sliding_window"] = 4096
        common["head_dim"] = 32  # head_dim != hidden / heads, as Mistral-Nemo
        cls = MistralConfig
    else:
        raise ValueError(arch)
    common.update(overrides)
    return cls(**common)


def build_hf_model(arch: str, seed: int = 0, **overrides):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random (not default-initialized) norm gains and biases so that they are tested.
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.float().eval()


def save_hf_model_with_tokenizer(path, arch: str = "llama"):
    """A tiny random model with a real (locally trained, byte-level BPE) tokenizer, saved to
    ``path`` with save_pretrained: text prompts work through the CLI."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world " * 50, "def f(x): return x + 1\n" * 50],
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>")
    build_hf_model(arch, vocab_size=max(128, len(hf_tok))).save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path
