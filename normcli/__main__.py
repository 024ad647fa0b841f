"""python -m normcli: the same entry point as the `normcli` command."""

from normcli.entry import run

run()
