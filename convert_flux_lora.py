"""Convert FLUX.1 / Chroma LoRA files between sd-scripts' and ai-toolkit's / diffusers' formats.

The user's guide names this script at the repository root; sd-scripts keeps it in
``networks/convert_flux_lora.py``. Both run the same code: see that module for the options.
"""

import sys

from networks.convert_flux_lora import convert_file, main, setup_parser  # noqa: F401  (the public entry points)

if __name__ == "__main__":
    sys.exit(main())
