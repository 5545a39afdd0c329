import sys

from keras_ckpt.cli import main

sys.exit(main())
