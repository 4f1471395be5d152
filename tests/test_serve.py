"""`potstill serve`: the OpenAI-compatible endpoints against the model's own forward pass and the sampler."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from openai import OpenAI
from tests.serving_helpers import request, running
from transformers import AutoModelForCausalLM

from potstill.generation.text import completion_text
from potstill.sampling import SamplingSettings, sample
from potstill.serving import build_app

NAME = "tiny"


@pytest.fixture(scope="module")
def model(model_dirs):
    return AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with running(build_app(model, tokenizer, NAME, max_logprobs=5)) as url:
        yield url


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(L-1, V): log p(· | ids[..i]) for i = 0..L-2, from one plain forward."""
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)


def assert_close(actual: list[float], expected: torch.Tensor) -> None:
    assert actual == pytest.approx(expected.tolist(), rel=1e-5)


def test_models_lists_the_served_name(server):
    status, body = request(f"{server}/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [NAME]


@pytest.mark.parametrize("as_ids", [True, False])
def test_scoring_form_returns_the_models_own_logprobs_for_every_prompt_token(server, model, tokenizer, as_ids):
    """max_tokens 0 + echo + logprobs k (vLLM's scoring form) on a batch of token-id prompts: null first, then
    log_softmax of a plain forward at each position (rel 1e-5); top dicts = the reference top k, plus the token."""
    prompts = [[1, 20, 31, 44, 9, 300, 12], [1, 7, 7]]
    status, body = request(f"{server}/v1/completions", {"model": NAME, "prompt": prompts, "max_tokens": 0,
                                                          "echo": True, "logprobs": 3, "return_tokens_as_token_ids": as_ids})
    assert status == 200 and len(body["choices"]) == 2
    for ids, choice in zip(prompts, body["choices"]):
        lp = choice["logprobs"]
        names = [f"token_id:{i}" for i in ids] if as_ids else [tokenizer.decode([i]) for i in ids]
        assert lp["tokens"] == names and choice["finish_reason"] == "length"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = reference_logprobs(model, ids)
        assert_close(lp["token_logprobs"][1:], ref.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1))
        for row, top, token in zip(ref, lp["top_logprobs"][1:], ids[1:]):
            values, indices = row.topk(3)
            expected = dict(zip(indices.tolist(), values.tolist())) | {token: row[token].item()}
            key = (lambda i: f"token_id:{i}") if as_ids else (lambda i: tokenizer.decode([i]))
            assert list(top) == [key(i) for i in expected]  # most likely first, the listed token last if not in top k
            assert list(top.values()) == pytest.approx(list(expected.values()), rel=1e-5)
        lengths = [len(tokenizer.decode([i])) for i in ids]
        assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(ids))]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 10}


def test_text_prompts_are_tokenised_with_bos(server, model, tokenizer):
    prompt = "the cat sees the dog"
    status, body = request(f"{server}/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 0,
                                                          "echo": True, "logprobs": 0, "return_tokens_as_token_ids": True})
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    choice = body["choices"][0]
    assert status == 200 and choice["text"] == prompt
    assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in ids]
    assert_close(choice["logprobs"]["token_logprobs"][1:],
                 reference_logprobs(model, ids).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1))


def test_completions_generate_what_the_sampler_draws(server, model, tokenizer):
    """Generation with a seed equals potstill.sampling.sample with that seed; logprobs (without echo) cover the
    generated tokens, the first one included."""
    ids = [1, 20, 31, 44]
    status, body = request(f"{server}/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": 6, "n": 2,
                                                          "seed": 3, "temperature": 0.8, "logprobs": 1})
    out = sample(model, [ids], SamplingSettings(max_new_tokens=6, temperature=0.8, n=2),
                 eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=3)
    assert status == 200
    for choice, tokens in zip(body["choices"], out.tokens):
        assert choice["text"] == completion_text(tokenizer, ids, tokens) and choice["finish_reason"] == "length"
        full = ids + tokens
        assert_close(choice["logprobs"]["token_logprobs"],
                     reference_logprobs(model, full)[len(ids) - 1:].gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1))
    assert body["usage"]["completion_tokens"] == 12


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_completion_renders_the_template_and_samples(server, model, tokenizer):
    messages = [{"role": "user", "content": "what is 1 2 + 3 ?"}]
    reply = client(server).chat.completions.create(model=NAME, messages=messages, n=3, seed=11, temperature=1.0,
                                                   top_p=0.9, max_completion_tokens=7, logprobs=True, top_logprobs=2)
    prompt = chat_prompt_ids(tokenizer, messages)
    out = sample(model, [prompt], SamplingSettings(max_new_tokens=7, temperature=1.0, top_p=0.9, n=3),
                 eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=11)
    for choice, tokens in zip(reply.choices, out.tokens):
        assert choice.message.content == completion_text(tokenizer, prompt, tokens)
        ref = reference_logprobs(model, prompt + tokens)[len(prompt) - 1:]
        assert [e.token for e in choice.logprobs.content] == [tokenizer.decode([t]) for t in tokens]
        assert_close([e.logprob for e in choice.logprobs.content], ref.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1))
        assert_close([t.logprob for e in choice.logprobs.content for t in e.top_logprobs], ref.topk(2).values.flatten())
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 21


def test_finish_reason_stop_on_eos_and_on_a_stop_string(model_dirs, tokenizer):
    """A model whose generation config makes the 3rd greedy token an EOS stops there ("stop", EOS not in the text,
    counted in usage); a stop string cuts the text before it."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    prompt = [1, 20, 31]
    greedy = sample(model, [prompt], SamplingSettings(max_new_tokens=8, temperature=0), eos_ids=[], pad_id=0).tokens[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[2]]
    with running(build_app(model, tokenizer, NAME)) as url:
        _, body = request(f"{url}/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0})
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == greedy.index(greedy[2]) + 1
        assert choice["text"] == completion_text(tokenizer, prompt, greedy[: greedy.index(greedy[2])])
        stop = tokenizer.decode([greedy[1]])
        _, body = request(f"{url}/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                    "stop": [stop]})
        full = completion_text(tokenizer, prompt, greedy[:2])
        assert body["choices"][0] == {"index": 0, "text": full[: full.find(stop)], "logprobs": None, "finish_reason": "stop"}


def test_a_tokenizer_without_chat_template_gets_400(model, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with running(build_app(model, plain, NAME)) as url:
        status, body = request(f"{url}/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "no chat template" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, status, says", [
    ({"model": "other", "prompt": "the"}, 404, "does not exist"),
    ({"model": NAME}, 400, "prompt: Field required"),
    ({"model": NAME, "prompt": "the", "stream": True}, 400, "stream"),
    ({"model": NAME, "prompt": [1, 5000]}, 400, "outside the model's vocabulary"),
    ({"model": NAME, "prompt": "the", "logprobs": 6}, 400, "--max-logprobs"),
    ({"model": NAME, "prompt": "the", "max_tokens": 300}, 400, "context of 256 tokens"),
    ({"model": NAME, "prompt": "the", "max_tokens": 0}, 400, "without echo"),
    ({"model": NAME, "prompt": "the", "temperature": -1}, 400, "temperature"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, says):
    got, reply = request(f"{server}/v1/completions", body)
    assert got == status and says in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_requests_run_one_at_a_time_while_the_server_stays_responsive(model_dirs, tokenizer):
    """Two chat requests while the model is held inside a forward: /v1/models still answers, and the model never
    runs two forwards at once."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    entered, release, active, most = threading.Event(), threading.Event(), [0], [0]

    def enter(module, args):
        active[0] += 1
        most[0] = max(most[0], active[0])
        entered.set()
        assert release.wait(60)

    def leave(module, args, output):
        active[0] -= 1

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave)
    body = {"model": NAME, "messages": [{"role": "user", "content": "the"}], "max_tokens": 3}
    with running(build_app(model, tokenizer, NAME)) as url:
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(request(f"{url}/v1/chat/completions", body)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        assert entered.wait(60)
        assert request(f"{url}/v1/models", timeout=30)[0] == 200  # answered while a forward is held
        release.set()
        for t in threads:
            t.join(60)
    assert [status for status, _ in replies] == [200, 200] and most[0] == 1


def test_the_openai_client_reads_the_scoring_form_and_the_default_length(server, model, tokenizer):
    """The maintained client sends the scoring request (vLLM's extension through extra_body) and parses the null
    first entries; a completions request with max_tokens null generates OpenAI's default 16 tokens."""
    ids = [1, 20, 31, 44]
    reply = client(server).completions.create(model=NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=2,
                                              extra_body={"return_tokens_as_token_ids": True})
    lp = reply.choices[0].logprobs
    assert lp.tokens == [f"token_id:{i}" for i in ids] and lp.token_logprobs[0] is None
    assert_close(lp.token_logprobs[1:], reference_logprobs(model, ids).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1))
    _, body = request(f"{server}/v1/completions", {"model": NAME, "prompt": ids, "max_tokens": None, "temperature": 0})
    greedy = sample(model, [ids], SamplingSettings(16, 0), eos_ids=tokenizer.eos_token_id, pad_id=0).tokens[0]
    assert body["usage"]["completion_tokens"] == len(greedy) and len(greedy) == 16
