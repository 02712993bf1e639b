"""``python -m appliance`` is the same as the ``appliance`` command."""

import sys


def run() -> None:
    """The ``appliance`` command. Ctrl-C while its modules still load ends
    it with one line and exit status 130, as Ctrl-C in a command does,
    rather than with the traceback of whatever was being imported."""
    try:
        from appliance.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted before the command started\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
