"""Quantization quality on held-out text: perplexity of bf16, int8 and int4 weights, and greedy agreement.

For one checkpoint (default: the shipped model) and the prepared validation plays (`mixtral prepare-data`),
each setting is loaded as users load it (`load_model`, CPU kernels included) and measured on the same reply
text: nats per character, perplexity per reply token, and its change against bf16. Then each greedy-decodes
`--new-tokens` tokens from the first `--prompts` validation prompts, and the share of positions where its tokens
equal bf16's (up to the first difference, and overall) is reported.

    python bench/quality.py --data runs/data                    # the shipped model
    python bench/quality.py --model DIR --data runs/data --json
    python bench/quality.py --data runs/data --gguf m.Q4_K_M.gguf --gguf m.Q8_0.gguf   # GGUF files of the model too

A `--gguf` file is loaded as `--model FILE.gguf` loads it: held in our nearest format (int8, or int4 in groups of
32; Q4_0, Q4_1 and Q4_K blocks as they are, the others dequantized and quantized again): the row says what reading
a llama.cpp quantization costs, against our bf16. Its "exact" row holds the file's own values in fp32 (`--quantize
none --dtype float32`): the difference between the two rows is what our holding of the file's blocks costs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

SETTINGS = [("bf16", None), ("int8", "int8"), ("int8+head", "int8+head"), ("int4", "int4")]


def validation_prompts(data: Path, n: int) -> list[list[int]]:
    """The first n conversations' prompts: tokens up to and including the first [/INST]."""
    from mixtral.data import load_split

    ids, mask, _ = load_split(data, "val")
    ids, mask = ids.tolist(), mask.tolist()
    prompts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] == 1:  # BOS starts the next conversation
            conv, conv_mask = ids[start:i], mask[start:i]
            if 1 in conv_mask:
                prompts.append(conv[:conv_mask.index(1)])
            start = i
            if len(prompts) == n:
                break
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    parser.add_argument("--data", default="runs/data", help="prepared data (mixtral prepare-data)")
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate on this many validation tokens")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gguf", action="append", default=[], metavar="FILE",
                        help="also a GGUF file of the same model, loaded the default way (repeatable)")
    opts = parser.parse_args(argv)

    import torch

    from mixtral.data import load_split
    from mixtral.generate import generate_step
    from mixtral.loading import load_model
    from mixtral.sampling import Sampler, SamplingParams
    from mixtral.train import reply_chars_tensor, reply_nats_per_char

    from mixtral.errors import MixtralError

    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        ids, mask, meta = load_split(Path(opts.data), "val")
    except MixtralError as e:  # (no prepared text: one line, not a traceback)
        print(f"error: {e}; `mixtral prepare-data --out DIR` makes it, then --data DIR", file=sys.stderr)
        return 2
    chars = reply_chars_tensor(ids, mask, meta)
    prompts = validation_prompts(Path(opts.data), opts.prompts)
    rows, greedy = [], {}
    settings = [(name, opts.model, quantize, "bfloat16") for name, quantize in SETTINGS]
    for f in opts.gguf:
        label = Path(f).name.removesuffix(".gguf").rpartition(".")[2] or Path(f).name
        settings.append((label, f, None, "bfloat16"))
        settings.append((f"{label} exact", f, "none", "float32"))  # the file's own values, no second rounding
    for name, path, quantize, dtype in settings:
        start = time.perf_counter()
        model = load_model(path, dtype=dtype, progress=False, quantize=quantize)
        result = reply_nats_per_char(model, ids, mask, chars, max_tokens=opts.max_tokens)
        steps = generate_step(model, prompts, [Sampler(SamplingParams(temperature=0)) for _ in prompts],
                              opts.new_tokens)
        tokens = [step for step in steps]
        greedy[name] = [[step[row][0] for step in tokens] for row in range(len(prompts))]
        rows.append({"setting": name, "nats_per_char": result["nats_per_char"],
                     "perplexity": math.exp(result["nats_per_token"]), "reply_tokens": result["reply_tokens"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    base = rows[0]
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
        same = [sum(a == b for a, b in zip(ours, ref)) for ours, ref in zip(greedy[row["setting"]], greedy["bf16"])]
        prefix = [next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
                  for ours, ref in zip(greedy[row["setting"]], greedy["bf16"])]
        total = len(prompts) * opts.new_tokens
        row["greedy_token_agreement"] = sum(same) / total
        row["greedy_identical_prefix"] = sum(prefix) / total
    report = {"model": opts.model or "shipped", "reply_tokens": base["reply_tokens"], "prompts": len(prompts),
              "new_tokens": opts.new_tokens, "results": rows}
    if opts.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']}: {base['reply_tokens']:,} held-out reply tokens; greedy {opts.new_tokens} tokens from "
          f"{len(prompts)} validation prompts, compared with bf16")
    print(f"{'setting':<14}{'nats/char':>11}{'perplexity':>12}{'vs bf16':>9}{'same tokens':>13}{'same prefix':>13}")
    for row in rows:
        print(f"{row['setting']:<14}{row['nats_per_char']:>11.4f}{row['perplexity']:>12.3f}"
              f"{row['perplexity_change']:>+9.2%}{row['greedy_token_agreement']:>13.1%}"
              f"{row['greedy_identical_prefix']:>13.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
