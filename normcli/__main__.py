from normcli.cli import run

run()
