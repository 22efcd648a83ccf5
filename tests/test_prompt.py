"""The prompt path (kernels/prompt.py): prefills on GEMMs (oneDNN's bf16 and int8 ones, our VNNI and bf16 ones),
each held to its contract, and the whole path to the exact fp32 kernels and to transformers' own bf16 model.

The contract (README, "Prompts on GEMMs"): a bf16 GEMM's inputs are rounded to bf16 and its sums are fp32; an
integer GEMM's inputs are rounded to int8 with a scale per row and its sums are exact; int8 and int4 weights widened
for a bf16 GEMM are rounded to bf16; SiLU x up is computed in the GEMMs' output type; the residual stream, norms,
routing and mixing stay fp32. So the bf16 path must be at least as close to the exact result as transformers' bf16
model, which rounds all of that and the residual stream too.
MIXTRAL_PROMPT=gemm runs the path on any CPU (slowly where it has no bf16 arithmetic), so these tests hold
everywhere; MIN_ROWS is lowered where a test needs short prompts to take it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model, save_hf_model

from mixtral import kernels, load
from mixtral.kernels import prompt
from mixtral.loading import default_model_path, load_model
from mixtral.model import attention_mask


@pytest.fixture(autouse=True)
def gemm_path(monkeypatch):
    monkeypatch.setenv("MIXTRAL_PROMPT", "gemm")
    monkeypatch.setattr(prompt, "MIN_ROWS", 1)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A bf16 Mixtral written by transformers: hidden 64, ffn 96, 4 experts top-2, GQA 4/2 heads."""
    out = tmp_path_factory.mktemp("prompt_bf16")
    return save_hf_model(make_hf_model(seed=11, vocab_size=256).to(torch.bfloat16), out)


def _ids(rows: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (rows, T), generator=torch.Generator().manual_seed(seed))


def _exact_and_fast(model, ids, routing: tuple[list, list] = ([], [])):
    runner = kernels.runner(model)
    assert runner.name == "native"
    with torch.no_grad():
        runner.exact = True
        exact = runner.forward(ids, routing=routing[0])
        runner.exact = False
        fast = runner.forward(ids, routing=routing[1])
    return exact, fast


@pytest.fixture(scope="module")
def wide_heads_dir(tmp_path_factory):
    """A bf16 Mixtral with heads of 64 (hidden 128, GQA 2/1 heads), which our attention kernel takes."""
    out = tmp_path_factory.mktemp("prompt_wide_heads")
    model = make_hf_model(seed=12, vocab_size=256, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    return save_hf_model(model.to(torch.bfloat16), out)


@pytest.mark.parametrize("T", [1, 2, 17, 129])
@pytest.mark.parametrize("heads", ["narrow", "wide"])
def test_fast_prompts_are_as_close_to_fp32_as_transformers_bf16(bf16_dir, wide_heads_dir, T, heads, monkeypatch):
    from transformers import MixtralForCausalLM

    path = bf16_dir if heads == "narrow" else wide_heads_dir
    model = load_model(path, dtype="bfloat16", progress=False)
    ids = _ids(2, T)
    attended, routing = [], ([], [])
    monkeypatch.setattr(prompt, "attention", lambda *a, real=prompt.attention: attended.append(1) or real(*a))
    exact, fast = _exact_and_fast(model, ids, routing)
    ours_attend = prompt.attends(*(torch.empty(1, 1, 1, 64),) * 3)
    assert len(attended) == (2 * (heads == "wide") if ours_attend else 0)  # our attention: the wide heads' layers
    with torch.no_grad():
        fp32 = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
        bf16 = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(ids).logits.float()
    assert (exact - fp32).abs().max() < 1e-4  # the exact path: the reference's numbers
    # (rounding may flip a near-tie between two experts, and that token, and through attention the ones after it,
    # then differ by far more than rounding: on the wide model at T = 129 one sequence flips at its 26th token)
    agreed = _same_routing_so_far(*routing)
    assert agreed.float().mean() > 0.5, agreed
    # each position's largest error: on average no larger, and nowhere more than twice transformers' largest (the
    # largest over a few positions can go either way where both round every GEMM's output to bf16, as oneDNN's
    # GEMMs do on AVX2-only and AMX CPUs: under MIXTRAL_AVX512=0 on Zen 4, heads of 64 at T = 17, largest 0.064
    # against 0.054, average 0.030 against 0.037)
    ours, theirs = ((got - fp32).abs().amax(-1)[agreed] for got in (fast, bf16))
    assert 0 < ours.mean() <= max(theirs.mean(), 1e-2), (ours, theirs)  # rounded (the path was taken), no worse
    assert ours.max() <= 2 * max(theirs.max(), 1e-2), (ours, theirs)


def _same_routing_so_far(a: list, b: list) -> torch.Tensor:
    """(B, T) True where every layer chose the same experts in both runs, at that position and all before it (a
    position sees the ones before it through attention)."""
    same = torch.ones(a[0].expert_ids.shape[:2], dtype=torch.bool)
    for x, y in zip(a, b):
        same &= (x.expert_ids.sort(-1).values == y.expert_ids.sort(-1).values).all(-1)
    return same.cumprod(-1).bool()


# The bound on the largest logit error against the exact path, as a share of the largest logit: activations
# rounded to bf16 (8 significant bits each) measured 0.9-1.2 % here; rounded to int8 with one scale per row (an
# error up to 1/254 of the row's largest), 1.4-2.5 % (hidden 64: few products average the rounding out).
BOUND = {"bf16": 0.02, "int8": 0.04}


@pytest.mark.parametrize("quantize,form", [("int8", "bf16"), ("int8", "int8"), ("int4-g32", "bf16"),
                                           ("int4-g32", "int8")])
@pytest.mark.parametrize("seed", [1, 2])
def test_quantized_fast_prompts_stay_within_their_rounding_of_the_exact_path(bf16_dir, quantize, form, seed,
                                                                                  monkeypatch):
    """Rounding may flip a near-tie between two experts, and that token then differs by far more than rounding
    (on this model about a third of random prompts of 3 x 40 tokens flip one, on either path's rounding): so the
    bound holds where the routing agreed, and a quarter of the positions at least must agree. `form`: the weights
    widened to bf16 (MIXTRAL_PROMPT=bf16) or on the integer GEMMs (=int8; int4 only with AVX512_VNNI), whatever
    this CPU would take."""
    monkeypatch.setenv("MIXTRAL_PROMPT", form)
    model = load_model(bf16_dir, dtype="bfloat16", progress=False, quantize=quantize)
    ids = _ids(3, 40, seed=seed)
    runner = kernels.runner(model)
    routing_exact, routing_fast = [], []
    with torch.no_grad():
        runner.exact = True
        exact = runner.forward(ids, routing=routing_exact)
        runner.exact = False
        fast = runner.forward(ids, routing=routing_fast)
    agreed = _same_routing_so_far(routing_exact, routing_fast)
    assert agreed.float().mean() > 0.25, agreed
    scale = exact.abs().max().item()
    error = (fast - exact).abs().amax(-1)[agreed].max().item()
    assert 0 < error < BOUND[form] * scale, (error, scale)


@pytest.mark.parametrize("M,K", [(1, 200), (2, 200), (17, 200), (128, 200), (100, 32768)])
@pytest.mark.parametrize("quantize", ["int8", "int4-g32", "int4-g128"])
def test_integer_gemms_compute_their_contract(monkeypatch, quantize, M, K):
    """Weights on the integer GEMMs: each activation row is rounded to int8 with one scale (max |x| / 127; codes
    x * (127 / max |x|) rounded to the nearest, ties to even; a zero row stays zero), the products are summed
    exactly (int4: per group, each group's sum times its scale added in fp32), then multiplied by the scales. Held
    here to float64 arithmetic on the same rounded values, rounded by torch, for an expert of a stacked weight and for
    rows given transposed (as the experts' hidden rows come) or in bf16 (a bf16 GEMM's outputs). K = 200 pads
    int4-g128's last group; K = 32768 makes our VNNI kernel take the 100 rows in chunks (of 64); 94 and 21 weight
    rows leave a partial last tile (of 4 int4 rows, of 8 int8 ones). int8: our VNNI kernel (up to OURS_MAX_ROWS =
    128 rows) and oneDNN's int8 GEMM give the same numbers."""
    from mixtral.kernels.native_lib import NativeWeight
    from mixtral.quantize import QuantLinear, parse_quantize

    monkeypatch.setenv("MIXTRAL_PROMPT", "int8")
    bits, group, _ = parse_quantize(quantize)
    gen = torch.Generator().manual_seed(M)
    weight = QuantLinear.from_weight(torch.randn(2, 21 if K > 1000 else 94, K, generator=gen) * 0.05, bits, group)
    native = NativeWeight(weight)
    if not prompt.integer_gemms():  # oneDNN's int8 GEMM did not sum exactly here (checked once): not used
        assert not prompt.integer(native)
        pytest.skip("oneDNN's int8 GEMM does not sum exactly on this CPU: int8/int4 weights are widened to bf16")
    if bits == 4 and not prompt._ours(native):
        assert not prompt.integer(native)
        pytest.skip("int4 takes the integer GEMM only on AVX512_VNNI (ours); here it is widened to bf16")
    x = torch.randn(M, K, generator=gen) * torch.logspace(-2, 1, M)[:, None]
    x[1:2] = 0.0  # (a zero row, where there are two or more)
    top = x.abs().amax(1, keepdim=True)
    inverse = torch.full_like(top, 127.0) / top  # (an fp32 division; torch's 127 / top rounds otherwise)
    codes = torch.where(top > 0, torch.round(x * inverse), 0.0)
    assert codes.abs().max() <= 127 and (codes != 0).any()
    wanted = ((codes * (top / 127)).double() @ weight.dequantize()[1].double().T).float()  # (float64 sums)
    got = prompt.linear(native, prompt.Rows(x), expert=1)
    assert got.dtype == torch.float32 and torch.allclose(got, wanted, rtol=1e-5, atol=1e-6 * wanted.abs().max())
    assert torch.equal(prompt.linear(native, prompt.Rows(x.t().contiguous().t()), expert=1), got)
    rounded = x.bfloat16()
    assert torch.equal(prompt.linear(native, prompt.Rows(rounded), expert=1),
                       prompt.linear(native, prompt.Rows(rounded.float()), expert=1))
    if bits == 8:
        assert M <= prompt.OURS_MAX_ROWS
        monkeypatch.setattr(prompt, "OURS_MAX_ROWS", 0)  # oneDNN's
        assert torch.equal(prompt.linear(native, prompt.Rows(x), expert=1), got)
    monkeypatch.setenv("MIXTRAL_PROMPT", "bf16")  # the same weight widened to bf16: bf16 activations, bf16 out
    widened = prompt.linear(native, prompt.Rows(x), expert=1)
    assert widened.dtype == torch.bfloat16 and not torch.equal(widened.float(), got)


@pytest.mark.parametrize("M,K", [(1, 200), (2, 200), (8, 200), (17, 200), (48, 200), (56, 200), (104, 200),
                                 (40, 32768)])
def test_our_bf16_gemm_sums_bf16_products_in_fp32(monkeypatch, M, K):
    """bf16 weights on our bf16 GEMM (AVX512_BF16, up to BF16_MAX_ROWS rows; oneDNN's beyond and on AMX): the rows
    rounded to bf16, each product exact, summed in fp32, out in fp32. Held to float64 sums of the same bf16 values,
    and to oneDNN's bf16 GEMM (whose out is rounded to bf16). K = 32768 takes the rows in chunks (of 32); 94 and 21
    weight rows leave a partial last tile of 8."""
    from mixtral.kernels.native_lib import NativeWeight

    gen = torch.Generator().manual_seed(M)
    weight = (torch.randn(2, 21 if K > 1000 else 94, K, generator=gen) * 0.05).bfloat16()
    native = NativeWeight(weight)
    x = torch.randn(M, K, generator=gen) * torch.logspace(-2, 1, M)[:, None]
    got = prompt.linear(native, prompt.Rows(x), expert=1)
    if not prompt._ours(native):
        assert got.dtype == torch.bfloat16
        pytest.skip("no AVX512_BF16 (or AMX, where oneDNN's bf16 GEMM runs on tiles): oneDNN's bf16 GEMM here")
    wanted = (x.bfloat16().double() @ weight[1].double().T).float()
    assert got.dtype == torch.float32 and torch.allclose(got, wanted, rtol=1e-5, atol=1e-6 * wanted.abs().max())
    assert torch.equal(prompt.linear(native, prompt.Rows(x.t().contiguous().t()), expert=1), got)
    monkeypatch.setattr(prompt, "BF16_MAX_ROWS", M - 1)  # one row too many for ours: oneDNN's
    onednn = prompt.linear(native, prompt.Rows(x), expert=1)
    assert onednn.dtype == torch.bfloat16 and torch.allclose(onednn.float(), got, rtol=2 ** -7, atol=1e-5)
    monkeypatch.setattr(prompt, "BF16_MAX_ROWS", M)
    monkeypatch.setenv("MIXTRAL_PROMPT", "bf16")  # every weight on oneDNN's
    assert torch.equal(prompt.linear(native, prompt.Rows(x), expert=1), onednn)


@pytest.mark.parametrize("M", [1, 5, 8, 17, 24, 40, 56, 64, 72, 104])
def test_our_bf16_gemm_gives_few_rows_the_numbers_it_gives_many(M):
    """Up to 8 rows take 256-bit tiles (a 512-bit one would be half empty), and more rows go in blocks of 48, 40,
    32, 24, 16 or 8 rows (vectors of 16, the last 8 in a 256-bit half): the same sums in the same order, so a row's
    numbers are those it gets among 120 rows, whatever block it falls in. 74 weight rows leave a partial last
    tile."""
    from mixtral.kernels.native_lib import NativeWeight

    gen = torch.Generator().manual_seed(M)
    native = NativeWeight((torch.randn(74, 202, generator=gen) * 0.05).bfloat16())
    x = torch.randn(120, 202, generator=gen)
    if not prompt._ours(native):
        pytest.skip("no AVX512_BF16 (or AMX): oneDNN's bf16 GEMM here")
    assert torch.equal(prompt.linear(native, prompt.Rows(x[:M])), prompt.linear(native, prompt.Rows(x))[:M])


@pytest.mark.parametrize("D,F,M", [(64, 96, 1), (94, 84, 8), (94, 84, 9), (200, 84, 40), (94, 84, 56), (94, 84, 72),
                                   (96, 32768, 40)])
def test_our_bf16_expert_is_its_three_gemms_with_swiglu_between(D, F, M, monkeypatch):
    """One expert in one call (mx_expert_bf16): h = silu(x W1^T) * (x W3^T) from the fp32 sums of bf16 products, in
    fp32, rounded to the nearest bf16; out = h W2^T summed in fp32. Held to float64 for all of it, h rounded to bf16
    (a few of our h may round the other way, from the fp32 sums and silu: a bf16 step each). 94 and 84 leave
    partial tiles; 8 rows take 256-bit tiles; F = 32768 takes the rows in chunks (of 32)."""
    import types

    from mixtral.kernels.native_lib import NativeWeight

    gen = torch.Generator().manual_seed(D + M)
    w1, w3, w2 = ((torch.randn(2, n, k, generator=gen) / k ** 0.5).bfloat16() for n, k in ((F, D), (F, D), (D, F)))
    layer = types.SimpleNamespace(w1=NativeWeight(w1), w3=NativeWeight(w3), w2=NativeWeight(w2))
    x = torch.randn(M, D, generator=gen) * torch.logspace(-1, 1, M)[:, None]
    if not prompt._ours(layer.w1):
        pytest.skip("no AVX512_BF16 (or AMX): oneDNN's bf16 GEMMs here")
    got = prompt.one_expert(layer, prompt.Rows(x), 1)
    xs = x.bfloat16().double()
    gate, up = xs @ w1[1].double().T, xs @ w3[1].double().T
    h = (gate * torch.sigmoid(gate) * up).bfloat16()
    wanted = h.double() @ w2[1].double().T
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), wanted, rtol=1e-3, atol=2e-3 * wanted.abs().max())
    assert torch.equal(prompt.one_expert(layer, prompt.Rows(x[:1]), 1), got[:1])  # (a row's numbers: its own)
    monkeypatch.setattr(prompt, "EXPERT_MAX_ROWS", M - 1)  # one row too many for one call: three GEMMs
    calls, linear = [], prompt.linear
    monkeypatch.setattr(prompt, "linear", lambda *a, **k: calls.append(a[0]) or linear(*a, **k))
    apart = prompt.one_expert(layer, prompt.Rows(x), 1).float()
    assert calls == [layer.w1, layer.w3, layer.w2]
    assert torch.allclose(apart.double(), wanted, rtol=1e-3, atol=2e-3 * wanted.abs().max())


@pytest.mark.parametrize("B,T,S,H,G,Dh,window", [
    (1, 1, 1, 4, 4, 64, None), (2, 2, 2, 4, 2, 32, None), (1, 17, 17, 16, 4, 64, None), (2, 129, 129, 8, 2, 128, None),
    (2, 64, 200, 4, 1, 64, None), (1, 300, 300, 8, 4, 64, 50), (2, 33, 90, 4, 2, 96, 40), (1, 70, 700, 2, 1, 32, None)])
def test_our_attention_is_attention_on_bf16_rounded_inputs(B, T, S, H, G, Dh, window):
    """Our prompt attention (mx_prompt_attention) against float64 SDPA with the model's mask on the same q, k, v
    rounded to bf16: its softmax weights are rounded to bf16 (relative error 2^-9), so each output is held within
    2^-8 of the weighted sum of |v|. Shapes: T = 1, 2, 17, 129; keys past the queries (a prompt's later chunk, and
    sequences at different positions), a sliding window, 1-4 query heads per key head, heads of 32-128."""
    gen = torch.Generator().manual_seed(T + S)
    q, k, v = (torch.randn(shape, generator=gen) * scale for shape, scale in
               (((B, T, H, Dh), 2.0), ((B, G, S, Dh), 2.0), ((B, G, S, Dh), 1.0)))
    if not prompt.attends(q, k, v):
        pytest.skip("this CPU has no AVX512_BF16 (or has AMX): our attention kernel does not run here")
    positions = torch.stack([torch.arange(S - T, S), torch.arange(T) + (S - T) // 2][:B])
    got = prompt.attention(q, k, v, positions, window).view(B, T, H, Dh).double()
    mask = attention_mask(positions, S, window)
    rounded = [t.to(torch.bfloat16).double() for t in (q, k, v)]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    want, spread = sdpa(*rounded), sdpa(rounded[0], rounded[1], rounded[2].abs())
    assert ((got - want).abs() <= 2 ** -8 * spread + 1e-6).all(), (got - want).abs().max()
    assert (got != sdpa(q.double(), k.double(), v.double())).any()  # (rounded inputs: the kernel ran)


def test_our_attention_keeps_a_nan_in_its_own_row():
    q, k, v = torch.randn(1, 3, 4, 64), torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64)
    if not prompt.attends(q, k, v):
        pytest.skip("this CPU has no AVX512_BF16 (or has AMX): our attention kernel does not run here")
    q[0, 2, 1, 5] = float("nan")  # position 2, head 1
    got = prompt.attention(q, k, v, torch.arange(3)[None], None).view(3, 4, 64)
    assert got[2, 1].isnan().all() and not got[:2].isnan().any() and not got[2, [0, 2, 3]].isnan().any()


def test_experts_without_tokens_and_one_expert_with_them_all(bf16_dir):
    model = load_model(bf16_dir, dtype="bfloat16", progress=False)
    for block in model.layers:  # equal router logits: every token goes to experts 0 and 1 (ties: lower index)
        block.ffn.router.weight.data.zero_()
    routing_exact, routing_fast = [], []
    runner = kernels.runner(model)
    ids = _ids(1, 33, seed=2)
    with torch.no_grad():
        runner.exact = True
        exact = runner.forward(ids, routing=routing_exact)
        runner.exact = False
        fast = runner.forward(ids, routing=routing_fast)
    for a, b in zip(routing_exact, routing_fast):
        assert torch.equal(a.expert_ids, b.expert_ids) and set(a.expert_ids.flatten().tolist()) == {0, 1}
    assert (fast - exact).abs().max() < 0.02 * exact.abs().max()


def test_exact_loads_keep_every_prompt_on_the_fp32_kernels(bf16_dir):
    model = load_model(bf16_dir, dtype="bfloat16", progress=False, exact=True)
    runner = kernels.runner(model)
    assert runner.exact
    ids = _ids(1, 20)
    with torch.no_grad():
        first = runner.forward(ids)
        runner.exact = False
        fast = runner.forward(ids)
        runner.exact = True
        assert torch.equal(runner.forward(ids), first)
    assert not torch.equal(fast, first)


def test_the_setting_says_which_path_prompts_take(monkeypatch):
    assert prompt.unavailable_reason() is None and "bf16 GEMMs" in prompt.describe()
    monkeypatch.setenv("MIXTRAL_PROMPT", "exact")
    assert "MIXTRAL_PROMPT=exact" in prompt.describe()


SAMPLE_PROMPTS = [  # chat prompts of 32+ tokens, as a prompt must be to take the GEMM path
    "Good morrow, my lord. I come from the court, where the king is sick and his sons are at odds. What news?",
    "Who goes there? Stand and unfold yourself, for the night is cold and the ghost walks upon the battlements.",
    "Tell me of the king, and of his sons, and of the lady whom the eldest loves and cannot wed. Speak plainly.",
    "Speak, what trade art thou? A cobbler, sir, a mender of bad soles, who walks the streets on holiday.",
    "Is this a dagger which I see before me, the handle toward my hand? Come, let me clutch thee, I pray.",
    "Where is the fair Ophelia now? She walks in the garden with flowers, singing of her father who is dead.",
]
REAL_MIN_ROWS = prompt.MIN_ROWS


def test_shipped_model_greedy_replies_equal_on_both_paths(monkeypatch):
    from mixtral.generate import generate
    from mixtral.sampling import SamplingParams

    monkeypatch.setattr(prompt, "MIN_ROWS", REAL_MIN_ROWS)
    model, tokenizer = load(default_model_path(), progress=False)
    runner = kernels.runner(model)
    replies = {}
    for exact in (True, False):
        runner.exact = exact
        replies[exact] = [generate(model, tokenizer, tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                                   SamplingParams(temperature=0, max_new_tokens=32)) for p in SAMPLE_PROMPTS]
    assert all(len(tokenizer.apply_chat_template([{"role": "user", "content": p}])) >= REAL_MIN_ROWS
               for p in SAMPLE_PROMPTS)
    assert replies[True] == replies[False]


@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_weights_widened_a_chunk_of_rows_at_a_time_give_the_same_prompt(bf16_dir, quantize, monkeypatch):
    """Large int8/int4 weights are widened and multiplied in chunks of rows (WIDEN_CHUNK_BYTES); forced here down
    to 5 rows a chunk, which leaves a short last chunk for every matrix of this model."""
    monkeypatch.setenv("MIXTRAL_PROMPT", "bf16")  # int8 weights widened, not on the integer GEMMs
    model = load_model(bf16_dir, dtype="bfloat16", progress=False, quantize=quantize)
    runner = kernels.runner(model)
    ids = _ids(2, 24, seed=3)
    with torch.no_grad():
        whole = runner.forward(ids)
        widened = []
        real_widen = prompt._widen
        monkeypatch.setattr(prompt, "_widen", lambda w, e, first, into: widened.append(len(into)) or
                            real_widen(w, e, first, into))
        monkeypatch.setattr(prompt, "WIDEN_CHUNK_BYTES", 2 * 5 * 96)  # 5 rows of the widest input (ffn 96)
        chunked = runner.forward(ids)
    assert widened and max(widened) <= 10 and min(widened) < 5  # chunks were taken, with short last ones
    assert (chunked - whole).abs().max() <= 1e-3 * whole.abs().max()


def test_weights_too_small_for_the_gemms_stay_on_the_exact_kernels(monkeypatch):
    """Prompts take the GEMMs from MIN_ROWS tokens, and only for weights of MIN_WEIGHTS elements or more (the exact
    kernels were faster on smaller ones at every prompt length measured): the shipped model's (256 x 256 at most)
    stay on the exact kernels, a 512 x 512 one goes to the GEMMs; MIXTRAL_PROMPT=gemm takes any size."""
    from mixtral.kernels.native_lib import NativeWeight

    monkeypatch.setattr(prompt, "unavailable_reason", lambda: None)  # as on a CPU with bf16 arithmetic
    monkeypatch.setattr(prompt, "MIN_ROWS", REAL_MIN_ROWS)
    small, large = (NativeWeight(torch.zeros(n, n, dtype=torch.bfloat16)) for n in (256, 512))
    assert prompt.takes([small, large], REAL_MIN_ROWS) and prompt.takes([small], REAL_MIN_ROWS)  # (the gemm fixture)
    monkeypatch.delenv("MIXTRAL_PROMPT")
    assert prompt.takes([small, large], REAL_MIN_ROWS) and not prompt.takes([large], REAL_MIN_ROWS - 1)
    assert not prompt.takes([small], REAL_MIN_ROWS) and not prompt.takes([small], 4096)
    model, tokenizer = load(default_model_path(), progress=False)
    calls = []
    real_linear = prompt.linear
    monkeypatch.setattr(prompt, "linear", lambda *args: calls.append(1) or real_linear(*args))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE_PROMPTS[0]}])
    assert len(ids) >= REAL_MIN_ROWS
    with torch.no_grad():
        model(torch.tensor([ids]))
    assert not calls
