#!/usr/bin/env python3
"""fairseq-train in which every BASE layer runs only its first local expert's FFN sublayer on
every token: a BASE layer's extra FLOPs without routing or all-to-all.

For scripts/bench_e2e.py (and, through ``ffn_only_forward``, scripts/bench_layer_workers.py)
only, as the lower bound on what a BASE layer can cost; not a model.
"""

import os
import sys


def ffn_only_forward(self, x, *args, **kwargs):
    """BaseLayer.forward without routing: x + the first local expert's FFN(x), for every token."""
    tokens = x.reshape(-1, x.size(-1))
    every_token_to_the_first = [tokens.size(0)] + [0] * (self.experts.num_experts - 1)
    return (tokens + self.experts(tokens, every_token_to_the_first)).view_as(x), None, None


if __name__ == "__main__":
    from fairseq_cli.train import cli_main  # first: it sets up fairseq's log format

    # The package that --user-dir names (this repository's), even if another copy is installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fairseq_base.layer import BaseLayer

    BaseLayer.forward = ffn_only_forward
    cli_main()
