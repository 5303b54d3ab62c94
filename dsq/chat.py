"""Multi-turn chat: a session whose turns continue their cache through the engine's prefix reuse, and the
terminal loop of `dsq chat`."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator

from rich.console import Console

from dsq.api import Model
from dsq.engine import SamplingParams
from dsq.errors import DsqError
from dsq.memory import CONTEXT
from dsq.parallel import Interrupt
from dsq.tokenizer import TextStream

HELP = """/system TEXT  set the system prompt (starts a new conversation)
/clear        forget the conversation
/exit         leave (or Ctrl-D)
/help         this help
A pasted block of lines is one message; or end a line with a backslash (\\) to continue it on the next line.
Ctrl-C stops a reply; the conversation keeps what was said."""
PROMPT, MORE = "[bold green]> [/]", "[green]. [/]"
REPLY = SamplingParams(max_tokens=512)  # greedy, up to 512 tokens: a reply's default


class ChatConsole(Console):
    """A rich console whose input() lets readline draw the prompt: rich printing the prompt itself leaves readline
    thinking the line starts at column 0, so recalling history wipes the `> `. The prompt's escape codes are
    wrapped in \\001..\\002, readline's markers for text of no width."""

    def input(self, prompt: str = "", **_: object) -> str:
        with self.capture() as capture:
            self.print(prompt, end="")
        text = capture.get()
        Interrupt.reading = True  # a Ctrl-C now is raised at once, also on N ranks (dsq.launch.terminal)
        try:
            return input(re.sub(r"(\x1b\[[0-9;]*m)", "\x01\\1\x02", text) if sys.stdin.isatty() else text)
        finally:
            Interrupt.reading = False


class ChatSession:
    """A conversation whose tokens stay in the engine's cache: the pages of the full blocks it shares with the
    previous turn (system prompt, earlier turns) are reused, so a turn mostly runs the tokens not seen before."""

    def __init__(self, model: Model, context: int = CONTEXT, system: str | None = None):
        if model.tokenizer is None:
            raise DsqError(f"{model.folder}: no tokenizer.json, so chat is not possible")
        if context > model.max_seq_len:
            raise DsqError(f"context {context} is above the model's maximum of {model.max_seq_len} tokens")
        self.model, self.context = model, context
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.dropped = 0  # turns dropped to fit the context
        self.stats = {"tokens": 0, "seconds": 0.0, "cut": False}  # cut: the reply reached max_new_tokens

    def clear(self, system: str | None = None) -> None:
        self.system, self.messages = system, []

    def _conversation(self, add_generation_prompt: bool = True, messages: list[dict[str, str]] | None = None
                      ) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.model.tokenizer.encode_chat(head + (self.messages if messages is None else messages),
                                                add_generation_prompt)

    def _prompt(self, max_new_tokens: int) -> list[int]:
        """The conversation's tokens, dropping the oldest turns (never the system prompt) until the reply fits.
        A message that does not fit even alone is refused, and the conversation stays as it was."""
        alone = len(self._conversation(messages=self.messages[-1:]))
        if alone + max_new_tokens > self.context:
            self.messages.pop()
            raise DsqError(f"the message ({alone} tokens) and its reply ({max_new_tokens}) do not fit the context "
                           f"of {self.context} tokens; shorten it, or ask for fewer tokens or a longer context")
        while True:
            ids = self._conversation()
            if len(ids) + max_new_tokens <= self.context:
                return ids
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
            self.dropped += 1

    def reply(self, text: str, sampling: SamplingParams = REPLY) -> Iterator[str]:
        """Stream the assistant's reply to `text`, of at most `sampling.max_tokens` tokens. Closing the iterator
        early keeps the partial reply."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt(sampling.max_tokens)
        stream, answer = TextStream(self.model.tokenizer), ""
        t0, n, eos = time.perf_counter(), 0, True
        try:
            for token in self.model.stream(ids, sampling):
                n += 1
                piece = stream.push(token)
                answer += piece
                yield piece
            eos = n < sampling.max_tokens
        finally:
            self.messages.append({"role": "assistant", "content": answer.strip()})
            self.stats = {"tokens": n, "seconds": time.perf_counter() - t0, "cut": n == sampling.max_tokens and not eos}

    @property
    def used(self) -> int:
        """Tokens the conversation holds, as the next turn will send them (system prompt, turns, template)."""
        return len(self._conversation(add_generation_prompt=False))


def read_message(console: Console) -> str:
    """One message: a line, a pasted block (readline's bracketed paste keeps its newlines), or lines joined
    while they end with a backslash."""
    lines = [console.input(PROMPT)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(console.input(MORE))
    return "\n".join(lines).strip()


def run_chat(model: Model, sampling: SamplingParams, context: int, system: str | None, console: Console) -> None:
    """The interactive loop: read a message, stream the reply, show speed and context use. A turn that fails
    (a message too long for the context, a model producing NaN) says so and the session goes on."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (arrow-key editing, history and bracketed paste for input())
    session = ChatSession(model, context, system)
    console.print(f"[bold]dsq chat[/] {model.folder.name} · context {session.context} tokens · "
                  f"up to {sampling.max_tokens} tokens a reply · /help for commands", highlight=False)
    console.print(f"[dim]template: {model.tokenizer.template_source}[/]", highlight=False)
    if system:
        console.print(f"system: {system}", style="dim", markup=False, highlight=False)
    while True:
        try:
            line = read_message(console)
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim](/exit or Ctrl-D to leave)[/]")
            continue
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/exit":
                return
            if cmd == "/clear":
                session.clear(session.system)
                console.print("[dim]conversation cleared[/]")
            elif cmd == "/system":
                session.clear(arg.strip() or None)
                console.print(f"[dim]system prompt {'set' if arg.strip() else 'removed'}; new conversation[/]")
            elif cmd == "/help":
                console.print(HELP, markup=False, highlight=False)
            else:
                console.print(f"[red]unknown command {cmd}[/]; /help lists them")
            continue
        dropped = session.dropped
        pieces = session.reply(line, sampling)
        try:
            for piece in pieces:
                console.print(piece, end="", markup=False, highlight=False)
        except KeyboardInterrupt:
            pieces.close()
            console.print("\n[yellow]reply stopped[/]", end="")
        except DsqError as e:
            console.print(f"\nerror: {e}", style="red", markup=False, highlight=False)
            continue
        s = session.stats
        if s["cut"]:
            console.print(f"\n[yellow](cut at {sampling.max_tokens} tokens: --max-new-tokens)[/]", end="",
                          highlight=False)
        console.print(f"\n[dim]{s['tokens']} tokens · {s['tokens'] / max(s['seconds'], 1e-9):.1f} tok/s · "
                      f"context {session.used}/{session.context}[/]", highlight=False)
        if session.dropped > dropped:
            console.print(f"[yellow]context full: dropped the {session.dropped - dropped} oldest turn(s)[/]")
