#!/usr/bin/env python3
"""Writes `tokenizer/tokenizer.json` for a Cosmos pipeline repository, which the Rust side
(`sampler::cosmos::text_encoder::T5PromptEncoder`, the `tokenizers` crate) reads. The Cosmos
repositories ship the T5 tokenizer as a SentencePiece model (tokenizer/spiece.model +
tokenizer_config.json); transformers converts it to the `tokenizers` format, the same tokenizer
diffusers uses (T5TokenizerFast), and this saves that.

    pip install transformers sentencepiece protobuf
    python scripts/cosmos_tokenizer_json.py nvidia/Cosmos-Predict2-2B-Video2World@diffusers
    python scripts/cosmos_tokenizer_json.py path/to/local/pipeline

A Hub repository is read through the Hugging Face cache (downloading only tokenizer/ when it is
not there; HF_HUB_OFFLINE=1 to stay offline) and tokenizer.json is written into the cached
snapshot, where `sampler cosmos --model ORG/NAME[@REV]` looks for it. A local directory gets
DIR/tokenizer/tokenizer.json. Add --check to compare the ids of a few prompts through the saved
file (the `tokenizers` library, as Rust reads it) with transformers' tokenizer.
"""

import argparse
import os


def snapshot_dir(reference):
    if os.path.isdir(reference):
        return reference
    from huggingface_hub import snapshot_download

    repo, _, revision = reference.partition("@")
    return snapshot_download(repo, revision=revision or None, allow_patterns=["tokenizer/*"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a local pipeline directory or a Hub repository org/name[@revision]")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.json")
    ap.add_argument("--check", action="store_true", help="compare ids through the saved file with transformers'")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    root = snapshot_dir(args.model)
    out = os.path.join(root, "tokenizer", "tokenizer.json")
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
    tokenizer.backend_tokenizer.save(out)
    print(f"wrote {out}")

    if args.check:
        import tokenizers

        saved = tokenizers.Tokenizer.from_file(out)
        prompts = [
            "A robot arm picks up the red cube on the table.",
            "Ünïcödé, numbers 12345 and  double  spaces\tand tabs.",
            "",
        ]
        for p in prompts:
            a = saved.encode(p).ids
            b = tokenizer(p).input_ids
            assert a == b, f"{p!r}: {a} from tokenizer.json, {b} from transformers"
        print(f"checked: {len(prompts)} prompts give the same ids through {out}")


if __name__ == "__main__":
    main()
