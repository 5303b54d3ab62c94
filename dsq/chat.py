"""Multi-turn chat: a session that keeps the latent cache between turns, and the terminal loop of `dsq chat`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console

from dsq.api import Model
from dsq.errors import DsqError
from dsq.generate import GREEDY, Sampling, steps
from dsq.tokenizer import TextStream

HELP = """/system TEXT  set the system prompt (starts a new conversation)
/clear        forget the conversation
/exit         leave (or Ctrl-D)
/help         this help
Ctrl-C stops a reply; the conversation keeps what was said."""


class ChatSession:
    """A conversation whose tokens stay in the cache: each turn only runs the tokens not seen before."""

    def __init__(self, model: Model, context: int = 4096, system: str | None = None):
        if model.tokenizer is None:
            raise DsqError(f"{model.folder}: no tokenizer.json, so chat is not possible")
        self.model, self.context = model, min(context, model.max_seq_len)
        self.system = system
        self.cache = model.net.new_cache(1, self.context)
        self.messages: list[dict[str, str]] = []
        self.cached: list[int] = []  # the tokens whose latents sit in the cache, in order
        self.dropped = 0  # turns dropped to fit the context
        self.stats = {"tokens": 0, "seconds": 0.0}

    def clear(self, system: str | None = None) -> None:
        self.system, self.messages, self.cached = system, [], []

    def _prompt(self, max_new_tokens: int) -> list[int]:
        """The conversation's tokens, dropping the oldest turns (never the system prompt) until the reply fits."""
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.model.tokenizer.encode_chat(head + self.messages)
            if len(ids) + max_new_tokens <= self.context:
                return ids
            if len(self.messages) <= 1:
                raise DsqError(f"the message ({len(ids)} tokens) and its reply ({max_new_tokens}) do not fit the "
                               f"context of {self.context} tokens; shorten it or raise --context")
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
            self.dropped += 1

    def reply(self, text: str, sampling: Sampling = GREEDY, max_new_tokens: int = 512,
              seed: int | None = None) -> Iterator[str]:
        """Stream the assistant's reply to `text`. Closing the iterator early keeps the partial reply."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt(max_new_tokens)
        reuse = 0
        while reuse < min(len(ids) - 1, len(self.cached)) and ids[reuse] == self.cached[reuse]:
            reuse += 1  # at least one new token is run, to get the next-token logits
        self.cached = ids[:reuse]
        stream, answer = TextStream(self.model.tokenizer), ""
        t0, n = time.perf_counter(), 0
        try:
            for (token,) in steps(self.model.net, [ids[reuse:]], max_new_tokens, sampling, seed, self.context,
                                  cache=self.cache, start=[reuse], graphs=self.model.graphs):
                if n == 0:
                    self.cached = list(ids)
                n += 1
                self.cached.append(token)
                if token == self.model.cfg.eos_token_id:
                    break
                piece = stream.push(token)
                answer += piece
                yield piece
        finally:
            self.cached = self.cached[:-1] if self.cached and n else self.cached  # the last token was never run
            self.messages.append({"role": "assistant", "content": answer.strip()})
            self.stats = {"tokens": n, "seconds": time.perf_counter() - t0}

    @property
    def used(self) -> int:
        return len(self.cached)


def run_chat(model: Model, sampling: Sampling, max_new_tokens: int, context: int, system: str | None,
             seed: int | None, console: Console) -> None:
    """The interactive loop: read a line, stream the reply, show speed and context use."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (arrow-key editing and history for input())
    session = ChatSession(model, context, system)
    console.print(f"[bold]dsq chat[/] {model.folder.name} · context {session.context} tokens · "
                  "/help for commands", highlight=False)
    while True:
        try:
            line = console.input("[bold green]> [/]").strip()
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
                console.print(HELP, markup=False)
            else:
                console.print(f"[red]unknown command {cmd}[/]; /help lists them")
            continue
        dropped = session.dropped
        pieces = session.reply(line, sampling, max_new_tokens, seed)
        try:
            for piece in pieces:
                console.print(piece, end="", markup=False, highlight=False)
        except KeyboardInterrupt:
            pieces.close()
            console.print("\n[yellow]reply stopped[/]", end="")
        s = session.stats
        console.print(f"\n[dim]{s['tokens']} tokens · {s['tokens'] / max(s['seconds'], 1e-9):.1f} tok/s · "
                      f"context {session.used}/{session.context}[/]", highlight=False)
        if session.dropped > dropped:
            console.print(f"[yellow]context full: dropped the {session.dropped - dropped} oldest turn(s)[/]")
