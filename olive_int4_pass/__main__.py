import sys

from olive_int4_pass.cli import main

sys.exit(main())
