"""Every option the plugin adds to fairseq, with its Hydra key, default and help:

    python -m fairseq_base.options            # a markdown table (the README's)
    python -m fairseq_base.options --text     # one option per paragraph, for a terminal

fairseq prints ``--help`` before it adds a model's options, so ``fairseq-train --arch
transformer_lm_base --help`` does not list them; this does.
"""

import argparse
import dataclasses
import os
import sys
from typing import Iterator, List, Tuple

from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBaseConfig


def model_fields() -> List[dataclasses.Field]:
    """The fields of transformer_lm_base's config that fairseq's transformer_lm lacks."""
    return [field for field in dataclasses.fields(TransformerLanguageModelBaseConfig) if field.name.startswith("base_")]


def plugin_options() -> Iterator[Tuple[str, str, str, str]]:
    """(command-line option, Hydra key, default, help) of each option of transformer_lm_base that
    fairseq's transformer_lm lacks."""
    for field in model_fields():
        shown = '""' if field.default == "" else str(field.default)
        yield f"--{field.name.replace('_', '-')}", f"model.{field.name}", shown, field.metadata["help"]


def table() -> str:
    rows = ["| option | Hydra key | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{option}` | `{key}` | {default} | {text} |" for option, key, default, text in plugin_options()]
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_base.options", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", action="store_true", help="plain text instead of a markdown table")
    args = parser.parse_args(argv)
    if args.text:
        text = "\n".join(f"{option} ({key}, default {default})\n    {meaning}\n"
                         for option, key, default, meaning in plugin_options())
    else:
        text = table()
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. `| head`, which has read what it wanted: no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
