"""`python -m flashlm`: the same as the `flashlm` command."""

from flashlm.cli import main

if __name__ == "__main__":
    main()
