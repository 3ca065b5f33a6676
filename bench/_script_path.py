# Imported first by each benchmark run as a file (`python bench/requests.py`):
# puts the project on sys.path and takes bench/ off it, so that `bench/requests.py`
# never shadows a module of the same name (requests, memory).

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))
