#!/usr/bin/env python3
"""Check an exported HuggingFace Llama directory against HuggingFace transformers.

Loads DIR with `transformers.AutoModelForCausalLM.from_pretrained(DIR, torch_dtype=torch.float32)` (Llama or Mistral), runs
a fixed prompt through it and through our engine (`fast-llm-rs generate --dump-logits`), and prints:

* the largest absolute difference between the two engines' logits over every prompt position;
* whether the greedy continuations (HF `model.generate(do_sample=False)` vs ours) are identical.

Not run in CI (needs torch + transformers). Setup, e.g.:

    python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers safetensors numpy
    cargo build --release
    /tmp/hfenv/bin/python scripts/check_transformers.py DIR [--prompt TEXT] [--max-new-tokens N]

A model to check, trained for 50 steps and exported:

    target/release/fast-llm-rs train --config examples/shakespeare.yaml training.train_iters=50 \
        run.experiment_dir=/tmp/shk model.distributed.world_size=1 training.checkpoint.interval=50
    target/release/fast-llm-rs convert input.path=/tmp/shk input.format=distributed \
        output.path=/tmp/shk_hf output.format=llama

The prompt is tokenized byte-level (token id = byte value) unless DIR holds a tokenizer.json, in which
case our engine uses it and this script encodes with the `tokenizers` package (installed with
transformers). Exit status 1 when the logits differ by more than --tolerance or the continuations
differ.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="exported HuggingFace Llama directory")
    p.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?\n")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "fast-llm-rs"))
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest acceptable max |logit difference|")
    return p.parse_args()


def encode(directory, prompt):
    tok = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tok):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tok).encode(prompt, add_special_tokens=False).ids
    return list(prompt.encode("utf-8"))


def ours(args, workdir):
    """Our prefill logits (prompt_len, vocab) and greedy continuation ids."""
    dump = os.path.join(workdir, "logits.f32")
    cmd = [
        args.binary, "generate", "--checkpoint", args.dir, "--format", "llama", "--prompt", args.prompt,
        "--max-new-tokens", str(args.max_new_tokens), "--greedy", "--dump-logits", dump, "--print-ids",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ids_line = [line for line in out.splitlines() if line.startswith("ids:")][-1]
    ids = [int(x) for x in ids_line[len("ids:"):].split()]
    meta = json.load(open(dump + ".json"))
    logits = np.fromfile(dump, dtype="<f4").reshape(meta["shape"])
    return meta["tokens"], logits, ids


def main():
    args = parse_args()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, torch_dtype=torch.float32)
    model.eval()
    # Byte-level models have no end-of-sequence token: never stop early (HF's default eos id is 2).
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0

    tokens = encode(args.dir, args.prompt)
    with tempfile.TemporaryDirectory() as workdir:
        our_tokens, our_logits, our_ids = ours(args, workdir)
    if our_tokens != tokens:
        print(f"token mismatch: ours {our_tokens[:16]}... vs {tokens[:16]}...", file=sys.stderr)
        return 1

    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        hf_logits = model(ids).logits[0].float().numpy()
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
        )
    hf_ids = generated[0, len(tokens):].tolist()

    diff = np.abs(hf_logits - our_logits)
    max_diff = float(diff.max())
    scale = float(np.abs(hf_logits).max())
    same_argmax = int((hf_logits.argmax(-1) == our_logits.argmax(-1)).sum())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"prompt: {len(tokens)} tokens; logits {tuple(hf_logits.shape)}, max |logit| {scale:.3f}")
    print(f"max |logit difference| = {max_diff:.3e} (mean {float(diff.mean()):.3e})")
    print(f"argmax agrees at {same_argmax}/{len(tokens)} prompt positions")
    first = next((i for i, (a, b) in enumerate(zip(hf_ids, our_ids)) if a != b), None)
    match = hf_ids == our_ids
    print(f"greedy continuation ({args.max_new_tokens} tokens): {'identical' if match else f'differs from token {first}'}")
    if os.path.exists(os.path.join(args.dir, "tokenizer.json")):
        print("ours:", our_ids)
        print("HF:  ", hf_ids)
    else:
        print("ours:", repr(bytes(i for i in our_ids if i < 256).decode("utf-8", "replace")))
        print("HF:  ", repr(bytes(i for i in hf_ids if i < 256).decode("utf-8", "replace")))
    return 0 if match and max_diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
