"""`python -m jif.bench`: see jif/bench/cli.py."""

from jif.bench.cli import main

main()
