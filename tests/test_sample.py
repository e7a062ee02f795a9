"""`make sample`: text from a GPT-2 run's final model (gpt2/sample.py, scripts/sample.py)."""

from __future__ import annotations

import pytest
import torch

from gpt2.model import GPT, config_for
from gpt2.sample import generate
from lib.data.tokenizer import gpt2_encoding
from lib.export import final_model_files
from scripts import sample

N_VOCAB = 50257


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_for("tiny", 64, 0.0)).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a final model, as a finished GPT-2 run leaves it."""
    directory = tmp_path_factory.mktemp("run")
    for name, data in final_model_files(tiny_gpt(), "gpt2-tiny", 10).items():
        (directory / name).write_bytes(data)
    return directory


def test_top_k_1_is_greedy_argmax():
    model = tiny_gpt()
    ids = gpt2_encoding().encode_ordinary("Now is the winter of our discontent")
    greedy = list(ids)
    with torch.no_grad():
        for _ in range(8):
            greedy.append(int(model(torch.tensor([greedy]))[0][0, -1, :N_VOCAB].argmax()))
    gen = torch.Generator().manual_seed(5)
    assert generate(model, ids, 8, 1.5, 1, gen, N_VOCAB) == greedy
    assert generate(model, ids, 8, 0.0, 0, gen, N_VOCAB) == greedy  # temperature 0: greedy too
    # Sampling among all tokens of a near-uniform untrained model does not follow the argmax.
    assert generate(model, ids, 8, 1.0, 0, gen, N_VOCAB) != greedy


def test_top_k_keeps_the_k_most_likely_tokens_only():
    model = tiny_gpt()
    ids = gpt2_encoding().encode_ordinary("Friends, Romans, countrymen")
    with torch.no_grad():
        top3 = set(torch.topk(model(torch.tensor([ids]))[0][0, -1, :N_VOCAB], 3).indices.tolist())
    firsts = {generate(model, ids, 1, 5.0, 3, torch.Generator().manual_seed(s), N_VOCAB)[-1] for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def test_padding_rows_are_never_sampled():
    model = tiny_gpt()
    with torch.no_grad():  # make the padding id 50300 by far the most likely token everywhere
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.wte.weight[50300] = 100.0
    out = generate(model, [464], 5, 0.0, 0, torch.Generator(), N_VOCAB)
    assert all(t < N_VOCAB for t in out)


def run_sample(capsys, *argv: str) -> str:
    assert sample.main(list(argv)) == 0
    return capsys.readouterr().out


def test_same_seed_same_text_and_the_prompt_round_trips(run_dir, capsys):
    prompt = 'Ünïcödé — “quoted” $(not a shell) `x`; and\na second line'
    args = ("--results", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12", "--top-k", "50")
    first = run_sample(capsys, *args, "--seed", "7")
    assert first == run_sample(capsys, *args, "--seed", "7")
    assert first != run_sample(capsys, *args, "--seed", "8")
    assert first.startswith(prompt) and len(first) > len(prompt)


def test_make_variables_give_the_defaults(run_dir, capsys, monkeypatch):
    for name, value in {"RESULTS": str(run_dir), "PROMPT": "To be", "MAX_NEW_TOKENS": "4", "TEMPERATURE": "0",
                        "TOP_K": "0", "SAMPLE_SEED": "3"}.items():
        monkeypatch.setenv(f"KPRUNE_{name}", value)
    out = run_sample(capsys)
    enc = gpt2_encoding()
    model = tiny_gpt()
    expected = generate(model, enc.encode_ordinary("To be"), 4, 0.0, 0, torch.Generator(), N_VOCAB)
    assert out == enc.decode(expected) + "\n"


@pytest.mark.parametrize("env, message", [({"TEMPERATURE": "hot"}, "TEMPERATURE='hot' is not a number"),
                                          ({"TOP_K": "-1"}, "TOP_K='-1' must be at least 0"),
                                          ({}, "no run given: make sample RESULTS=<run dir>")])
def test_bad_input_is_one_error_line(env, message, capsys, monkeypatch):
    monkeypatch.delenv("KPRUNE_RESULTS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(f"KPRUNE_{name}", value)
    assert sample.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
