"""The one prompt renderer: training and the app turn a comment into tokens here, and nowhere else.

The persona is a text file with a single ``{comment}`` slot. It is folded into the first user turn
(Mistral's ``[INST]`` format has no system role, and the original article did the same), and the
conversation goes through the tokenizer's own chat template, so ChatML, Mistral and any other
template work unchanged. A template that writes a system prompt of its own when the conversation
has none (SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face", Qwen2's
"You are a helpful assistant") gets an empty system turn instead: it would tell the model it is an
assistant while the persona tells it it is the creator. Measured on the held-out set with the
embedded model, the persona prompt alone talked about being an AI in 28% of its replies under
SmolLM2's own system prompt and 6% under an empty one (bench/RESULTS.md, "The system turn").

The template is rendered once, with sentinels where the comment and the reply go, and split into
fixed token segments. Each example is then ``head + comment + middle + reply + end``:

* the template's own text (``head``, ``middle``, ``end``) is tokenized with special tokens parsed,
  so ``<|im_start|>`` or ``[INST]`` become their control tokens;
* the comment and the reply are tokenized with ``split_special_tokens=True``: a commenter who
  types ``</s>`` or ``<|im_end|>`` gets those characters as plain text, never a real end of turn;
* nothing adds a BOS of its own: the template's text carries it (or, for a template that does
  not, the renderer adds the tokenizer's one), so every example has exactly one.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from errors import ReplytuneError

PERSONA_PATH = Path(__file__).with_name("persona.txt")
SLOT = "comment"
# Sentinels that no tokenizer treats specially and no persona contains.
_COMMENT_SENTINEL = "\ue000COMMENT\ue000"
_REPLY_SENTINEL = "\ue000REPLY\ue000"
IGNORE_INDEX = -100  # the label value that PyTorch's cross-entropy skips


def _slot(kind: str, i: int) -> str:
    """The sentinel of an earlier turn's comment (``C``) or reply (``R``)."""
    return f"\ue000{kind}{i}\ue000"


class PromptError(ReplytuneError, ValueError):
    """A persona template or chat template that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class Persona:
    """The persona instruction, with one ``{comment}`` slot (write literal braces as ``{{ }}``)."""

    template: str
    source: str = "<string>"

    def __post_init__(self) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise PromptError(f"{self.source}: {exc}; write a literal brace as '{{{{' or '}}}}'") from exc
        unknown = sorted({f for f in fields if f != SLOT})
        if unknown:
            raise PromptError(
                f"{self.source}: unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; "
                f"the only slot is {{{SLOT}}} (write a literal brace as '{{{{' or '}}}}')"
            )
        if fields.count(SLOT) != 1:
            raise PromptError(
                f"{self.source}: the persona must contain {{{SLOT}}} exactly once, found {fields.count(SLOT)}"
            )

    @classmethod
    def from_file(cls, path: str | Path = PERSONA_PATH) -> Persona:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PromptError(f"{path}: persona file not found") from None
        return cls(text.strip("\n"), source=str(path))

    @property
    def signature(self) -> str | None:
        """The sign-off the persona asks for (the quoted text after the word "signature"), if any."""
        match = re.search(r'signature[^"\u201c\n]*["\u201c]([^"\u201d\n]+)["\u201d]', self.template, re.IGNORECASE)
        return match.group(1).strip() if match else None

    def fill(self, comment: str) -> str:
        # str.format does not re-parse the substituted value, so braces in a comment stay text.
        return self.template.format(**{SLOT: comment})


def is_signed(text: str, signature: str | None) -> bool:
    """Whether a reply ends with the sign-off (trailing spaces aside): the one test of "signed" that
    the data, the doctor and the evaluations share."""
    return bool(signature and signature.strip()) and text.rstrip().endswith(signature.strip())


@dataclass(frozen=True)
class Prompt:
    """What is sent to the model for one comment."""

    input_ids: list[int]
    text: str  # the same prompt as a string, for people to read


@dataclass(frozen=True)
class Example:
    """One training example: the prompt is masked out of ``labels``, the reply and end of turn are kept."""

    input_ids: list[int]
    labels: list[int]
    comment_tokens_cut: int  # > 0 when the comment was shortened to fit max_length


class PromptRenderer:
    """Renders comments (and replies, for training) for one tokenizer and persona."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, persona: Persona) -> None:
        self.tokenizer = tokenizer
        self.persona = persona
        if not tokenizer.chat_template:
            raise PromptError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; use an instruct/chat model "
                "or set tokenizer.chat_template"
            )
        user = {"role": "user", "content": persona.fill(_COMMENT_SENTINEL)}
        assistant = {"role": "assistant", "content": _REPLY_SENTINEL}
        self._system = self._empty_system_turn(user)
        prompt = tokenizer.apply_chat_template([*self._system, user], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*self._system, user, assistant], tokenize=False)
        if prompt.count(_COMMENT_SENTINEL) != 1 or not full.startswith(prompt):
            raise PromptError(
                f"the chat template of {tokenizer.name_or_path!r} does not render a training conversation "
                "as the generation prompt followed by the reply; this renderer needs that to train on "
                "exactly what the app sends"
            )
        head, middle = prompt.split(_COMMENT_SENTINEL)
        before_reply, after_reply = full[len(prompt) :].split(_REPLY_SENTINEL)
        self._head_text, self._middle_text = head, middle
        # Whitespace before the comment is tokenized with it: BPE merges "\n\nGreat" differently from
        # "\n\n" + "Great", and this keeps plain comments tokenized exactly as the whole string would be.
        self._lead = head[len(head.rstrip()) :]
        head = head.rstrip()

        self._head = self._template_ids(head)
        self._middle = self._template_ids(middle)
        self._before_reply = self._template_ids(before_reply)
        end = self._template_ids(after_reply)
        if bos := tokenizer.bos_token_id:
            if self._head[:1] != [bos] and self._adds_bos():
                self._head = [bos, *self._head]
            if self._head[:2] == [bos, bos]:
                raise PromptError(
                    f"the chat template of {tokenizer.name_or_path!r} starts with two BOS tokens; "
                    "remove the literal BOS from the template or the persona"
                )
        # The end of turn is the first control token after the reply (<|im_end|>, </s>, <|eot_id|>).
        special = set(tokenizer.all_special_ids)
        eot_at = next((i for i, t in enumerate(end) if t in special), None)
        if eot_at is None:
            if tokenizer.eos_token_id is None:
                raise PromptError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-turn or EOS token")
            end, eot_at = [*end, tokenizer.eos_token_id], len(end)
        # Anything after the end-of-turn token (ChatML's trailing newline) is never generated.
        self._end = end[: eot_at + 1]
        self.end_of_turn_id: int = end[eot_at]

    def _empty_system_turn(self, user: dict[str, str]) -> list[dict[str, str]]:
        """``[an empty system message]`` where the template writes a system prompt of its own into a
        conversation without one (an empty one renders shorter), else ``[]``: templates with no
        system prompt of their own keep their rendering, and Mistral's, which has no system role
        and raises on one, keeps the persona in its first ``[INST]``."""
        plain = self.tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        empty = [{"role": "system", "content": ""}]
        try:
            emptied = self.tokenizer.apply_chat_template([*empty, user], tokenize=False, add_generation_prompt=True)
        except TemplateError:  # the template's own "roles must alternate user/assistant": no system role
            return []
        return empty if len(emptied) < len(plain) else []

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: the template's end of turn and the tokenizer's EOS."""
        ids = [self.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @property
    def prompt_parts(self) -> tuple[str, str]:
        """The prompt's text before and after the comment: ``prompt(c).text == head + c + middle``
        (what an exported Ollama template wraps around the comment)."""
        return self._head_text, self._middle_text

    def prompt(self, comment: str, examples: Sequence[tuple[str, str]] = ()) -> Prompt:
        """The generation prompt for ``comment``; ``examples`` are (comment, reply) pairs of the
        creator's that go first as earlier user/assistant turns (the persona stays in the first
        user turn, so every prompt starts with the same tokens and the persona's cache is shared)."""
        ids, text, lead = self._before_comment(examples)
        return Prompt([*ids, *self._text_ids(lead + comment), *self._middle], text + comment + self._middle_text)

    def _before_comment(self, examples: Sequence[tuple[str, str]]) -> tuple[list[int], str, str]:
        """Token ids and text of a prompt up to its last comment (the persona's head, then each
        example's comment and reply in the template's turns), and the whitespace that the last
        comment is tokenized with."""
        ids, text, lead = list(self._head), self._head_text, self._lead
        parts = self._turn_parts(len(examples)) if examples else ()
        for (comment, reply), after_comment, after_reply in zip(examples, parts[1::2], parts[2::2]):
            # Each slot is tokenized as the single-turn prompt and the training example do: a
            # comment with the whitespace before it, a reply on its own.
            ids += [*self._text_ids(lead + comment), *self._template_ids(after_comment), *self._text_ids(reply)]
            lead = after_reply[len(after_reply.rstrip()) :]
            ids += self._template_ids(after_reply.rstrip())
            text += comment + after_comment + reply + after_reply
        return ids, text, lead

    # A renderer lives as long as the replier that owns it; 16 entries bound what the cache keeps alive.
    @functools.lru_cache(maxsize=16)  # noqa: B019
    def _turn_parts(self, n: int) -> tuple[str, ...]:
        """The template's text around the slots of a conversation with ``n`` earlier turns:
        ``head, comment_0, parts[1], reply_0, parts[2], comment_1, ...`` (parts[0] is the head)."""
        messages = [*self._system, {"role": "user", "content": self.persona.fill(_slot("C", 0))}]
        for i in range(n):
            messages += [
                {"role": "assistant", "content": _slot("R", i)},
                {"role": "user", "content": _slot("C", i + 1)},
            ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = re.split("\ue000([CR]\\d+)\ue000", text)
        expected = [name for i in range(n) for name in (f"C{i}", f"R{i}")] + [f"C{n}"]
        if pieces[1::2] != expected or pieces[0] != self._head_text or pieces[-1] != self._middle_text:
            raise PromptError(
                f"the chat template of {self.tokenizer.name_or_path!r} does not render earlier turns before the "
                "persona's prompt unchanged; the creator's examples cannot go into this template as turns"
            )
        return tuple(pieces[0::2][:-1])

    def example(self, comment: str, reply: str, max_length: int, examples: Sequence[tuple[str, str]] = ()) -> Example:
        """Prompt + reply + end of turn; only the reply and the end of turn are learned.

        An example longer than ``max_length`` loses the end of its comment, never its reply or its
        end of turn, so the model still learns to stop. Raises PromptError if even the reply alone
        does not fit. ``examples``: earlier turns, as in :meth:`prompt`.
        """
        before, _, lead = self._before_comment(examples)
        comment_ids = self._text_ids(lead + comment)
        reply_ids = self._text_ids(reply)
        if not reply_ids:
            # Some tokenizers drop control characters (SmolLM2's drops most of U+0001-U+001F).
            raise PromptError(f"the reply {reply[:40]!r} has no tokens for this tokenizer; write it out in plain text")
        answer = [*self._before_reply, *reply_ids, *self._end]
        fixed = len(before) + len(self._middle) + len(answer)
        room = max_length - fixed
        if room < 1:
            turns = f" and {len(examples)} earlier turns" if examples else ""
            raise PromptError(
                f"the reply alone takes {fixed} tokens with the prompt{turns}, more than max_length={max_length}; "
                f"raise max_length{', show fewer examples' if examples else ''} or shorten the reply"
            )
        cut = max(0, len(comment_ids) - room)
        if cut:
            comment_ids = comment_ids[:room]
        prompt = [*before, *comment_ids, *self._middle]
        return Example([*prompt, *answer], [IGNORE_INDEX] * len(prompt) + answer, cut)

    def _template_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _text_ids(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _adds_bos(self) -> bool:
        """Whether the tokenizer puts a BOS in front of plain text (Llama/Mistral do, ChatML models do not)."""
        ids = self.tokenizer("a")["input_ids"]
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id


NO_TURNS_IN_SEQ2SEQ = "an encoder-decoder model has no earlier turns to show the creator's examples in"


class Seq2SeqRenderer:
    """The renderer for encoder-decoder models (FLAN-T5): the persona-filled comment is the encoder's
    input and the reply the decoder's target; there is no chat template, and the tokenizer's own EOS
    ends both. Same interface as :class:`PromptRenderer`, so data loading and training share it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, persona: Persona) -> None:
        if tokenizer.eos_token_id is None:
            raise PromptError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end the target")
        self.tokenizer = tokenizer
        self.persona = persona
        self.end_of_turn_id: int = tokenizer.eos_token_id
        self.stop_ids = [tokenizer.eos_token_id]
        head, tail = persona.fill(_COMMENT_SENTINEL).split(_COMMENT_SENTINEL)
        self._head, self._tail = self._ids(head), [*self._ids(tail), tokenizer.eos_token_id]

    def prompt(self, comment: str, examples: Sequence[tuple[str, str]] = ()) -> Prompt:
        if examples:
            raise PromptError(NO_TURNS_IN_SEQ2SEQ)
        return Prompt([*self._head, *self._ids(comment), *self._tail], self.persona.fill(comment))

    def example(self, comment: str, reply: str, max_length: int, examples: Sequence[tuple[str, str]] = ()) -> Example:
        """Encoder input (the comment cut to fit ``max_length``) and decoder labels (reply + EOS, all learned)."""
        if examples:
            raise PromptError(NO_TURNS_IN_SEQ2SEQ)
        reply_ids = self._ids(reply)
        if not reply_ids:
            raise PromptError(f"the reply {reply[:40]!r} has no tokens for this tokenizer; write it out in plain text")
        labels = [*reply_ids, self.end_of_turn_id]
        if len(labels) > max_length:
            raise PromptError(
                f"the reply takes {len(labels)} tokens, more than "
                f"max_length={max_length}; raise max_length or shorten the reply"
            )
        comment_ids = self._ids(comment)
        room = max(0, max_length - len(self._head) - len(self._tail))
        cut = max(0, len(comment_ids) - room)
        return Example([*self._head, *comment_ids[:room], *self._tail], labels, cut)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def renderer_for(
    tokenizer: PreTrainedTokenizerBase, persona: Persona, seq2seq: bool
) -> PromptRenderer | Seq2SeqRenderer:
    return Seq2SeqRenderer(tokenizer, persona) if seq2seq else PromptRenderer(tokenizer, persona)
