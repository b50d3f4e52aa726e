import sys

from .cli import main

# vLLM starts its engine in spawned processes, which import the main module again (as __mp_main__).
if __name__ == "__main__":
    sys.exit(main())
