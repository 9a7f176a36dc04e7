"""Run the charrnn command from a checkout: ``python cli.py --help``."""
from charrnn.cli import main

if __name__ == "__main__":
    main()
