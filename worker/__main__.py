"""`python -m worker` is `dnd-client`."""

from worker.cli.main import main

main()
