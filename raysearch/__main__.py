"""``python -m raysearch``: the ``raysearch`` command, for an environment whose scripts folder
is not on ``PATH`` (a venv not activated, a notebook's kernel)."""

import sys

from raysearch.cli import main

if __name__ == "__main__":  # importing the module (tools, the layout test) runs nothing
    sys.exit(main())
