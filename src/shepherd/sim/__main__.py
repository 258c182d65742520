"""``python -m shepherd.sim``: run the simulator without the ``shepherd`` CLI."""

import argparse
import sys

from shepherd.sim.server import add_sim_arguments, run_sim


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m shepherd.sim", description="Simulated SGLang workers")
    add_sim_arguments(parser)
    return run_sim(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
