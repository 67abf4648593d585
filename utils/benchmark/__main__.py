import sys

from utils.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
