"""`python -m csrtool ...` (and `torchrun ... -m csrtool train-dict ...`): the csrtool command line."""

from csrtool.cli import main

if __name__ == "__main__":
    main()
