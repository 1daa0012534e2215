import sys

from llmk_lab.report.cli import main

sys.exit(main())
