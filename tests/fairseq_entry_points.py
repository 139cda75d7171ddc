"""fairseq's own Python entry points, called as fairseq's tests call them: with an argparse
Namespace built by fairseq's parsers. Each step is one command line; steps are separated by
"--then", and all run in this one process:

    python tests/fairseq_entry_points.py train ARGS... --then eval_lm ARGS... --then generate ARGS...

``--user-dir fairseq_base`` among a step's ARGS imports the plugin, as on fairseq's command line.
eval_lm prints its result as a line "eval_lm: {json}".
"""

import json
import sys

from fairseq import options


def run(command, argv):
    # Looked up when called, not imported before: the plugin replaces some of these functions.
    import fairseq_cli.eval_lm
    import fairseq_cli.generate
    import fairseq_cli.train
    from fairseq.distributed import utils as distributed_utils
    if command == "train":
        fairseq_cli.train.main(options.parse_args_and_arch(options.get_training_parser(), argv))
    elif command == "eval_lm":
        results = fairseq_cli.eval_lm.main(options.parse_args_and_arch(options.get_eval_lm_parser(), argv))
        print("eval_lm: " + json.dumps({key: float(value) for key, value in results.items()}), flush=True)
    elif command == "generate":
        fairseq_cli.generate.main(options.parse_args_and_arch(options.get_generation_parser(), argv))
    elif command == "distributed_init":
        args = options.parse_args_and_arch(options.get_training_parser(), argv)
        print(f"distributed_init: rank {distributed_utils.distributed_init(args)}", flush=True)
    else:
        raise SystemExit(f"unknown step {command!r}")


def steps(argv):
    step = []
    for arg in argv + ["--then"]:
        if arg == "--then":
            yield step[0], step[1:]
            step = []
        else:
            step.append(arg)


if __name__ == "__main__":
    for command, argv in steps(sys.argv[1:]):
        run(command, argv)
