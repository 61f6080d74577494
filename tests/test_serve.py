"""smoe serve: a real server process on a free port, talked to with the official openai client and raw HTTP.

One server per module (a tiny random model built here, a tokenizer trained here, a chat template), 4 rows and a
queue of 4, one torch thread like this process, so its greedy tokens can be compared with smoe.generate's.
"""

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

for module in ("starlette", "uvicorn", "jinja2", "httpx", "openai"):
    pytest.importorskip(module)

import httpx  # noqa: E402
import openai  # noqa: E402

import smoe  # noqa: E402
from smoe import presets  # noqa: E402
from smoe.cli import main  # noqa: E402
from smoe.generation import default_stop_tokens  # noqa: E402
from smoe.io.tokenizer import find_tokenizer  # noqa: E402
from smoe.serve.config import ServeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
ROWS, QUEUE, CONTEXT = 4, 4, 2048  # long enough that requests held in a test cannot finish first
READ_TIMEOUT, DRAIN = 2, 3  # seconds: --read-timeout, --shutdown-timeout
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_model(directory: Path, chat_template: str | None = TEMPLATE) -> Path:
    from smoe.interop.hf import save_model_checkpoint
    from smoe.train.data.tokenizer import train_tokenizer

    words = "once upon a time a little fox found a red ball and played with it in the sun all day".split()
    tokenizer = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4, vocab_size=300)
    torch.manual_seed(0)
    config = presets.get("deepseek-v3-tiny", vocab_size=300, n_layers=2, max_seq_len=CONTEXT,
                         **{"layout.n_mtp_modules": 0})
    save_model_checkpoint(smoe.build_model(config), directory, tokenizer_json=tokenizer.to_str())
    # No end-of-sequence token: a random model would emit one at any step, and the tests need requests that run
    # for as long as they ask (stop tokens are tests/test_generate.py's, and Reply's below).
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))
    if chat_template is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return directory


class Server:
    def __init__(self, directory: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SMOE_API_KEY": KEY}
        self.directory, self.model = directory, str(directory)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smoe", "serve", self.model, "--port", "0", "--max-batch", str(ROWS),
             "--max-queue", str(QUEUE), "--max-seq-len", str(CONTEXT), "--shutdown-timeout", str(DRAIN),
             "--read-timeout", str(READ_TIMEOUT)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        ready = threading.Event()

        def read():  # keeps draining the pipe so the server never blocks on a full one
            for line in self.proc.stdout:
                self.output.append(line)
                if " on http://" in line:
                    self.url = line.rsplit(" on ", 1)[1].split()[0]
                    self.maps_when_ready = _memory_maps(self.proc.pid)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180) or self.proc.poll() is not None:
            raise RuntimeError("smoe serve did not start:\n" + "".join(self.output))
        self.headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path: str, body, headers=(), timeout: float = 60) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, headers={**self.headers, **dict(headers)},
                          timeout=timeout)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def wait_for(self, condition, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not condition(self.metrics()):
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}: {self.metrics()}")
            time.sleep(0.05)


def _memory_maps(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # not Linux
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(make_model(tmp_path_factory.mktemp("serve") / "model"))
    yield server
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(60)


def test_openai_client_completes_streams_chats_and_lists_the_model(server):
    client = server.client
    assert [m.id for m in client.models.list()] == [server.model]
    done = client.completions.create(model=server.model, prompt="once upon a", max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(client.completions.create(model=server.model, prompt="once upon a", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "a fox"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    streamed = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "a fox"}],
                                              max_tokens=5, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    parts = list(streamed)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_concurrent_greedy_requests_get_what_generate_gives_each_alone(server):
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randint(0, 300, (n,), generator=g).tolist(), m)
             for n, m in [(3, 12), (17, 7), (1, 10), (30, 9), (8, 14), (12, 5), (5, 11), (150, 8)]]

    def ask(case):
        prompt, max_tokens = case
        return server.post("/v1/completions", {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0}).json()

    with ThreadPoolExecutor(len(cases)) as pool:  # 8 at once on 4 rows: they join and leave the running batch
        answers = list(pool.map(ask, cases))
    # What smoe.generate gives each prompt on its own, with the server's row count, stop tokens and threads.
    model, tokenizer = smoe.load_pretrained(server.directory), find_tokenizer(server.directory)
    stop = default_stop_tokens(server.directory, tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (prompt, max_tokens), answer in zip(cases, answers, strict=True):
            alone = smoe.generate(model, [prompt], max_new_tokens=max_tokens, stop_tokens=stop, decode_rows=ROWS,
                                  prefill_chunk=ServeConfig.prefill_chunk)[0].tolist()  # 150 tokens: 3 chunks
            alone = alone[: next((i + 1 for i, t in enumerate(alone) if t in stop), len(alone))]
            assert answer["usage"]["completion_tokens"] == len(alone)
            assert answer["choices"][0]["text"] == tokenizer.decode(alone)
    finally:
        torch.set_num_threads(threads)


def test_extreme_sampling_values_fail_alone_while_a_stream_runs(server):
    body = {"model": server.model, "prompt": [4, 5, 6], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", content=json.dumps(body), headers=server.headers,
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        greedy = {"model": server.model, "prompt": "a fox", "max_tokens": 4, "temperature": 0}
        tiny = server.post("/v1/completions", {**greedy, "temperature": 1e-40})  # greedy, not a NaN softmax
        assert tiny.status_code == 200
        assert tiny.json()["choices"][0]["text"] == server.post("/v1/completions", greedy).json()["choices"][0]["text"]
        zero_p = server.post("/v1/completions", {**greedy, "temperature": 1, "top_p": 1e-46})
        assert zero_p.status_code == 400 and zero_p.json()["error"]["param"] == "top_p"
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the stream was not aborted


def _log_softmax_of(server, ids: list[int]) -> torch.Tensor:
    """The model's own next-token log-probabilities at every position of ``ids`` (one forward, this process)."""
    model = smoe.load_pretrained(server.directory)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_echo_with_logprobs_scores_the_prompt_as_the_models_forward_does(server):
    tokenizer = find_tokenizer(server.directory)
    text = "once upon a time a little fox"
    ids = tokenizer.encode(text).ids
    scored = server.client.completions.create(model=server.model, prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == text and scored.usage.completion_tokens == 0 and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing comes before it
    expected = _log_softmax_of(server, ids)
    for t in range(1, len(ids)):
        assert logprobs.token_logprobs[t] == pytest.approx(expected[t - 1, ids[t]].item(), abs=1e-4)
        best = expected[t - 1].topk(2)
        top = logprobs.top_logprobs[t]
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert top[tokenizer.decode([int(best.indices[0])])] == max(top.values())
        assert logprobs.top_logprobs[t][logprobs.tokens[t]] == logprobs.token_logprobs[t]  # its own, too
    assert logprobs.text_offset == [sum(len(x) for x in logprobs.tokens[:t]) for t in range(len(ids))]
    # lm-evaluation-harness's request for a loglikelihood: token ids, echo, one new token, logprobs 1
    harness = server.post("/v1/completions", {"model": server.model, "prompt": [ids], "max_tokens": 1, "echo": True,
                                              "logprobs": 1, "temperature": 0, "seed": 1234}).json()["choices"][0]
    assert harness["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-6)
    assert len(harness["logprobs"]["token_logprobs"]) == len(ids) + 1


def test_generated_tokens_carry_the_models_logprobs_streamed_or_not(server):
    prompt = [5, 9, 12, 40]
    body = {"model": server.model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    whole = server.post("/v1/completions", body).json()["choices"][0]
    tokenizer = find_tokenizer(server.directory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's tokens are generate's with its rows and threads
    try:
        new = smoe.generate(smoe.load_pretrained(server.directory), [prompt], max_new_tokens=6,
                            decode_rows=ROWS)[0].tolist()
    finally:
        torch.set_num_threads(threads)
    lp = whole["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in new]  # each token's text decoded alone
    for t, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert t == max(top.values()) and len(top) <= 3  # greedy; texts two tokens share (U+FFFD) count once
    expected = _log_softmax_of(server, prompt + new)
    for t, token in enumerate(new):
        assert lp["token_logprobs"][t] == pytest.approx(expected[len(prompt) - 1 + t, token].item(), abs=1e-4)
    streamed_text = server.post("/v1/completions", {**body, "stream": True}).text
    events = [json.loads(line[6:]) for line in streamed_text.splitlines() if line.startswith("data: {")]
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert sum((c["tokens"] for c in streamed), []) == lp["tokens"]
    assert sum((c["text_offset"] for c in streamed), []) == lp["text_offset"]
    echoed = server.post("/v1/completions", {**body, "echo": True, "stream": True}).text
    assert json.loads(echoed.split("data: ")[1])["choices"][0]["logprobs"]["tokens"][0] == tokenizer.decode([5])
    chat = server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "a fox"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and "".join(c.token for c in content) == \
        chat.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob and c.bytes == list(c.token.encode())
    refused = server.post("/v1/completions", {**body, "max_tokens": 0})
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]
    assert server.post("/v1/completions", {**body, "logprobs": 21}).status_code == 400


# lm-evaluation-harness, when this interpreter has it or SMOE_LM_EVAL_PYTHON names one that does (it is no
# dependency of smoe: e.g. a venv with `pip install 'lm-eval[api]'`).
LM_EVAL_PYTHON = sys.executable if importlib.util.find_spec("lm_eval") else os.environ.get("SMOE_LM_EVAL_PYTHON")
LM_EVAL_TASKS = {
    "smoe_tiny_choice": {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "target_delimiter": "",
                         "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                         "metric_list": [{"metric": "acc"}]},
    "smoe_tiny_generate": {"output_type": "generate_until", "doc_to_text": "{{context}}",
                           "doc_to_target": "{{target}}", "metric_list": [{"metric": "exact_match"}],
                           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False,
                                                 "temperature": 0}},
}


@pytest.mark.slow
@pytest.mark.skipif(LM_EVAL_PYTHON is None, reason="lm-evaluation-harness is not installed (SMOE_LM_EVAL_PYTHON)")
def test_lm_evaluation_harness_scores_and_generates_what_the_model_does(server, tmp_path):
    docs = [{"context": "once upon a time a", "choices": [" little fox", " red ball", " sun"], "answer": 0},
            {"context": "the fox found a", "choices": [" red ball", " day"], "answer": 1},
            {"context": "and played with it in", "choices": [" the sun all day", " a time"], "answer": 0}]
    for name, task in LM_EVAL_TASKS.items():  # local files: no dataset download
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({**d, "target": "x"}) + "\n" for d in docs))
        (tmp_path / f"{name}.yaml").write_text(json.dumps({  # YAML reads JSON
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **task}))
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    args = (f"model={server.model},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={server.directory},tokenized_requests=True,max_length={CONTEXT},max_retries=1,timeout=120")
    run = subprocess.run([LM_EVAL_PYTHON, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                          "--tasks", ",".join(LM_EVAL_TASKS), "--include_path", str(tmp_path), "--batch_size", "1",
                          "--output_path", str(tmp_path / "out"), "--log_samples"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {name: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{name}_*.jsonl"))
                      .read_text().splitlines()] for name in LM_EVAL_TASKS}
    tokenizer, model = find_tokenizer(server.directory), smoe.load_pretrained(server.directory)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    checked = 0
    for sample in samples["smoe_tiny_choice"]:
        doc = sample["doc"]
        for choice, (loglikelihood, greedy) in zip(doc["choices"], (r[0] for r in sample["resps"]), strict=True):
            loglikelihood, greedy = float(loglikelihood), greedy in (True, "True")  # logged as text
            context, whole = encode(doc["context"]), encode(doc["context"] + choice)  # lm-eval's split
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            rows = range(len(context) - 1, len(whole) - 1)
            assert loglikelihood == pytest.approx(sum(logprobs[t, whole[t + 1]].item() for t in rows), abs=1e-4)
            assert greedy == all(int(logprobs[t].argmax()) == whole[t + 1] for t in rows)
            checked += 1
    assert checked == 7
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's greedy tokens are generate's with its rows and threads
    try:
        for sample in samples["smoe_tiny_generate"]:
            new = smoe.generate(model, [encode(sample["doc"]["context"])], max_new_tokens=6,
                                decode_rows=ROWS)[0].tolist()
            assert sample["resps"][0][0] == tokenizer.decode(new).split("\n")[0]
    finally:
        torch.set_num_threads(threads)
    assert len(samples["smoe_tiny_generate"]) == 3


def test_a_stop_string_ends_the_text_before_it(server):
    free = server.post("/v1/completions", {"model": server.model, "prompt": "a red", "max_tokens": 12,
                                           "temperature": 0}).json()["choices"][0]["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert len(stop) == 2
    for stream in (False, True):
        response = server.post("/v1/completions", {"model": server.model, "prompt": "a red", "max_tokens": 12,
                                                   "temperature": 0, "stop": [stop], "stream": stream})
        if stream:
            events = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {")]
            text = "".join(e["choices"][0]["text"] for e in events)
            finish = events[-1]["choices"][0]["finish_reason"]
        else:
            text, finish = response.json()["choices"][0]["text"], response.json()["choices"][0]["finish_reason"]
        assert text == free[: free.index(stop)] and finish == "stop"


def test_reply_text_stops_before_a_stop_string_and_holds_back_its_beginning():
    from smoe.serve.app import Reply
    from smoe.train.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a fox and a cat"] * 10, vocab_size=260)
    ids = {c: tokenizer.token_to_id(c) for c in "abcxy"}
    reply = Reply(tokenizer, ("xy", "cab"))
    assert [reply.push(ids[c], None) for c in "abc"] == ["a", "b", ""]  # "c" may begin "cab"
    assert reply.push(ids["a"], None) == ""  # "ca" may still become "cab"
    assert reply.push(ids["x"], None) == "ca"  # it did not; "x" may begin "xy"
    assert reply.push(ids["y"], None) == "" and reply.finish_reason == "stop" and reply.text == "abca"
    stopped = Reply(tokenizer, ())
    assert stopped.push(ids["a"], None) == "a" and stopped.push(ids["b"], "stop") == ""  # a stop token: no text
    assert stopped.finish_reason == "stop" and stopped.tokens == 2


def test_metrics_count_tokens_and_the_tokens_routed_to_each_expert(server):
    def routed(m):
        return {layer: sum(v for k, v in m.items() if f'layer="{layer}"' in k) for layer in (1,)}

    before = server.metrics()
    answer = server.post("/v1/completions", {"model": server.model, "prompt": [5, 6, 7, 8], "max_tokens": 6,
                                             "temperature": 0}).json()
    after = server.metrics()
    new = answer["usage"]["completion_tokens"]
    top_k = presets.get("deepseek-v3-tiny").moe.top_k
    # every prompt token and every generated token but the last went through layer 1's router once
    assert routed(after)[1] - routed(before)[1] == top_k * (4 + new - 1)
    assert after["smoe_generation_tokens_total"] - before["smoe_generation_tokens_total"] == new
    assert after["smoe_prompt_tokens_total"] - before["smoe_prompt_tokens_total"] == 4
    assert after['smoe_requests_total{endpoint="/v1/completions",code="200"}'] >= 1
    assert after["smoe_batch_rows"] == ROWS and after["smoe_queue_depth"] == 0


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "other", "prompt": "a"}, 400, "model"),
    ({"model": None, "prompt": "a"}, 400, "model"),
    ({"prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"prompt": "a", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "a", "max_tokens": -1, "echo": True}, 400, "max_tokens"),
    ({"prompt": "a", "mystery": 1}, 400, "mystery"),
    ({"prompt": list(range(CONTEXT + 1))}, 400, "prompt"),
    ({"prompt": [1, 2, 3], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"prompt": [1, 10**9]}, 400, "prompt"),
    ({"prompt": "a" * (16 * CONTEXT + 1)}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"messages": [{"role": "user", "content": "a"}]}, 400, "messages"),  # to /v1/completions: no prompt
])
def test_bad_requests_get_an_openai_error_naming_the_field(server, body, status, param):
    if isinstance(body, dict):
        body = {"model": server.model, **body} if "model" not in body else body
        body = {k: v for k, v in body.items() if v is not None}
    response = server.post("/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if param:
        assert error["message"].startswith(param)


def test_limits_and_keys(server):
    huge = b'{"prompt": "' + b"a" * 400_000 + b'"}'
    assert server.post("/v1/completions", huge).status_code == 413
    assert server.post("/v1/completions", {"model": server.model, "prompt": "a"},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(server.url + "/nowhere", headers=server.headers).json()["error"]["message"]


def test_a_full_queue_is_429_and_clients_that_leave_free_their_rows(server):
    body = {"model": server.model, "prompt": [1, 2, 3], "max_tokens": CONTEXT - 3, "temperature": 0}

    def impatient():  # a plain request whose client gives up while it waits
        with pytest.raises(httpx.TimeoutException):
            server.post("/v1/completions", body, timeout=1)

    with httpx.Client(timeout=60, headers=server.headers) as http, ThreadPoolExecutor(QUEUE) as pool:
        streams = [http.stream("POST", server.url + "/v1/completions", content=json.dumps({**body, "stream": True}))
                   for _ in range(ROWS)]
        for stream in streams:
            stream.__enter__()
        server.wait_for(lambda m: m["smoe_running_requests"] == ROWS, "the streams to take every row")
        waiting = [pool.submit(impatient) for _ in range(QUEUE)]
        server.wait_for(lambda m: m["smoe_queue_depth"] == QUEUE, "the queue to fill")
        refused = server.post("/v1/completions", body)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.headers["Retry-After"] == "1"
        for future in waiting:
            future.result()
        server.wait_for(lambda m: m["smoe_queue_depth"] == 0, "the queue to empty as its clients left")
        for stream in streams:
            stream.__exit__(None, None, None)  # the clients go away mid-stream
    server.wait_for(lambda m: m["smoe_running_requests"] == 0 and m["smoe_queue_depth"] == 0, "the rows to free")


def test_fuzzed_request_bodies_never_take_the_server_down(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)
    keys = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
                            "stop", "n", "stream", "stream_options", "logprobs", "echo", "user", "x"])
    fields = st.dictionaries(keys, values, max_size=8)
    sane = st.fixed_dictionaries({"model": st.just(server.model),
                                  "prompt": st.text(max_size=30) | st.lists(st.integers(-2, 400), max_size=8),
                                  "messages": st.lists(st.fixed_dictionaries(
                                      {"role": st.sampled_from(["user", "assistant", "robot"]), "content": values}),
                                      max_size=3),
                                  "max_tokens": st.integers(-1, 3)}, optional={"stream": st.booleans(),
                                                                                "stop": values, "seed": values})
    bodies = st.binary(max_size=64) | st.builds(lambda a, b: json.dumps({**a, **b}).encode(), fields, sane)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def check(body, path):
        response = server.post(path, body)
        assert response.status_code in (200, 400, 429), response.text
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert httpx.get(server.url + "/health").status_code == 200


def test_health_answers_only_once_a_request_is_served_at_once(server):
    # The port listens only after the warm-up step, which built (or loaded) the C++ kernels: no first request
    # waits for them while /health says 200.
    if server.maps_when_ready is None:
        pytest.skip("no /proc/PID/maps here")
    assert "smoe_kernels_" in server.maps_when_ready


def test_accepted_connections_get_tcp_nodelay():
    from smoe.serve.server import _bind

    async def accepted_nodelay() -> int:
        sock = _bind("127.0.0.1", 0)
        sock.listen()
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                              socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)  # as uvicorn serves it
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_page_elsewhere_cannot_drive_the_loopback_server(server):
    body = {"model": server.model, "prompt": "a fox", "max_tokens": 2}
    rebound = server.post("/v1/completions", body, headers={"Host": "evil.example"})  # DNS rebinding
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    for host in ("localhost:8000", "127.0.0.1", "[::1]:80"):
        assert server.post("/v1/completions", body, headers={"Host": host}).status_code == 200
    simple = server.post("/v1/completions", body, headers={"Content-Type": "text/plain"})  # no CORS preflight
    assert simple.status_code == 415 and "application/json" in simple.json()["error"]["message"]
    assert server.post("/v1/completions", body, headers={"Content-Type": "application/json; charset=utf-8"}
                       ).status_code == 200


def test_allowed_hosts_widen_loopback_and_bind_other_addresses():
    from smoe.serve.app import allowed_hosts

    assert allowed_hosts("0.0.0.0", ()) is None  # any Host: the user exposed it on purpose
    assert allowed_hosts("127.0.0.1", ("Box.lan",)) >= {"localhost", "127.0.0.1", "::1", "box.lan"}
    assert allowed_hosts("0.0.0.0", ("box.lan",)) >= {"box.lan"}
    assert main(["serve", "x", "--allowed-hosts", "box.lan:8000"]) == 2


def test_malformed_text_and_a_slow_or_vanishing_client_fail_alone(server):
    lone = b'{"model": ' + json.dumps(server.model).encode() + b', "prompt": "a \\ud800 b"}'
    response = server.post("/v1/completions", lone)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"

    def raw(data: bytes) -> socket.socket:
        sock = socket.create_connection(server.url.removeprefix("http://").split(":"), timeout=READ_TIMEOUT + 10)
        sock.sendall(data)
        return sock

    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n").encode()
    with raw(head) as slow_headers:  # headers never finished: closed after the read timeout
        assert slow_headers.recv(1000) == b""
    with raw(head + b"Content-Length: 100\r\n\r\n{") as slow_body:
        assert slow_body.recv(1000).startswith(b"HTTP/1.1 408 ")
    before = server.metrics().get('smoe_requests_total{endpoint="/v1/completions",code="499"}', 0)
    raw(head + b"Content-Length: 100\r\n\r\n{").close()  # gone mid-body
    server.wait_for(lambda m: m.get('smoe_requests_total{endpoint="/v1/completions",code="499"}', 0) == before + 1,
                    "the vanished client to count as 499")
    unknown = server.post("/v1/completions", {"model": "nope", "prompt": "a"}).json()["error"]["message"]
    assert "nope" in unknown and str(server.directory) not in unknown  # no path of the server's in an error


def test_chat_without_a_template_is_400(tmp_path):
    from starlette.testclient import TestClient

    from smoe.serve.app import create_app
    from smoe.serve.server import load_state

    directory = make_model(tmp_path / "model", chat_template=None)
    state = load_state(str(directory), ServeConfig(max_batch=1, max_seq_len=32))
    with TestClient(create_app(state), base_url="http://localhost") as client:
        response = client.post("/v1/chat/completions", json={"model": str(directory), "max_tokens": 2,
                                                              "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and "chat_template" in response.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": str(directory), "prompt": "a fox",
                                                    "max_tokens": 2}).status_code == 200


def test_quantize_serves_the_quantised_model(tmp_path):
    from starlette.testclient import TestClient

    from smoe.serve.app import create_app
    from smoe.serve.server import load_state

    directory = make_model(tmp_path / "model")
    state = load_state(str(directory), ServeConfig(max_batch=2, max_seq_len=32, quantize="int8"))
    prompt = [5, 6, 7, 8]
    quantised = smoe.quantize(smoe.load_pretrained(directory), "int8")
    expected = smoe.generate(quantised, [prompt], max_new_tokens=4, decode_rows=2)[0].tolist()
    with TestClient(create_app(state), base_url="http://localhost") as client:
        response = client.post("/v1/completions", json={"model": str(directory), "prompt": prompt, "max_tokens": 4,
                                                        "temperature": 0})
    assert state.worker.engine.model.config.quantization.scheme == "int8"
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == find_tokenizer(directory).decode(expected)


def test_max_expert_memory_serves_the_in_memory_tokens_and_reports_the_cache(tmp_path):
    from starlette.testclient import TestClient

    from smoe.offload.budget import OffloadConfig
    from smoe.serve.app import create_app
    from smoe.serve.server import load_state

    directory = make_model(tmp_path / "model")
    state = load_state(str(directory), ServeConfig(max_batch=2, max_seq_len=32),
                       OffloadConfig(max_expert_memory="2MB"))
    prompt = [5, 6, 7, 8]
    expected = smoe.generate(smoe.load_pretrained(directory), [prompt], max_new_tokens=4, decode_rows=2)[0].tolist()
    with TestClient(create_app(state), base_url="http://localhost") as client:
        response = client.post("/v1/completions", json={"model": str(directory), "prompt": prompt, "max_tokens": 4,
                                                        "temperature": 0})
        metrics = client.get("/metrics").text
    assert response.json()["choices"][0]["text"] == find_tokenizer(directory).decode(expected)
    misses = next(line for line in metrics.splitlines() if line.startswith("smoe_expert_cache_misses_total "))
    assert int(misses.split()[1]) > 0 and "smoe_expert_cache_read_bytes_total" in metrics


@pytest.mark.slow
def test_compile_serves_quantised_experts_with_rows_independent_and_counts_them(tmp_path):
    from starlette.testclient import TestClient

    from smoe.generation import Engine, Request
    from smoe.serve.app import create_app
    from smoe.serve.server import load_state

    directory = make_model(tmp_path / "model")
    with pytest.raises(ValueError, match="^compile: .*`dependent_rows`"):  # fp32 experts: not without saying so
        load_state(str(directory), ServeConfig(max_batch=2, max_seq_len=32, compile=True))
    state = load_state(str(directory), ServeConfig(max_batch=2, max_seq_len=32, quantize="int8", compile=True))
    engine = state.worker.engine
    if engine.compiled_step is None or not all(layer.experts.rows_independent(torch.device("cpu"))
                                               for layer in engine.model.moe_layers):
        pytest.skip("the C++ kernels could not be built here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine.warm_up()
        prompts = [[5, 6, 7, 8], [9, 10]]
        with TestClient(create_app(state), base_url="http://localhost") as client, ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda p: client.post("/v1/completions", json={
                "model": str(directory), "prompt": p, "max_tokens": 5, "temperature": 0}).json(), prompts))
            metrics = client.get("/metrics").text
        for prompt, answer in zip(prompts, answers, strict=True):  # each as the same compiled engine gives it alone
            alone = Engine(engine.model, 2, 32, compile=True, count_experts=True)
            request = Request(prompt, 5)
            alone.add(request)
            with torch.inference_mode():
                while alone.running:
                    alone.prefill() if alone.prefilling else alone.decode()
            assert answer["choices"][0]["text"] == find_tokenizer(directory).decode(request.tokens)
    finally:
        torch.set_num_threads(threads)
    routed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("smoe_expert_routed_tokens_total{"))
    top_k = presets.get("deepseek-v3-tiny").moe.top_k
    assert routed == top_k * (4 + 2 + 2 * (5 - 1))  # prompts, then every new token but the last, in layer 1


@pytest.mark.parametrize("argv, message", [
    (["serve", "x", "--group-size", "32"], "--group-size: only with --quantize int4"),
    (["serve", "x", "--quantize", "int4", "--group-size", "48"], "--group-size: int4 needs one of"),
    (["serve", "no/such/model", "--port", "0"], "no/such/model"),
    (["serve", "x", "--port", "70000"], "--port: must lie in [0, 65535]"),
    (["serve", "x", "--max-batch", "0"], "--max-batch: must be a positive number"),
    (["serve", "x", "--api-key", "clé"], "--api-key: must be printable ASCII"),  # a header could never match it
])
def test_cli_serve_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sigterm_drains_the_streams_in_flight_then_aborts_the_rest_with_503(server):
    # Last: it ends the module's server.
    body = {"model": server.model, "prompt": [4, 5], "max_tokens": 40, "temperature": 0, "stream": True}
    long = {"model": server.model, "prompt": [4, 5], "max_tokens": CONTEXT - 2, "temperature": 0}  # outlasts it
    with ThreadPoolExecutor(1) as pool, httpx.stream("POST", server.url + "/v1/completions", content=json.dumps(body),
                                                     headers=server.headers, timeout=60) as response:
        unfinished = pool.submit(server.post, "/v1/completions", long)
        server.wait_for(lambda m: m["smoe_running_requests"] == 2, "both requests to run")
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
        aborted = unfinished.result()
    assert rest[-1] == "data: [DONE]"  # the stream in flight finished
    assert aborted.status_code == 503 and "shutting down" in aborted.json()["error"]["message"]
    assert server.proc.wait(60) == 0
