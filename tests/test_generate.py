"""The KV-cached sampler against the old greedy loop, transformers' generate and the uncached forward."""
from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import pytest
import torch

import codeparrot.generate as gen_mod
import codeparrot.sampler as sampler_mod
from codeparrot.generate import Infill, prompt_ids
from codeparrot.sampler import (NUCLEUS_CANDIDATES, Completion, SamplingConfig, filter_logits, first_stop,
                                nucleus_candidates, sample)
from codeparrot.model import GPT, GPTConfig, KVCache, generate, save_hf
from codeparrot.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, quality_token, train_on

STDLIB = Path(os.__file__).parent
EOS = "<|endoftext|>"
PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Foo:\n    def __init__(self):\n        self.", "x"]


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE trained on a few standard-library files."""
    texts = [(STDLIB / name).read_text() for name in ("abc.py", "bisect.py", "colorsys.py", "fnmatch.py")]
    return train_on(iter([texts]), vocab_size=400, min_frequency=2, eos_token=EOS)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    """A small random GPT; larger-than-GPT-2 init so that its logits are peaked and greedy argmax is unambiguous."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_positions=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


def encode(tok, text: str) -> list[int]:
    """Token ids of text, without special tokens."""
    return tok.encode(text, add_special_tokens=False).ids


def decoder(tok):
    """A decode function for the sampler."""
    return lambda ids: tok.decode(ids)


def old_greedy(model: GPT, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """The generated part of the old uncached loop (the oracle)."""
    out = generate(model, torch.tensor([prompt]), max_new_tokens, eos_token_id=eos_id)[0].tolist()
    return out[len(prompt):]


def greedy(model, prompt, max_new_tokens=20, **kw):
    """The single greedy Completion of our sampler."""
    return sample(model, [prompt], SamplingConfig(n=1, max_new_tokens=max_new_tokens, **kw))[0][0]


def test_cached_logits_equal_uncached(model, tok):
    ids = encode(tok, PROMPTS[2])
    full = ids + [5, 17, 42, 7, 99]
    ref = model(torch.tensor([full])).logits[0]  # [T, V]
    # prefill in two chunks (the second exercises the explicit mask), then one token at a time
    cache = KVCache(model.config.n_layer, len(full))
    a = model(torch.tensor([ids[:3]]), kv_cache=cache).logits[0]
    b = model(torch.tensor([ids[3:]]), kv_cache=cache, start_pos=3).logits[0]
    torch.testing.assert_close(torch.cat([a, b]), ref[: len(ids)], atol=1e-5, rtol=0)
    for pos in range(len(ids), len(full)):
        step = model(torch.tensor([[full[pos]]]), kv_cache=cache, start_pos=pos).logits[0, -1]
        torch.testing.assert_close(step, ref[pos], atol=1e-5, rtol=0)


def test_greedy_equals_old_loop(model, tok):
    for text in PROMPTS:
        prompt = encode(tok, text)
        assert greedy(model, prompt, 30).tokens == old_greedy(model, prompt, 30)


def test_greedy_n_rows_all_equal_old_loop(model, tok):
    prompt = encode(tok, PROMPTS[0])
    rows = sample(model, [prompt], SamplingConfig(n=3, max_new_tokens=15))[0]
    assert [r.tokens for r in rows] == [old_greedy(model, prompt, 15)] * 3


def test_greedy_equals_transformers(model, tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    eos_id = tok.token_to_id(EOS)
    save_hf(model, tmp_path, eos_token_id=eos_id)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for text in PROMPTS:
        prompt = encode(tok, text)
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=25,
                          eos_token_id=eos_id, pad_token_id=eos_id)[0, len(prompt):].tolist()
        ours = greedy(model, prompt, 25, eos_id=eos_id)
        assert ours.tokens + ([eos_id] if ours.finish == "eos" else []) == out


def test_sampling_reproducible_per_seed(model, tok):
    prompts = [encode(tok, t) for t in PROMPTS[:2]]

    def run(seed: int) -> list[list[list[int]]]:
        cfg = SamplingConfig(n=4, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
        return [[c.tokens for c in rows] for rows in sample(model, prompts, cfg)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_equals_greedy(model, tok):
    prompt = encode(tok, PROMPTS[1])
    rows = sample(model, [prompt], SamplingConfig(n=2, max_new_tokens=20, temperature=1.5, top_k=1, seed=3))[0]
    assert [r.tokens for r in rows] == [greedy(model, prompt, 20).tokens] * 2


def test_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    inf = float("-inf")
    assert filter_logits(logits, 2, 1.0).tolist() == [[inf, 3.0, 2.0, inf]]
    # probs ~ [0.09, 0.64, 0.24, 0.03]: 0.64 < 0.7 so the second-ranked token stays, the rest go
    assert filter_logits(logits, 0, 0.7).tolist() == [[inf, 3.0, 2.0, inf]]
    assert filter_logits(logits, 0, 0.5).tolist() == [[inf, 3.0, inf, inf]]


@pytest.mark.parametrize("top_k,top_p", [(1000, 1.0), (300, 0.5), (300, 1.0), (256, 0.99), (0, 0.95), (0, 0.5),
                                         (50, 0.9), (10, 0.3), (5000, 1.0)])
def test_nucleus_fast_path_equals_filter_logits(top_k, top_p):
    """Where the fast path answers, its kept tokens and probabilities are filter_logits' + softmax, for any top_k."""
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 4.0):  # flat logits: nuclei of hundreds of tokens; peaked: a handful
        logits = torch.randn(4, 2000, generator=gen) * scale  # [B, V]
        ref = filter_logits(logits, top_k, top_p).softmax(dim=-1)  # [B, V]
        found = nucleus_candidates(logits, top_k, top_p)
        if found is None:  # the caller falls back to filter_logits itself
            assert top_k > NUCLEUS_CANDIDATES or scale == 1.0, "the fast path should answer here"
            continue
        kept, ids = found
        fast = torch.zeros_like(ref).scatter(1, ids, kept.softmax(dim=-1))
        kept_fast, kept_ref = int((fast > 0).sum()), int((ref > 0).sum())
        assert torch.equal(fast > 0, ref > 0), f"fast path kept {kept_fast} tokens, filter_logits {kept_ref}"
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)


def keep_rows_counter(monkeypatch) -> list[int]:
    """Count KVCache.keep_rows calls (each one compacts every layer's cache)."""
    calls: list[int] = []
    original = KVCache.keep_rows

    def counted(self, rows):
        calls.append(len(rows))
        original(self, rows)

    monkeypatch.setattr(KVCache, "keep_rows", counted)
    return calls


def test_finished_rows_are_masked_until_half_are_done(model, tok, monkeypatch):
    """Finished rows ride along masked; the cache is compacted only when half of its rows are done, and the
    completions are those of compacting after every finish."""
    prompt = encode(tok, PROMPTS[0])
    free = sample(model, [prompt], SamplingConfig(n=16, max_new_tokens=30, temperature=1.0, top_k=5, seed=0))[0]
    eos_id = free[0].tokens[3]  # a token that really occurs, so that rows end at many different steps
    cfg = SamplingConfig(n=16, max_new_tokens=30, temperature=1.0, top_k=5, eos_id=eos_id, seed=0)
    calls = keep_rows_counter(monkeypatch)
    monkeypatch.setattr(sampler_mod, "COMPACT_FINISHED", 0.0, raising=False)  # compact after every finish (the old way)
    every = sample(model, [prompt], cfg)[0]
    n_every = len(calls)
    monkeypatch.setattr(sampler_mod, "COMPACT_FINISHED", 0.5, raising=False)
    masked = sample(model, [prompt], cfg)[0]
    n_masked = len(calls) - n_every
    ends = sorted({len(c.tokens) for c in every if c.finish == "eos"})
    assert len(ends) >= 6, "rows should finish at many different steps"
    assert [(c.tokens, c.finish) for c in masked] == [(c.tokens, c.finish) for c in every]
    assert n_every >= len(ends) - 1 and n_masked < n_every


def full_decode_finish_row(i, tok, tokens, done, cfg, decode) -> bool:
    """The reference: decode the sample's whole output after every token and look for the stop strings in it."""
    if cfg.eos_id is not None and tok == cfg.eos_id:
        done[i] = Completion(tokens[i], decode(tokens[i]), "eos")
        return True
    tokens[i].append(tok)
    if not cfg.stop:
        return False
    text = decode(tokens[i])
    cut = first_stop(text, cfg.stop)
    if cut < 0:
        return False
    done[i] = Completion(tokens[i], text[:cut], "stop")
    return True


def test_stop_window_equals_full_decode(model, tok, monkeypatch):
    """Searching the last few tokens finds every stop string that decoding the whole output finds, at the same
    token, and cuts the text at the same place; random byte tokens give split (multi-byte) characters too."""
    decode = decoder(tok)
    prompts = [encode(tok, t) for t in PROMPTS]
    free = sample(model, prompts, SamplingConfig(n=4, max_new_tokens=30, temperature=1.5, seed=1), decode)
    texts = [c.text for rows in free for c in rows]
    stops = [texts[0][10:13], texts[5][4:6], texts[9][12:20], "\n", "):"]
    cfg = SamplingConfig(n=4, max_new_tokens=30, temperature=1.5, seed=1, stop=stops)
    ours = sample(model, prompts, cfg, decode)
    monkeypatch.setattr(sampler_mod, "finish_row", full_decode_finish_row)
    ref = sample(model, prompts, cfg, decode)
    assert ours == ref
    assert sum(c.finish == "stop" for rows in ref for c in rows) >= 4


def test_stop_search_work_is_linear(model, tok):
    """Each step decodes a bounded tail of its row, not the whole output: decoded tokens grow linearly."""
    decode = decoder(tok)
    prompt = encode(tok, PROMPTS[3])

    def decoded_tokens(max_new_tokens: int) -> int:
        seen: list[int] = []
        counting = lambda ids: (seen.append(len(ids)), decode(ids))[1]  # noqa: E731
        [[c]] = sample(model, [prompt], SamplingConfig(max_new_tokens=max_new_tokens, stop=["@@@"]), counting)
        assert c.finish == "length"
        return sum(seen)

    short, long = decoded_tokens(20), decoded_tokens(60)
    # a window of a few tokens per step, one whole decode for the Completion; the whole-output search decodes
    # 1 + 2 + ... + 60 tokens, and each step past the 20th costs it 21 to 60
    assert long <= 60 * 10 + 60 and long - short <= 40 * (10 + 1)


def test_sampled_rows_follow_their_own_prefix(model, tok):
    """Rows that finish leave the batch; every remaining row must still be decoded from its own cache."""
    prompt = encode(tok, PROMPTS[0])
    free = sample(model, [prompt], SamplingConfig(n=6, max_new_tokens=20, temperature=1.0, top_k=3, seed=0))[0]
    eos_id = free[0].tokens[4]  # a token that really occurs, so that rows end at different steps
    cfg = SamplingConfig(n=6, max_new_tokens=20, temperature=1.0, top_k=3, eos_id=eos_id, seed=0)
    rows = sample(model, [prompt], cfg)[0]
    assert len({len(r.tokens) for r in rows}) > 1, "rows should finish at different steps"
    for r in rows:
        seq = prompt + r.tokens + ([eos_id] if r.finish == "eos" else [])
        logits = model(torch.tensor([seq])).logits[0]
        for pos in range(len(prompt), len(seq)):
            assert seq[pos] in logits[pos - 1].topk(3).indices.tolist()


def test_eos_stops_a_row(model, tok):
    prompt = encode(tok, PROMPTS[2])
    free = greedy(model, prompt, 30).tokens
    eos_id = free[6]
    first = free.index(eos_id)
    c = greedy(model, prompt, 30, eos_id=eos_id)
    assert (c.tokens, c.finish) == (free[:first], "eos")


def test_stop_string_split_across_two_tokens(model, tok):
    decode = decoder(tok)
    prompt = encode(tok, PROMPTS[0])
    free = greedy(model, prompt, 40).tokens
    # a stop string made of the last char of token i and the first char of token i+1, absent from before
    for i in range(len(free) - 1):
        head, nxt = decode(free[: i + 1]), decode([free[i + 1]])
        stop = head[-1:] + nxt[:1]
        if len(stop) == 2 and stop.isascii() and stop not in head:
            break
    else:
        pytest.fail("no token boundary to split a stop string across")
    c = sample(model, [prompt], SamplingConfig(max_new_tokens=40, stop=["never-there", stop]), decode)[0][0]
    assert (c.tokens, c.text, c.finish) == (free[: i + 2], head[:-1], "stop")


def test_stop_cuts_at_first_occurrence(model, tok):
    decode = decoder(tok)
    prompt = encode(tok, PROMPTS[1])
    free = greedy(model, prompt, 40).tokens
    text = decode(free)
    late, early = text[-3:], text[5:8]  # two stop strings: the earlier one in the text must win
    c = sample(model, [prompt], SamplingConfig(max_new_tokens=40, stop=[late, early]), decode)[0][0]
    cut = min(text.find(late), text.find(early))
    assert c.text == text[:cut] and c.finish == "stop"
    assert early in decode(c.tokens) and early not in decode(c.tokens[:-1])


def test_stop_searched_only_in_generated_text(model, tok):
    decode = decoder(tok)
    prompt = encode(tok, "def f():\n    return 1\ndef g():\n")  # holds the stop string "\ndef"
    free = greedy(model, prompt, 20).tokens
    text = decode(free)
    c = sample(model, [prompt], SamplingConfig(max_new_tokens=20, stop=["\ndef"]), decode)[0][0]
    assert len(c.tokens) > 0
    expected = text[: text.find("\ndef")] if "\ndef" in text else text
    assert c.text == expected


def test_too_long_prompt_is_refused(model):
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ max_new_tokens 10 = 70 exceeds .* n_positions 64"):
        sample(model, [[1] * 60], SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty prompt"):
        sample(model, [[]], SamplingConfig(max_new_tokens=10))


def test_stop_without_decode_is_refused(model):
    with pytest.raises(ValueError, match="decode"):
        sample(model, [[1, 2]], SamplingConfig(max_new_tokens=4, stop=["\n"]))


def test_training_mode_restored(model):
    model.train()
    sample(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=3))
    assert model.training
    model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok, model) -> Path:
    """The random model and its tokenizer saved as a checkpoint directory (no config.yaml: defaults apply)."""
    d = tmp_path_factory.mktemp("gen") / "step-1"
    save_hf(model, d, eos_token_id=tok.token_to_id(EOS))
    tok.save(str(d / "tokenizer.json"))
    return d


def generate_cli(capsys, ckpt: Path, *args: str) -> tuple[int, str, str]:
    """Run `codeparrot generate` in this process: exit code, stdout, stderr."""
    from codeparrot.cli import main

    code = main(["generate", "--checkpoint", str(ckpt), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_command_streams_the_text_it_writes(capsys, tmp_path, checkpoint, tok, model):
    """Greedy: the streamed text is the prompt + the JSONL completion, which is the sampler's own (after EOS)."""
    prompt = PROMPTS[0]
    code, _, _ = generate_cli(capsys, checkpoint, "-p", prompt, "--temperature", "0", "--max-new-tokens", "20",
                              "-o", str(tmp_path / "out.jsonl"))
    assert code == 0
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    eos = tok.token_to_id(EOS)
    [[expected]] = sample(model, [[eos, *encode(tok, prompt)]], SamplingConfig(max_new_tokens=20, eos_id=eos),
                          decoder(tok))
    assert row["completion"] == expected.text and row["finish"] == expected.finish and len(expected.text) > 5
    code, out, _ = generate_cli(capsys, checkpoint, "-p", prompt, "--temperature", "0", "--max-new-tokens", "20")
    assert code == 0 and out == f"=== prompt 0, sample 0 ===\n{prompt}{expected.text}\n"
    # A stop string from the middle of that text: the stream must hold back its first characters, then cut there.
    text = expected.text
    at = next(i for i in range(len(text) // 2, len(text) - 3) if text[i:i + 3].isascii())
    stop, cut = text[at:at + 3], text[:text.find(text[at:at + 3])]
    code, out, _ = generate_cli(capsys, checkpoint, "-p", prompt, "--temperature", "0", "--max-new-tokens", "20",
                                "--stop", stop.replace("\n", "\\n"))
    assert code == 0 and out == f"=== prompt 0, sample 0 ===\n{prompt}{cut}\n"


def test_generate_reads_prompt_files_and_stdin(capsys, monkeypatch, tmp_path, checkpoint):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    code, _, _ = generate_cli(capsys, checkpoint, "--prompt-file", str(prompts), "-n", "3", "--max-new-tokens", "8",
                              "--seed", "5", "-o", str(tmp_path / "out.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0 and [(r["prompt"], r["sample"]) for r in rows] == [(p, i) for p in PROMPTS[:2] for i in range(3)]
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[1]))
    code, out, _ = generate_cli(capsys, checkpoint, "--max-new-tokens", "8", "-n", "2")
    assert code == 0 and out.count(f"sample 1 ===\n{PROMPTS[1]}") == 1
    prompts.write_text('{"prompt": "x"}\n["no"]\n')
    code, _, err = generate_cli(capsys, checkpoint, "--prompt-file", str(prompts))
    assert code == 2 and 'prompts.jsonl:2: not a JSON object with a "prompt"' in err


def test_generate_refuses_a_prompt_longer_than_the_context(capsys, checkpoint):
    code, out, err = generate_cli(capsys, checkpoint, "-p", PROMPTS[2] * 20, "--max-new-tokens", "8")
    assert code == 2 and "exceeds the model's context n_positions 64" in err and "Traceback" not in err
    assert out == ""  # nothing was sampled


PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return c\n"


def test_infill_and_quality_prompts_on_token_ids(tok):
    """PSM exactly: [EOS, <quality_q>?, <fim_prefix>] prefix [<fim_suffix>] suffix [<fim_middle>]; the literal
    strings of those tokens in user text stay text."""
    eos, fp, fs, fm = (tok.token_to_id(t) for t in (EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    high = tok.token_to_id(quality_token("high"))
    psm = [fp, *encode(tok, PREFIX), fs, *encode(tok, SUFFIX), fm]
    assert prompt_ids(tok, Infill(PREFIX, SUFFIX), eos) == [eos, *psm]
    assert prompt_ids(tok, Infill(PREFIX, SUFFIX), eos, "high") == [eos, high, *psm]
    assert prompt_ids(tok, PROMPTS[0], eos, "high") == [eos, high, *encode(tok, PROMPTS[0])]
    literal = prompt_ids(tok, Infill(f"x = '{FIM_MIDDLE}{EOS}'\n", ""), eos)
    assert literal.count(fm) == 1 and literal.count(eos) == 1 and literal[-1] == fm  # only the ones we put


def test_generate_infills_from_the_psm_prompt(capsys, tmp_path, checkpoint, tok, model):
    """`--prefix/--suffix` samples the middle from exactly the PSM ids; the stream shows prefix, middle, suffix."""
    eos, fp, fs, fm = (tok.token_to_id(t) for t in (EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    psm = [eos, fp, *encode(tok, PREFIX), fs, *encode(tok, SUFFIX), fm]
    [[expected]] = sample(model, [psm], SamplingConfig(max_new_tokens=12, eos_id=eos), decoder(tok))
    flags = ["--prefix", PREFIX, "--suffix", SUFFIX, "--temperature", "0", "--max-new-tokens", "12"]
    code, _, _ = generate_cli(capsys, checkpoint, *flags, "-o", str(tmp_path / "out.jsonl"))
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0 and (row["prefix"], row["suffix"]) == (PREFIX, SUFFIX) and "prompt" not in row
    assert row["completion"] == expected.text and row["tokens"] == len(expected.tokens) > 0
    code, out, _ = generate_cli(capsys, checkpoint, *flags)
    assert code == 0 and out == f"=== prompt 0, sample 0 ===\n{PREFIX}{expected.text}{SUFFIX}\n"


def test_generate_quality_prepends_its_token(capsys, tmp_path, checkpoint, tok, model):
    eos = tok.token_to_id(EOS)
    ids = [eos, tok.token_to_id(quality_token("low")), *encode(tok, PROMPTS[0])]
    [[expected]] = sample(model, [ids], SamplingConfig(max_new_tokens=12, eos_id=eos), decoder(tok))
    code, _, _ = generate_cli(capsys, checkpoint, "-p", PROMPTS[0], "--quality", "low", "--temperature", "0",
                              "--max-new-tokens", "12", "-o", str(tmp_path / "out.jsonl"))
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0 and row["completion"] == expected.text
    code, _, err = generate_cli(capsys, checkpoint, "-p", "x", "--quality", "best")
    assert code == 2 and "--quality: 'best' is not one of" in err and "Traceback" not in err


def test_generate_refuses_an_infill_with_a_prompt(capsys, checkpoint):
    code, out, err = generate_cli(capsys, checkpoint, "-p", "x", "--prefix", PREFIX)
    assert code == 2 and "mutually exclusive" in err and out == ""


# --- the command line: names in errors, the default checkpoint, instructions ---------------------------------------

def write_checkpoint(directory: Path, tok, model: GPT, overrides: list[str]) -> Path:
    """The random model as a complete checkpoint whose config.yaml is the defaults with `overrides`."""
    from codeparrot.config import load_config

    save_hf(model, directory, eos_token_id=tok.token_to_id(EOS))
    tok.save(str(directory / "tokenizer.json"))
    load_config(None, overrides).save(directory / "config.yaml")
    (directory / "trainer_state.json").write_text("{}\n")  # what marks a step-N complete
    return directory


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`codeparrot ARGS` in this process: exit code, stdout, stderr."""
    from codeparrot.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_config_leaves_room_for_a_prompt():
    """Finding: tiny.yaml kept generate.max_new_tokens at 128, its model's whole context, so every prompt failed."""
    from codeparrot.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert cfg.generate.max_new_tokens <= (cfg.model.n_positions or cfg.data.seq_length) // 2


def test_max_new_tokens_errors_name_the_flag_or_the_key(capsys, checkpoint):
    """Finding: the error named `max_new_tokens` when the user had typed --max-new-tokens (or set nothing)."""
    code, out, err = generate_cli(capsys, checkpoint, "-p", "x", "--max-new-tokens", "64")
    assert code == 2 and out == "" and err.splitlines()[-1] == (  # (a log line may come before)
        "codeparrot generate: error: --max-new-tokens 64 leaves no room for a prompt in the model's context "
        "n_positions 64; lower --max-new-tokens below 64")
    code, _, err = generate_cli(capsys, checkpoint, "-p", "x")  # the default, 128, from the config
    assert code == 2 and "error: generate.max_new_tokens 128 leaves no room" in err
    code, _, err = generate_cli(capsys, checkpoint, "-p", PROMPTS[2] * 20, "--max-new-tokens", "8")
    assert code == 2 and "+ --max-new-tokens 8 = " in err and err.endswith("or lower --max-new-tokens\n")


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-0.5", "--temperature must be at least 0, got -0.5"),
    ("--top-p", "2", "--top-p must be greater than 0 and at most 1, got 2.0"),
    ("--top-p", "0", "--top-p must be greater than 0 and at most 1, got 0.0"),
    ("--top-k", "-5", "--top-k must be at least 0, got -5"),
    ("-n", "0", "-n must be at least 1, got 0"),
    ("--quality", "best", """--quality: 'best' is not one of "", low, medium, high"""),
])
def test_flags_outside_their_range_are_refused_naming_the_flag(capsys, checkpoint, flag, value, message):
    """Finding: --temperature -0.5, --top-p 2 and --top-k -5 were accepted."""
    code, out, err = generate_cli(capsys, checkpoint, "-p", "x", "--max-new-tokens", "4", flag, value)
    assert (code, out, err) == (2, "", f"codeparrot generate: error: {message}\n")


def test_without_config_generate_finds_the_one_run_there(capsys, monkeypatch, tmp_path, tok, model):
    """Finding: right after the demo (configs/tiny.yaml: run tiny), `generate` without --config looked for the
    defaults' run `default` and said "train first". The one pretraining run under the default workdir is used now;
    with several, or with --config or a run key given, nothing is guessed and the error says what to pass."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "work" / "tiny" / "runs"  # the defaults' paths.workdir, which configs/tiny.yaml shares
    write_checkpoint(runs / "tiny" / "step-2", tok, model, ["train.run_name=tiny", "generate.max_new_tokens=8"])
    write_checkpoint(runs / "sft" / "step-1", tok, model, ["train.run_name=sft"])  # a fine-tuning run: not it
    code, out, _ = run_main(capsys, "generate", "-p", PROMPTS[0], "--temperature", "0")
    assert code == 0 and out.startswith(f"=== prompt 0, sample 0 ===\n{PROMPTS[0]}")
    code, out, err = run_main(capsys, "generate", "train.run_name=gone", "-p", "x")
    assert code == 2 and "no complete checkpoint under work/tiny/runs/gone; work/tiny/runs holds the pretraining " \
                          "runs tiny: pick one (tiny: --config tiny) or pass --checkpoint" in err
    code, out, _ = run_main(capsys, "generate", "--config", "tiny", "-p", PROMPTS[0], "--max-new-tokens", "4")
    assert code == 0 and out.startswith("=== prompt 0")
    write_checkpoint(runs / "other" / "step-1", tok, model, ["train.run_name=other"])
    code, out, err = run_main(capsys, "generate", "-p", "x")
    assert code == 2 and out == "" and err.splitlines()[-1] == (
        "codeparrot generate: error: no complete checkpoint under work/tiny/runs/default; work/tiny/runs holds the "
        "pretraining runs other, tiny: pick one (other: train.run_name=other; tiny: --config tiny) or pass "
        "--checkpoint")
    code, _, err = run_main(capsys, "generate", "paths.workdir=elsewhere", "-p", "x")
    assert code == 2 and "under elsewhere/runs/default; run `codeparrot train` first" in err


def test_instruction_prompts_are_the_fine_tuning_rows_prompts(capsys, monkeypatch, tmp_path, tok):
    """--instruction/--input: exactly the prompt ids sft's encode_record gives the record (no EOS or quality token
    before them), sampled from the sft run's final/ by default; only the response is printed."""
    from codeparrot.generate import Instruction
    from codeparrot.sft.format import encode_record

    torch.manual_seed(0)  # the instruction format's preamble alone is ~140 tokens here: a wider context than `model`
    model = GPT(GPTConfig(vocab_size=tok.get_vocab_size(), n_positions=256, n_layer=2, n_head=2, n_embd=32)).eval()
    eos, decode = tok.token_to_id(EOS), functools.partial(tok.decode, skip_special_tokens=False)
    record = {"instruction": "Add two numbers.", "input": f"a = 1\nb = '{EOS}'", "output": ""}
    ids = encode_record(record, tok)[0]
    assert prompt_ids(tok, Instruction(record["instruction"], record["input"]), eos) == ids and eos not in ids
    short = {"instruction": "Add.", "output": ""}
    assert prompt_ids(tok, Instruction("Add."), eos) == encode_record(short, tok)[0]  # no input section

    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "generate", "--instruction", "Add.")
    assert code == 2 and "no complete checkpoint under work/tiny/runs/sft; run `codeparrot sft` first" in err
    final = tmp_path / "work" / "tiny" / "runs" / "sft" / "final"  # where `sft` writes its model, as it saves it
    write_checkpoint(final, tok, model, ["train.run_name=sft", "generate.max_new_tokens=10"])
    seen, real = [], gen_mod.sample
    monkeypatch.setattr(gen_mod, "sample", lambda m, ps, *a, **k: seen.append(ps) or real(m, ps, *a, **k))
    code, out, _ = run_main(capsys, "generate", "--instruction", record["instruction"], "--input", record["input"],
                            "--temperature", "0", "-o", str(tmp_path / "out.jsonl"))
    [[expected]] = real(model, [ids], SamplingConfig(max_new_tokens=10, eos_id=eos), decode)
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0 and seen == [[ids]] and row["completion"] == expected.text
    assert (row["instruction"], row["input"]) == (record["instruction"], record["input"]) and "prompt" not in row
    code, out, _ = run_main(capsys, "generate", "--instruction", record["instruction"], "--input", record["input"],
                            "--temperature", "0")
    assert code == 0 and out == expected.text + "\n"  # the response only
    code, out, _ = run_main(capsys, "generate", "--instruction", "Add.", "-n", "2", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("=== sample 0 ===\n") and "\n=== sample 1 ===\n" in out


@pytest.mark.parametrize("args, message", [
    (["-p", "x"], "--instruction (a fine-tuned model's prompt format) and --prompt/--prompt-file/--prefix/--suffix "
                  "are mutually exclusive"),
    (["--prefix", "a"], "are mutually exclusive"),
    (["--prompt-file", "f.jsonl"], "are mutually exclusive"),
    (["--quality", "high"], "--quality 'high': an instruction takes no quality token"),
])
def test_instruction_refuses_other_prompts_and_quality(capsys, checkpoint, args, message):
    code, out, err = generate_cli(capsys, checkpoint, "--instruction", "Add.", "--max-new-tokens", "4", *args)
    assert code == 2 and out == "" and message in err.splitlines()[-1]
    code, _, err = generate_cli(capsys, checkpoint, "--input", "x")
    assert code == 2 and "--input is the input of an --instruction; give --instruction too" in err
