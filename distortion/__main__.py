import sys

from distortion.cli import main

sys.exit(main())
