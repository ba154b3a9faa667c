"""Multi-turn conversations (``workload.source=conversations``): their user turns, the
history each turn is sent with, and the checks a run needs before any model loads.

A conversation is a sequence of user turns sent one after another; turn k's prompt is the
history (the user turns before it, each with its answer) plus user turn k, rendered by the
model's chat template with the generation prompt. The answers in the history are the
model's own (``workload.conversation_history=generated``) or the file's assistant turns
(``file``). The driver that sends them is :mod:`pipeline.serving.conversations`.

Conversations come from a ShareGPT-style ``.jsonl`` file (one conversation a line:
``{"id": ..., "conversations": [{"from": "human", "value": "..."}, ...]}``) or are synthetic:
user turns of exactly ``workload.input_tokens`` tokens cut from the shipped corpus by
:func:`pipeline.workload.synthetic.build_synthetic`.

The file is read with plain ``json`` rather than ``datasets``, for the reasons
:mod:`pipeline.workload.trace` gives: every refusal names its line and field (Arrow infers
one type per column and fails, or silently widens, the whole file), and nothing is cached
on disk. Everything here up to :func:`load_conversations` runs in validation: no torch, no
tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.workload.line_files import json_lines, read_lines_file, refusal

if TYPE_CHECKING:
    from pipeline.config import Config, WorkloadConfig
    from pipeline.records import Request
    from pipeline.workload.base import Prompt

#: ShareGPT's speaker names (and OpenAI's) -> the OpenAI role they are sent as
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
HISTORIES = ("generated", "file")
MAX_TURNS = 64
#: workload keys a conversation replaces or cannot honour: set, they are refused
_REFUSED = (("request_rate", None, "each turn is sent when the previous answer is in "
             "(plus workload.think_time_s); use workload.concurrency for the live "
             "conversations"),
            ("prompts_file", None, "the turns come from workload.conversations_file or "
             "are synthetic"),
            ("shared_prefix_tokens", 0, "the history is the shared prefix"),
            ("prefix_groups", 1, "the history is the shared prefix"),
            ("output_dist", "fixed", "every answer is workload.max_new_tokens long at most"),
            ("input_dist", "fixed", "every synthetic user turn is workload.input_tokens "
             "long"),
            ("max_input_tokens", None, "a turn's history cannot be cut; the context check "
             "refuses conversations that cannot fit"))


@dataclass(frozen=True)
class Conversation:
    """One conversation: its id (the file's ``id``, else ``line N``; synthetic
    ``conversation N``), 1-based position, system prompt, user turns and the file's
    assistant turns (None for synthetic ones)."""

    conversation_id: str
    number: int
    system: str | None
    user_turns: tuple[str, ...]
    file_answers: tuple[str, ...] | None


def _bad(path: str, why: str) -> ConfigError:
    return refusal("conversations_file", path, why)


def _parse_line(obj: Any, line: int, number: int, path: str) -> Conversation:
    where = f"line {line}"
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise _bad(path, f"{where}: needs a \"conversations\" list of "
                         f"{{\"from\": ..., \"value\": ...}} turns")
    cid = obj.get("id")
    if cid is not None and (isinstance(cid, bool) or not isinstance(cid, str | int)):
        raise _bad(path, f"{where}: id={cid!r} must be a string or an integer")
    system: str | None = None
    users: list[str] = []
    answers: list[str] = []
    for j, turn in enumerate(obj["conversations"]):
        at = f"{where}: conversations[{j}]"
        if not isinstance(turn, dict):
            raise _bad(path, f"{at} is not an object with \"from\" and \"value\"")
        who, value = turn.get("from"), turn.get("value")
        if who not in ROLES:
            raise _bad(path, f"{at}: from={who!r} is not one of {', '.join(ROLES)}")
        if not isinstance(value, str) or not value.strip():
            raise _bad(path, f"{at}: value={value!r} must be a non-empty string")
        role = ROLES[who]
        expected = "user" if len(users) == len(answers) else "assistant"
        if role == "system" and j == 0:
            system = value
            continue
        if role != expected:
            raise _bad(path, f"{at}: from={who!r} where a "
                             f"{'human' if expected == 'user' else 'gpt'} turn is due; "
                             f"turns alternate human, gpt, starting with human (one "
                             f"leading system turn allowed)")
        (users if role == "user" else answers).append(value)
    if not users:
        raise _bad(path, f"{where}: holds no human turn")
    name = str(cid) if cid is not None else where
    return Conversation(name, number, system, tuple(users), tuple(answers))


def _parse(path: str, text: str) -> tuple[Conversation, ...]:
    out: list[Conversation] = []
    for line, obj in json_lines("conversations_file", path, text):
        out.append(_parse_line(obj, line, len(out) + 1, path))
    if not out:
        raise _bad(path, "holds no conversation")
    return tuple(out)


def read_conversations(path: str, max_bytes: int) -> tuple[Conversation, ...]:
    """Every conversation of a ShareGPT-style ``.jsonl`` file, checked line by line
    (speakers, their order, non-empty values); refusals name the line and the field."""
    return read_lines_file("conversations_file", path, (".jsonl",),
                           ".jsonl (one ShareGPT-style conversation a line)", max_bytes,
                           _parse)


def file_conversations(w: WorkloadConfig) -> list[Conversation]:
    """The file's first ``num_conversations`` conversations (None: all), each cut to its
    first ``conversation_turns`` user turns (and their answers)."""
    assert w.conversations_file is not None
    convs = read_conversations(w.conversations_file, w.max_file_bytes)
    if w.num_conversations is not None:
        convs = convs[:w.num_conversations]
    n = w.conversation_turns
    return [Conversation(c.conversation_id, c.number, c.system, c.user_turns[:n],
                         (c.file_answers or ())[:n]) for c in convs]


def validate_conversations(w: WorkloadConfig) -> None:
    """The conversation keys and the file itself, before anything loads (exit 2)."""
    from pipeline.config import check_choice, check_range, fail

    if w.profile != "fixed":
        fail("workload.profile", w.profile, "source=conversations runs one phase of live "
             "conversations (profile=fixed); sweeps and searches vary an arrival rate "
             "that conversations do not have")
    for key, unset, why in _REFUSED:
        if getattr(w, key) != unset:
            fail(f"workload.{key}", getattr(w, key),
                 f"with workload.source=conversations {why}; leave it at {unset}")
    if w.repeats != 1:
        fail("workload.repeats", w.repeats, "with workload.source=conversations the "
             "conversations run once; use 1")
    check_range("workload.conversation_turns", w.conversation_turns, 1, MAX_TURNS)
    check_range("workload.num_conversations", w.num_conversations, 1, optional=True)
    check_range("workload.think_time_s", w.think_time_s, 0.0)
    check_choice("workload.conversation_history", w.conversation_history, HISTORIES)
    if w.conversations_file is None:
        if w.conversation_history == "file":
            fail("workload.conversation_history", "file", "needs workload.conversations_"
                 "file (synthetic conversations have no answers); use generated")
        if w.num_conversations is None:
            fail("workload.num_conversations", None, "synthetic conversations need their "
                 "number (or set workload.conversations_file)")
        return
    convs = file_conversations(w)
    if w.conversation_history == "file":
        for c in convs:
            if len(c.file_answers or ()) < len(c.user_turns) - 1:
                raise _bad(w.conversations_file, (
                    f"{c.conversation_id}: has {len(c.user_turns)} human turns but only "
                    f"{len(c.file_answers or ())} gpt answers, and "
                    f"workload.conversation_history=file needs an answer after every "
                    f"human turn but the last"))


def check_conversation_job(spec: Config, online: bool) -> None:
    """What conversations need of the backend and model: an online backend (turns are
    sent as answers come back) and the chat template (it renders the history)."""
    if not online:
        raise ConfigError(
            f"workload.source='conversations' is invalid for backend {spec.backend.name}: it "
            f"is offline (it generates in batches, and a turn must wait for the previous "
            f"answer); use an online backend (vllm_server, llamacpp, openai)")
    if spec.model.use_chat_template == "false":
        raise ConfigError(
            "model.use_chat_template='false' is invalid with workload.source=conversations: "
            "the history is rendered by the chat template; use auto or true")


def conversations_of(w: WorkloadConfig) -> list[tuple[str, int]]:
    """``(conversation id, user turns)`` of each conversation, known without a tokenizer."""
    if w.conversations_file is None:
        assert w.num_conversations is not None, "validate_conversations requires it"
        return [(f"conversation {i + 1}", w.conversation_turns)
                for i in range(w.num_conversations)]
    return [(c.conversation_id, len(c.user_turns)) for c in file_conversations(w)]


def conversation_prompts(w: WorkloadConfig) -> list[Prompt]:
    """One placeholder per turn (``<conversation id> turn <k>``), so that the number of
    requests is known before any model loads; :func:`load_conversations` builds them."""
    from pipeline.workload.base import Prompt

    return [Prompt(f"<{cid} turn {k}>", request_id=f"{cid} turn {k}")
            for cid, turns in conversations_of(w) for k in range(1, turns + 1)]


def load_conversations(spec: Config, tokenizer: Any) -> list[Conversation]:
    """The workload's conversations: the file's, or synthetic ones whose user turns are
    exactly ``workload.input_tokens`` tokens of this tokenizer (the seed picks the text)."""
    w = spec.workload
    if w.conversations_file is not None:
        return file_conversations(w)
    from pipeline.workload.synthetic import build_synthetic

    def render(text: str) -> list[int]:
        # the user turn's own tokens: the template around it is counted per turn
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert w.num_conversations is not None
    n, t = w.num_conversations, w.conversation_turns
    built = build_synthetic(render, tokenizer, [w.input_tokens] * (n * t), 0, 1, spec.seed)
    return [Conversation(f"conversation {i + 1}", i + 1, None,
                         tuple(b.text for b in built[i * t:(i + 1) * t]), None)
            for i in range(n)]


def turn_messages(conv: Conversation, answers: Sequence[str], k: int) -> list[dict[str, str]]:
    """The messages of turn ``k`` (0-based): the system prompt, user turns 1..k each with
    its answer (``answers[:k]``), then user turn k+1, in OpenAI's roles."""
    if len(answers) < k:
        raise ValueError(f"{conv.conversation_id} turn {k + 1} needs {k} answers, got "
                         f"{len(answers)}")
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for j in range(k):
        msgs += [{"role": "user", "content": conv.user_turns[j]},
                 {"role": "assistant", "content": answers[j]}]
    return msgs + [{"role": "user", "content": conv.user_turns[k]}]


def render_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` as the model sees them: the chat template with the
    generation prompt, tokenized without adding special tokens (the template holds them);
    :func:`pipeline.workload.prompts.render_prompt` renders a single prompt through it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_synthetic_conversation_context(w: WorkloadConfig, limit: int, what: str) -> None:
    """Before the tokenizer loads: refuse synthetic conversations whose content alone (k
    user turns of ``input_tokens``, k-1 answers and this turn's of ``max_new_tokens``)
    exceeds ``limit`` at some turn k; the template only adds to it."""
    if w.conversations_file is not None or w.num_conversations is None:
        return
    for k in range(1, w.conversation_turns + 1):
        need = k * (w.input_tokens + w.max_new_tokens)
        if need > limit:
            raise ConfigError(
                f"workload.conversation_turns={w.conversation_turns} is invalid: "
                f"conversation 1 turn {k} needs at least {need} tokens ({k} user turns of "
                f"{w.input_tokens} + {k} answers of up to {w.max_new_tokens}, chat template "
                f"not counted) and that exceeds {what}; lower workload.conversation_turns, "
                f"workload.input_tokens or workload.max_new_tokens, or use a longer context")


def check_conversation_context(convs: Sequence[Conversation], tokenizer: Any,
                               w: WorkloadConfig, limit: int, what: str) -> None:
    """Refuse the first turn whose prompt could exceed ``limit`` tokens with its answer.
    The bound renders the turn's messages by the template with every earlier answer empty
    and adds ``max_new_tokens`` for each (generated answers at their longest) and for the
    turn's own; with ``conversation_history=file`` the file's answers are rendered as
    they are, so the bound is the prompt itself plus the answer."""
    n_out = w.max_new_tokens
    for c in convs:
        for k in range(len(c.user_turns)):
            if w.conversation_history == "file":
                n_in = len(render_messages(tokenizer, turn_messages(c, c.file_answers or (),
                                                                    k)))
                how = "the prompt with the file's answers"
            else:
                n_in = len(render_messages(tokenizer, turn_messages(c, [""] * k, k))) \
                    + k * n_out
                how = f"the template and {k} earlier answer(s) of up to {n_out}"
            if n_in + n_out > limit:
                raise ConfigError(
                    f"workload.conversation_turns={w.conversation_turns} is invalid: "
                    f"{c.conversation_id} turn {k + 1} may need {n_in + n_out} tokens "
                    f"({n_in} prompt tokens at most, {how}, + {n_out} output tokens) and "
                    f"that exceeds {what}; lower workload.conversation_turns or "
                    f"workload.max_new_tokens, or use a longer context")


def first_turn_requests(convs: Sequence[Conversation], tokenizer: Any) -> list[Request]:
    """The first turn of each conversation as a request (index = the conversation's
    place), so that the checks made on any job's requests apply; the driver builds the
    later turns as the answers come in."""
    from pipeline.records import Request

    out = []
    for i, c in enumerate(convs):
        msgs = turn_messages(c, (), 0)
        ids = render_messages(tokenizer, msgs)
        out.append(Request(index=i, prompt=tokenizer.decode(ids), prompt_token_ids=tuple(ids),
                           request_id=f"{c.conversation_id} turn 1", messages=tuple(msgs)))
    return out
