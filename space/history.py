"""Conversations as the chat template needs them: Gradio 6 history → `[{"role", "content"}]`, trimmed to the
context, and the part of the model's context that the next prompt can reuse. Pure functions, no model needed.

    from space.history import history_to_messages, trim_history
    messages = history_to_messages(gradio_history) + [{"role": "user", "content": "Next question"}]
    messages = trim_history(messages, count_tokens, n_ctx=4096, max_new_tokens=256)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from common.cli import valid_unicode
from space.replies import UserError

__all__ = ["flatten_content", "prompt_text", "history_to_messages", "trim_history", "reusable_prefix"]


def _field(item, name: str):
    """item[name] for dicts, item.name for objects (gr.ChatMessage, Gradio's pydantic message models)."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def flatten_content(content) -> str:
    """The plain text of a Gradio 6 message's content; file, image and component blocks are skipped.

    >>> flatten_content("Hello")
    'Hello'
    >>> flatten_content([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}])
    'Hello\\nworld'
    >>> flatten_content([{"type": "file", "file": {"path": "/tmp/cat.png"}}, {"type": "text", "text": "What is it?"}])
    'What is it?'
    >>> flatten_content({"type": "text", "text": "one block"})
    'one block'
    >>> flatten_content({"path": "/tmp/cat.png"})
    ''
    >>> flatten_content(None)
    ''
    """
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "\n".join(text for text in map(flatten_content, content) if text)
    text = _field(content, "text")
    if _field(content, "type") in ("text", None) and isinstance(text, str):
        return text
    return ""


def prompt_text(value, part: str) -> str:
    """What the user wrote as `part` ("message", "system prompt"): a string or Gradio content, stripped; None is
    empty. UserError, naming the part and the fix, for anything else and for text that is not valid Unicode.

    >>> prompt_text([{"type": "text", "text": " Hi "}], "message")
    'Hi'
    >>> prompt_text(42, "message")
    Traceback (most recent call last):
    space.replies.UserError: Your message must be text, not int; send it as a string.
    >>> prompt_text("ok " + chr(0xD800), "system prompt")
    Traceback (most recent call last):
    space.replies.UserError: Your system prompt holds U+D800 at character 4, half of a UTF-16 surrogate pair and \
not valid Unicode; remove it and send again.
    """
    if value is not None and not isinstance(value, (str, list, tuple, Mapping)) and not hasattr(value, "text"):
        raise UserError(f"Your {part} must be text, not {type(value).__name__}; send it as a string.")
    text = flatten_content(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"Your {part} holds U+{ord(text[error.start]):04X} at character {error.start + 1:,}, half of "
                        "a UTF-16 surrogate pair and not valid Unicode; remove it and send again.") from None
    return text.strip()


def history_to_messages(history) -> list[dict]:
    """Gradio 6 ChatInterface history → `[{"role", "content": str}]` for the chat template.

    Keeps user and assistant messages with text; drops empty ones, other roles, and Gradio "thought"
    messages (a `metadata.title`: tool or status panels the app shows, not part of the answer). Text that is not
    valid Unicode (a lone surrogate) becomes U+FFFD: the history comes back every turn, so rejecting it would end
    the conversation. UserError for a history that is not a list of messages.

    >>> history_to_messages([
    ...     {"role": "user", "content": [{"type": "text", "text": "Hi"}], "metadata": None},
    ...     {"role": "assistant", "content": "Hello!", "metadata": {"title": "⏱ stats"}},
    ...     {"role": "assistant", "content": [{"type": "text", "text": "Hello! How can I help?"}]},
    ...     {"role": "system", "content": "ignored"},
    ...     {"role": "user", "content": [{"type": "file", "file": {"path": "a.png"}}]},
    ... ])
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello! How can I help?'}]
    """
    if history is not None and not isinstance(history, (list, tuple)):
        raise UserError(f"The conversation history must be a list of messages, not {type(history).__name__}; "
                        "send [] to start a new one.")
    messages = []
    for number, item in enumerate(history or [], start=1):
        if not isinstance(item, Mapping) and not hasattr(item, "role"):
            raise UserError(f"Message {number:,} of the conversation history is a {type(item).__name__}, not a "
                            '{"role", "content"} message; send the history as Gradio gives it, or [].')
        role, metadata = _field(item, "role"), _field(item, "metadata")
        if role not in ("user", "assistant") or (metadata and _field(metadata, "title")):
            continue
        text = valid_unicode(flatten_content(_field(item, "content"))).strip()
        if text:
            messages.append({"role": role, "content": text})
    return messages


def trim_history(messages: list[dict], count_tokens: Callable[[list[dict]], int], n_ctx: int,
                 max_new_tokens: int, drop_step: int = 1) -> list[dict]:
    """Drop the oldest exchanges until the prompt and the answer fit in the context.

    `messages` is `[system?] + history + [new user message]`. Whole exchanges go (a user message with the
    answers after it), oldest first, until `count_tokens(messages) + max_new_tokens <= n_ctx`; the system
    message and the new message always stay. With `drop_step` > 1, exchanges go by multiples of that many
    (as many as needed, rounded up), so that the next turns of a full conversation keep the same start.

    >>> chat = [{"role": "system", "content": "Be brief."}] + [
    ...     {"role": role, "content": f"{role} {turn}"} for turn in range(3) for role in ("user", "assistant")
    ... ] + [{"role": "user", "content": "new"}]
    >>> [m["content"] for m in trim_history(chat, len, n_ctx=6, max_new_tokens=1)]
    ['Be brief.', 'user 2', 'assistant 2', 'new']
    >>> [m["content"] for m in trim_history(chat, len, n_ctx=8, max_new_tokens=1, drop_step=2)]
    ['Be brief.', 'user 2', 'assistant 2', 'new']
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    head, history, new = messages[:start], messages[start:-1], messages[-1:]
    budget = n_ctx - max_new_tokens

    def fits(first_kept: int) -> bool:
        return count_tokens(head + history[first_kept:] + new) <= budget

    # Where the kept history may begin: its start, at a user message, or nowhere (all dropped).
    starts = [0] + [i for i, message in enumerate(history) if i > 0 and message["role"] == "user"] + [len(history)]
    needed = count_tokens(head + new)
    if needed > budget:
        raise UserError(_too_long(head, new, count_tokens, needed, budget, max_new_tokens))
    # Fewer messages never need more tokens, so binary-search the first start that fits: a handful of
    # renders even for a long (or hostile) history.
    low, high = 0, len(starts) - 1
    while low < high:
        middle = (low + high) // 2
        if fits(starts[middle]):
            high = middle
        else:
            low = middle + 1
    dropped = min(-(-low // drop_step) * drop_step, len(starts) - 1)  # low rounded up to a multiple of drop_step
    return head + history[starts[dropped]:] + new


def _too_long(head: list[dict], new: list[dict], count_tokens: Callable[[list[dict]], int], needed: int,
              budget: int, max_new_tokens: int) -> str:
    """The message for a system prompt and message (the history is dropped first) that cannot fit: the part to
    shorten (the one too long alone, else both) and by how much.

    >>> count = lambda messages: sum(len(m["content"]) for m in messages)
    >>> _too_long([{"content": "S" * 50}], [{"content": "Hi"}], count, 52, 30, 10)
    "Your system prompt is too long for this model's context: the prompt comes to 52 tokens where 30 fit (10 more \
are kept for the answer); shorten it by 22 tokens."
    """
    empty = [{**new[0], "content": ""}]
    if not head or count_tokens(new) > budget:
        part, shorten = "message is", "it"
    elif count_tokens(head + empty) > budget:
        part, shorten = "system prompt is", "it"
    else:
        part, shorten = "system prompt and message are", "them"
    return (f"Your {part} too long for this model's context: the prompt comes to {needed:,} tokens where "
            f"{budget:,} fit ({max_new_tokens:,} more are kept for the answer); shorten {shorten} by "
            f"{needed - budget:,} tokens.")


def reusable_prefix(context: Sequence[int], piece: Callable[[int], bytes], prompt: bytes) -> tuple[int, int]:
    r"""How many of the context's tokens spell the start of `prompt`, and how many of its bytes they spell.

    A conversation's next prompt holds the previous answer as text, re-rendered by the chat template. Tokenized
    afresh, that text often differs from the tokens that were sampled (another split of the same characters,
    a character whose bytes two tokens shared), so prefix matching on tokens would stop at the first difference
    and re-read the whole answer. Matching on the text the context's tokens spell keeps the sampled tokens
    (the model sees exactly what it generated, leading whitespace the template trims included) and reads only
    what is new. The prefix never ends inside a UTF-8 character, so the rest tokenizes as text.

    >>> pieces = {0: b"<s>", 1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"!", 6: b"\xc3", 7: b"\xa9"}
    >>> reusable_prefix([0, 1, 2, 3, 4], pieces.get, b"<s>Hello world, again")
    (5, 14)
    >>> reusable_prefix([0, 1, 2, 5], pieces.get, b"<s>Hello?")    # the context goes another way after "Hello"
    (3, 8)
    >>> reusable_prefix([0, 6, 7], pieces.get, "<s>\u00e9t\u00e9".encode())  # "é" split over two tokens
    (3, 5)
    >>> reusable_prefix([0, 6], pieces.get, "<s>\u00e9".encode())  # not half of a character
    (1, 3)
    >>> reusable_prefix([0, 3, 4], pieces.get, b"<s>world")   # " wor": an answer's first token, its space trimmed
    (3, 8)
    >>> pieces[8] = b"\n"
    >>> reusable_prefix([0, 8, 1, 2], pieces.get, b"<s>Hello")   # a whole token of trimmed whitespace
    (4, 8)
    >>> reusable_prefix([0, 1, 2, 8], pieces.get, b"<s>Hello<eot>")  # but never as the last kept token
    (3, 8)
    """
    offset, steps = 0, []
    for token in context:
        text = piece(token)
        if text and prompt.startswith(text, offset):
            steps.append(len(text))
        elif prompt.startswith(text.lstrip(), offset):
            # The template trims each answer (`| trim`): its leading whitespace stays as it was sampled.
            steps.append(len(text.lstrip()))
        else:
            break
        offset += steps[-1]
    # Never end on whitespace the prompt does not have, nor inside a character.
    while steps and (steps[-1] == 0 or offset < len(prompt) and prompt[offset] & 0xC0 == 0x80):
        offset -= steps.pop()
    return len(steps), offset
