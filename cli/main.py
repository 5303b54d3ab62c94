"""The `dsq` command line. Every command turns a DsqError into one red line on stderr and exit code 1."""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console

from dsq.cli.quantize import quantize
from dsq.errors import DsqError

app = typer.Typer(
    help="dsq: quantized DeepSeek-V2 / V2-Lite inference (FP8 W8A8 + INT4 experts).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def command(fn: F) -> F:
    """Register a command whose bad input ends in one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DsqError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            sys.exit(130)

    return app.command()(wrapper)


ModelArg = Annotated[str, typer.Argument(help="A model folder or a Hugging Face Hub repo id (owner/name).")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")]  # noqa: UP045
TP = Annotated[int, typer.Option("--tp", min=1, help="Split the model over N ranks (a GPU each with cuda, "
                                                     "processes on cpu): tensor + expert parallel.")]


@command
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="The text to complete (with --ids: token ids, e.g. '1 2 3').")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples more freely.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 turns it off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0 turns it off).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,  # noqa: UP045
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop at this string (repeatable).")] = None,  # noqa: UP045
    ids: Annotated[bool, typer.Option("--ids", help="Take and print token ids instead of text.")] = False,
    device: Device = "cpu",
    revision: Revision = None,
    tp: TP = 1,
) -> None:
    """Complete a prompt and print the completion as it is generated."""
    params = dict(locals())
    from dsq import load_quantized
    from dsq.launch import launch
    from dsq.tokenizer import TextStream

    if ids:
        try:
            prompt_ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise DsqError(f"--prompt {prompt!r}: with --ids, give whitespace-separated integers") from None
    if tp > 1 and launch(tp, generate, params):  # ran this command on tp ranks; rank 0 printed
        return
    with console.status("loading model"):
        m = load_quantized(model, device=device, revision=revision, tp=tp)
    if ids:
        out = m.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, seed=seed)
        console.print(" ".join(map(str, out)), highlight=False)
        return
    if m.tokenizer is None:
        raise DsqError(f"{model}: no tokenizer.json; pass token ids with --ids")
    stream = TextStream(m.tokenizer)
    text = m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      seed=seed, stop=stop, on_token=lambda _, t: None if stop else print(stream.push(t), end="",
                                                                                           flush=True))
    print(text if stop else "")


@command
def chat(
    model: ModelArg,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,  # noqa: UP045
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per reply.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples more freely.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 turns it off).")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0 turns it off).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,  # noqa: UP045
    context: Annotated[int, typer.Option(min=16, help="Context length in tokens (cache size).")] = 4096,
    device: Device = "cpu",
    revision: Revision = None,
    tp: TP = 1,
) -> None:
    """Chat with a model in the terminal, in its chat template; the reply streams as it is generated."""
    params = dict(locals())
    from dsq import load_quantized
    from dsq.chat import run_chat
    from dsq.generate import Sampling
    from dsq.launch import launch, terminal

    sampling = Sampling(temperature, top_k, top_p)
    if tp > 1 and launch(tp, chat, params):  # ran this command on tp ranks; rank 0 read and printed
        return
    with console.status("loading model"):
        m = load_quantized(model, device=device, revision=revision, max_seq_len=context, tp=tp)
    with terminal(console, m.net.dist) as term:  # on N ranks: rank 0 reads, the others follow
        run_chat(m, sampling, max_new_tokens, context, system, seed, term)


@command
def inspect(model: ModelArg, revision: Revision = None) -> None:
    """Print a checkpoint's config, its quantization scheme, and parameters and bytes by role."""
    from dsq.inspect import describe

    describe(model, revision, console)


@command
def demo(
    folder: Annotated[Optional[Path], typer.Option("--dir", help="Where to write the demo checkpoint "  # noqa: UP045
                                                   "(default: a temporary folder, removed afterwards).")] = None,
    device: Device = "cpu",
) -> None:
    """Run dsq end to end on a tiny random-weight DeepSeek-V2: no GPU, no download."""
    from dsq.demo import run_demo

    if folder is not None:
        run_demo(folder, device, console)
        return
    with tempfile.TemporaryDirectory(prefix="dsq-demo-") as tmp:
        run_demo(Path(tmp), device, console)


command(quantize)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
