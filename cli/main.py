"""The `dsq` command line. Every error, a usage error or bad input, is one red line on stderr: exit code 2 for
usage (click's convention), 1 for a DsqError. Flags are checked before a model is loaded."""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from dsq.api import check_device
from dsq.cli.flags import (
    TP,
    Device,
    ModelArg,
    Revision,
    Seed,
    Threads,
    model_config,
    sampling,
    use_threads,
)
from dsq.cli.quantize import quantize
from dsq.errors import DsqError
from dsq.memory import CONTEXT

err = Console(stderr=True)
clicks = sys.modules[typer.BadParameter.__module__]  # click's exceptions, from click or from typer's copy of it


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


class Group(TyperGroup):
    """Runs click in non-standalone mode so that its usage errors print as one line, like a DsqError."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except getattr(clicks, "NoArgsIsHelpError", ()) as e:  # plain `dsq`: the help, as click prints it
            print(e.format_message())
            sys.exit(e.exit_code)
        except clicks.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            fail(e.format_message().replace("\n", " ") + hint, e.exit_code)
        except clicks.ClickException as e:
            fail(e.format_message().replace("\n", " "), e.exit_code)
        except typer.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=Group,
    help="dsq: quantized DeepSeek-V2 / V2-Lite inference (FP8 W8A8 + INT4 experts).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags show no value type, as click and typer conventions have it
)
console = Console()
F = TypeVar("F", bound=Callable)


def show_version(value: bool) -> None:
    if value:
        from dsq import __version__

        print(f"dsq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """dsq: quantized DeepSeek-V2 / V2-Lite inference (FP8 W8A8 + INT4 experts)."""


def command(fn: F) -> F:
    """Register a command whose bad input ends in one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DsqError as e:
            fail(str(e), 1)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            sys.exit(130)

    return app.command()(wrapper)


@command
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="The text to complete (with --ids: token ids, e.g. '1 2 3').")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples more freely.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 turns it off).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0 turns it off).")] = 0,
    seed: Seed = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop at this string (repeatable).")] = None,  # noqa: UP045
    ids: Annotated[bool, typer.Option("--ids", help="Take and print token ids instead of text.")] = False,
    device: Device = "cpu",
    revision: Revision = None,
    tp: TP = 1,
    threads: Threads = None,
) -> None:
    """Complete a prompt and print the completion as it is generated (defaults as Model.generate's)."""
    sampling(temperature, top_p, top_k, seed, max_new_tokens, stop)
    check_device(device, cli=True)
    if ids:
        try:
            prompt_ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise DsqError(f"--prompt {prompt!r}: with --ids, give whitespace-separated integers") from None
    use_threads(threads, tp)
    folder, _ = model_config(model, revision)
    from dsq import load_quantized
    from dsq.launch import check_tp
    from dsq.tokenizer import TextStream

    if tp > 1:
        check_tp(tp, folder, device)
    with console.status("loading model"):  # on --tp N this process is rank 0 and starts the others
        m = load_quantized(folder, device=device, tp=tp)
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
    temperature: Annotated[float, typer.Option(help="0 is greedy; higher samples more freely (Model.chat's "
                                                    "default is 0).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 turns it off; Model.chat's default "
                                              "is 1).")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0 turns it off).")] = 0,
    seed: Seed = None,
    context: Annotated[int, typer.Option(min=16, help="Context length in tokens (cache size).")] = CONTEXT,
    chat_template: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        metavar="FILE", help="A jinja chat template to use instead of the checkpoint's.")] = None,
    device: Device = "cpu",
    revision: Revision = None,
    tp: TP = 1,
    threads: Threads = None,
) -> None:
    """Chat with a model in the terminal, in its chat template; the reply streams as it is generated."""
    params = sampling(temperature, top_p, top_k, seed, max_new_tokens)
    check_device(device, cli=True)
    if max_new_tokens >= context:
        raise DsqError(f"--max-new-tokens {max_new_tokens} leaves no room for a message in --context {context}; "
                       "ask for fewer tokens or raise --context")
    if chat_template is not None:
        try:
            chat_template.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DsqError(f"--chat-template {chat_template}: cannot be read ({e.__class__.__name__})") from None
    use_threads(threads, tp)
    folder, cfg = model_config(model, revision)
    if context > cfg.max_position_embeddings:
        raise DsqError(f"--context {context} is above this model's maximum of {cfg.max_position_embeddings} "
                       "tokens (max_position_embeddings); give a smaller --context")
    from dsq import load_quantized
    from dsq.chat import ChatConsole, run_chat
    from dsq.launch import check_tp, terminal
    from dsq.tokenizer import Tokenizer

    if tp > 1:
        check_tp(tp, folder, device)
    with console.status("loading model"):  # on --tp N this process is rank 0 and starts the others
        m = load_quantized(folder, device=device, max_seq_len=context, tp=tp)
    if chat_template is not None and m.tokenizer is not None:
        m.tokenizer = Tokenizer(folder, chat_template=chat_template)
    with terminal(m.net.dist):  # on N ranks a Ctrl-C mid-reply waits for the step's end
        run_chat(m, params, context, system, ChatConsole())


@command
def inspect(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A model folder, a Hub repo id (owner/name), or a "
                                         "preset (deepseek-v2-lite, deepseek-v2) to plan before downloading.")],
    revision: Revision = None,
) -> None:
    """Print a checkpoint's config, its quantization scheme, and parameters and bytes by role; for a preset,
    the bytes of every scheme and which GPUs fit which context."""
    from dsq.config import PRESETS
    from dsq.inspect import describe, describe_preset

    if model in PRESETS:
        describe_preset(model, console)
    else:
        describe(model, revision, console)


@command
def demo(
    folder: Annotated[Optional[Path], typer.Option("--dir", metavar="DIR", help="Keep the demo checkpoints "  # noqa: UP045
                                                   "in DIR (default: a temporary folder, removed afterwards).")] = None,
    device: Device = "cpu",
    threads: Threads = None,
) -> None:
    """Run dsq end to end on a tiny random-weight DeepSeek-V2: no GPU, no download."""
    from dsq.demo import run_demo

    check_device(device, cli=True)
    use_threads(threads, 1)
    if folder is not None:
        run_demo(folder, device, console, keep=True)
        return
    with tempfile.TemporaryDirectory(prefix="dsq-demo-") as tmp:
        run_demo(Path(tmp), device, console, keep=False)


@command
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    max_model_len: Annotated[Optional[int], typer.Option(  # noqa: UP045
        min=16, help=f"Longest prompt + completion in tokens (default: {CONTEXT}, at most the model's).")] = None,
    kv_cache_dtype: Annotated[str, typer.Option(help="The latent cache's layout: fp8, bf16 or fp32.")] = "fp8",
    gpu_memory_utilization: Annotated[float, typer.Option(
        help="Share of the GPU's memory dsq may use; the cache takes what weights leave.")] = 0.9,
    served_model_name: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The model name clients ask for (default: the model argument).")] = None,
    api_key: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Require 'Authorization: Bearer KEY' on /v1 requests.")] = None,
    device: Device = "cpu",
    revision: Revision = None,
    tp: TP = 1,
    threads: Threads = None,
) -> None:
    """Serve a model over the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions) with continuous
    batching; SIGINT or SIGTERM stops it."""
    from dsq.cli.serve import check_flags, run_serve

    check_flags(kv_cache_dtype, gpu_memory_utilization, host, port)
    check_device(device, cli=True)
    use_threads(threads, tp)
    folder, cfg = model_config(model, revision)
    run_serve(folder, cfg, model, host, port, max_model_len, kv_cache_dtype, gpu_memory_utilization,
              served_model_name or model, api_key, device, tp, console)


command(quantize)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
