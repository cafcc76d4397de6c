#!/usr/bin/env python3
"""Prompt embeddings for `sampler cosmos --prompt-embeds FILE` (Cosmos-Predict2 / its T5-XXL text
encoder), computed as diffusers' `Cosmos2VideoToWorldPipeline.encode_prompt` does: T5 tokenizer
padded to 512 tokens, `T5EncoderModel(...).last_hidden_state`, embeddings past each prompt's length
zeroed; the negative prompt defaults to the pipeline's own DEFAULT_NEGATIVE_PROMPT.

    pip install torch transformers diffusers safetensors sentencepiece
    python scripts/cosmos_prompt_embeds.py --model nvidia/Cosmos-Predict2-2B-Video2World@diffusers \
        --prompt "A robot arm picks up the red cube." -o prompt.safetensors

--model takes a Hub repository (org/name[@revision]) or a local pipeline directory. The T5-11B
encoder needs ~22 GB in bf16 (use --device cuda when you have one). Writes `prompt_embeds` and
`negative_prompt_embeds`, (1, 512, 1024) float32.
"""

import argparse
import os

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it")

    from transformers import T5EncoderModel, T5TokenizerFast
    from diffusers.pipelines.cosmos.pipeline_cosmos2_video2world import DEFAULT_NEGATIVE_PROMPT

    repo, _, revision = args.model.partition("@")
    kw = {"revision": revision} if revision else {}
    tokenizer = T5TokenizerFast.from_pretrained(repo, subfolder="tokenizer", **kw)
    encoder = T5EncoderModel.from_pretrained(
        repo, subfolder="text_encoder", torch_dtype=getattr(torch, args.dtype), **kw
    ).to(args.device)

    def embed(text):
        tokens = tokenizer([text], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.bool().to(args.device)
        with torch.no_grad():
            out = encoder(tokens.input_ids.to(args.device), attention_mask=mask).last_hidden_state
        out = out.float().cpu()
        out[0, int(mask.sum()) :] = 0
        return out

    negative = args.negative_prompt if args.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    tensors = {"prompt_embeds": embed(args.prompt), "negative_prompt_embeds": embed(negative)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))


if __name__ == "__main__":
    main()
