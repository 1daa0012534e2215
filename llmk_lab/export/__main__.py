import sys

from llmk_lab.export.cli import main

sys.exit(main())
