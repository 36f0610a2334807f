"""Built-in blocks. Importing this package registers each family with `zoo.registry`."""
from zoo.blocks import (attention, conv, delta, infini, lightning, mamba, mlstm, parallel, passthrough,  # noqa: F401
                        rglru, selective, taipan)
