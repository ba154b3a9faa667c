"""The conversation driver: N live conversations, each sending its user turns one after
another, every turn with its history (``workload.source=conversations``).

One asyncio loop and one HTTP session (:func:`pipeline.serving.client.client_session`);
``workload.concurrency`` workers (null: one per conversation) each take the next
conversation from a queue and run it to its end, so that at most that many conversations
are live at once. Per turn: the messages (:func:`pipeline.workload.conversations.
turn_messages`) are rendered by the chat template into token ids, the backend turns the
request into what it posts (``stream_request``: token ids on completions, the messages on
the chat API), and :func:`pipeline.serving.client.send` streams it. The answer that enters
the history is the generated text (``conversation_history=generated``) or the file's. A
failed turn ends its conversation: later turns are not sent (their history would be
wrong), and the failure is logged. After an answer a conversation waits
``workload.think_time_s`` before its next turn.

Rendering a turn happens on the loop between turns, outside any request's timing: a
request's ``t_start`` is taken as it is sent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.records import Request, RequestRecord
from pipeline.serving.client import client_session, run_sync, send
from pipeline.workload.conversations import render_messages, turn_messages

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.workload.conversations import Conversation

log = logging.getLogger(__name__)


def run_conversations(backend: Any, spec: Config, conversations: list[Conversation],
                      tokenizer: Any, headers: Mapping[str, str] | None = None,
                      sent: list[Request] | None = None) -> list[RequestRecord]:
    """Run every conversation against ``backend`` (an online backend with
    ``request_base`` and ``stream_request``); one record per turn sent, in send order.

    Each record's ``extra`` carries ``request_id`` (``<conversation id> turn <k>``),
    ``conversation_id``, ``conversation`` (its 1-based place), ``turn`` (1-based) and
    ``think_time_s``; ``cached_prompt_tokens`` where the server reports it. ``sent``, when
    given, receives the request of every turn sent, in the same order.
    """
    w = spec.workload
    base = backend.request_base(spec.decoding, w.max_new_tokens, w.fixed_length)
    records, requests = run_sync(_run_all(backend, conversations, tokenizer, spec, base,
                                          dict(headers or {})))
    order = sorted(range(len(records)), key=lambda i: records[i].index)
    if sent is not None:
        sent.extend(requests[i] for i in order)
    return [records[i] for i in order]


async def _run_all(backend: Any, conversations: list[Conversation], tokenizer: Any,
                   spec: Config, base: dict[str, Any], headers: dict[str, str]
                   ) -> tuple[list[RequestRecord], list[Request]]:
    w = spec.workload
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for c in conversations:
        queue.put_nowait(c)
    records: list[RequestRecord] = []
    requests: list[Request] = []
    index = itertools.count()  # global running index, in send order

    async def worker(session: Any) -> None:
        while not queue.empty():
            conv = queue.get_nowait()
            answers: list[str] = []
            for k in range(len(conv.user_turns)):
                if k and w.think_time_s:
                    await asyncio.sleep(w.think_time_s)
                msgs = turn_messages(conv, answers, k)
                ids = render_messages(tokenizer, msgs)
                rid = f"{conv.conversation_id} turn {k + 1}"
                req = Request(index=next(index), prompt=tokenizer.decode(ids),
                              prompt_token_ids=tuple(ids), request_id=rid,
                              messages=tuple(msgs))
                rec = await send(session, backend.stream_request(req, base),
                                 w.request_timeout_s, headers)
                rec.extra.update(request_id=rid, conversation_id=conv.conversation_id,
                                 conversation=conv.number, turn=k + 1,
                                 think_time_s=w.think_time_s)
                records.append(rec)
                requests.append(req)
                if not rec.ok:
                    left = len(conv.user_turns) - k - 1
                    log.warning("%s failed (%s); the conversation ends here, %d later "
                                "turn(s) not sent", rid, rec.error, left)
                    break
                if k + 1 < len(conv.user_turns):
                    answers.append(rec.text if w.conversation_history == "generated"
                                   else (conv.file_answers or ())[k])

    workers = min(w.concurrency or len(conversations), len(conversations))
    async with client_session() as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return records, requests
