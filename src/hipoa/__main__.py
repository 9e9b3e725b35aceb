"""`python -m hipoa`: the same as the `hipoa` command (the workflow's rules run it this way)."""

from hipoa.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
