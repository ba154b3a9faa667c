"""workload.source=conversations: multi-turn conversations, each turn sent with its history.

ShareGPT parsing and its refusals are checked on small hand-written files; synthetic user
turns and the context's upper bound in the packaged model's real tokenizer; every CLI-level
refusal before anything loads; the shipped preset composes, validates and dry-runs (its
sweep's dry run is tests/test_robustness.py's). One real vLLM server with prefix caching on
runs two conversations of three turns through the job's own path (check_inputs,
prepare_requests, measure): every turn's prompt is the chat template over the earlier turns
with the model's own answers, the server received exactly those tokens, and its prefix
cache holds a growing share of each later turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import WorkloadConfig, validate
from pipeline.errors import ConfigError
from pipeline.workload import load_prompts
from pipeline.workload.conversations import (
    Conversation,
    check_conversation_context,
    file_conversations,
    load_conversations,
    read_conversations,
    render_messages,
    turn_messages,
)
from tests.conftest import CACHE_DIR, assert_refused_early, compose_config, vllm_server_cfg

CHATS = [
    {"id": "c-a", "conversations": [
        {"from": "system", "value": "You answer briefly."},
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "Another?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And a third?"}]},
    {"conversations": [
        {"from": "user", "value": "Hello"},
        {"from": "assistant", "value": "Hi!"}]},
    {"id": 7, "conversations": [
        {"from": "human", "value": "One"}, {"from": "gpt", "value": "1"},
        {"from": "human", "value": "Two"}, {"from": "gpt", "value": "2"}]},
]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _w(path: Path | None, **kw: Any) -> WorkloadConfig:
    return WorkloadConfig(name="conversation", source="conversations",
                          conversations_file=None if path is None else str(path), **kw)


@pytest.fixture(scope="module")
def tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_sharegpt_lines_give_system_turns_answers_and_ids(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.jsonl", [CHATS[0], "", CHATS[1], CHATS[2]])
    convs = read_conversations(str(f), 10_000)
    assert convs == (
        Conversation("c-a", 1, "You answer briefly.",
                     ("Name a colour.", "Another?", "And a third?"), ("Blue.", "Red.")),
        Conversation("line 3", 2, None, ("Hello",), ("Hi!",)),  # the blank line 2 skipped
        Conversation("7", 3, None, ("One", "Two"), ("1", "2")))
    # the first N conversations, each cut to its first conversation_turns user turns
    cut = file_conversations(_w(f, num_conversations=2, conversation_turns=2))
    assert [(c.conversation_id, c.user_turns, c.file_answers) for c in cut] == [
        ("c-a", ("Name a colour.", "Another?"), ("Blue.", "Red.")),
        ("line 3", ("Hello",), ("Hi!",))]
    # one placeholder per turn, named by conversation and turn: the dry run counts turns
    assert [p.request_id for p in load_prompts(_w(f, conversation_turns=2))] == [
        "c-a turn 1", "c-a turn 2", "line 3 turn 1", "7 turn 1", "7 turn 2"]
    assert [p.request_id for p in load_prompts(_w(None, num_conversations=2,
                                                  conversation_turns=2))] == [
        "conversation 1 turn 1", "conversation 1 turn 2", "conversation 2 turn 1",
        "conversation 2 turn 2"]
    # turn 3 (0-based 2): system, two earlier turns with the given answers, then turn 3
    assert turn_messages(convs[0], ["x", "y"], 2) == [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "y"},
        {"role": "user", "content": "And a third?"}]


@pytest.mark.parametrize(("row", "needle"), [
    ({"conversations": [{"from": "gpt", "value": "Hi"}]},
     "line 1: conversations[0]: from='gpt' where a human turn is due"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "line 1: conversations[1]: from='human' where a gpt turn is due"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]},
     "line 1: conversations[1]: from='system' where a gpt turn is due"),
    ({"conversations": [{"from": "human"}]}, "line 1: conversations[0]: value=None must be"),
    ({"conversations": [{"from": "bot", "value": "a"}]},
     "line 1: conversations[0]: from='bot' is not one of human, user, gpt"),
    ({"messages": []}, "line 1: needs a \"conversations\" list"),
    ("{not json", "line 1: not valid JSON"),
])
def test_a_bad_line_is_refused_naming_line_and_field(tmp_path: Path, row: Any,
                                                     needle: str) -> None:
    f = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ConfigError, match="workload.conversations_file=") as e:
        read_conversations(str(f), 10_000)
    assert needle in str(e.value)


def test_synthetic_turns_are_exact_and_the_bound_renders_the_template(tokenizer: Any) -> None:
    spec = validate(compose_config("backend=vllm_server", "workload=conversation",
                                   "workload.num_conversations=2",
                                   "workload.conversation_turns=3",
                                   "workload.input_tokens=20", "workload.max_new_tokens=10"))
    convs = load_conversations(spec, tokenizer)
    assert [c.conversation_id for c in convs] == ["conversation 1", "conversation 2"]
    turns = [t for c in convs for t in c.user_turns]
    assert len(set(turns)) == 6
    assert [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in turns] == [20] * 6
    # the bound of turn 3: the template over 3 user turns and 2 empty answers, + 2 answers
    # and this one at max_new_tokens
    bound = len(render_messages(tokenizer, turn_messages(convs[0], ["", ""], 2))) + 3 * 10
    check_conversation_context(convs, tokenizer, spec.workload, bound, "the limit")
    with pytest.raises(ConfigError, match=f"conversation 1 turn 3 may need {bound} tokens"):
        check_conversation_context(convs, tokenizer, spec.workload, bound - 1, "the limit")
    # with the file's answers, the prompt itself: exact
    conv = Conversation("c", 1, None, ("Hi", "More"), ("Hello there, friend.",))
    w = _w(None, conversation_history="file", max_new_tokens=10)
    exact = len(render_messages(tokenizer, turn_messages(conv, conv.file_answers, 1))) + 10
    check_conversation_context([conv], tokenizer, w, exact, "the limit")
    with pytest.raises(ConfigError, match=f"c turn 2 may need {exact} tokens"):
        check_conversation_context([conv], tokenizer, w, exact - 1, "the limit")


def test_every_refusal_comes_before_anything_loads(tmp_path: Path) -> None:
    good = str(_write(tmp_path / "good.jsonl", CHATS))
    short = str(_write(tmp_path / "short.jsonl", [{"conversations": [
        {"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}]))
    base = ["backend=vllm_server", "workload=conversation"]
    cases = [
        (["backend=hf", "workload=conversation"],
         "workload.source='conversations' is invalid for backend hf: it is offline"),
        ([*base, "workload.profile=sweep"],
         "workload.profile='sweep' is invalid: source=conversations runs one phase"),
        ([*base, "workload.request_rate=2"], "workload.request_rate=2.0 is invalid"),
        ([*base, "workload.repeats=2"], "workload.repeats=2 is invalid"),
        ([*base, "workload.shared_prefix_tokens=8"],
         "workload.shared_prefix_tokens=8 is invalid: with workload.source=conversations "
         "the history is the shared prefix"),
        ([*base, "workload.conversation_history=file"],
         "workload.conversation_history='file' is invalid: needs workload.conversations_"
         "file"),
        ([*base, "workload.num_conversations=null"], "workload.num_conversations=None"),
        ([*base, "workload.conversation_turns=0"], "workload.conversation_turns=0 is invalid"),
        ([*base, "workload.think_time_s=-1"], "workload.think_time_s=-1.0 is invalid"),
        ([*base, "model.use_chat_template=false"],
         "model.use_chat_template='false' is invalid with workload.source=conversations"),
        ([*base, f"workload.conversations_file={short}"],
         "line 1: conversations[1]: from='human' where a gpt turn is due"),
        ([*base, f"workload.conversations_file={good}", "workload.max_file_bytes=10"],
         "above workload.max_file_bytes=10"),
        # 4 turns of 48 + 4 answers of 24 = 288 content tokens at turn 4 > 256
        ([*base, "backend.max_model_len=256"],
         "conversation 1 turn 4 needs at least 288 tokens"),
    ]
    assert_refused_early(cases)


def test_the_exact_bound_is_refused_when_the_requests_are_built() -> None:
    """The content alone (4 turns: 288 tokens) fits 300; with the template (351) it does
    not, which only the tokenizer shows: refused where every job builds its requests,
    before any weights load (dry runs too), naming the conversation and turn."""
    from pipeline.job_checks import check_inputs
    from pipeline.workload.prepare import prepare_requests

    spec, prompts = check_inputs(compose_config(
        "backend=vllm_server", "workload=conversation", "backend.max_model_len=300",
        f"paths.cache_dir={CACHE_DIR}"))
    with pytest.raises(ConfigError, match=r"conversation 1 turn 4 may need 351 tokens .* "
                                          r"exceeds backend.max_model_len=300"):
        prepare_requests(spec, prompts)


def test_a_failed_turn_ends_its_conversation(tokenizer: Any, model_dir: str) -> None:
    """Against a closed port every first turn fails: no later turn is sent (its history
    would lack the answer), and a phase where every turn failed fails the job."""
    from pipeline.backends.openai import OpenAIBackend, OpenAIBackendConfig, ServingFailed
    from pipeline.backends.vllm.server_process import free_port
    from pipeline.config import ModelConfig

    spec = validate(compose_config("backend=openai", "workload=conversation",
                                   "workload.num_conversations=3",
                                   "workload.conversation_turns=3", "workload.concurrency=2",
                                   "workload.fixed_length=false", "workload.input_tokens=8"))
    backend = OpenAIBackend(model_dir, ModelConfig(), OpenAIBackendConfig(
        base_url=f"http://127.0.0.1:{free_port()}/v1", model="m"), 0)
    backend.tokenizer = tokenizer  # load() would probe the closed port first
    convs = load_conversations(spec, tokenizer)
    sent: list[Any] = []
    with pytest.raises(ServingFailed, match="all 3 requests failed") as e:
        backend.serve_conversations(spec, convs, tokenizer, sent)
    recs = e.value.records
    assert [(r.extra["conversation_id"], r.extra["turn"]) for r in recs] == [
        ("conversation 1", 1), ("conversation 2", 1), ("conversation 3", 1)]
    assert all("cannot connect" in (r.error or "") for r in recs)
    assert [q.request_id for q in sent] == [f"conversation {i} turn 1" for i in (1, 2, 3)]


# ----------------------------------------------------------------------- a real vLLM server


@pytest.fixture(scope="module")
def caching_server(no_orphans: list[int], model_dir: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One vLLM server with automatic prefix caching on, for this module."""
    pytest.importorskip("vllm")
    from pipeline.backends.vllm.server import VLLMServerBackend
    from pipeline.config import ModelConfig

    b = VLLMServerBackend(model_dir, ModelConfig(), vllm_server_cfg(
        tmp_path_factory.mktemp("srv"), enable_prefix_caching=True), seed=0)
    b.load()
    yield b
    b.close()
    VLLMServerBackend.shutdown_cached()


@pytest.mark.slow
@pytest.mark.vllm
def test_turns_carry_generated_history_and_hit_the_prefix_cache(
        caching_server: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.job_checks import check_inputs
    from pipeline.job_measure import measure
    from pipeline.measure.timing import PhaseTimer
    from pipeline.serving import stream
    from pipeline.serving.engine_metrics import parse_prometheus
    from pipeline.serving.http_json import http_get_json
    from pipeline.workload.prepare import prepare_requests

    spec, prompts = check_inputs(compose_config(
        "backend=vllm_server", "backend.max_model_len=512",
        "backend.enable_prefix_caching=true", "workload=conversation",
        "workload.num_conversations=2", "workload.conversation_turns=3",
        "workload.max_new_tokens=8", "workload.warmup=0", "scoring.perplexity=false",
        f"paths.cache_dir={CACHE_DIR}"))
    prepared = prepare_requests(spec, prompts)
    assert len(prompts) == 6 and len(prepared.requests) == 2
    # the server's view: vLLM echoes the prompt's token ids in a request's first chunk
    echoed: dict[int, list[int]] = {}
    on_event = stream.on_event

    def spy(ev: dict[str, Any], st: Any, *args: Any) -> None:
        for ch in ev.get("choices") or []:
            if ch.get("prompt_token_ids") is not None:
                echoed[id(st)] = list(ch["prompt_token_ids"])
        on_event(ev, st, *args)

    monkeypatch.setattr(stream, "on_event", spy)
    requests = list(prepared.requests)
    block = caching_server.server.info["block_size"]
    recs, metrics = measure(caching_server, spec, requests, PhaseTimer(),
                            conversations=prepared.conversations)
    assert [r.error for r in recs] == [None] * 6
    assert metrics["conversations"] == 2 and metrics["conversation_turns_completed"] == 6
    assert [r.index for r in recs] == list(range(6))
    assert len(requests) == 6  # extended to every turn sent, for the scorer
    by_conv: dict[str, list[Any]] = {}
    for r in recs:
        by_conv.setdefault(r.extra["conversation_id"], []).append(r)
    assert sorted(by_conv) == ["conversation 1", "conversation 2"]
    convs = prepared.conversations
    assert convs is not None
    sent = {q.index: q for q in requests}
    for conv in convs:
        turns = by_conv[conv.conversation_id]
        assert [r.extra["turn"] for r in turns] == [1, 2, 3]
        assert [r.extra["request_id"] for r in turns] == [
            f"{conv.conversation_id} turn {k}" for k in (1, 2, 3)]
        assert all(r.output_tokens == 8 for r in turns)
        answers = [r.text for r in turns]
        for k, r in enumerate(turns):
            # the history holds the model's own answers, rendered by the template
            msgs = turn_messages(conv, answers[:k], k)
            want = tokenizer.apply_chat_template(msgs, tokenize=True,
                                                 add_generation_prompt=True)
            want = list(want["input_ids"] if hasattr(want, "keys") else want)
            assert list(sent[r.index].prompt_token_ids) == want
            assert r.prompt_tokens == len(want)  # vLLM's own usage count
        ids = [list(sent[r.index].prompt_token_ids) for r in turns]
        assert ids[1][:len(ids[0])] == ids[0] and ids[2][:len(ids[1])] == ids[1]
        cached = [r.extra["cached_prompt_tokens"] for r in turns]
        assert cached[0] <= cached[1] < cached[2]
        # each later turn finds at least the full KV blocks of the turn before it cached
        # (the CPU build's blocks are 128 tokens: turn 2 of ~145 tokens finds none of turn
        # 1's 78, turn 3 one block)
        for k in (1, 2):
            assert block * (len(ids[k - 1]) // block) <= cached[k] < len(ids[k])
    assert sorted(map(sorted, echoed.values())) == sorted(
        sorted(q.prompt_token_ids) for q in requests)
    root = caching_server.base_url.removesuffix("/v1")
    assert parse_prometheus(http_get_json(f"{root}/metrics", 5.0)[1])[
        "vllm:prefix_cache_hits_total"] > 0
    assert metrics["engine_prefix_cache_hit_rate"] > 0


@pytest.mark.slow
@pytest.mark.vllm
def test_the_chat_api_sends_each_turn_as_its_messages(caching_server: Any) -> None:
    """backend=openai with api=chat on the module's server: each turn is posted as its
    messages (the history with the model's answer), and the prompt the server renders
    from them with its own template is the pipeline's count token for token (vLLM's
    usage)."""
    from pipeline.backends.openai import OpenAIBackend
    from pipeline.job_checks import check_inputs
    from pipeline.job_measure import measure
    from pipeline.measure.timing import PhaseTimer
    from pipeline.workload.prepare import prepare_requests

    spec, prompts = check_inputs(compose_config(
        "backend=openai", f"backend.base_url={caching_server.base_url}", "backend.api=chat",
        "backend.vllm_extensions=true", "workload=conversation",
        "workload.num_conversations=1", "workload.conversation_turns=2",
        "workload.max_new_tokens=4", "workload.warmup=0", "scoring.perplexity=false",
        f"paths.cache_dir={CACHE_DIR}"))
    prepared = prepare_requests(spec, prompts)
    backend = OpenAIBackend(prepared.model_dir, spec.model, spec.backend, spec.seed)
    backend.load()
    requests = list(prepared.requests)
    try:
        recs, _ = measure(backend, spec, requests, PhaseTimer(),
                          conversations=prepared.conversations)
    finally:
        backend.close()
    assert [(r.error, r.extra["turn"], r.output_tokens) for r in recs] == [
        (None, 1, 4), (None, 2, 4)]
    assert prepared.conversations is not None
    conv = prepared.conversations[0]
    body = backend.stream_request(requests[1], {})
    assert body.body["messages"] == turn_messages(conv, [recs[0].text], 1)
    assert [r.prompt_tokens for r in recs] == [len(q.prompt_token_ids) for q in requests]
