"""The prompt type the workload hands around before tokenization."""

from __future__ import annotations


class Prompt(str):
    """A prompt's text that also remembers where it came from.

    A ``str`` subclass so that everything that took the plain prompt list (the dry-run count,
    results, tests comparing with lists of strings) keeps working unchanged; the extra
    attributes ride along to :class:`~pipeline.records.Request`.
    """

    request_id: str | None
    reference: str | None

    def __new__(cls, text: str, request_id: str | None = None,
                reference: str | None = None) -> Prompt:
        obj = super().__new__(cls, text)
        obj.request_id = request_id
        obj.reference = reference
        return obj

    def __reduce__(self) -> tuple:
        # keep the attributes through pickling (Hydra launchers send jobs to processes)
        return (Prompt, (str(self), self.request_id, self.reference))
