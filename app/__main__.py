"""`python -m app [--host H] [--port P] [--auth USER:PASSWORD | --users FILE] [--data-root D] [--prior-dir P]`: same as `dreambooth-lora serve`."""

import sys

from dreambooth_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
