import sys

from ebpf_telemetry.cli import main

sys.exit(main())
