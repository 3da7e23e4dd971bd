"""Tiny random transformers (PyTorch) Qwen checkpoints: the independent oracle for our models."""
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 131


def make_hf_model(model_type="qwen3", *, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None,
                  inter=96, tied=False, bias=None, rope_parameters=None, vocab=VOCAB, seed=0,
                  max_pos=512):
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
              tie_word_embeddings=tied, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if rope_parameters is not None:
        kw["rope_parameters"] = rope_parameters
    if model_type == "qwen3":
        cfg = Qwen3Config(head_dim=head_dim or hidden // heads, attention_bias=bool(bias), **kw)
        model = Qwen3ForCausalLM(cfg)
    else:
        assert head_dim is None, "Qwen2 has head_dim = hidden / heads"
        cfg = Qwen2Config(**kw)
        model = Qwen2ForCausalLM(cfg)
    # Random norms/biases so every parameter matters in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens, attention_mask=None, position_ids=None):
    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long), **kw).logits.float().numpy()
