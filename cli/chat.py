"""`llmp chat DEPLOYMENT`: a conversation with a deployment in the terminal, through the gateway's
OpenAI-compatible `POST /openai/v1/chat/completions` with `stream: true`.

Each answer is printed token by token as the Server-Sent Events arrive, and the whole conversation goes
with every turn (the model sees what was said before). At a terminal it prompts `you> `; otherwise it
reads one message per line of stdin, which makes it scriptable (`printf 'hi\nand then?\n' | llmp chat d`).
End of input ends the conversation (exit 0); Ctrl-C too (exit 130), whether at the prompt or mid-answer.
`/reset` forgets the conversation so far (the system message stays).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

from cli.client import ApiError, Client

CHAT_PATH = "/openai/v1/chat/completions"
RESET = "/reset"
INTERRUPTED = 130  # the shell's code for a program ended by SIGINT


class Conversation:
    """The messages so far, and one streamed turn at a time."""

    def __init__(self, client: Client, deployment: str, *, system: str = "", temperature: float = 0.7,
                 max_tokens: int = 256, seed: int | None = None) -> None:
        self.client, self.deployment = client, deployment
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []
        self.options: dict = {"temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            self.options["seed"] = seed

    def reset(self) -> None:
        self.history.clear()

    def ask(self, text: str) -> Iterator[str]:
        """The answer's pieces as they arrive; the turn joins the history only once the answer is whole,
        so an interrupted or failed answer leaves the conversation as it was."""
        messages = [*self.system, *self.history, {"role": "user", "content": text}]
        body = {"model": self.deployment, "messages": messages, "stream": True, **self.options}
        pieces: list[str] = []
        for chunk in self.client.events(CHAT_PATH, body, method="POST"):
            if "error" in chunk:  # an error after the stream began comes as an event of OpenAI's shape
                error = chunk["error"]
                raise ApiError(0, error.get("type") or "stream", error.get("message", ""))
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    pieces.append(piece)
                    yield piece
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


def _lines(stdin: TextIO, interactive: bool) -> Iterator[str]:
    """The user's messages: prompted for at a terminal, else one per line of input."""
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            line = stdin.readline()
            if not line:
                return
        yield line.strip()


def run(conversation: Conversation, stdin: TextIO, stdout: TextIO, interactive: bool) -> int:
    for line in _lines(stdin, interactive):
        if not line:
            continue
        if line == RESET:
            conversation.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        try:
            for piece in conversation.ask(line):
                stdout.write(piece)
                stdout.flush()
        except ApiError as error:
            stdout.write("\n")
            print(f"error: {error}", file=sys.stderr)
            if not interactive:
                return 1  # a script should not go on as if the turn had been answered
            continue
        stdout.write("\n")
        stdout.flush()
    return 0


def chat(args) -> int:
    client = Client(args.url, args.key, timeout=args.timeout)
    conversation = Conversation(client, args.deployment, system=args.system, temperature=args.temperature,
                                max_tokens=args.max_tokens, seed=args.seed)
    try:
        return run(conversation, sys.stdin, sys.stdout, sys.stdin.isatty())
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return INTERRUPTED


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("chat", help="chat with a deployment (streamed; reads stdin lines when piped)")
    parser.add_argument("deployment", help="deployment name")
    parser.add_argument("--system", default="", help="a system message opening the conversation")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=256, help="at most this many tokens per answer")
    parser.add_argument("--seed", type=int, help="sample reproducibly")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the next token")
    parser.add_argument("--url", help="gateway URL (default LLMP_URL or http://127.0.0.1:8080)")
    parser.add_argument("--key", help="API key (default LLMP_API_KEY, LLMP_ADMIN_KEY or .llmp/admin.key)")
    parser.set_defaults(func=chat)
