import sys
from pathlib import Path

# tests import the small graph helpers in this folder
sys.path.insert(0, str(Path(__file__).parent))
