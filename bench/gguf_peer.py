"""Our engine and llama.cpp on the same GGUF files: greedy continuations and speed, side by side in one run.

    python bench/gguf_peer.py --llama-bin /path/to/llama.cpp/build/bin          # the shipped model
    python bench/gguf_peer.py --llama-bin DIR --model DIR --tokens 64 --json

The model is written as GGUF by our exporter (`mixtral export-gguf`: F16, Q8_0, Q4_0), and its F16 file is
quantized by llama.cpp's own `llama-quantize` to Q4_0 and Q4_K_M. On each file, for each prompt, llama.cpp's
`llama-simple` (greedy) and ours (`load(file)`, greedy; quantized files held in our nearest format, as
`--model x.gguf` does) continue the prompt for --tokens tokens or to the end-of-sequence token, and the two texts
are compared as llama.cpp prints them (piece by piece, so equal text means equal tokens); "fp32 eq" repeats the
comparison with the file's own values widened to fp32 (`--quantize none --dtype float32`). Then llama.cpp's
`llama-bench -p 128 -n 64` and our prefill and decode tokens/s on the same file, in the same run.
Needs a llama.cpp build with llama-simple, llama-quantize and llama-bench (README: peers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import last_line, llama_env  # noqa: E402

PROMPTS = ["[INST] Who goes there? [/INST]", "[INST] What news from the battle? [/INST]",
           "[INST] Wilt thou be my love? [/INST]", "[INST] Good morrow, my lord. How fares the king? [/INST]",
           "[INST] I am no traitor, sir. [/INST]", "ROMEO:", "KING HENRY: Once more unto the breach,",
           "First Citizen:\nBefore we proceed any further, hear me speak."]


def llama_text(tokenizer, ids: list[int]) -> str:
    """The ids as llama.cpp prints them token by token: "▁" as a space, byte pieces as their bytes."""
    out = bytearray()
    for i in ids:
        piece = tokenizer.id_to_piece(i)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(int(piece[3:5], 16))
        else:
            out += piece.replace("\u2581", " ").encode()
    return out.decode(errors="replace")


def ours_continuation(model, tokenizer, prompt: str, tokens: int) -> str:
    import torch

    from mixtral.generate import generate_step
    from mixtral.sampling import Sampler, SamplingParams

    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new = []
    with torch.inference_mode():
        for [(token, _)] in generate_step(model, [ids], [Sampler(SamplingParams(temperature=0))], tokens):
            if token == tokenizer.eos_id:
                break
            new.append(token)
    return llama_text(tokenizer, ids + new)


def ours_speed(model, prompt_tokens: int, new_tokens: int, repeat: int) -> dict:
    import torch

    from mixtral.generate import generate_step
    from mixtral.sampling import Sampler, SamplingParams

    prompt = torch.randint(3, model.args.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0))

    def timed(n: int) -> list[float]:
        times = [time.perf_counter()]
        for _ in generate_step(model, [prompt.tolist()], [Sampler(SamplingParams(temperature=0))], n):
            times.append(time.perf_counter())
        return times

    with torch.inference_mode():
        timed(3)
        runs = [timed(new_tokens + 1) for _ in range(repeat)]
    return {"prefill_tok_s": max(prompt_tokens / (t[1] - t[0]) for t in runs),
            "decode_tok_s": max(new_tokens / (t[-1] - t[1]) for t in runs)}


def llama_continuation(bin_dir: Path, gguf: Path, prompt: str, tokens: int, bos: str = "<s>") -> str:
    """llama.cpp's greedy continuation, printed as llama-simple prints it: the BOS piece, the prompt, the new text.
    llama-simple cannot turn off llama.cpp's weight repacking, whose AMX path for Q8_0/Q4_0 crashes on some Xeons
    (README: peers); when it is killed by a signal, llama-completion runs instead with `--no-repack`, greedy (top-k
    1), its output put in llama-simple's form (no BOS piece printed, " [end of text]" at the end of a reply)."""
    proc = subprocess.run([str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(tokens), prompt],
                          capture_output=True, text=True, env=llama_env(), timeout=600)
    if proc.returncode < 0 and (bin_dir / "llama-completion").exists():
        proc = subprocess.run([str(bin_dir / "llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(tokens),
                               "--no-repack", "--samplers", "top_k", "--top-k", "1", "-no-cnv", "--simple-io",
                               "--no-warmup", "-t", "2"], capture_output=True, text=True, env=llama_env(), timeout=600)
        if proc.returncode == 0:
            return bos + proc.stdout.rstrip("\n").removesuffix(" [end of text]").rstrip("\n")
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(proc.args[0]).name}: " + last_line(proc))
    return proc.stdout.rstrip("\n")


def llama_speed(bin_dir: Path, gguf: Path, prompt_tokens: int, new_tokens: int, repeat: int) -> dict:
    """llama-bench's prefill and decode tokens/s; rerun with `--repack 0` when killed by a signal (as llama_continuation
    does; the row's "repack" then says so)."""
    command = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", "2", "-p", str(prompt_tokens),
               "-n", str(new_tokens), "-r", str(repeat), "-o", "json"]
    proc = subprocess.run(command, capture_output=True, text=True, env=llama_env(), timeout=900)
    repack = proc.returncode >= 0
    if not repack:
        proc = subprocess.run(command + ["--repack", "0"], capture_output=True, text=True, env=llama_env(), timeout=900)
    if proc.returncode != 0:
        return {"error": "llama-bench: " + last_line(proc)}
    tests = json.loads(proc.stdout)
    return {"prefill_tok_s": next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"]),
            "decode_tok_s": next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"]), "repack": repack}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bin", required=True, help="folder with llama-simple, llama-quantize, llama-bench "
                                                           "(and llama-completion, where llama-simple crashes)")
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()

    from mixtral import gguf_file, load
    from mixtral.weights import export_gguf
    from mixtral.loading import load_model, resolve_model
    from mixtral.tokenizer import load_tokenizer

    bin_dir = Path(opts.llama_bin)
    source = resolve_model(opts.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mixtral-gguf-peer-") as tmp:
        model = load_model(source, dtype="float32", pack=False, progress=False)
        tokenizer = load_tokenizer(source)
        files = {}
        for kind in ("f16", "q8_0", "q4_0"):
            files[f"ours {kind.upper()}"] = export_gguf(model, tokenizer, Path(tmp) / f"{kind}.gguf", kind,
                                                             progress=False)
        del model
        for kind in ("Q4_0", "Q4_K_M"):
            out = Path(tmp) / f"llama-{kind}.gguf"
            proc = subprocess.run([str(bin_dir / "llama-quantize"), str(files["ours F16"]), str(out), kind],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"llama-quantize {kind}: {last_line(proc)}", file=sys.stderr)
                continue
            files[f"llama-quantize {kind}"] = out
        bos = tokenizer.id_to_piece(tokenizer.bos_id)
        for name, path in files.items():
            model, tok = load(path, progress=False)
            row = {"file": name, "mb": round(path.stat().st_size / 1e6, 1),
                   "prompts": len(PROMPTS), "agree": 0, "first_difference": []}
            held = gguf_file.nearest_quantization(path)[0]
            row["held_as"] = held or "bfloat16"
            for prompt in PROMPTS:
                ours = ours_continuation(model, tok, prompt, opts.tokens)
                theirs = llama_continuation(bin_dir, path, prompt, opts.tokens, bos)
                if ours == theirs:
                    row["agree"] += 1
                else:
                    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                    row["first_difference"].append({"prompt": prompt, "ours": ours[max(0, at - 20):at + 40],
                                                    "llama.cpp": theirs[max(0, at - 20):at + 40]})
            row["ours"] = ours_speed(model, opts.prompt_tokens, opts.new_tokens, opts.repeat)
            del model
            # and with the file's own values, widened to fp32 (--quantize none --dtype float32): what differs then
            # is arithmetic (llama.cpp rounds activations to 8 bits for its quantized dot products), not the weights
            model, _ = load(path, dtype="float32", quantize="none", progress=False)
            row["agree_fp32"] = sum(ours_continuation(model, tok, p, opts.tokens)
                                    == llama_continuation(bin_dir, path, p, opts.tokens, bos) for p in PROMPTS)
            row["llama.cpp"] = llama_speed(bin_dir, path, opts.prompt_tokens, opts.new_tokens, opts.repeat)
            rows.append(row)
            del model
    if opts.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{source.name}: greedy continuations ({opts.tokens} tokens or to EOS) equal to llama.cpp's, and speed "
          f"(prefill {opts.prompt_tokens} / decode {opts.new_tokens} tokens/s, 2 threads)")
    print(f"{'file':<24}{'MB':>7}  {'ours holds':<14}{'equal':>7}{'fp32 eq':>9}{'ours pp':>10}{'llama pp':>10}"
          f"{'ours tg':>9}{'llama tg':>10}")
    for row in rows:
        o, t = row["ours"], row["llama.cpp"]
        print(f"{row['file']:<24}{row['mb']:>7}  {row['held_as']:<14}{row['agree']:>3}/{row['prompts']:<3}"
              f"{row['agree_fp32']:>5}/{row['prompts']:<3}"
              f"{o['prefill_tok_s']:>10,.0f}{t.get('prefill_tok_s', float('nan')):>10,.0f}"
              f"{o['decode_tok_s']:>9,.0f}{t.get('decode_tok_s', float('nan')):>10,.0f}"
              + ("" if t.get("repack", True) else "  (llama.cpp: --repack 0)"))
        for diff in row["first_difference"]:
            print(f"    differs on {diff['prompt']!r}: ours {diff['ours']!r} / llama.cpp {diff['llama.cpp']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
