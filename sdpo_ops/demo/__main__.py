import sys

from sdpo_ops.demo.cli import main

sys.exit(main())
