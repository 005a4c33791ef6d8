import sys

from fakedet.cli import main

sys.exit(main())
