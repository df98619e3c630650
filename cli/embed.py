"""`llmp embed DEPLOYMENT TEXT...`: embeddings from a deployment of an encoder model, through the gateway's
OpenAI-compatible `POST /openai/v1/embeddings`.

A line per text for people (its tokens aside, the vector's size, its L2 norm and first values); `--json`
prints the vectors as the API returns them, for scripts. `-` reads the texts from stdin, one per line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from cli.client import ApiError, Client

HEAD = 4  # values of each vector the summary shows


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text == ["-"]:
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return args.text


def embed(args: argparse.Namespace) -> int:
    texts = _texts(args)
    try:
        answer = Client(args.url, args.key).call("POST", "/openai/v1/embeddings",
                                                 {"model": args.deployment, "input": texts})
    except ApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer))
        return 0
    print(f"{len(answer['data'])} embeddings from {answer['model']} ({answer['usage']['prompt_tokens']} tokens)")
    for item, text in zip(answer["data"], texts, strict=True):
        vector = item["embedding"]
        head = ", ".join(f"{value:.4f}" for value in vector[:HEAD])
        norm = math.sqrt(sum(value * value for value in vector))
        print(f"{item['index']}  dims={len(vector)}  norm={norm:.4f}  [{head}, ...]  {text[:40]!r}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("embed", help="embed texts with a deployment of an encoder model")
    parser.add_argument("deployment", help="deployment name")
    parser.add_argument("text", nargs="+", help="texts to embed ('-': one per line from stdin)")
    parser.add_argument("--url", help="gateway URL (default LLMP_URL or http://127.0.0.1:8080)")
    parser.add_argument("--key", help="API key (default LLMP_API_KEY, LLMP_ADMIN_KEY or .llmp/admin.key)")
    parser.add_argument("--json", action="store_true", help="print the API's answer (the vectors) as JSON")
    parser.set_defaults(func=embed)
