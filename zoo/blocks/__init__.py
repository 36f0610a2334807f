"""Built-in blocks. Importing this package registers each family with `zoo.registry`."""
from zoo.blocks import (attention, conv, delta, infini, lightning, mamba, parallel, passthrough, rglru,  # noqa: F401
                        selective, taipan)
