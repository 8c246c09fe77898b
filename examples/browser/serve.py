"""Serve an exported folder with this page on loopback: ``python examples/browser/serve.py out/minilm-8x``.

The same as ``python -m embfactor.export.serve FOLDER [--port 8000]``; see src/embfactor/export/serve.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # a checkout without `pip install -e .`

from embfactor.export.serve import main

if __name__ == "__main__":
    main()
