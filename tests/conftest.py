import sys
from pathlib import Path

# tests import the float64 reference as a plain module
sys.path.insert(0, str(Path(__file__).parent))
