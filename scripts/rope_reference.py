#!/usr/bin/env python3
"""Print transformers' rotary frequencies for the reference cases of `src/model/rotary.rs`'s tests.

Not run in CI (needs torch + transformers, see scripts/check_transformers.py for a setup). Uses
transformers' own `ROPE_INIT_FUNCTIONS` on a LlamaConfig: head size 16, rope_theta 500000;
llama3 with Llama 3.1's parameters, yarn with factor 4, beta 32/1, original context 4096.

    /tmp/hfenv/bin/python scripts/rope_reference.py
"""

import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

CASES = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "original_max_position_embeddings": 4096},
}

print(f"transformers {transformers.__version__}")
for name, scaling in CASES.items():
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling=dict(scaling),
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[name](config, "cpu")
    values = ", ".join(repr(float(x)) for x in inv_freq)
    print(f"{name}: [{values}]")
    print(f"{name} attention factor: {float(attention_factor)!r}")
