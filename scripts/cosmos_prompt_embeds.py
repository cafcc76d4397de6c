#!/usr/bin/env python3
"""Prompt embeddings for `sampler cosmos --prompt-embeds FILE`, as diffusers computes them.

* Cosmos-Predict2 (`Cosmos2VideoToWorldPipeline`, T5-XXL): T5 tokenizer padded to 512 tokens,
  `T5EncoderModel(...).last_hidden_state`, embeddings past each prompt's length zeroed.
* Cosmos-Predict2.5 (`Cosmos2_5_PredictBasePipeline`, Qwen2.5-VL-7B): diffusers' own
  `_get_prompt_embeds` is called (the chat template, 512 tokens, every layer's hidden state
  normalised and concatenated: (1, 512, 100352)); the transformer projects them itself.

The pipeline is recognised from the repository's model_index.json; the negative prompt defaults to
that pipeline's DEFAULT_NEGATIVE_PROMPT.

    pip install torch transformers diffusers safetensors sentencepiece
    python scripts/cosmos_prompt_embeds.py --model nvidia/Cosmos-Predict2-2B-Video2World@diffusers \
        --prompt "A robot arm picks up the red cube." -o prompt.safetensors

--model takes a Hub repository (org/name[@revision]) or a local pipeline directory. The T5-11B
encoder needs ~22 GB in bf16, Qwen2.5-VL-7B ~16 GB (use --device cuda when you have one). Writes
`prompt_embeds` and `negative_prompt_embeds`, float32: (1, 512, 1024) for Predict2, (1, 512,
100352) for Predict2.5 (~200 MB each). The Predict2 path reproduces the tiny fixture pipeline's
embeddings to 4e-6; the Predict2.5 path calls diffusers' function and has not been run on the real
encoder here (no download possible).
"""
import json

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

    repo, _, revision = args.model.partition("@")
    kw = {"revision": revision} if revision else {}
    if os.path.isdir(repo):
        index_path = os.path.join(repo, "model_index.json")
    else:
        from huggingface_hub import hf_hub_download

        index_path = hf_hub_download(repo, "model_index.json", **kw)
    with open(index_path) as f:
        pipeline_class = json.load(f)["_class_name"]
    if pipeline_class == "Cosmos2_5_PredictBasePipeline":
        return predict25(args, repo, kw)
    if pipeline_class != "Cosmos2VideoToWorldPipeline":
        raise SystemExit(f"{args.model}: pipeline {pipeline_class} is not a Cosmos-Predict2 / 2.5 pipeline")

    from transformers import T5EncoderModel, T5TokenizerFast
    from diffusers.pipelines.cosmos.pipeline_cosmos2_video2world import DEFAULT_NEGATIVE_PROMPT
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


def predict25(args, repo, kw):
    """Qwen2.5-VL embeddings through diffusers' own Cosmos2_5_PredictBasePipeline._get_prompt_embeds."""
    import types

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from diffusers.pipelines.cosmos import pipeline_cosmos2_5_predict as p25

    tokenizer = AutoTokenizer.from_pretrained(repo, subfolder="tokenizer", **kw)
    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        repo, subfolder="text_encoder", torch_dtype=getattr(torch, args.dtype), **kw
    ).to(args.device)
    host = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, _execution_device=torch.device(args.device))

    def embed(text):
        with torch.no_grad():
            out = p25.Cosmos2_5_PredictBasePipeline._get_prompt_embeds(host, prompt=text, max_sequence_length=512)
        return out.float().cpu()

    negative = args.negative_prompt if args.negative_prompt is not None else p25.DEFAULT_NEGATIVE_PROMPT
    tensors = {"prompt_embeds": embed(args.prompt), "negative_prompt_embeds": embed(negative)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))


if __name__ == "__main__":
    main()
